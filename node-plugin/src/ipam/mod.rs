//! carve-ipam: pod addresses from the node's blocks (the node state file),
//! kept in an on-disk store; usable alone, like host-local.
//!
//! ```text
//!  node state file ──▶ NodePool ─┐
//!                                ├─ assign / release / gc (pure, alloc.rs)
//!  <dataDir>/allocations.json ◀──┘   under flock, atomic write (store.rs)
//! ```
//!
//! IPAM config (`ipam` object of the network config):
//! - `type`: `carve-ipam`
//! - `stateFile`: node state file (default [`crate::state::DEFAULT_STATE_FILE`];
//!   the environment variable `CARVE_STATE_FILE` overrides both)
//! - `dataDir`: allocation store (default `/var/lib/carve/ipam/<network name>`)
//! - `routes`: `[{"dst": .., "gw": ..}]` returned as is (none by default)
//! - `reserved`: extra addresses never handed out
//!
//! ADD reads the state file after it took the store's lock, so a block the
//! agent marked releasing (in the store) and the state file it then rewrites
//! are seen consistently. In a dynamic pool, an ADD that finds every block
//! full leaves a waiting marker ([`waiting`]) the agent counts as demand,
//! waits up to [`GROW_WAIT`] (not holding the lock) for a new block in the
//! state file, tries once more, and otherwise answers code 11 (try again
//! later): the runtime retries while the agent asks for more.

pub mod alloc;
pub mod leaks;
pub mod store;
pub mod waiting;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use carve_crds::{AllocationStrategy, IpFamily};

use ipnet::IpNet;
use serde::Deserialize;

use crate::cni::{CniError, CniResult, IpConfig, Plugin, Request, Route, code};
use crate::state::{self, NodeState, StateError};
use alloc::{AllocError, NodePool, Owner};
use store::{PodIpStore, StoreError};

/// Where stores live unless `dataDir` says otherwise.
pub const DEFAULT_DATA_ROOT: &str = "/var/lib/carve/ipam";
/// Environment variable that overrides the state file path.
pub const STATE_FILE_ENV: &str = "CARVE_STATE_FILE";
/// How long an ADD in a dynamic pool waits for a new block when every block is full.
pub const GROW_WAIT: Duration = Duration::from_secs(3);
/// How often it looks at the state file meanwhile.
const GROW_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpamConf {
    #[serde(default)]
    state_file: Option<PathBuf>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    routes: Vec<RouteConf>,
    #[serde(default)]
    reserved: Vec<IpAddr>,
}

#[derive(Debug, Deserialize)]
struct RouteConf {
    dst: IpNet,
    #[serde(default)]
    gw: Option<IpAddr>,
}

/// The node state file path: `CARVE_STATE_FILE`, else `configured`, else the default.
pub fn state_file_path(configured: Option<PathBuf>) -> PathBuf {
    std::env::var_os(STATE_FILE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or(configured)
        .unwrap_or_else(|| PathBuf::from(state::DEFAULT_STATE_FILE))
}

/// Reads the node state; a missing file is `missing_code` (11 for ADD: the
/// agent has not written it yet; 50 for STATUS).
pub fn read_state(path: &std::path::Path, missing_code: u32) -> Result<NodeState, CniError> {
    state::read(path).map_err(|e| match e {
        StateError::Missing { .. } => CniError::new(missing_code, e.to_string()),
        StateError::Parse { .. } | StateError::Io { .. } => CniError::new(
            if missing_code == code::NOT_AVAILABLE { missing_code } else { code::INTERNAL },
            e.to_string(),
        ),
    })
}

struct Resolved {
    state_file: PathBuf,
    store: PodIpStore,
    routes: Vec<Route>,
    reserved: Vec<IpAddr>,
}

fn resolve(req: &Request) -> Result<Resolved, CniError> {
    let ipam: IpamConf = match &req.conf.ipam {
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| CniError::new(code::INVALID_CONFIG, format!("ipam configuration: {e}")))?,
        None => IpamConf::default(),
    };
    let data_dir = match ipam.data_dir {
        Some(d) => d,
        None => {
            let name = &req.conf.name;
            if name.is_empty() || name == "." || name == ".." || name.contains('/') {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("network name {name:?} cannot name a data directory; set ipam.dataDir"),
                ));
            }
            PathBuf::from(DEFAULT_DATA_ROOT).join(name)
        }
    };
    Ok(Resolved {
        state_file: state_file_path(ipam.state_file),
        store: PodIpStore::new(data_dir),
        routes: ipam.routes.into_iter().map(|r| Route { dst: r.dst, gw: r.gw }).collect(),
        reserved: ipam.reserved,
    })
}

