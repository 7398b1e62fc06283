//! Address arithmetic and pool validation with no Kubernetes dependency.
//!
//! The API server enforces most of these rules at admission through the CEL
//! rules on the CRDs; the controller calls the same checks here for what CEL
//! cannot see (overlaps between pools, objects written before a rule existed).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Ranges AKS refuses for pod, service and cluster networks: link-local,
/// two ranges Azure uses internally, and TEST-NET-1.
pub const FORBIDDEN_RANGES: [&str; 4] = ["169.254.0.0/16", "172.30.0.0/16", "172.31.0.0/16", "192.0.2.0/24"];

/// Longest block prefix per family: a block must hold at least four addresses.
pub const MAX_BLOCK_PREFIX_V4: u8 = 30;
pub const MAX_BLOCK_PREFIX_V6: u8 = 126;

/// Addresses Azure reserves in every subnet: network, gateway, two DNS, and the last one.
pub const AZURE_RESERVED_AT_START: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => IpFamily::IPv4,
            IpNet::V6(_) => IpFamily::IPv6,
        }
    }

    pub fn of_addr(ip: &std::net::IpAddr) -> Self {
        if ip.is_ipv4() { IpFamily::IPv4 } else { IpFamily::IPv6 }
    }

    /// Address length in bits: 32 or 128.
    pub fn bits(self) -> u8 {
        match self {
            IpFamily::IPv4 => 32,
            IpFamily::IPv6 => 128,
        }
    }

    pub fn max_block_prefix(self) -> u8 {
        match self {
            IpFamily::IPv4 => MAX_BLOCK_PREFIX_V4,
            IpFamily::IPv6 => MAX_BLOCK_PREFIX_V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::IPv4 => "IPv4",
            IpFamily::IPv6 => "IPv6",
        })
    }
}

/// An address as a number (IPv4 in the low 32 bits), for arithmetic.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

/// The address of `family` numbered `n` (IPv4: its low 32 bits).
pub fn from_u128(family: IpFamily, n: u128) -> IpAddr {
    match family {
        IpFamily::IPv4 => IpAddr::V4((n as u32).into()),
        IpFamily::IPv6 => IpAddr::V6(n.into()),
    }
}

/// The first and last address of `net`, as numbers.
pub fn bounds(net: &IpNet) -> (u128, u128) {
    (to_u128(net.network()), to_u128(net.broadcast()))
}

/// The address `offset` after `net`'s network address (`offset` < its size).
pub fn nth(net: &IpNet, offset: u128) -> IpAddr {
    from_u128(IpFamily::of(net), to_u128(net.network()) + offset)
}

/// Number of addresses in `net`, saturating at `u128::MAX`.
pub fn size(net: &IpNet) -> u128 {
    1u128.checked_shl(u32::from(net.max_prefix_len() - net.prefix_len())).unwrap_or(u128::MAX)
}

/// Why a CIDR or block size is unusable. Each message names the value and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("{input:?} is not a CIDR ({reason}); write it as address/prefix, e.g. 10.244.0.0/16")]
    NotACidr { input: String, reason: String },
    #[error("{input} has host bits set; use the network address {network}")]
    NotNetworkAddress { input: String, network: IpNet },
    #[error("{cidr} overlaps {range}, a range reserved by the platform; pick a range outside it")]
    Forbidden { cidr: IpNet, range: IpNet },
    #[error(
        "{family} block size /{block} is shorter than the pool CIDR {cidr}; use /{} or longer",
        cidr.prefix_len()
    )]
    BlockShorterThanPool { family: IpFamily, block: u8, cidr: IpNet },
    #[error("{family} block size /{block} is too long; use /{max} or shorter (a block needs at least 4 addresses)")]
    BlockTooLong { family: IpFamily, block: u8, max: u8 },
    #[error("{a} overlaps {b}; CIDRs of a pool, and of different pools, must be disjoint")]
    Overlap { a: IpNet, b: IpNet },
}

/// Parses a CIDR and insists on the network address, so `10.244.1.0/16` is
/// caught instead of silently meaning `10.244.0.0/16`.
pub fn parse_cidr(input: &str) -> Result<IpNet, NetError> {
    let net: IpNet = input
        .trim()
        .parse()
        .map_err(|e: ipnet::AddrParseError| NetError::NotACidr { input: input.to_string(), reason: e.to_string() })?;
    if net.network() != net.addr() {
        return Err(NetError::NotNetworkAddress { input: input.to_string(), network: net.trunc() });
    }
    Ok(net)
}

/// Two CIDRs overlap exactly when one contains the other.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first forbidden range `net` overlaps, if any.
pub fn forbidden_overlap(net: &IpNet) -> Option<IpNet> {
    FORBIDDEN_RANGES
        .iter()
        .map(|r| r.parse::<IpNet>().expect("forbidden ranges are valid CIDRs"))
        .find(|range| overlaps(net, range))
}

/// A block prefix must be at least the pool's prefix and leave at least four addresses.
pub fn check_block_size(pool: &IpNet, block: u8) -> Result<(), NetError> {
    let family = IpFamily::of(pool);
    if block < pool.prefix_len() {
        return Err(NetError::BlockShorterThanPool { family, block, cidr: *pool });
    }
    let max = family.max_block_prefix();
    if block > max {
        return Err(NetError::BlockTooLong { family, block, max });
    }
    Ok(())
}

/// The five addresses Azure reserves in `subnet`: the first four and the last.
/// Subnets too small to hold them yield every address they have.
pub fn azure_reserved(subnet: &IpNet) -> Vec<IpAddr> {
    let family = IpFamily::of(subnet);
    let (first, last) = bounds(subnet);
    let mut hosts: Vec<IpAddr> =
        (first..=last.min(first + u128::from(AZURE_RESERVED_AT_START) - 1)).map(|a| from_u128(family, a)).collect();
    hosts.push(from_u128(family, last));
    hosts.dedup();
    hosts
}

