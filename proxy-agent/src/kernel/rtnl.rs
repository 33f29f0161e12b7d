//! rtnetlink requests of the calling thread's network namespace, written
//! directly (the agent's image has no `ip`): the links with their kinds and
//! bridge masters, the routes out of each, the route to one address, and
//! what `fib_model` creates. The messages the link and route events carry
//! are read here too.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};

use crate::frontend::Cidr;

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_DELROUTE: u16 = 25;
pub const RTM_GETROUTE: u16 = 26;
pub const IFINFOMSG: usize = 16;
pub const RTMSG: usize = 12;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MASTER: u16 = 10;
pub const IFLA_LINKINFO: u16 = 18;
pub const IFLA_INFO_KIND: u16 = 1;
pub const RTA_DST: u16 = 1;
pub const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
pub const RT_TABLE_MAIN: u8 = 254;
pub const RTN_UNICAST: u8 = 1;
/// `rtm_type` of a route to one of the node's own addresses.
const RTN_LOCAL: u8 = 2;

/// An rtnetlink socket that sends one request at a time.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

/// An rtnetlink socket of the calling thread's namespace.
fn socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2).
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
    // SAFETY: a descriptor we own from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An rtnetlink socket that receives the events of multicast `groups`
/// (`RTMGRP_*`).
pub fn subscribe(groups: u32) -> Result<OwnedFd> {
    let fd = socket()?;
    // SAFETY: an all-zero sockaddr_nl is valid.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: `addr` is valid for the length given.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error()).context("subscribing to rtnetlink events");
    }
    Ok(fd)
}

/// The OS error code behind an error of a [`Rtnl::request`], if any.
pub fn os_error(e: &anyhow::Error) -> Option<i32> {
    e.downcast_ref::<io::Error>()
        .and_then(io::Error::raw_os_error)
}

impl Rtnl {
    pub fn open() -> Result<Self> {
        Ok(Self {
            fd: socket()?,
            seq: 0,
        })
    }

    /// Sends one request (`body`: the family header and its attributes) and
    /// returns the messages that answer it (their payloads, after the
    /// netlink header): a dump's, until it is done; otherwise whatever
    /// comes before the kernel's acknowledgement, which an error replaces.
    pub fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        let mut msg = Vec::with_capacity(NLMSG_HDR + body.len());
        msg.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // To the kernel: port id 0.
        // SAFETY: an all-zero sockaddr_nl is valid.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `msg` and `kernel` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error()).context("rtnetlink send");
        }
        let mut answers = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err).context("rtnetlink receive");
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDR {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                if len < NLMSG_HDR || len > rest.len() {
                    bail!("a malformed rtnetlink reply");
                }
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                let payload = &rest[NLMSG_HDR..len];
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if seq != self.seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(answers),
                    NLMSG_ERROR if payload.len() >= 4 => {
                        let errno = -i32::from_ne_bytes(payload[0..4].try_into().unwrap());
                        return match errno {
                            0 => Ok(answers),
                            e => Err(io::Error::from_raw_os_error(e).into()),
                        };
                    }
                    _ => answers.push(payload.to_vec()),
                }
            }
        }
    }
}

/// Appends one attribute, padded.
pub fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Appends an attribute that holds the attributes `fill` writes.
pub fn nest(buf: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    fill(&mut inner);
    attr(buf, kind, &inner);
}

pub fn c_string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// The attributes of a message whose family header is `header` bytes long:
/// (type, value), nesting flags masked off.
pub fn attributes(msg: &[u8], header: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = msg.get(header..).unwrap_or_default();
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((
            u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff,
            &rest[4..len],
        ));
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    out
}

fn u32_of(value: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(value.get(..4)?.try_into().ok()?))
}

/// A network interface: its index, name, bridge (or bond) master and kind
/// (`veth`, `bridge`, ...; none for a physical device).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub master: Option<u32>,
    pub kind: Option<String>,
}

impl Link {
    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }
}

