//! carve's SNAT table, applied through `nft -j` (the `nftables` crate, as netavark does).
//!
//! One table per family (`table ip carve`, `table ip6 carve`) holding a NAT
//! chain on postrouting and an interval set of destinations that keep the pod
//! address:
//!
//! ```text
//! table ip carve {
//!   set no-masquerade { type ipv4_addr; flags interval; elements = { 10.244.0.0/16, ... } }
//!   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr 10.244.1.0/24 ip daddr != @no-masquerade masquerade
//!   }
//! }
//! ```
//!
//! Every apply replaces the tables in one transaction (`add table; delete
//! table; add table ...`), so a restart never duplicates rules and a stale
//! rule cannot survive; a family without own blocks gets its table deleted.

use serde_json::{Value, json};

use super::plan::{Family, NFT_TABLE, Snat};

/// Name of the set of destinations that are not masqueraded.
pub const NO_MASQUERADE_SET: &str = "no-masquerade";
/// Name of the NAT chain.
pub const CHAIN: &str = "postrouting";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nftables: the SNAT batch for table {NFT_TABLE} does not fit the nftables JSON schema: {0}")]
    Schema(serde_json::Error),
    #[error("nftables: applying table {NFT_TABLE} (SNAT) failed: {0}; stderr: {1}")]
    Apply(nftables::helper::NftablesError, String),
}

fn names(family: Family) -> (&'static str, &'static str, &'static str) {
    match family {
        Family::V4 => ("ip", "ip", "ipv4_addr"),
        Family::V6 => ("ip6", "ip6", "ipv6_addr"),
    }
}

fn prefix(net: &ipnet::IpNet) -> Value {
    json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}})
}

/// The `nft -j` batch that makes carve's tables exactly `snat` (pure).
pub fn batch(snat: &[Snat]) -> Value {
    let mut cmds = Vec::new();
    for family in [Family::V4, Family::V6] {
        let (fam, proto, set_type) = names(family);
        let table = json!({"family": fam, "name": NFT_TABLE});
        cmds.push(json!({"add": {"table": table}}));
        cmds.push(json!({"delete": {"table": table}}));
        let Some(s) = snat.iter().find(|s| s.family == family) else { continue };
        cmds.push(json!({"add": {"table": table}}));
        cmds.push(json!({"add": {"chain": {
            "family": fam, "table": NFT_TABLE, "name": CHAIN,
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept",
        }}}));
        cmds.push(json!({"add": {"set": {
            "family": fam, "table": NFT_TABLE, "name": NO_MASQUERADE_SET, "type": set_type, "flags": ["interval"],
        }}}));
        if !s.exclude.is_empty() {
            cmds.push(json!({"add": {"element": {
                "family": fam, "table": NFT_TABLE, "name": NO_MASQUERADE_SET,
                "elem": s.exclude.iter().map(prefix).collect::<Vec<_>>(),
            }}}));
        }
        for source in &s.sources {
            cmds.push(json!({"add": {"rule": {
                "family": fam, "table": NFT_TABLE, "chain": CHAIN,
                "comment": "carve: pod egress leaves with the node IP",
                "expr": [
                    {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "saddr"}}, "right": prefix(source)}},
                    {"match": {"op": "!=", "left": {"payload": {"protocol": proto, "field": "daddr"}}, "right": format!("@{NO_MASQUERADE_SET}")}},
                    {"masquerade": null},
                ],
            }}}));
        }
    }
    json!({"nftables": cmds})
}

/// Applies [`batch`] with the `nft` on PATH, in the calling thread's network namespace.
pub fn apply(snat: &[Snat]) -> Result<(), NftError> {
    let doc: nftables::schema::Nftables = serde_json::from_value(batch(snat)).map_err(NftError::Schema)?;
    nftables::helper::apply_ruleset(&doc).map_err(|e| {
        let stderr = match &e {
            nftables::helper::NftablesError::NftFailed { stderr, .. } => stderr.trim().to_string(),
            _ => String::new(),
        };
        NftError::Apply(e, stderr)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_replaces_ipv4_table_and_deletes_ipv6_one() {
        let snat = [Snat {
            family: Family::V4,
            sources: vec!["10.244.1.0/24".parse().unwrap()],
            exclude: vec!["10.244.0.0/16".parse().unwrap(), "192.168.0.0/16".parse().unwrap()],
        }];
        let b = batch(&snat);
        let cmds = b["nftables"].as_array().unwrap();
        // ip: add, delete, add table, chain, set, elements, one rule; ip6: add + delete (removal).
        assert_eq!(cmds.len(), 9);
        assert_eq!(cmds[2]["add"]["table"]["family"], "ip");
        assert_eq!(cmds[5]["add"]["element"]["elem"][1]["prefix"]["addr"], "192.168.0.0");
        let rule = &cmds[6]["add"]["rule"]["expr"];
        assert_eq!(rule[0]["match"]["right"]["prefix"]["len"], 24);
        assert_eq!(rule[1]["match"]["right"], "@no-masquerade");
        assert_eq!(cmds[8]["delete"]["table"]["family"], "ip6");
        // The crate's schema accepts it.
        serde_json::from_value::<nftables::schema::Nftables>(b).unwrap();
    }
}
