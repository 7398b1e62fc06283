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

/// A CIDR as written in a spec, e.g. `10.244.0.0/16`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cidr(pub String);

impl Cidr {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Cidr {
    fn from(s: &str) -> Self {
        Cidr(s.to_string())
    }
}

impl JsonSchema for Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": MAX_CIDR_LEN,
        })
    }
}

fn forbidden_list() -> String {
    let quoted: Vec<String> = FORBIDDEN_RANGES.iter().map(|r| format!("'{r}'")).collect();
    format!("[{}]", quoted.join(", "))
}

/// `c` overlaps the forbidden range `f` (both strings); IPv4 only, as every forbidden range is.
fn overlaps_forbidden(c: &str, f: &str) -> String {
    format!("(cidr({f}).containsCIDR({c}) || cidr({c}).containsCIDR({f}))")
}

pub fn rule_immutable(field: &str, fix: &str) -> Rule {
    Rule::new("self == oldSelf").message(Message::Message(format!("{field} is immutable; {fix}")))
}

pub fn rule_cidrs_parse() -> Rule {
    Rule::new("self.all(c, isCIDR(c))").message(Message::Expression(
        "self.filter(c, !isCIDR(c)).map(c, '\"' + c + '\" is not a CIDR; write address/prefix, \
         e.g. 10.244.0.0/16 or fd12:3456:789a::/64')[0]"
            .into(),
    ))
}

pub fn rule_cidrs_parse_named(field: &str) -> Rule {
    Rule::new("self.all(c, isCIDR(c))").message(Message::Expression(format!(
        "self.filter(c, !isCIDR(c)).map(c, '{field}: \"' + c + '\" is not a CIDR; write address/prefix, \
         e.g. 10.244.8.0/24')[0]"
    )))
}

pub fn rule_cidrs_network_address() -> Rule {
    Rule::new("self.all(c, !isCIDR(c) || string(cidr(c).masked()) == c)").message(Message::Expression(
        "self.filter(c, isCIDR(c) && string(cidr(c).masked()) != c)\
         .map(c, c + ' is not the network address of its prefix; write ' + string(cidr(c).masked()))[0]"
            .into(),
    ))
}

pub fn rule_cidrs_not_forbidden() -> Rule {
    let list = forbidden_list();
    let hit = overlaps_forbidden("c", "f");
    Rule::new(format!(
        "self.all(c, !isCIDR(c) || cidr(c).ip().family() != 4 || {list}.all(f, !{hit}))"
    ))
    .message(Message::Expression(format!(
        "self.filter(c, isCIDR(c) && cidr(c).ip().family() == 4 && {list}.exists(f, {hit}))\
         .map(c, c + ' overlaps ' + {list}.filter(f, {hit})[0] + ', a range reserved by the platform \
         (169.254.0.0/16, 172.30.0.0/16, 172.31.0.0/16 and 192.0.2.0/24 are forbidden); pick a range outside them')[0]"
    )))
}

pub fn rule_cidrs_disjoint() -> Rule {
    let overlapping = "self.filter(b, isCIDR(b) && (cidr(a).containsCIDR(b) || cidr(b).containsCIDR(a)))";
    Rule::new(format!("self.all(a, !isCIDR(a) || {overlapping}.size() == 1)")).message(Message::Expression(format!(
        "self.filter(a, isCIDR(a) && {overlapping}.size() > 1).join(' and ') \
         + ' overlap or repeat; the CIDRs of a pool must be disjoint'"
    )))
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
    .message(Message::Expression(format!(
        "'block size /' + string({block}) + ' is shorter than the pool CIDR ' \
         + self.cidrs.filter(c, {of_family} && cidr(c).prefixLength() > {block})[0] \
         + '; set spec.blockSize.{family} to at least that CIDR\\'s prefix length'"
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
    Rule::new(format!("self <= {max}")).message(Message::Message(format!(
        "{field} must be {max} or less: a block needs at least 4 addresses"
    )))
}
