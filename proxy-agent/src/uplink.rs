//! Which interfaces are the node's uplinks (XDP for NodePort, externalIPs and
//! LoadBalancer IPs): pure. The facts it decides from (each interface's
//! addresses, the default route) are read by `kernel::netinfo`.

use std::{fmt, net::Ipv4Addr};

use anyhow::{bail, Result};
use serde::Serialize;

/// What `--uplink-iface` (`FERRY_UPLINK_IFACE`) asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UplinkRequest {
    /// Unset: found from the Node's InternalIP, else the default route.
    Auto,
    /// `none`: no uplink, no north-south traffic.
    Off,
    /// These interfaces, as named.
    Named(Vec<String>),
}

impl UplinkRequest {
    /// From the flag's comma-separated values (empty ones ignored); `none`
    /// stands alone.
    pub fn from_flag(values: &[String]) -> Result<Self> {
        let names: Vec<String> = values
            .iter()
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(String::from)
            .collect();
        Ok(match names.as_slice() {
            [] => Self::Auto,
            [one] if one == "none" => Self::Off,
            _ if names.iter().any(|n| n == "none") => {
                bail!("--uplink-iface {}: `none` stands alone", names.join(","))
            }
            _ => Self::Named(names),
        })
    }
}

/// One interface of the node's network namespace, with its IPv4 addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    pub loopback: bool,
}

/// Why these uplinks (or none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Reason {
    /// Named by `--uplink-iface`.
    Flag,
    /// `--uplink-iface none`.
    Off,
    /// The interface holds this InternalIP of the Node.
    NodeAddress { address: Ipv4Addr },
    /// No interface holds an InternalIP of the Node (`node_addresses`, maybe
    /// none): the default route's interface.
    DefaultRoute { node_addresses: Vec<Ipv4Addr> },
    /// Neither: nothing serves traffic from outside.
    NotFound { node_addresses: Vec<Ipv4Addr> },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addrs = |a: &[Ipv4Addr]| match a {
            [] => "the Node has no IPv4 InternalIP".to_string(),
            _ => format!(
                "no interface holds the Node's InternalIP {}",
                a.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        match self {
            Self::Flag => write!(f, "named by --uplink-iface"),
            Self::Off => write!(
                f,
                "--uplink-iface none: NodePort, externalIPs and LoadBalancer IPs are not served"
            ),
            Self::NodeAddress { address } => write!(f, "holds the Node's InternalIP {address}"),
            Self::DefaultRoute { node_addresses } => {
                write!(
                    f,
                    "the default route's interface ({})",
                    addrs(node_addresses)
                )
            }
            Self::NotFound { node_addresses } => write!(
                f,
                "{} and there is no default route: NodePort, externalIPs and LoadBalancer IPs \
                 are not served (set --uplink-iface)",
                addrs(node_addresses)
            ),
        }
    }
}

/// The uplinks and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Choice {
    pub interfaces: Vec<String>,
    pub reason: Reason,
}

