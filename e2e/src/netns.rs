//! carve-testkit's network namespaces ([`Netns`], re-exported), plus what
//! needs to enter one from Rust code ([`NetnsExt`], [`within`]: carve's one
//! namespace helper, `carve_node_plugin::netlink::in_netns`; only the calling
//! thread moves, and back): sockets inside a namespace, and a TCP forwarder
//! into one. A socket stays in the namespace it was created in.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub use carve_testkit::netns::{Netns, run};

/// Code and sockets inside a [`Netns`].
pub trait NetnsExt {
    /// Runs `f` with the calling thread inside this namespace, then back.
    fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T>;
    /// Runs `f` on a new thread inside this namespace.
    fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T>;
    /// A TCP listener on `addr` inside this namespace, answering one
    /// connection: it reads a line, then writes back `from <peer address>`.
    /// Returns a handle that yields the peer address it saw.
    fn tcp_echo_peer(&self, addr: SocketAddr) -> Result<std::thread::JoinHandle<Result<SocketAddr>>>;
    /// Connects from this namespace to `addr`, sends a line and returns the answer.
    fn tcp_exchange(&self, addr: SocketAddr) -> Result<String>;
}

impl NetnsExt for Netns {
    fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        within(&self.path(), f)
    }

    fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.path();
        std::thread::spawn(move || within(&path, f))
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    fn tcp_echo_peer(&self, addr: SocketAddr) -> Result<std::thread::JoinHandle<Result<SocketAddr>>> {
        let path = self.path();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || -> Result<SocketAddr> {
            let bound = within(&path, || TcpListener::bind(addr).context("bind")).and_then(|r| r);
            let listener = match bound {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            listener.set_nonblocking(true)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let (mut conn, peer) = loop {
                match listener.accept() {
                    Ok(c) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            bail!("no connection on {addr} within 20s");
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            conn.set_nonblocking(false)?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf)?;
            conn.write_all(format!("from {}\n", peer.ip()).as_bytes())?;
            Ok(peer)
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => bail!("listening on {addr} in {}: {e}", self.name),
            Err(_) => bail!("listener on {addr} in {} did not start", self.name),
        }
    }

    fn tcp_exchange(&self, addr: SocketAddr) -> Result<String> {
        self.run_in(move || -> Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).context("connect")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"hello\n")?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer.trim().to_string())
        })?
    }
}

/// Forwards TCP connections from an ephemeral port on the host's loopback to
/// `target` inside a network namespace: how the host (tests, kubectl, the
/// developer) reaches an API server that lives on the isolated underlay.
/// Each connection is dialled from a thread that entered the namespace.
pub struct TcpForwarder {
    local: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TcpForwarder {
    pub fn start(netns: &std::path::Path, target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind forwarder on 127.0.0.1")?;
        let local = listener.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ns, flag) = (netns.to_path_buf(), stop.clone());
        std::thread::Builder::new().name("carve-forwarder".into()).spawn(move || {
            for conn in listener.incoming() {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let ns = ns.clone();
                std::thread::spawn(move || {
                    let upstream =
                        within(&ns, || TcpStream::connect_timeout(&target, Duration::from_secs(5)).context("connect"))
                            .and_then(|r| r);
                    if let Ok(upstream) = upstream {
                        splice(client, upstream);
                    }
                });
            }
        })?;
        Ok(TcpForwarder { local, stop })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_millis(200));
    }
}

/// Copies both directions until either side closes.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let up = std::thread::spawn(move || {
        let (mut from, mut to) = (a2, b2);
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let (mut from, mut to) = (b, a);
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

/// Runs `f` with the calling thread in the network namespace at `path`, then back.
pub fn within<T>(path: &std::path::Path, f: impl FnOnce() -> T) -> Result<T> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    carve_node_plugin::netlink::in_netns(&ns, f).with_context(|| format!("entering {}", path.display()))
}
