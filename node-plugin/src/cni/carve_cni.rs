//! carve-cni: the main plugin. IP from the IPAM plugin of `ipam.type`
//! (normally carve-ipam), then the pod's veth, /32 address and routes
//! ([`crate::podnet`]).
//!
//! Config: `name`, `type`, `ipam` (delegated as is), optional `stateFile`
//! (node state file for the MTU; else `ipam.stateFile`, else the default;
//! `CARVE_STATE_FILE` overrides), optional `mtu` (overrides the state's),
//! `logLevel`, `logFile`.
//!
//! ```text
//!  ADD:   IPAM ADD ─▶ podnet::setup ─(fails)─▶ IPAM DEL (roll back)
//!  DEL:   delete host veth (gone = fine) ─▶ IPAM DEL (always)
//!  CHECK: podnet::check (address, routes) ─▶ IPAM CHECK
//!  STATUS: node state file readable (else 50) ─▶ IPAM STATUS;  GC ─▶ IPAM GC
//! ```

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::Value;

use super::delegate;
use super::{CniError, CniResult, Command, Interface, IpConfig, Plugin, Request, Route, code};
use crate::ipam::{read_state, state_file_path};
use crate::podnet::{self, GATEWAY_V4, GATEWAY_V6, PodNetSpec};

pub struct CarveCni;

fn ipam_type(req: &Request) -> Result<String, CniError> {
    req.conf
        .ipam_field("type")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "network configuration has no ipam.type"))
}

fn ipam_binary(req: &Request) -> Result<PathBuf, CniError> {
    delegate::find_in_path(&ipam_type(req)?, &req.env.path)
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
        let ipam = ipam_binary(req)?;
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
        let allocated = delegate::ipam_add(&ipam, &req.raw)?;
        let ips: Vec<IpAddr> = allocated.ips.iter().map(|c| c.address.addr()).collect();
        let rollback = |e: CniError| {
            if let Err(d) = delegate::exec(&ipam, Command::Del, &req.raw) {
                tracing::error!("rolling back the IPAM allocation after a failed ADD: {d}");
            }
            e
        };
        if ips.iter().filter(|ip| ip.is_ipv4()).count() > 1 || ips.iter().filter(|ip| ip.is_ipv6()).count() > 1 {
            return Err(rollback(CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM {} returned more than one address per family: {ips:?}", ipam.display()),
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
        if let Err(e) = podnet::delete_host_veth(&host) {
            errors.push(format!("deleting host veth {host}: {e}"));
        }
        match ipam_binary(req) {
            Ok(ipam) => {
                if let Err(e) = delegate::exec(&ipam, Command::Del, &req.raw) {
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
        delegate::exec(&ipam_binary(req)?, Command::Check, &req.raw)?;
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        read_state(&state_file(req), code::NOT_AVAILABLE)?;
        let ipam = ipam_binary(req).map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))?;
        delegate::exec(&ipam, Command::Status, &req.raw)?;
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        delegate::exec(&ipam_binary(req)?, Command::Gc, &req.raw)?;
        Ok(())
    }
}
