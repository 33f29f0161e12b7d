//! Which interfaces get the pod programs, and the events that change it.
//!
//! An interface is a pod interface when its name matches one of the
//! configured globs, or, whatever the CNI names it, when the kernel routes
//! this node's pods through it: a route of the main table into one of the
//! Node's pod CIDRs (a bridge CNI's subnet, a routed CNI's per-pod routes),
//! a route to one address out of a veth (routed CNIs whose pod addresses lie
//! outside the Node's pod CIDRs, as cloud VPC CNIs'), or the route to an
//! endpoint on this node. Such an interface that is a bridge passes the
//! role to its ports (a bridge CNI's veths). The uplinks and loopback never
//! are. Local endpoints still routed through an interface without the
//! programs are named, for the agent to warn about.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    thread,
};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;

use super::rtnl::{self, Link, Route, RouteTo};
use crate::frontend::Cidr;

/// A change of the namespace's links or routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link appeared or changed.
    Up(Link),
    Gone {
        index: u32,
        name: String,
    },
    Route(Route),
    RouteGone(Route),
    /// Events were lost: the agent reads links and routes afresh.
    Lost,
}

/// Why an interface gets the pod programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Its name matches a `--pod-iface-pattern` glob.
    Pattern,
    /// The kernel routes this node's pods through it.
    PodRoute,
    /// It is a port of a bridge the kernel routes this node's pods through.
    BridgePort,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pattern => "its name matches --pod-iface-pattern",
            Self::PodRoute => "it routes this node's pods",
            Self::BridgePort => "it is a port of a bridge that routes this node's pods",
        }
    }
}

/// What decides which interfaces are pod interfaces, besides the links and
/// routes themselves.
#[derive(Clone, Copy, Debug)]
pub struct Selection<'a> {
    pub patterns: &'a [String],
    /// Never pod interfaces.
    pub uplinks: &'a [String],
    /// The Node's pod CIDRs.
    pub pod_cidrs: &'a [Cidr],
    /// Interfaces the kernel routes an endpoint on this node through.
    pub endpoint_routes: &'a HashSet<u32>,
}

/// Whether `outer` holds every address of `inner` (same family).
fn covers(outer: &Cidr, inner: &Cidr) -> bool {
    inner.prefix >= outer.prefix && outer.contains(inner.address)
}

/// The pod interfaces among `links`, with why each is one.
pub fn pod_interfaces(
    links: &HashMap<u32, Link>,
    routes: &HashSet<Route>,
    selection: &Selection<'_>,
) -> Vec<(u32, String, Reason)> {
    let host_route = |r: &Route| r.dst.prefix == if r.dst.address.is_ipv4() { 32 } else { 128 };
    let veth = |index: u32| links.get(&index).and_then(|l| l.kind.as_deref()) == Some("veth");
    let routing: HashSet<u32> = routes
        .iter()
        .filter(|r| {
            selection.pod_cidrs.iter().any(|c| covers(c, &r.dst)) || (host_route(r) && veth(r.oif))
        })
        .map(|r| r.oif)
        .chain(selection.endpoint_routes.iter().copied())
        .collect();
    let routing_bridge = |index: Option<u32>| {
        index.is_some_and(|i| routing.contains(&i) && links.get(&i).is_some_and(Link::is_bridge))
    };
    let mut out: Vec<(u32, String, Reason)> = links
        .values()
        .filter(|l| l.name != "lo" && !selection.uplinks.contains(&l.name))
        .filter_map(|l| {
            let reason = if matches_any(selection.patterns, &l.name) {
                Reason::Pattern
            } else if routing.contains(&l.index) && !l.is_bridge() {
                Reason::PodRoute
            } else if routing_bridge(l.master) {
                Reason::BridgePort
            } else {
                return None;
            };
            Some((l.index, l.name.clone(), reason))
        })
        .collect();
    out.sort_unstable_by_key(|(index, ..)| *index);
    out
}

/// Glob matching with `*` (any run of characters), as in `--pod-iface-pattern 'veth*'`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

