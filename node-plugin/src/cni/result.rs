//! CNI results and their wire formats, 0.3.0 to 1.1.0.
//!
//! One in-memory shape; [`CniResult::render`] writes the requested version's
//! format (0.3.x/0.4.0 carry `"version":"4"|"6"` on each IP; 1.1.0 may carry
//! the interface MTU). [`CniResult::parse`] reads any of them back.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value, json};

use super::{CniError, code, version_at_least};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; None on the host.
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    /// Address with the prefix length the interface should use.
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub domain: Option<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

impl CniResult {
    /// The result in `version`'s wire format (a supported version).
    pub fn render(&self, version: &str) -> Value {
        let pre_1_0 = !version_at_least(version, "1.0.0");
        let v1_1 = version_at_least(version, "1.1.0");
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version));
        if !self.interfaces.is_empty() {
            let ifaces: Vec<Value> = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut m = Map::new();
                    m.insert("name".into(), json!(i.name));
                    if !i.mac.is_empty() {
                        m.insert("mac".into(), json!(i.mac));
                    }
                    if let (true, Some(mtu)) = (v1_1, i.mtu) {
                        m.insert("mtu".into(), json!(mtu));
                    }
                    if let Some(s) = &i.sandbox {
                        m.insert("sandbox".into(), json!(s));
                    }
                    Value::Object(m)
                })
                .collect();
            out.insert("interfaces".into(), Value::Array(ifaces));
        }
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut m = Map::new();
                if pre_1_0 {
                    m.insert("version".into(), json!(if ip.address.addr().is_ipv4() { "4" } else { "6" }));
                }
                if let Some(i) = ip.interface {
                    m.insert("interface".into(), json!(i));
                }
                m.insert("address".into(), json!(ip.address.to_string()));
                if let Some(gw) = ip.gateway {
                    m.insert("gateway".into(), json!(gw.to_string()));
                }
                Value::Object(m)
            })
            .collect();
        out.insert("ips".into(), Value::Array(ips));
        if !self.routes.is_empty() {
            let routes: Vec<Value> = self
                .routes
                .iter()
                .map(|r| match r.gw {
                    Some(gw) => json!({ "dst": r.dst.to_string(), "gw": gw.to_string() }),
                    None => json!({ "dst": r.dst.to_string() }),
                })
                .collect();
            out.insert("routes".into(), Value::Array(routes));
        }
        let mut dns = Map::new();
        if !self.dns.nameservers.is_empty() {
            dns.insert("nameservers".into(), json!(self.dns.nameservers));
        }
        if let Some(d) = &self.dns.domain {
            dns.insert("domain".into(), json!(d));
        }
        if !self.dns.search.is_empty() {
            dns.insert("search".into(), json!(self.dns.search));
        }
        if !self.dns.options.is_empty() {
            dns.insert("options".into(), json!(self.dns.options));
        }
        out.insert("dns".into(), Value::Object(dns));
        Value::Object(out)
    }

    /// Reads a result of any supported version (a delegated IPAM's stdout, a prevResult).
    pub fn parse(v: &Value) -> Result<Self, CniError> {
        let bad = |what: String| CniError::new(code::DECODE_FAILURE, format!("CNI result: {what}"));
        let strs = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let parse_ip = |s: &str| s.parse::<IpAddr>().map_err(|e| bad(format!("address {s:?}: {e}")));
        let mut res = CniResult::default();
        for i in v.get("interfaces").and_then(Value::as_array).into_iter().flatten() {
            res.interfaces.push(Interface {
                name: i.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
                mac: i.get("mac").and_then(Value::as_str).unwrap_or_default().to_owned(),
                mtu: i.get("mtu").and_then(Value::as_u64).map(|m| m as u32),
                sandbox: i.get("sandbox").and_then(Value::as_str).map(str::to_owned),
            });
        }
        for ip in v.get("ips").and_then(Value::as_array).into_iter().flatten() {
            let addr = ip.get("address").and_then(Value::as_str).ok_or_else(|| bad("ip without address".into()))?;
            let address = addr.parse::<IpNet>().map_err(|e| bad(format!("address {addr:?}: {e}")))?;
            let gateway = ip.get("gateway").and_then(Value::as_str).map(parse_ip).transpose()?;
            let interface = ip.get("interface").and_then(Value::as_u64).map(|i| i as usize);
            res.ips.push(IpConfig { address, gateway, interface });
        }
        for r in v.get("routes").and_then(Value::as_array).into_iter().flatten() {
            let dst = r.get("dst").and_then(Value::as_str).ok_or_else(|| bad("route without dst".into()))?;
            let dst = dst.parse::<IpNet>().map_err(|e| bad(format!("route dst {dst:?}: {e}")))?;
            let gw = r.get("gw").and_then(Value::as_str).map(parse_ip).transpose()?;
            res.routes.push(Route { dst, gw });
        }
        if let Some(d) = v.get("dns") {
            res.dns = Dns {
                nameservers: strs(d.get("nameservers")),
                domain: d.get("domain").and_then(Value::as_str).map(str::to_owned),
                search: strs(d.get("search")),
                options: strs(d.get("options")),
            };
        }
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "carve0123456789".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    mtu: Some(1450),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "11:22:33:44:55:66".into(),
                    mtu: Some(1450),
                    sandbox: Some("/var/run/netns/p".into()),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.2/32".parse().unwrap(),
                    gateway: Some("169.254.1.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00::2/128".parse().unwrap(),
                    gateway: Some("fe80::1".parse().unwrap()),
                    interface: Some(1),
                },
            ],
            routes: vec![Route { dst: "0.0.0.0/0".parse().unwrap(), gw: Some("169.254.1.1".parse().unwrap()) }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn old_versions_carry_ip_version_field() {
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let out = sample().render(v);
            assert_eq!(out["cniVersion"], v);
            assert_eq!(out["ips"][0]["version"], "4");
            assert_eq!(out["ips"][1]["version"], "6");
            assert!(out["interfaces"][0].get("mtu").is_none());
        }
    }

    #[test]
    fn new_versions_drop_it_and_1_1_has_mtu() {
        let out = sample().render("1.0.0");
        assert!(out["ips"][0].get("version").is_none());
        assert!(out["interfaces"][0].get("mtu").is_none());
        let out = sample().render("1.1.0");
        assert!(out["ips"][0].get("version").is_none());
        assert_eq!(out["interfaces"][1]["mtu"], 1450);
        assert_eq!(out["interfaces"][1]["sandbox"], "/var/run/netns/p");
        assert_eq!(out["ips"][0]["address"], "10.244.1.2/32");
        assert_eq!(out["routes"][0]["gw"], "169.254.1.1");
    }

    #[test]
    fn parse_reads_every_version_back() {
        for v in crate::cni::SUPPORTED_VERSIONS {
            let mut expect = sample();
            if !version_at_least(v, "1.1.0") {
                for i in &mut expect.interfaces {
                    i.mtu = None;
                }
            }
            assert_eq!(CniResult::parse(&sample().render(v)).unwrap(), expect, "{v}");
        }
        assert_eq!(CniResult::parse(&json!({"ips":[{"address":"nope"}]})).unwrap_err().code, 6);
    }
}
