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
//! the kernel's whole link delete itself, see [`crate::podnet`]), `logLevel`, `logFile`.
//!
//! ```text
//!  ADD:   IPAM ADD ─▶ podnet::setup ─(fails)─▶ IPAM DEL (roll back)
//!  DEL:   delete host veth (gone = fine; detached unless syncDelete) ─▶ IPAM DEL (always)
//!  CHECK: podnet::check (address, routes) ─▶ IPAM CHECK
//!  STATUS: node state file readable (else 50) ─▶ IPAM STATUS;  GC ─▶ IPAM GC
//! ```

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::Value;

use super::delegate;
use super::{CniError, CniResult, Command, Interface, IpConfig, Plugin, Request, Route, code};
use crate::ipam::{CarveIpam, read_state, state_file_path};
use crate::podnet::{self, Delete, GATEWAY_V4, GATEWAY_V6, PodNetSpec};

pub struct CarveCni;

/// Environment variable that makes DEL delete synchronously (like `syncDelete`).
pub const SYNC_DELETE_ENV: &str = "CARVE_CNI_SYNC_DELETE";

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

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        match self {
            Ipam::InProcess => CarveIpam.add(req),
            Ipam::Exec(path) => delegate::ipam_add(path, &req.raw),
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

fn state_file(req: &Request) -> PathBuf {
    let configured = req
        .conf
        .other
        .get("stateFile")
        .or_else(|| req.conf.ipam_field("stateFile"))
        .and_then(Value::as_str)
        .map(PathBuf::from);
    state_file_path(configured)
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
            None => read_state(&state_file(req), code::TRY_AGAIN_LATER)?.mtu,
        };
        if !(576..=65535).contains(&mtu) {
            return Err(CniError::new(code::INVALID_CONFIG, format!("MTU {mtu} is out of range 576..65535")));
        }
        let allocated = ipam.add(req)?;
        let ips: Vec<IpAddr> = allocated.ips.iter().map(|c| c.address.addr()).collect();
        let rollback = |e: CniError| {
            if let Err(d) = ipam.run(Command::Del, req) {
                tracing::error!("rolling back the IPAM allocation after a failed ADD: {d}");
            }
            e
        };
        if ips.iter().filter(|ip| ip.is_ipv4()).count() > 1 || ips.iter().filter(|ip| ip.is_ipv6()).count() > 1 {
            return Err(rollback(CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM {} returned more than one address per family: {ips:?}", ipam.name()),
            )));
        }
        let spec = spec(req, ips.clone(), mtu).map_err(rollback)?;
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
            Ok(ipam) => {
                if let Err(e) = ipam.run(Command::Del, req) {
                    errors.push(e.msg);
                }
            }
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
        read_state(&state_file(req), code::NOT_AVAILABLE)?;
        let ipam = Ipam::of(req).map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))?;
        ipam.run(Command::Status, req)
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        Ipam::of(req)?.run(Command::Gc, req)
    }
}