pub fn matches_any(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, name))
}

/// The agent's view of the namespace's links and routes, what decides the
/// pod interfaces beyond them, and the interfaces it attached.
#[derive(Debug, Default)]
pub struct Interfaces {
    pub links: HashMap<u32, Link>,
    pub routes: HashSet<Route>,
    /// Interfaces the kernel routes an endpoint on this node through.
    pub endpoint_routes: HashSet<u32>,
    /// The Node's pod CIDRs.
    pub pod_cidrs: Vec<Cidr>,
    pub uplinks: Vec<String>,
    /// Pod interfaces with the programs attached, by name: their index.
    pub attached: HashMap<String, u32>,
    /// Interfaces whose attach failed since the last resync: not tried again
    /// on every event.
    pub failed: HashSet<u32>,
}

impl Interfaces {
    /// Follows one event (not [`LinkEvent::Lost`]); returns the name of an
    /// attached interface that went.
    pub fn apply(&mut self, event: LinkEvent) -> Option<String> {
        match event {
            LinkEvent::Up(link) => {
                self.links.insert(link.index, link);
            }
            LinkEvent::Gone { index, name } => {
                self.links.remove(&index);
                // The kernel drops the link's routes without an event.
                self.routes.retain(|r| r.oif != index);
                self.endpoint_routes.remove(&index);
                self.failed.remove(&index);
                if self.attached.get(&name) == Some(&index) {
                    self.attached.remove(&name);
                    return Some(name);
                }
            }
            LinkEvent::Route(route) => {
                self.routes.insert(route);
            }
            LinkEvent::RouteGone(route) => {
                self.routes.remove(&route);
            }
            LinkEvent::Lost => {}
        }
        None
    }

    /// Takes the links and routes read afresh; forgets attached interfaces
    /// that are gone (or came back under another index) and past failures.
    pub fn replace(&mut self, links: Vec<Link>, routes: Vec<Route>) {
        self.links = links.into_iter().map(|l| (l.index, l)).collect();
        self.routes = routes.into_iter().collect();
        let links = &self.links;
        self.attached
            .retain(|name, index| links.get(index).is_some_and(|l| l.name == *name));
        self.endpoint_routes
            .retain(|index| links.contains_key(index));
        self.failed.clear();
    }

    /// The pod interfaces not attached yet (nor failed since the last
    /// resync), with why each is one.
    pub fn to_attach(&self, patterns: &[String]) -> Vec<(u32, String, Reason)> {
        let selection = Selection {
            patterns,
            uplinks: &self.uplinks,
            pod_cidrs: &self.pod_cidrs,
            endpoint_routes: &self.endpoint_routes,
        };
        pod_interfaces(&self.links, &self.routes, &selection)
            .into_iter()
            .filter(|(index, name, _)| {
                self.attached.get(name) != Some(index) && !self.failed.contains(index)
            })
            .collect()
    }
}

/// The local endpoints (with the route the kernel takes to each) whose pods
/// the pod programs do not see: routed out of an interface that has none
/// attached, and that is no bridge with an attached port (a bridge CNI's
/// veths are its ports). Each with that interface's name. The node's own
/// addresses (hostNetwork endpoints) are not pods behind an interface.
pub fn unattached(
    routes: &[(IpAddr, RouteTo)],
    links: &[Link],
    attached: &HashMap<String, u32>,
) -> Vec<(IpAddr, String)> {
    let served = |oif: u32| {
        attached.values().any(|&i| i == oif)
            || links
                .iter()
                .any(|l| l.master == Some(oif) && attached.get(&l.name) == Some(&l.index))
    };
    let name = |oif: u32| {
        links
            .iter()
            .find(|l| l.index == oif)
            .map_or_else(|| format!("ifindex {oif}"), |l| l.name.clone())
    };
    routes
        .iter()
        .filter_map(|&(addr, route)| match route {
            RouteTo::Local => None,
            RouteTo::Unreachable => Some((addr, "no route".to_string())),
            RouteTo::Interface(oif) if served(oif) => None,
            RouteTo::Interface(oif) => Some((addr, name(oif))),
        })
        .collect()
}

