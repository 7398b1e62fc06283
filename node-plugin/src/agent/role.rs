//! carve-agent's part in a node's network, and what stands in its way.
//!
//! ```text
//!   Role::Dataplane (default)  carve is the node's network: carve-cni + carve-ipam,
//!                              VXLAN or routes, SNAT; the Node's NetworkUnavailable.
//!   Role::IpamOnly             another dataplane (Cilium with `ipam: kubernetes`, …) wires
//!                              the pods on the blocks carve's controller hands out (NNC
//!                              status, the Node's podCIDRs); the agent programs nothing,
//!                              removes what carve programmed before, leaves the Node's
//!                              condition to that dataplane and reports only whether its
//!                              NNC has blocks (carve_agent_ready).
//! ```
//!
//! With its own dataplane the agent will not be one of two: [`foreign`] names
//! another network config the runtime would pick first, or another
//! dataplane's device on the node. Pure.

use std::str::FromStr;

/// See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    #[default]
    Dataplane,
    IpamOnly,
}

impl FromStr for Role {
    type Err = String;

    /// `dataplane` or `ipam-only` (`--role`, `CARVE_ROLE`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "dataplane" => Ok(Role::Dataplane),
            "ipam-only" => Ok(Role::IpamOnly),
            other => Err(format!(
                "unknown role {other:?}: use dataplane (carve wires the pods) or ipam-only \
                 (another dataplane, such as Cilium with ipam: kubernetes, wires them on carve's podCIDRs)"
            )),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Dataplane => "dataplane",
            Role::IpamOnly => "ipam-only",
        })
    }
}

/// Devices other dataplanes create on every node they run on, and whose they are.
const FOREIGN_DEVICES: [(&str, &str); 3] =
    [("cilium_host", "Cilium"), ("flannel.1", "Flannel"), ("vxlan.calico", "Calico")];

/// What keeps carve's own dataplane from being the node's network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Foreign {
    /// `ForeignCNIConfig` or `ForeignDataplane`: the Node condition's reason.
    pub reason: &'static str,
    /// Names both sides and the fix.
    pub message: String,
}

/// Whether a file in the CNI config dir is a network config for libcni.
fn is_network_config(name: &str) -> bool {
    [".conf", ".conflist", ".json"].iter().any(|ext| name.ends_with(ext))
}

/// With carve's dataplane: another dataplane's device among `links`, or a
/// network config in `conf_dir` (file names `conf_files`) that sorts before
/// carve's `conflist` (the runtime uses the first one).
pub fn foreign(conf_dir: &str, conf_files: &[String], conflist: &str, links: &[String]) -> Option<Foreign> {
    let fix = "run carve-agent with CARVE_ROLE=ipam-only under that dataplane (carve then only hands out blocks), \
               or remove it";
    if let Some((device, owner)) = FOREIGN_DEVICES.iter().find(|(d, _)| links.iter().any(|l| l == d)) {
        return Some(Foreign {
            reason: "ForeignDataplane",
            message: format!(
                "{owner}'s dataplane runs on this node (device {device}) beside carve's: two dataplanes would \
                 fight over the pods' routes; {fix}"
            ),
        });
    }
    let mut configs: Vec<&String> = conf_files.iter().filter(|f| is_network_config(f)).collect();
    configs.sort();
    match configs.first() {
        Some(first) if first.as_str() < conflist => Some(Foreign {
            reason: "ForeignCNIConfig",
            message: format!(
                "{conf_dir}/{first} sorts before carve's {conf_dir}/{conflist}: the container runtime uses the \
                 first network config, so new pods would not get carve's network; {fix}"
            ),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_config_sorting_before_carves_is_named_with_both_paths_and_the_fix() {
        let found =
            foreign("/etc/cni/net.d", &names(&["05-cilium.conflist", "10-carve.conflist"]), "10-carve.conflist", &[]);
        let found = found.expect("a foreign config first");
        assert_eq!(found.reason, "ForeignCNIConfig");
        assert!(
            found
                .message
                .contains("/etc/cni/net.d/05-cilium.conflist sorts before carve's /etc/cni/net.d/10-carve.conflist")
        );
        assert!(found.message.contains("CARVE_ROLE=ipam-only"), "{}", found.message);
    }

    #[test]
    fn configs_after_carves_and_files_libcni_ignores_are_not_in_the_way() {
        let files = names(&["10-carve.conflist", "20-other.conf", "00-notes.txt", "01-backup.conflist.bak"]);
        assert_eq!(foreign("/etc/cni/net.d", &files, "10-carve.conflist", &names(&["eth0", "carve.1"])), None);
        // Before the agent's first write too.
        assert_eq!(foreign("/etc/cni/net.d", &[], "10-carve.conflist", &[]), None);
        let json_first = foreign("/d", &names(&["00-x.json"]), "10-carve.conflist", &[]).unwrap();
        assert_eq!(json_first.reason, "ForeignCNIConfig");
    }

    #[test]
    fn another_dataplanes_device_is_named_by_its_owner() {
        let found = foreign("/d", &names(&["10-carve.conflist"]), "10-carve.conflist", &names(&["lo", "cilium_host"]));
        let found = found.expect("Cilium's device");
        assert_eq!(found.reason, "ForeignDataplane");
        assert!(
            found.message.starts_with("Cilium's dataplane runs on this node (device cilium_host)"),
            "{}",
            found.message
        );
    }

    #[test]
    fn roles_parse_from_their_names_and_refuse_others_naming_both() {
        assert_eq!("ipam-only".parse::<Role>(), Ok(Role::IpamOnly));
        assert_eq!("dataplane".parse::<Role>(), Ok(Role::Dataplane));
        assert_eq!(Role::IpamOnly.to_string(), "ipam-only");
        let err = "cilium".parse::<Role>().unwrap_err();
        assert!(err.contains("dataplane") && err.contains("ipam-only"), "{err}");
    }
}
