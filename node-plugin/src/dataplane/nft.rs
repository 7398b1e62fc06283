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

use std::borrow::Cow;
use std::collections::HashSet;

use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, Element, NfListObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::plan::{Family, NFT_TABLE, Snat};

/// Name of the set of destinations that are not masqueraded.
pub const NO_MASQUERADE_SET: &str = "no-masquerade";
/// Name of the NAT chain.
pub const CHAIN: &str = "postrouting";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nftables: applying table {NFT_TABLE} (SNAT) failed: {0}; stderr: {1}")]
    Apply(nftables::helper::NftablesError, String),
}

/// The nftables family, the payload protocol and the set's address type.
fn names(family: Family) -> (NfFamily, &'static str, SetType) {
    match family {
        Family::V4 => (NfFamily::IP, "ip", SetType::Ipv4Addr),
        Family::V6 => (NfFamily::IP6, "ip6", SetType::Ipv6Addr),
    }
}

fn prefix(net: &ipnet::IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}

fn address(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

/// The `nft -j` batch that makes carve's tables exactly `snat` (pure).
pub fn batch(snat: &[Snat]) -> Nftables<'static> {
    let mut batch = Batch::new();
    for family in [Family::V4, Family::V6] {
        let (fam, proto, set_type) = names(family);
        let table = || NfListObject::Table(Table { family: fam, name: NFT_TABLE.into(), handle: None });
        // add + delete: the delete cannot fail on a missing table, and clears a stale one.
        batch.add(table());
        batch.delete(table());
        let Some(s) = snat.iter().find(|s| s.family == family) else { continue };
        batch.add(table());
        batch.add(NfListObject::Chain(Chain {
            family: fam,
            table: NFT_TABLE.into(),
            name: CHAIN.into(),
            _type: Some(NfChainType::NAT),
            hook: Some(NfHook::Postrouting),
            prio: Some(100),
            policy: Some(NfChainPolicy::Accept),
            ..Default::default()
        }));
        batch.add(NfListObject::Set(Box::new(Set {
            family: fam,
            table: NFT_TABLE.into(),
            name: NO_MASQUERADE_SET.into(),
            set_type: SetTypeValue::Single(set_type),
            flags: Some(HashSet::from([SetFlag::Interval])),
            ..Default::default()
        })));
        if !s.exclude.is_empty() {
            batch.add(NfListObject::Element(Element {
                family: fam,
                table: NFT_TABLE.into(),
                name: NO_MASQUERADE_SET.into(),
                elem: s.exclude.iter().map(prefix).collect::<Vec<_>>().into(),
            }));
        }
        for source in &s.sources {
            let expr = vec![
                Statement::Match(Match { left: address(proto, "saddr"), right: prefix(source), op: Operator::EQ }),
                Statement::Match(Match {
                    left: address(proto, "daddr"),
                    right: Expression::String(format!("@{NO_MASQUERADE_SET}").into()),
                    op: Operator::NEQ,
                }),
                Statement::Masquerade(None),
            ];
            batch.add(NfListObject::Rule(Rule {
                family: fam,
                table: NFT_TABLE.into(),
                chain: CHAIN.into(),
                expr: expr.into(),
                comment: Some("carve: pod egress leaves with the node IP".into()),
                ..Default::default()
            }));
        }
    }
    batch.to_nftables()
}

/// Applies [`batch`] with the `nft` on PATH, in the calling thread's network namespace.
pub fn apply(snat: &[Snat]) -> Result<(), NftError> {
    nftables::helper::apply_ruleset(&batch(snat)).map_err(|e| {
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
        // As nft reads it: the JSON document the batch serialises to.
        let b = serde_json::to_value(batch(&snat)).unwrap();
        let cmds = b["nftables"].as_array().unwrap();
        // ip: add, delete, add table, chain, set, elements, one rule; ip6: add + delete (removal).
        assert_eq!(cmds.len(), 9);
        assert_eq!(cmds[2]["add"]["table"]["family"], "ip");
        assert_eq!(cmds[5]["add"]["element"]["elem"][1]["prefix"]["addr"], "192.168.0.0");
        let rule = &cmds[6]["add"]["rule"]["expr"];
        assert_eq!(rule[0]["match"]["right"]["prefix"]["len"], 24);
        assert_eq!(rule[1]["match"]["right"], "@no-masquerade");
        assert_eq!(cmds[8]["delete"]["table"]["family"], "ip6");
        assert_eq!(cmds[3]["add"]["chain"]["hook"], "postrouting");
        assert_eq!(cmds[4]["add"]["set"]["flags"], serde_json::json!(["interval"]));
    }
}