const RTMGRP_LINK: u32 = 1;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

/// Subscribes to link and route events of this network namespace. A thread
/// reads the netlink socket and forwards events; it ends when the receiver
/// is dropped.
pub fn subscribe() -> Result<mpsc::UnboundedReceiver<LinkEvent>> {
    let socket = rtnl::subscribe(RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
        .context("subscribing to link and route events")?;
    let (tx, rx) = mpsc::unbounded_channel();
    thread::Builder::new()
        .name("link-events".into())
        .spawn(move || {
            let mut buf = Vec::with_capacity(64 * 1024);
            loop {
                if let Err(err) = rtnl::receive(&socket, &mut buf) {
                    // ENOBUFS: events were lost.
                    if err.raw_os_error() == Some(libc::ENOBUFS) {
                        if tx.send(LinkEvent::Lost).is_err() {
                            break;
                        }
                        continue;
                    }
                    tracing::error!(error = %err, "link events stopped");
                    break;
                }
                for event in parse(&buf) {
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(rx)
}

/// Parses a datagram of rtnetlink messages into link and route events.
pub fn parse(buf: &[u8]) -> Vec<LinkEvent> {
    rtnl::messages(buf)
        .into_iter()
        .filter_map(|message| match message.payload {
            NetlinkPayload::InnerMessage(inner) => Some(inner),
            _ => None,
        })
        .filter_map(|inner| match inner {
            RouteNetlinkMessage::NewLink(l) => rtnl::link_of(&l).map(LinkEvent::Up),
            RouteNetlinkMessage::DelLink(l) => rtnl::link_of(&l).map(|l| LinkEvent::Gone {
                index: l.index,
                name: l.name,
            }),
            RouteNetlinkMessage::NewRoute(r) => rtnl::route_of(&r).map(LinkEvent::Route),
            RouteNetlinkMessage::DelRoute(r) => rtnl::route_of(&r).map(LinkEvent::RouteGone),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::address::AddressMessage;

    use crate::kernel::rtnl::tests::{framed, link_message};

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth1234"));
        assert!(glob_match("*", "eth0"));
        assert!(glob_match("lxc*_c", "lxc12_c"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(!glob_match("cali", "cali0"));
        assert!(matches_any(&["cali*".into(), "fp-*".into()], "fp-web-1"));
    }

    fn link(index: u32, name: &str, master: Option<u32>) -> Link {
        Link {
            index,
            name: name.into(),
            master,
            kind: None,
        }
    }

    fn veth(index: u32, name: &str) -> Link {
        Link {
            kind: Some("veth".into()),
            ..link(index, name, None)
        }
    }

    fn bridge(index: u32, name: &str) -> Link {
        Link {
            kind: Some("bridge".into()),
            ..link(index, name, None)
        }
    }

    #[test]
    fn pod_interfaces_by_name_by_route_and_by_bridge() {
        let links: HashMap<u32, Link> = [
            link(1, "lo", None),
            link(2, "eth0", None),
            link(3, "veth1", None),   // a glob matches
            link(4, "eni4", None),    // per-pod route into the pod CIDR
            bridge(5, "cni0"),        // the pod CIDR's route
            link(6, "tap6", Some(5)), // its ports
            link(7, "tap7", Some(5)),
            link(8, "azv8", None),  // an endpoint's route, outside the pod CIDR
            link(9, "tunl0", None), // other nodes' pod CIDR
            link(10, "docker0", None), // another prefix
            bridge(11, "br-ext"),   // a bridge routing nothing of ours
            link(12, "tap12", Some(11)),
            veth(13, "eni13"), // a cloud CNI's veth: a host route, no pod CIDR
            veth(14, "tun14"), // a veth with only a subnet route
        ]
        .into_iter()
        .map(|l| (l.index, l))
        .collect();
        let route = |dst: &str, oif| Route {
            dst: dst.parse().unwrap(),
            oif,
        };
        let routes: HashSet<Route> = [
            route("0.0.0.0/0", 2),
            route("10.244.1.7/32", 4),
            route("10.244.1.0/24", 5),
            route("10.244.2.0/24", 9),
            route("10.244.0.0/16", 2), // wider than the pod CIDR: not ours alone
            route("172.17.0.0/16", 10),
            route("192.168.5.0/24", 11),
            route("10.0.7.23/32", 13),
            route("10.9.0.0/24", 14),
            route("10.0.7.1/32", 2), // a host route out of a device that is no veth
        ]
        .into();
        let endpoint_routes: HashSet<u32> = [8].into();
        let patterns = ["veth*".to_string()];
        let selection = Selection {
            patterns: &patterns,
            uplinks: &["eth0".to_string()],
            pod_cidrs: &["10.244.1.0/24".parse().unwrap()],
            endpoint_routes: &endpoint_routes,
        };
        let chosen: Vec<(String, Reason)> = pod_interfaces(&links, &routes, &selection)
            .into_iter()
            .map(|(_, name, reason)| (name, reason))
            .collect();
        assert_eq!(
            chosen,
            [
                ("veth1".to_string(), Reason::Pattern),
                ("eni4".to_string(), Reason::PodRoute),
                ("tap6".to_string(), Reason::BridgePort),
                ("tap7".to_string(), Reason::BridgePort),
                ("azv8".to_string(), Reason::PodRoute),
                ("eni13".to_string(), Reason::PodRoute),
            ]
        );
        // An uplink is never one, whatever routes through it or its name.
        let selection = Selection {
            uplinks: &["veth1".to_string(), "eni4".to_string()],
            ..selection
        };
        let names: Vec<String> = pod_interfaces(&links, &routes, &selection)
            .into_iter()
            .map(|(_, name, _)| name)
            .collect();
        assert_eq!(names, ["tap6", "tap7", "azv8", "eni13"]);
    }

    #[test]
    fn endpoints_behind_interfaces_without_the_programs_are_named() {
        let links = [
            link(2, "eth0", None),
            link(3, "veth1", None),
            link(4, "cni0", None),
            link(5, "vethb", Some(4)),
            link(6, "eni7", None),
            link(7, "br1", None),
        ];
        let attached: HashMap<String, u32> = [("veth1".into(), 3), ("vethb".into(), 5)].into();
        let addr = |last: u8| IpAddr::from([10, 0, 0, last]);
        let routes = [
            (addr(1), RouteTo::Interface(3)), // a routed veth with the programs
            (addr(2), RouteTo::Interface(4)), // behind a bridge with an attached port
            (addr(3), RouteTo::Interface(6)), // another CNI's name
            (addr(4), RouteTo::Local),        // hostNetwork
            (addr(5), RouteTo::Unreachable),
            (addr(6), RouteTo::Interface(7)), // a bridge without attached ports
        ];
        assert_eq!(
            unattached(&routes, &links, &attached),
            [
                (addr(3), "eni7".to_string()),
                (addr(5), "no route".to_string()),
                (addr(6), "br1".to_string())
            ]
        );
    }

    #[test]
    fn parses_new_and_deleted_links() {
        let buf = [
            framed(RouteNetlinkMessage::NewLink(link_message(
                7, "vethab", None,
            ))),
            framed(RouteNetlinkMessage::DelLink(link_message(3, "fp-x", None))),
            framed(RouteNetlinkMessage::NewAddress(AddressMessage::default())),
        ]
        .concat();
        assert_eq!(
            parse(&buf),
            [
                LinkEvent::Up(Link {
                    index: 7,
                    name: "vethab".into(),
                    master: None,
                    kind: None,
                }),
                LinkEvent::Gone {
                    index: 3,
                    name: "fp-x".into()
                }
            ]
        );
        assert!(
            parse(&buf[..10]).is_empty(),
            "a truncated buffer yields nothing"
        );
    }
}