fn string_of(value: &[u8]) -> String {
    let raw = value.split(|b| *b == 0).next().unwrap_or(value);
    String::from_utf8_lossy(raw).into_owned()
}

/// An RTM_NEWLINK message as a [`Link`] (None without a name).
pub fn link_of(msg: &[u8]) -> Option<Link> {
    let index = u32_of(msg.get(4..8)?)?;
    let mut name = None;
    let mut master = None;
    let mut kind = None;
    for (attr, value) in attributes(msg, IFINFOMSG) {
        match attr {
            IFLA_IFNAME => name = Some(string_of(value)),
            IFLA_MASTER => master = u32_of(value).filter(|m| *m != 0),
            IFLA_LINKINFO => {
                kind = attributes(value, 0)
                    .into_iter()
                    .find(|(a, _)| *a == IFLA_INFO_KIND)
                    .map(|(_, v)| string_of(v));
            }
            _ => {}
        }
    }
    Some(Link {
        index,
        name: name?,
        master,
        kind,
    })
}

/// A unicast route of the main table out of an interface (`ip route`'s
/// `dst dev oif`, with or without a gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub dst: Cidr,
    pub oif: u32,
}

/// An RTM_NEWROUTE (or RTM_DELROUTE) message as a [`Route`]: None for other
/// tables and types, and routes without one outgoing interface.
pub fn route_of(msg: &[u8]) -> Option<Route> {
    if msg.len() < RTMSG || msg[7] != RTN_UNICAST {
        return None;
    }
    let (family, prefix) = (i32::from(msg[0]), msg[1]);
    let mut table = u32::from(msg[4]);
    let mut dst = None;
    let mut oif = None;
    for (attr, value) in attributes(msg, RTMSG) {
        match attr {
            RTA_DST => dst = Some(value),
            RTA_OIF => oif = u32_of(value),
            RTA_TABLE => table = u32_of(value)?,
            _ => {}
        }
    }
    if table != u32::from(RT_TABLE_MAIN) {
        return None;
    }
    let address = match (family, dst) {
        (libc::AF_INET, None) => IpAddr::from([0u8; 4]),
        (libc::AF_INET6, None) => IpAddr::from([0u8; 16]),
        (libc::AF_INET, Some(d)) => IpAddr::from(<[u8; 4]>::try_from(d).ok()?),
        (libc::AF_INET6, Some(d)) => IpAddr::from(<[u8; 16]>::try_from(d).ok()?),
        _ => return None,
    };
    Some(Route {
        dst: Cidr::new(address, prefix)?,
        oif: oif?,
    })
}

/// Every unicast route of the main table, of both families.
pub fn routes() -> Result<Vec<Route>> {
    let mut rtnl = Rtnl::open()?;
    let answers = rtnl
        .request(RTM_GETROUTE, NLM_F_DUMP, &[0u8; RTMSG])
        .context("listing routes")?;
    Ok(answers.iter().filter_map(|m| route_of(m)).collect())
}

/// Every interface of this network namespace.
pub fn links() -> Result<Vec<Link>> {
    let mut rtnl = Rtnl::open()?;
    let answers = rtnl
        .request(RTM_GETLINK, NLM_F_DUMP, &[0u8; IFINFOMSG])
        .context("listing interfaces")?;
    Ok(answers.iter().filter_map(|m| link_of(m)).collect())
}

/// Where the kernel sends a packet to one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteTo {
    /// One of this node's own addresses (a hostNetwork endpoint).
    Local,
    /// Out of this interface.
    Interface(u32),
    /// No route.
    Unreachable,
}

