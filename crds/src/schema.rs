//! Admission rules (CEL, `x-kubernetes-validations`) for the CRDs.
//!
//! The API server prefixes every failure with the field path, so messages say
//! what is wrong with the value and how to fix it. Rules that parse a CIDR
//! guard with `isCIDR` so one malformed entry yields one clear message rather
//! than a runtime error from every other rule.

use std::borrow::Cow;

use kube::core::{Message, Rule};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::net::FORBIDDEN_RANGES;

/// Longest textual CIDR: a full IPv6 address with a 3-digit prefix, plus slack.
/// Bounding it keeps the API server's CEL cost estimate small.
const MAX_CIDR_LEN: usize = 49;

/// A CIDR as written in a spec, e.g. `10.244.8.0/24`: must parse and be a network address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cidr(pub String);

/// A pool CIDR: a [`Cidr`] that also stays clear of the platform's forbidden ranges.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PoolCidr(pub String);

macro_rules! cidr_string {
    ($t:ident) => {
        impl $t {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $t {
            fn from(s: &str) -> Self {
                $t(s.to_string())
            }
        }
    };
}
cidr_string!(Cidr);
cidr_string!(PoolCidr);

/// Rules on one CIDR string. They sit on the item rather than the list so each
/// message can quote the offending value cheaply: the API server refuses rules
/// whose estimated cost is too high, and list-wide message expressions are.
fn cidr_rules(forbidden: bool) -> Vec<serde_json::Value> {
    let example = "e.g. 10.244.0.0/16 or fd12:3456:789a::/64";
    let mut rules = vec![
        serde_json::json!({
            "rule": "isCIDR(self)",
            "messageExpression": format!("'\"' + self + '\" is not a CIDR; write address/prefix, {example}'"),
        }),
        serde_json::json!({
            "rule": "!isCIDR(self) || string(cidr(self).masked()) == self",
            // string(...) in a message makes the cost estimate unbounded, so no suggested value here.
            "messageExpression":
                "self + ' is not the network address of its prefix: clear the host bits (10.244.1.0/16 means 10.244.0.0/16)'",
        }),
    ];
    if forbidden {
        for range in FORBIDDEN_RANGES {
            let hit = format!("(cidr('{range}').containsCIDR(self) || cidr(self).containsCIDR('{range}'))");
            let fix = format!(
                "{range}, a range reserved by the platform ({} are forbidden); pick a range outside it",
                FORBIDDEN_RANGES.join(", ")
            );
            rules.push(serde_json::json!({
                "rule": format!("!isCIDR(self) || cidr(self).ip().family() != 4 || !{hit}"),
                "messageExpression": format!("self + ' overlaps {fix}'"),
            }));
        }
    }
    rules
}

impl JsonSchema for Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": MAX_CIDR_LEN,
            "x-kubernetes-validations": cidr_rules(false),
        })
    }
}

impl JsonSchema for PoolCidr {
    fn schema_name() -> Cow<'static, str> {
        "PoolCidr".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": MAX_CIDR_LEN,
            "x-kubernetes-validations": cidr_rules(true),
        })
    }
}

pub fn rule_immutable(field: &str, fix: &str) -> Rule {
    Rule::new("self == oldSelf").message(Message::Message(format!("{field} is immutable; {fix}")))
}

pub fn rule_cidrs_disjoint() -> Rule {
    let overlapping = "self.filter(b, isCIDR(b) && (cidr(a).containsCIDR(b) || cidr(b).containsCIDR(a)))";
    Rule::new(format!("self.all(a, !isCIDR(a) || {overlapping}.size() == 1)")).message(Message::Message(
        "CIDRs of a pool must not overlap or repeat; remove or merge the overlapping entries".into(),
    ))
}

/// The effective IPv4/IPv6 block prefix in CEL, with the mode's default when unset.
fn effective_block(family: &str, overlay: u8, vnet: u8) -> String {
    format!(
        "(has(self.blockSize) && has(self.blockSize.{family}) ? self.blockSize.{family} : \
         (self.mode == 'VNet' ? {vnet} : {overlay}))"
    )
}

fn rule_block_not_shorter_than_pool(family: &str, cel_family: u8, overlay: u8, vnet: u8) -> Rule {
    let block = effective_block(family, overlay, vnet);
    let of_family = format!("isCIDR(c) && cidr(c).ip().family() == {cel_family}");
    Rule::new(format!(
        "self.cidrs.all(c, !({of_family}) || cidr(c).prefixLength() <= {block})"
    ))
    .message(Message::Message(format!(
        "the IPv{cel_family} block size (default /{overlay} in Overlay, /{vnet} in VNet) is shorter than the prefix \
         of an IPv{cel_family} CIDR in spec.cidrs; set spec.blockSize.{family} to at least the longest \
         IPv{cel_family} prefix of the pool"
    )))
    .field_path(format!(".blockSize.{family}"))
}

pub fn rule_block_v4_not_shorter_than_pool() -> Rule {
    rule_block_not_shorter_than_pool("ipv4", 4, 24, 28)
}

pub fn rule_block_v6_not_shorter_than_pool() -> Rule {
    rule_block_not_shorter_than_pool("ipv6", 6, 80, 124)
}

pub fn rule_max_prefix(field: &str, max: u8) -> Rule {
    Rule::new(format!("self <= {max}"))
        .message(Message::Message(format!("{field} must be {max} or less: a block needs at least 4 addresses")))
}

pub fn rule_blocks_per_node_only_in_vnet() -> Rule {
    Rule::new("!has(self.allocation) || !has(self.allocation.strategy) || self.allocation.strategy == 'Single' || self.mode == 'VNet'")
        .message(Message::Message(
            "spec.allocation.strategy Static and Dynamic need mode VNet (an Overlay node has one /24 per family); \
             use strategy Single or mode VNet"
                .into(),
        ))
        .field_path(".allocation.strategy")
}

pub fn rule_release_above_request() -> Rule {
    Rule::new(
        "(has(self.releaseThresholdPercent) ? self.releaseThresholdPercent : 150) >= \
         (has(self.requestThresholdPercent) ? self.requestThresholdPercent : 50) + 100",
    )
    .message(Message::Message(
        "spec.allocation.releaseThresholdPercent must be at least requestThresholdPercent + 100: a node gives a \
         block back only while a whole block more than its request threshold is free (no flapping)"
            .into(),
    ))
    .field_path(".releaseThresholdPercent")
}