/// Every problem with a pool's CIDR list and block sizes, in order, so a
/// condition can list them all at once.
pub fn validate_pool(cidrs: &[String], block_v4: u8, block_v6: u8) -> Vec<NetError> {
    let mut errors = Vec::new();
    let mut parsed: Vec<IpNet> = Vec::new();
    for raw in cidrs {
        let net = match parse_cidr(raw) {
            Ok(net) => net,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if let Some(range) = forbidden_overlap(&net) {
            errors.push(NetError::Forbidden { cidr: net, range });
        }
        let block = match IpFamily::of(&net) {
            IpFamily::IPv4 => block_v4,
            IpFamily::IPv6 => block_v6,
        };
        if let Err(e) = check_block_size(&net, block) {
            errors.push(e);
        }
        if let Some(other) = parsed.iter().find(|p| overlaps(p, &net)) {
            errors.push(NetError::Overlap { a: *other, b: net });
        }
        parsed.push(net);
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn parse_accepts_canonical_v4_and_v6() {
        assert_eq!(parse_cidr("10.244.0.0/16").unwrap(), net("10.244.0.0/16"));
        assert_eq!(parse_cidr("fd12:3456:789a::/64").unwrap(), net("fd12:3456:789a::/64"));
    }

    #[test]
    fn parse_rejects_garbage_and_names_the_input() {
        let err = parse_cidr("10.244.0.0").unwrap_err();
        assert!(matches!(err, NetError::NotACidr { .. }));
        assert!(err.to_string().contains("\"10.244.0.0\""), "{err}");
        assert!(parse_cidr("10.300.0.0/16").is_err());
        assert!(parse_cidr("10.0.0.0/33").is_err());
    }

    #[test]
    fn parse_rejects_host_bits_and_suggests_the_network() {
        let err = parse_cidr("10.244.1.0/16").unwrap_err();
        assert_eq!(err, NetError::NotNetworkAddress { input: "10.244.1.0/16".into(), network: net("10.244.0.0/16") });
        assert!(err.to_string().contains("10.244.0.0/16"));
    }

    #[test]
    fn overlap_is_containment_either_way() {
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.244.0.0/16")));
        assert!(overlaps(&net("10.244.0.0/16"), &net("10.0.0.0/8")));
        assert!(!overlaps(&net("10.244.0.0/16"), &net("10.245.0.0/16")));
        assert!(!overlaps(&net("10.244.0.0/16"), &net("fd00::/8")));
    }

    #[test]
    fn forbidden_ranges_caught_inside_and_around() {
        assert_eq!(forbidden_overlap(&net("169.254.10.0/24")), Some(net("169.254.0.0/16")));
        // A supernet of a forbidden range overlaps it too.
        assert_eq!(forbidden_overlap(&net("172.16.0.0/12")), Some(net("172.30.0.0/16")));
        assert_eq!(forbidden_overlap(&net("192.0.2.0/25")), Some(net("192.0.2.0/24")));
        assert_eq!(forbidden_overlap(&net("10.244.0.0/16")), None);
        assert_eq!(forbidden_overlap(&net("172.29.0.0/16")), None);
    }

    #[test]
    fn block_size_bounds() {
        assert!(check_block_size(&net("10.244.0.0/16"), 24).is_ok());
        assert!(check_block_size(&net("10.244.0.0/16"), 16).is_ok());
        assert!(check_block_size(&net("10.244.0.0/16"), 30).is_ok());
        assert!(matches!(
            check_block_size(&net("10.244.0.0/16"), 15),
            Err(NetError::BlockShorterThanPool { block: 15, .. })
        ));
        assert!(matches!(check_block_size(&net("10.244.0.0/16"), 31), Err(NetError::BlockTooLong { max: 30, .. })));
        assert!(check_block_size(&net("fd12:3456:789a::/64"), 80).is_ok());
        assert!(matches!(
            check_block_size(&net("fd12:3456:789a::/64"), 127),
            Err(NetError::BlockTooLong { max: 126, .. })
        ));
    }

    #[test]
    fn azure_reserves_first_four_and_last() {
        let got = azure_reserved(&net("10.224.0.0/24"));
        let want: Vec<IpAddr> = ["10.224.0.0", "10.224.0.1", "10.224.0.2", "10.224.0.3", "10.224.0.255"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        let v6 = azure_reserved(&net("fd00::/120"));
        assert_eq!(v6.len(), 5);
        assert_eq!(v6[4], "fd00::ff".parse::<IpAddr>().unwrap());
        // A /30 has four addresses, all of them reserved.
        assert_eq!(azure_reserved(&net("10.0.0.0/30")).len(), 4);
    }

    #[test]
    fn validate_pool_reports_every_problem() {
        let cidrs = vec![
            "10.244.0.0/16".to_string(),
            "10.244.128.0/17".to_string(),
            "172.31.0.0/16".to_string(),
            "nope".to_string(),
        ];
        let errors = validate_pool(&cidrs, 24, 80);
        assert!(errors.iter().any(|e| matches!(e, NetError::Overlap { .. })), "{errors:?}");
        assert!(errors.iter().any(|e| matches!(e, NetError::Forbidden { .. })), "{errors:?}");
        assert!(errors.iter().any(|e| matches!(e, NetError::NotACidr { .. })), "{errors:?}");
        assert!(validate_pool(&["10.244.0.0/16".into(), "fd12:3456:789a::/64".into()], 24, 80).is_empty());
    }
}