/// The route the kernel takes to `addr` (`ip route get`).
pub fn route_to(rtnl: &mut Rtnl, addr: IpAddr) -> Result<RouteTo> {
    let (family, bytes, bits) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec(), 32),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec(), 128),
    };
    let mut body = vec![family, bits, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut body, RTA_DST, &bytes);
    let answers = match rtnl.request(RTM_GETROUTE, 0, &body) {
        Ok(answers) => answers,
        Err(e) => {
            if matches!(os_error(&e), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) {
                return Ok(RouteTo::Unreachable);
            }
            return Err(e).with_context(|| format!("the route to {addr}"));
        }
    };
    let Some(route) = answers.first().filter(|m| m.len() >= RTMSG) else {
        return Ok(RouteTo::Unreachable);
    };
    if route[7] == RTN_LOCAL {
        return Ok(RouteTo::Local);
    }
    Ok(attributes(route, RTMSG)
        .into_iter()
        .find(|(kind, _)| *kind == RTA_OIF)
        .and_then(|(_, v)| u32_of(v))
        .map_or(RouteTo::Unreachable, RouteTo::Interface))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested_lengths_cover_their_content() {
        let mut buf = Vec::new();
        attr(&mut buf, IFLA_IFNAME, &c_string("uplink0"));
        assert_eq!(buf.len(), 12, "4 header + 8 name bytes");
        assert_eq!(u16::from_ne_bytes([buf[0], buf[1]]), 12);
        let mut nested = Vec::new();
        nest(&mut nested, 18, |i| attr(i, 1, b"veth"));
        assert_eq!(u16::from_ne_bytes([nested[0], nested[1]]), 12);
        assert_eq!(&nested[8..12], b"veth");
    }

    #[test]
    fn a_link_message_gives_its_index_name_and_master() {
        let mut msg = vec![0u8; IFINFOMSG];
        msg[4..8].copy_from_slice(&7u32.to_ne_bytes());
        attr(&mut msg, IFLA_IFNAME, &c_string("veth9"));
        attr(&mut msg, IFLA_MASTER, &3u32.to_ne_bytes());
        nest(&mut msg, IFLA_LINKINFO, |i| {
            attr(i, IFLA_INFO_KIND, b"veth")
        });
        assert_eq!(
            link_of(&msg),
            Some(Link {
                index: 7,
                name: "veth9".into(),
                master: Some(3),
                kind: Some("veth".into()),
            })
        );
        assert_eq!(link_of(&msg[..IFINFOMSG]), None, "no name");
    }

    fn route(family: u8, prefix: u8, table: u8, kind: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut msg = vec![family, prefix, 0, 0, table, 4, 0, kind, 0, 0, 0, 0];
        for (a, v) in attrs {
            attr(&mut msg, *a, v);
        }
        msg
    }

    #[test]
    fn route_messages_give_main_table_unicast_routes_with_an_interface() {
        let oif = 5u32.to_ne_bytes();
        let v4 = libc::AF_INET as u8;
        let pod = route(
            v4,
            32,
            RT_TABLE_MAIN,
            RTN_UNICAST,
            &[(RTA_DST, &[10, 244, 1, 5]), (RTA_OIF, &oif)],
        );
        assert_eq!(
            route_of(&pod),
            Some(Route {
                dst: "10.244.1.5/32".parse().unwrap(),
                oif: 5
            })
        );
        let default = route(v4, 0, RT_TABLE_MAIN, RTN_UNICAST, &[(RTA_OIF, &oif)]);
        assert_eq!(
            route_of(&default).unwrap().dst,
            "0.0.0.0/0".parse().unwrap()
        );
        let v6 = route(
            libc::AF_INET6 as u8,
            64,
            0,
            RTN_UNICAST,
            &[
                (RTA_TABLE, &254u32.to_ne_bytes()),
                (RTA_DST, &[0xfd; 16]),
                (RTA_OIF, &oif),
            ],
        );
        assert_eq!(
            route_of(&v6).unwrap().dst.prefix,
            64,
            "the table from RTA_TABLE"
        );
        let local_table = route(
            v4,
            32,
            255,
            RTN_LOCAL,
            &[(RTA_DST, &[10, 0, 0, 1]), (RTA_OIF, &oif)],
        );
        assert_eq!(route_of(&local_table), None);
        let blackhole = route(v4, 24, RT_TABLE_MAIN, 6, &[(RTA_DST, &[10, 9, 9, 0])]);
        assert_eq!(route_of(&blackhole), None);
    }
}
