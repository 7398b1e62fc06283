//! carve-cni: the main plugin. IP from the IPAM plugin of `ipam.type`
//! (normally carve-ipam, then run in this process: the spec lets a plugin
//! choose how it delegates, and it saves an exec and a second read of the
//! store per call; any other type is exec'd from CNI_PATH as libcni would),
//! then the pod's veth, /32 address and routes ([`crate::podnet`]).
//!
//! Config: `name`, `type`, `ipam` (delegated as is), optional `stateFile`
//! (node state file for the MTU; else `ipam.stateFile`, else the default;
//! `CARVE_STATE_FILE` overrides), optional `mtu` (overrides the state's),
//! optional `syncDelete` (`true`, or `CARVE_CNI_SYNC_DELETE=1`: DEL waits for
//! the kernel's whole link delete itself, see [`crate::podnet`]), optional
//! `runDir` (the exec'd IPAM's attachment claims, default [`attachment::DEFAULT_RUN_DIR`]),
//! `logLevel`, `logFile`.
//!
//! A failed ADD rolls back only what it created. An ADD for an attachment
//! that already has an address (repeated by the runtime, retried after a
//! kill, or racing the first) gets that address back from IPAM and may fail
//! on the interface the first one made: freeing it would give a live pod's
//! address to the next pod. carve-ipam says which addresses an ADD recorded;
//! for an exec'd IPAM, the first ADD of an attachment claims it in `runDir`
//! ([`attachment`]) and only the claimant rolls back.
//!
//! ```text
//!  ADD:   IPAM ADD ─▶ podnet::setup ─(fails)─▶ undo what this ADD created
//!  DEL:   delete host veth (gone = fine; detached unless syncDelete) ─▶ IPAM DEL (always)
//!  CHECK: podnet::check (address, routes) ─▶ IPAM CHECK
//!  STATUS: node state file readable (else 50) ─▶ IPAM STATUS;  GC ─▶ IPAM GC
//! ```

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::Value;

use super::{CniError, CniResult, Command, Interface, IpConfig, Plugin, Request, Route, code};
use super::{attachment, delegate};
use crate::ipam::{CarveIpam, read_state};
use crate::podnet::{self, Delete, GATEWAY_V4, GATEWAY_V6, PodNetSpec};

pub struct CarveCni;

/// Environment variable that makes DEL delete synchronously (like `syncDelete`).
pub const SYNC_DELETE_ENV: &str = "CARVE_CNI_SYNC_DELETE";

/// What a failed ADD gives back: only what it created.
enum Undo {
    /// carve-ipam's addresses this ADD recorded (none: the attachment had them before).
    Release(Vec<IpAddr>),
    /// The exec'd IPAM's allocation, claimed by this ADD: its DEL.
    Delete(attachment::Claim),
    /// An earlier ADD claimed the attachment: keep it.
    Nothing,
}

/// The IPAM plugin of `ipam.type`: carve-ipam in this process, anything else exec'd.
enum Ipam {
    InProcess,
    Exec(PathBuf),
}

impl Ipam {
    fn of(req: &Request) -> Result<Ipam, CniError> {
        let kind = ipam_type(req)?;
        if kind == CarveIpam::NAME {
            return Ok(Ipam::InProcess);
        }
        delegate::find_in_path(&kind, &req.env.path).map(Ipam::Exec)
    }

    fn name(&self) -> String {
        match self {
            Ipam::InProcess => CarveIpam::NAME.to_string(),
            Ipam::Exec(path) => path.display().to_string(),
        }
    }