/// Chooses the uplinks: the named ones; else the interface holding the first
/// of the Node's InternalIPs that one holds; else the default route's
/// interface. A loopback interface is never an uplink.
pub fn choose(
    request: &UplinkRequest,
    node_addresses: &[Ipv4Addr],
    interfaces: &[Interface],
    default_route: Option<&str>,
) -> Choice {
    let one = |name: &str, reason| Choice {
        interfaces: vec![name.to_string()],
        reason,
    };
    match request {
        UplinkRequest::Named(names) => {
            return Choice {
                interfaces: names.clone(),
                reason: Reason::Flag,
            }
        }
        UplinkRequest::Off => {
            return Choice {
                interfaces: Vec::new(),
                reason: Reason::Off,
            }
        }
        UplinkRequest::Auto => {}
    }
    let candidates = || interfaces.iter().filter(|i| !i.loopback);
    for &address in node_addresses {
        if let Some(iface) = candidates().find(|i| i.addresses.contains(&address)) {
            return one(&iface.name, Reason::NodeAddress { address });
        }
    }
    let node_addresses = node_addresses.to_vec();
    match default_route.filter(|route| candidates().any(|i| i.name == *route)) {
        Some(name) => one(name, Reason::DefaultRoute { node_addresses }),
        None => Choice {
            interfaces: Vec::new(),
            reason: Reason::NotFound { node_addresses },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, addresses: &[&str]) -> Interface {
        Interface {
            name: name.into(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            loopback: name == "lo",
        }
    }

    fn node() -> Vec<Interface> {
        vec![
            iface("lo", &["127.0.0.1"]),
            iface("eth0", &["192.168.1.5"]),
            iface("eth1", &["10.0.0.5", "10.0.0.6"]),
        ]
    }

    fn ip(a: &str) -> Ipv4Addr {
        a.parse().unwrap()
    }

    #[test]
    fn the_interface_holding_the_internal_ip_wins_over_the_default_route() {
        let choice = choose(
            &UplinkRequest::Auto,
            &[ip("10.0.0.6")],
            &node(),
            Some("eth0"),
        );
        assert_eq!(choice.interfaces, ["eth1"]);
        assert_eq!(
            choice.reason,
            Reason::NodeAddress {
                address: ip("10.0.0.6")
            }
        );
        assert_eq!(
            choice.reason.to_string(),
            "holds the Node's InternalIP 10.0.0.6"
        );
    }

    #[test]
    fn the_first_internal_ip_an_interface_holds_decides() {
        let choice = choose(
            &UplinkRequest::Auto,
            &[ip("172.16.0.1"), ip("192.168.1.5"), ip("10.0.0.5")],
            &node(),
            None,
        );
        assert_eq!(choice.interfaces, ["eth0"]);
    }

    #[test]
    fn without_an_interface_holding_the_internal_ip_the_default_route_decides() {
        let choice = choose(
            &UplinkRequest::Auto,
            &[ip("172.16.0.1")],
            &node(),
            Some("eth0"),
        );
        assert_eq!(choice.interfaces, ["eth0"]);
        assert_eq!(
            choice.reason.to_string(),
            "the default route's interface (no interface holds the Node's InternalIP 172.16.0.1)"
        );
        let no_node = choose(&UplinkRequest::Auto, &[], &node(), Some("eth1"));
        assert_eq!(no_node.interfaces, ["eth1"]);
        assert_eq!(
            no_node.reason.to_string(),
            "the default route's interface (the Node has no IPv4 InternalIP)"
        );
    }

    #[test]
    fn loopback_is_never_an_uplink() {
        // An InternalIP on lo (as some routing setups put it) falls through
        // to the default route; a default route via lo counts as none.
        let choice = choose(
            &UplinkRequest::Auto,
            &[ip("127.0.0.1")],
            &node(),
            Some("lo"),
        );
        assert!(choice.interfaces.is_empty());
        assert!(matches!(choice.reason, Reason::NotFound { .. }));
    }

    #[test]
    fn nothing_found_says_what_to_do() {
        let choice = choose(
            &UplinkRequest::Auto,
            &[ip("10.9.9.9")],
            &node(),
            Some("gone0"),
        );
        assert!(choice.interfaces.is_empty());
        let text = choice.reason.to_string();
        assert!(text.contains("10.9.9.9"), "{text}");
        assert!(text.contains("set --uplink-iface"), "{text}");
    }

    #[test]
    fn the_flag_overrides_or_turns_off() {
        let flag = |v: &[&str]| {
            UplinkRequest::from_flag(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        assert_eq!(flag(&[]), UplinkRequest::Auto);
        assert_eq!(flag(&[""]), UplinkRequest::Auto, "FERRY_UPLINK_IFACE=\"\"");
        assert_eq!(flag(&["none"]), UplinkRequest::Off);
        assert_eq!(
            flag(&["bond0", " eth2 "]),
            UplinkRequest::Named(vec!["bond0".into(), "eth2".into()])
        );
        let named = choose(&flag(&["bond0"]), &[ip("10.0.0.5")], &node(), Some("eth0"));
        assert_eq!(
            (named.interfaces, named.reason),
            (vec!["bond0".to_string()], Reason::Flag)
        );
        let off = choose(&flag(&["none"]), &[ip("10.0.0.5")], &node(), Some("eth0"));
        assert_eq!(
            (off.interfaces, off.reason),
            (Vec::<String>::new(), Reason::Off)
        );
        let mixed = UplinkRequest::from_flag(&["eth0".into(), "none".into()]);
        let err = mixed.unwrap_err().to_string();
        assert!(err.contains("`none` stands alone"), "{err}");
    }
}
