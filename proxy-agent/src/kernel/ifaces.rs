//! Which interfaces get the pod programs: names matching the configured globs,
//! found at start and then followed through rtnetlink link events; and the
//! local endpoints the kernel reaches through an interface without them
//! (a CNI whose names no glob matches), which the agent warns about.

use std::{collections::HashMap, io, mem::size_of, net::IpAddr, thread};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::rtnl::{self, Link, RouteTo, RTM_NEWLINK};

/// A link appeared (or changed) or went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Up { index: u32, name: String },
    Gone { index: u32, name: String },
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

/// Interfaces present now, as (index, name).
pub fn current() -> Result<Vec<(u32, String)>> {
    Ok(rtnl::links()?
        .into_iter()
        .map(|link| (link.index, link.name))
        .collect())
}

const RTM_DELLINK: u16 = 17;
const RTMGRP_LINK: u32 = 1;
const NLMSG_HDR: usize = 16;

/// Subscribes to link events of this network namespace. A thread reads the
/// netlink socket and forwards events; it ends when the receiver is dropped.
pub fn subscribe() -> Result<mpsc::UnboundedReceiver<LinkEvent>> {
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening an rtnetlink socket");
    }
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = RTMGRP_LINK;
    let ret = unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if ret != 0 {
        let err = io::Error::last_os_error();
        unsafe { libc::close(fd) };
        return Err(err).context("subscribing to link events");
    }
    let (tx, rx) = mpsc::unbounded_channel();
    thread::Builder::new()
        .name("link-events".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let err = io::Error::last_os_error();
                    if err.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // ENOBUFS: events were lost. Report every current link again.
                    if err.raw_os_error() == Some(libc::ENOBUFS) {
                        for (index, name) in current().unwrap_or_default() {
                            if tx.send(LinkEvent::Up { index, name }).is_err() {
                                break;
                            }
                        }
                        continue;
                    }
                    tracing::error!(error = %err, "link events stopped");
                    break;
                }
                for event in parse(&buf[..n as usize]) {
                    if tx.send(event).is_err() {
                        unsafe { libc::close(fd) };
                        return;
                    }
                }
            }
            unsafe { libc::close(fd) };
        })?;
    Ok(rx)
}

/// Parses a buffer of rtnetlink messages into link events.
pub fn parse(mut buf: &[u8]) -> Vec<LinkEvent> {
    let mut events = Vec::new();
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        if len < NLMSG_HDR || len > buf.len() {
            break;
        }
        let msg = &buf[NLMSG_HDR..len];
        if kind == RTM_NEWLINK || kind == RTM_DELLINK {
            if let Some(rtnl::Link { index, name, .. }) = rtnl::link_of(msg) {
                events.push(if kind == RTM_NEWLINK {
                    LinkEvent::Up { index, name }
                } else {
                    LinkEvent::Gone { index, name }
                });
            }
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::rtnl::{IFINFOMSG, IFLA_IFNAME};

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth1234"));
        assert!(glob_match("*", "eth0"));
        assert!(glob_match("lxc*_c", "lxc12_c"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(!glob_match("cali", "cali0"));
        assert!(matches_any(&["cali*".into(), "fp-*".into()], "fp-web-1"));
    }

    fn message(kind: u16, index: i32, name: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let alen = 4 + name.len() + 1;
        attr.extend((alen as u16).to_ne_bytes());
        attr.extend(IFLA_IFNAME.to_ne_bytes());
        attr.extend(name.as_bytes());
        attr.push(0);
        attr.resize(alen.next_multiple_of(4), 0);
        let mut info = vec![0u8; IFINFOMSG];
        info[4..8].copy_from_slice(&index.to_ne_bytes());
        // An attribute before the name, as the kernel sends (IFLA_MTU = 4).
        let mut mtu = vec![8, 0, 4, 0];
        mtu.extend(1500u32.to_ne_bytes());
        let body: Vec<u8> = [info, mtu, attr].concat();
        let mut msg = Vec::new();
        msg.extend(((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        msg.extend(kind.to_ne_bytes());
        msg.extend([0u8; 10]);
        msg.extend(body);
        msg
    }

    #[test]
    fn endpoints_behind_interfaces_without_the_programs_are_named() {
        let link = |index, name: &str, master| Link {
            index,
            name: name.into(),
            master,
        };
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
            message(RTM_NEWLINK, 7, "vethab"),
            message(RTM_DELLINK, 3, "fp-x"),
            message(20, 1, "addr"),
        ]
        .concat();
        assert_eq!(
            parse(&buf),
            [
                LinkEvent::Up {
                    index: 7,
                    name: "vethab".into()
                },
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