fn store_err(e: StoreError) -> CniError {
    let code = match e {
        StoreError::Io { .. } => code::IO_FAILURE,
        StoreError::Corrupt { .. } | StoreError::TooNew { .. } => code::INTERNAL,
        StoreError::Busy { .. } => code::TRY_AGAIN_LATER,
    };
    CniError::new(code, e.to_string())
}

fn alloc_err(e: AllocError) -> CniError {
    let code = match e {
        AllocError::NoBlocks => code::TRY_AGAIN_LATER,
        _ => code::INTERNAL,
    };
    CniError::new(code, e.to_string())
}

/// Every block of a dynamic pool full (or none yet): worth waiting for a grant.
struct Full {
    why: AllocError,
    families: Vec<IpFamily>,
    /// The state file's blocks when it was seen full.
    blocks: Vec<carve_crds::NodeBlock>,
}

enum AddError {
    Cni(CniError),
    Full(Full),
}

impl From<CniError> for AddError {
    fn from(e: CniError) -> Self {
        AddError::Cni(e)
    }
}

/// An ADD's answer and the addresses that ADD itself recorded: an
/// attachment that already held an address (a repeated or retried ADD) gets
/// it back, but did not create it, and must not free it on a rollback.
pub struct Grant {
    pub result: CniResult,
    pub created: Vec<IpAddr>,
}

/// One allocation attempt: the store's lock first, then the state file.
fn allocate(r: &Resolved, owner: &Owner) -> Result<Grant, AddError> {
    let locked = r.store.lock().map_err(store_err)?;
    let mut allocations = locked.load().map_err(store_err)?;
    let node = read_state(&r.state_file, code::TRY_AGAIN_LATER)?;
    let dynamic = node.strategy == AllocationStrategy::Dynamic;
    let full =
        |why: AllocError, families: Vec<IpFamily>| AddError::Full(Full { why, families, blocks: node.blocks.clone() });
    let pool = match NodePool::from_state(&node, &r.reserved) {
        Ok(p) => p,
        Err(e @ AllocError::NoBlocks) if dynamic => return Err(full(e, vec![])),
        Err(e) => return Err(alloc_err(e).into()),
    };
    let held = allocations.held_by(owner);
    let ips = match allocations.assign(&pool, owner) {
        Ok(ips) => ips,
        Err(e @ AllocError::Exhausted { family, .. }) if dynamic => return Err(full(e, vec![family])),
        Err(e) => return Err(alloc_err(e).into()),
    };
    let created: Vec<IpAddr> = ips.iter().filter(|ip| !held.contains(ip)).copied().collect();
    if !created.is_empty() {
        locked.save(&allocations).map_err(store_err)?;
    }
    drop(locked);
    let mut result = CniResult { routes: r.routes.clone(), ..Default::default() };
    for ip in ips {
        let block = pool.block_of(&ip).expect("assign returns addresses of the pool");
        let address = IpNet::new(ip, block.net.prefix_len()).expect("prefix of a parsed block");
        result.ips.push(IpConfig { address, gateway: block.gateway, interface: None });
    }
    tracing::info!(container = %owner.container_id, ifname = %owner.ifname, ips = ?result.ips.iter().map(|i| i.address.to_string()).collect::<Vec<_>>(), ?created, "allocated");
    Ok(Grant { result, created })
}

fn owner(req: &Request) -> Owner {
    Owner::new(req.env.container_id.clone(), req.env.ifname.clone())
}

/// The carve-ipam plugin.
pub struct CarveIpam;