    /// IPAM ADD, and how to undo what it created.
    fn add(&self, req: &Request) -> Result<(CniResult, Undo), CniError> {
        match self {
            Ipam::InProcess => {
                let grant = CarveIpam.grant(req)?;
                Ok((grant.result, Undo::Release(grant.created)))
            }
            Ipam::Exec(path) => {
                let claim = attachment::claim(&run_dir(req), &req.conf.name, &req.env.container_id, &req.env.ifname)?;
                match delegate::ipam_add(path, &req.raw) {
                    Ok(result) => Ok((result, claim.map_or(Undo::Nothing, Undo::Delete))),
                    Err(e) => {
                        // The plugin refused: nothing of this ADD to keep a claim for.
                        if let Some(claim) = claim {
                            claim.drop_claim();
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    /// Rolls back a failed ADD; logs what it could not undo (the runtime's DEL follows).
    fn undo(&self, undo: Undo, req: &Request) {
        let outcome = match undo {
            Undo::Release(created) if !created.is_empty() => CarveIpam.undo(req, &created),
            Undo::Delete(claim) => self.run(Command::Del, req).map(|()| claim.drop_claim()),
            Undo::Release(_) | Undo::Nothing => {
                tracing::warn!("ADD failed for an attachment an earlier ADD gave its address: the address stays");
                Ok(())
            }
        };
        if let Err(e) = outcome {
            tracing::error!("rolling back the IPAM allocation after a failed ADD: {e}");
        }
    }

    fn run(&self, command: Command, req: &Request) -> Result<(), CniError> {
        match self {
            Ipam::InProcess => match command {
                Command::Del => CarveIpam.del(req),
                Command::Check => CarveIpam.check(req),
                Command::Status => CarveIpam.status(req),
                Command::Gc => CarveIpam.gc(req),
                other => Err(CniError::internal(format!("IPAM {} is not delegated", other.as_str()))),
            },
            Ipam::Exec(path) => delegate::exec(path, command, &req.raw).map(drop),
        }
    }
}

fn delete_mode(req: &Request) -> Delete {
    let configured = req.conf.other.get("syncDelete").and_then(Value::as_bool).unwrap_or(false);
    let env = std::env::var(SYNC_DELETE_ENV).is_ok_and(|v| v == "1" || v == "true");
    if configured || env { Delete::Synchronous } else { Delete::Detached }
}

fn ipam_type(req: &Request) -> Result<String, CniError> {
    req.conf
        .ipam_field("type")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "network configuration has no ipam.type"))
}

fn run_dir(req: &Request) -> PathBuf {
    req.conf
        .other
        .get("runDir")
        .and_then(Value::as_str)
        .map_or_else(|| attachment::DEFAULT_RUN_DIR.into(), PathBuf::from)
}

fn netns(req: &Request) -> Result<PathBuf, CniError> {
    req.env.netns.clone().ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is required"))
}

fn spec(req: &Request, ips: Vec<IpAddr>, mtu: u32) -> Result<PodNetSpec, CniError> {
    Ok(PodNetSpec {
        netns: netns(req)?,
        ifname: req.env.ifname.clone(),
        host_ifname: podnet::host_veth_name(&req.env.container_id, &req.env.ifname),
        ips,
        mtu,
    })
}

fn gateway_for(ip: &IpAddr) -> IpAddr {
    if ip.is_ipv4() { GATEWAY_V4.into() } else { GATEWAY_V6.into() }
}

impl Plugin for CarveCni {
    const NAME: &'static str = "carve-cni";

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        // Validate before anything is allocated or created.
        let ipam = Ipam::of(req)?;
        let netns = netns(req)?;
        if !netns.exists() {
            return Err(CniError::new(code::INVALID_ENV, format!("CNI_NETNS {} does not exist", netns.display())));
        }
        let mtu = match req.conf.other.get("mtu").and_then(Value::as_u64) {
            Some(m) => m as u32,
            None => read_state(&req.conf.state_file(), code::TRY_AGAIN_LATER)?.mtu,
        };
        if !(576..=65535).contains(&mtu) {
            return Err(CniError::new(code::INVALID_CONFIG, format!("MTU {mtu} is out of range 576..65535")));
        }
        let (allocated, undo) = ipam.add(req)?;
        let ips: Vec<IpAddr> = allocated.ips.iter().map(|c| c.address.addr()).collect();
        let mut undo = Some(undo);
        let mut rollback = |e: CniError| {
            if let Some(undo) = undo.take() {
                ipam.undo(undo, req);
            }
            e
        };
        if ips.iter().filter(|ip| ip.is_ipv4()).count() > 1 || ips.iter().filter(|ip| ip.is_ipv6()).count() > 1 {
            return Err(rollback(CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM {} returned more than one address per family: {ips:?}", ipam.name()),
            )));
        }
        let spec = spec(req, ips.clone(), mtu).map_err(&mut rollback)?;
        let info = podnet::setup(&spec).map_err(|e| {
            rollback(CniError::internal(format!(
                "setting up {} in {} (host side {}): {e}",
                spec.ifname,
                spec.netns.display(),
                spec.host_ifname
            )))
        })?;
        let mut result = CniResult {
            interfaces: vec![
                Interface { name: spec.host_ifname.clone(), mac: info.host_mac, mtu: Some(mtu), sandbox: None },
                Interface {
                    name: spec.ifname.clone(),
                    mac: info.pod_mac,
                    mtu: Some(mtu),
                    sandbox: Some(spec.netns.display().to_string()),
                },
            ],
            dns: allocated.dns,
            ..Default::default()
        };
        for ip in &ips {
            let gw = gateway_for(ip);
            let len = if ip.is_ipv4() { 32 } else { 128 };
            result.ips.push(IpConfig {
                address: IpNet::new(*ip, len).expect("full-length prefix"),
                gateway: Some(gw),
                interface: Some(1),
            });
            let any: IpNet = if ip.is_ipv4() { "0.0.0.0/0".parse().unwrap() } else { "::/0".parse().unwrap() };
            result.routes.push(Route { dst: any, gw: Some(gw) });
        }
        Ok(result)
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        // Best effort: keep going, report every failure; the address is released in any case.
        let mut errors = Vec::new();
        let host = podnet::host_veth_name(&req.env.container_id, &req.env.ifname);
        if let Err(e) = podnet::delete_host_veth(&host, delete_mode(req)) {
            errors.push(format!("deleting host veth {host}: {e}"));
        }
        match Ipam::of(req) {
            Ok(ipam) => match ipam.run(Command::Del, req) {
                Ok(()) if matches!(ipam, Ipam::Exec(_)) => {
                    attachment::forget(&run_dir(req), &req.conf.name, &req.env.container_id, &req.env.ifname)
                }
                Ok(()) => {}
                Err(e) => errors.push(e.msg),
            },
            Err(e) => errors.push(e.msg),
        }
        if errors.is_empty() { Ok(()) } else { Err(CniError::internal(errors.join("; "))) }
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let prev = req
            .conf
            .prev_result
            .as_ref()
            .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK without prevResult"))?;
        let prev = CniResult::parse(prev)?;
        let ips: Vec<IpAddr> = prev.ips.iter().map(|c| c.address.addr()).collect();
        if ips.is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "prevResult has no IP address"));
        }
        let spec = spec(req, ips, 0)?;
        podnet::check(&spec)
            .map_err(|e| CniError::internal(format!("CHECK {} in {}: {e}", spec.ifname, spec.netns.display())))?;
        Ipam::of(req)?.run(Command::Check, req)
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        read_state(&req.conf.state_file(), code::NOT_AVAILABLE)?;
        let ipam = Ipam::of(req).map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))?;
        ipam.run(Command::Status, req)
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        Ipam::of(req)?.run(Command::Gc, req)
    }
}
