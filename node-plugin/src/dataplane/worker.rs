//! A dedicated OS thread that owns the (synchronous) netlink socket and runs
//! `nft`, so that no tokio worker ever blocks on the kernel or calls `setns`:
//! with `netns` set, the thread enters that network namespace for good (`nft`
//! and the sysctls act on the thread's namespace), opens its socket there and
//! serves every dataplane request from it (netavark's pattern). Without `netns` it stays in
//! the agent's own namespace (hostNetwork in a DaemonSet).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc;

use futures::channel::oneshot;

use super::plan::Desired;
use super::{Applied, DataplaneError};
use crate::netlink::Netlink;

enum Job {
    Apply { desired: Box<Desired>, vxlan_device: String, reply: oneshot::Sender<Result<Applied, DataplaneError>> },
    UnderlayMtu { node_ip: IpAddr, reply: oneshot::Sender<Result<Option<u32>, DataplaneError>> },
    LinkNames { reply: oneshot::Sender<Result<Vec<String>, DataplaneError>> },
}

/// Handle to the dataplane thread; dropping it stops the thread.
pub struct Worker {
    jobs: mpsc::Sender<Job>,
}

fn gone() -> DataplaneError {
    DataplaneError::Conflict("the dataplane thread stopped".into())
}

impl Worker {
    /// Starts the thread, entering `netns` (a path such as /run/netns/node-a) first when given;
    /// `proc_sys` is where it finds the forwarding sysctls (normally /proc/sys).
    pub fn spawn(netns: Option<PathBuf>, proc_sys: PathBuf) -> Result<Self, DataplaneError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), DataplaneError>>();
        std::thread::Builder::new()
            .name("carve-dataplane".into())
            .spawn(move || {
                let setup = || -> Result<Netlink, DataplaneError> {
                    if let Some(path) = &netns {
                        let enter = |source: std::io::Error| DataplaneError::Netns { path: path.clone(), source };
                        let fd = crate::netlink::open_netns(path).map_err(enter)?;
                        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(|e| enter(std::io::Error::from(e)))?;
                    }
                    Ok(Netlink::open()?)
                };
                let mut nl = match setup() {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Apply { desired, vxlan_device, reply } => {
                            let _ = reply.send(super::apply(&mut nl, &desired, &vxlan_device, &proc_sys));
                        }
                        Job::UnderlayMtu { node_ip, reply } => {
                            let _ = reply.send(nl.mtu_of_address(node_ip).map_err(DataplaneError::from));
                        }
                        Job::LinkNames { reply } => {
                            let _ = reply.send(nl.link_names().map_err(DataplaneError::from));
                        }
                    }
                }
            })
            .map_err(DataplaneError::Socket)?;
        ready_rx.recv().map_err(|_| gone())??;
        Ok(Self { jobs })
    }

    /// Reconciles the dataplane with `desired` (see [`super::apply`]).
    pub async fn apply(&self, desired: Desired, vxlan_device: &str) -> Result<Applied, DataplaneError> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Apply { desired: Box::new(desired), vxlan_device: vxlan_device.to_string(), reply };
        self.jobs.send(job).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// The names of the node's links (the pods' host veths among them).
    pub async fn link_names(&self) -> Result<Vec<String>, DataplaneError> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send(Job::LinkNames { reply }).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// MTU of the link holding `node_ip`, if any link does.
    pub async fn underlay_mtu(&self, node_ip: IpAddr) -> Result<Option<u32>, DataplaneError> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send(Job::UnderlayMtu { node_ip, reply }).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}