impl CarveIpam {
    /// ADD, telling which addresses it recorded (see [`Grant`]).
    pub fn grant(&self, req: &Request) -> Result<Grant, CniError> {
        let r = resolve(req)?;
        let owner = owner(req);
        let full = match allocate(&r, &owner) {
            Ok(result) => return Ok(result),
            Err(AddError::Cni(e)) => return Err(e),
            Err(AddError::Full(full)) => full,
        };
        // Visible to the agent for as long as this ADD waits (removed on drop).
        let _waiting = waiting::Waiting::register(r.store.dir(), &owner, &full.families)
            .map_err(
                |e| tracing::warn!(error = %e, "could not leave a waiting marker; the agent may not ask for a block"),
            )
            .ok();
        let deadline = Instant::now() + GROW_WAIT;
        while Instant::now() < deadline {
            std::thread::sleep(GROW_POLL);
            if state::read(&r.state_file).is_ok_and(|s| s.blocks != full.blocks) {
                break;
            }
        }
        match allocate(&r, &owner) {
            Ok(result) => Ok(result),
            Err(AddError::Cni(e)) => Err(e),
            Err(AddError::Full(full)) => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "{}; carve-agent has asked for another block (waited {GROW_WAIT:?} for it): try again later",
                    full.why
                ),
            )),
        }
    }

    /// Rolls back a failed ADD: frees `created` (what [`grant`](Self::grant)
    /// recorded), each only while it is still this attachment's.
    pub fn undo(&self, req: &Request, created: &[IpAddr]) -> Result<(), CniError> {
        if created.is_empty() {
            return Ok(());
        }
        let r = resolve(req)?;
        let locked = r.store.lock().map_err(store_err)?;
        let mut allocations = locked.load().map_err(store_err)?;
        let freed = allocations.release_only(&owner(req), created);
        if !freed.is_empty() {
            locked.save(&allocations).map_err(store_err)?;
        }
        tracing::info!(container = %req.env.container_id, ifname = %req.env.ifname, ?freed, "rolled back");
        Ok(())
    }
}

impl Plugin for CarveIpam {
    const NAME: &'static str = "carve-ipam";

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        self.grant(req).map(|g| g.result)
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let r = resolve(req)?;
        let locked = r.store.lock().map_err(store_err)?;
        let mut allocations = locked.load().map_err(store_err)?;
        let freed = allocations.release(&owner(req));
        if !freed.is_empty() {
            locked.save(&allocations).map_err(store_err)?;
        }
        tracing::info!(container = %req.env.container_id, ifname = %req.env.ifname, ?freed, "released");
        Ok(())
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let r = resolve(req)?;
        let locked = r.store.lock().map_err(store_err)?;
        let held = locked.load().map_err(store_err)?.held_by(&owner(req));
        drop(locked);
        if held.is_empty() {
            return Err(CniError::internal(format!(
                "no address allocated for container {} ifname {} in {}",
                req.env.container_id,
                req.env.ifname,
                r.store.file().display()
            )));
        }
        if let Some(prev) = &req.conf.prev_result {
            for ip in CniResult::parse(prev)?.ips {
                if !held.contains(&ip.address.addr()) {
                    return Err(CniError::internal(format!(
                        "address {} of prevResult is not allocated to container {} ifname {}",
                        ip.address, req.env.container_id, req.env.ifname
                    )));
                }
            }
        }
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        let r = resolve(req)?;
        let node = read_state(&r.state_file, code::NOT_AVAILABLE)?;
        NodePool::from_state(&node, &r.reserved).map_err(|e| CniError::new(code::NOT_AVAILABLE, e.to_string()))?;
        let locked = r.store.lock().map_err(|e| CniError::new(code::NOT_AVAILABLE, e.to_string()))?;
        locked.load().map_err(|e| CniError::new(code::NOT_AVAILABLE, e.to_string()))?;
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let r = resolve(req)?;
        // No list at all (libcni's GCNetworkList without args, as cnitool sends)
        // means no attachment is valid, as host-local reads it.
        let valid: BTreeSet<Owner> = req
            .conf
            .valid_attachments
            .iter()
            .flatten()
            .map(|a| Owner::new(a.container_id.clone(), a.ifname.clone()))
            .collect();
        let locked = r.store.lock().map_err(store_err)?;
        let mut allocations = locked.load().map_err(store_err)?;
        let freed = allocations.gc(&valid);
        if !freed.is_empty() {
            locked.save(&allocations).map_err(store_err)?;
        }
        tracing::info!(freed = freed.len(), "gc");
        Ok(())
    }
}
