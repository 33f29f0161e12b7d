//! rtnetlink requests of the calling thread's network namespace (the
//! agent's image has no `ip`): the links with their kinds and bridge
//! masters, the routes out of each, the route to one address, and what
//! `fib_model` and `clsact` send. The messages are netlink-packet-route's
//! typed ones, over netlink-sys's blocking socket; this module turns them
//! into what the agent keeps ([`Link`], [`Route`], [`RouteTo`]), and reads
//! the link and route events too.

use std::{io, net::IpAddr};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    link::{LinkAttribute, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::frontend::Cidr;

/// Room for one datagram of a dump (the kernel sends up to a page's worth
/// of messages at a time, or 32 KiB with large pages).
const RECV_BUF: usize = 64 * 1024;

/// An rtnetlink socket that sends one request at a time.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

/// An rtnetlink socket that receives the events of multicast `groups`
/// (`RTMGRP_*`).
pub fn subscribe(groups: u32) -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
    socket
        .bind(&SocketAddr::new(0, groups))
        .context("subscribing to rtnetlink events")?;
    Ok(socket)
}

/// The OS error code behind an error of a [`Rtnl::request`], if any.
pub fn os_error(e: &anyhow::Error) -> Option<i32> {
    e.downcast_ref::<io::Error>()
        .and_then(io::Error::raw_os_error)
}

/// Reads one datagram of `socket` into `buf` (cleared first), retrying
/// when a signal interrupts the wait.
pub fn receive(socket: &Socket, buf: &mut Vec<u8>) -> io::Result<()> {
    loop {
        buf.clear();
        match socket.recv(buf, 0) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(drop),
        }
    }
}

/// The messages of one datagram, in order: a message that does not parse
/// ends the list (the rest of the datagram cannot be framed without it).
pub fn messages(mut buf: &[u8]) -> Vec<NetlinkMessage<RouteNetlinkMessage>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf) else {
            break;
        };
        let len = message.header.length as usize;
        if len == 0 {
            break;
        }
        out.push(message);
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

impl Rtnl {
    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
        socket.bind_auto().context("binding an rtnetlink socket")?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends one request (with `flags` beside NLM_F_REQUEST) and returns the
    /// messages that answer it: a dump's, until it is done; otherwise
    /// whatever comes before the kernel's acknowledgement, which an error
    /// replaces (as an `io::Error`, see [`os_error`]).
    pub fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq += 1;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = self.seq;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket
            .send_to(&bytes, &SocketAddr::new(0, 0), 0)
            .context("rtnetlink send")?;

        let mut answers = Vec::new();
        let mut buf = Vec::with_capacity(RECV_BUF);
        loop {
            receive(&self.socket, &mut buf).context("rtnetlink receive")?;
            let got = messages(&buf);
            if got.is_empty() {
                bail!("a malformed rtnetlink reply");
            }
            for reply in got {
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(_) => Err(e.to_io().into()),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    _ => {}
                }
            }
        }
    }
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

/// A link message as a [`Link`] (None without a name).
pub fn link_of(msg: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut master = None;
    let mut kind = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Controller(m) => master = Some(*m).filter(|m| *m != 0),
            LinkAttribute::LinkInfo(infos) => {
                kind = infos.iter().find_map(|info| match info {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Some(Link {
        index: msg.header.index,
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

/// A route message as a [`Route`]: None for other tables and types, and
/// routes without one outgoing interface.
pub fn route_of(msg: &RouteMessage) -> Option<Route> {
    if msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut dst = None;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(d) => dst = Some(d),
            RouteAttribute::Oif(o) => oif = Some(*o),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let address = match (msg.header.address_family, dst) {
        (AddressFamily::Inet, None) => IpAddr::from([0u8; 4]),
        (AddressFamily::Inet6, None) => IpAddr::from([0u8; 16]),
        (AddressFamily::Inet, Some(RouteAddress::Inet(a))) => IpAddr::V4(*a),
        (AddressFamily::Inet6, Some(RouteAddress::Inet6(a))) => IpAddr::V6(*a),
        _ => return None,
    };
    Some(Route {
        dst: Cidr::new(address, msg.header.destination_prefix_length)?,
        oif: oif?,
    })
}

/// Every unicast route of the main table, of both families.
pub fn routes() -> Result<Vec<Route>> {
    let mut rtnl = Rtnl::open()?;
    let answers = rtnl
        .request(
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
            NLM_F_DUMP,
        )
        .context("listing routes")?;
    Ok(answers
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => route_of(r),
            _ => None,
        })
        .collect())
}

/// Every interface of this network namespace.
pub fn links() -> Result<Vec<Link>> {
    let mut rtnl = Rtnl::open()?;
    let answers = rtnl
        .request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )
        .context("listing interfaces")?;
    Ok(answers
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => link_of(l),
            _ => None,
        })
        .collect())
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

/// The family, host prefix length and route address of `addr`.
pub fn route_address(addr: IpAddr) -> (AddressFamily, u8, RouteAddress) {
    match addr {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    }
}

/// The route the kernel takes to `addr` (`ip route get`).
pub fn route_to(rtnl: &mut Rtnl, addr: IpAddr) -> Result<RouteTo> {
    let (family, bits, dst) = route_address(addr);
    let mut query = RouteMessage::default();
    query.header.address_family = family;
    query.header.destination_prefix_length = bits;
    query.attributes.push(RouteAttribute::Destination(dst));
    let answers = match rtnl.request(RouteNetlinkMessage::GetRoute(query), 0) {
        Ok(answers) => answers,
        Err(e) => {
            if matches!(os_error(&e), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) {
                return Ok(RouteTo::Unreachable);
            }
            return Err(e).with_context(|| format!("the route to {addr}"));
        }
    };
    let Some(RouteNetlinkMessage::NewRoute(route)) = answers.first() else {
        return Ok(RouteTo::Unreachable);
    };
    if route.header.kind == RouteType::Local {
        return Ok(RouteTo::Local);
    }
    Ok(route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(oif) => Some(RouteTo::Interface(*oif)),
            _ => None,
        })
        .unwrap_or(RouteTo::Unreachable))
}

#[cfg(test)]
pub mod tests {
    use netlink_packet_route::link::InfoKind;

    use super::*;

    /// `inner` as the kernel would send it: framed, in bytes.
    pub fn framed(inner: RouteNetlinkMessage) -> Vec<u8> {
        let mut message = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(inner),
        );
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    /// A link message, with a kind if any.
    pub fn link_message(index: u32, name: &str, kind: Option<InfoKind>) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        // An attribute before the name, as the kernel sends.
        msg.attributes.push(LinkAttribute::Mtu(1500));
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        if let Some(kind) = kind {
            msg.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
        }
        msg
    }

    /// One framed message, parsed back as the events' reader parses it.
    fn round_trip(inner: RouteNetlinkMessage) -> RouteNetlinkMessage {
        let mut parsed = messages(&framed(inner));
        assert_eq!(parsed.len(), 1);
        match parsed.remove(0).payload {
            NetlinkPayload::InnerMessage(inner) => inner,
            other => panic!("not a route message: {other:?}"),
        }
    }

    #[test]
    fn a_link_message_gives_its_index_name_kind_and_master() {
        let mut msg = link_message(7, "veth9", Some(InfoKind::Veth));
        msg.attributes.push(LinkAttribute::Controller(3));
        let RouteNetlinkMessage::NewLink(parsed) = round_trip(RouteNetlinkMessage::NewLink(msg))
        else {
            panic!("not a link");
        };
        assert_eq!(
            link_of(&parsed),
            Some(Link {
                index: 7,
                name: "veth9".into(),
                master: Some(3),
                kind: Some("veth".into()),
            })
        );
        let mut nameless = LinkMessage::default();
        nameless.header.index = 7;
        assert_eq!(link_of(&nameless), None, "no name");
    }

    fn route(
        family: AddressFamily,
        prefix: u8,
        table: u8,
        kind: RouteType,
        attributes: Vec<RouteAttribute>,
    ) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.destination_prefix_length = prefix;
        msg.header.table = table;
        msg.header.kind = kind;
        msg.attributes = attributes;
        let RouteNetlinkMessage::NewRoute(parsed) = round_trip(RouteNetlinkMessage::NewRoute(msg))
        else {
            panic!("not a route");
        };
        parsed
    }

    #[test]
    fn route_messages_give_main_table_unicast_routes_with_an_interface() {
        let main = RouteHeader::RT_TABLE_MAIN;
        let v4 = AddressFamily::Inet;
        let to = |a: [u8; 4]| RouteAttribute::Destination(RouteAddress::Inet(a.into()));
        let pod = route(
            v4,
            32,
            main,
            RouteType::Unicast,
            vec![to([10, 244, 1, 5]), RouteAttribute::Oif(5)],
        );
        assert_eq!(
            route_of(&pod),
            Some(Route {
                dst: "10.244.1.5/32".parse().unwrap(),
                oif: 5
            })
        );
        let default = route(
            v4,
            0,
            main,
            RouteType::Unicast,
            vec![RouteAttribute::Oif(5)],
        );
        assert_eq!(
            route_of(&default).unwrap().dst,
            "0.0.0.0/0".parse().unwrap()
        );
        let v6 = route(
            AddressFamily::Inet6,
            64,
            0,
            RouteType::Unicast,
            vec![
                RouteAttribute::Table(254),
                RouteAttribute::Destination(RouteAddress::Inet6([0xfd; 16].into())),
                RouteAttribute::Oif(5),
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
            RouteType::Local,
            vec![to([10, 0, 0, 1]), RouteAttribute::Oif(5)],
        );
        assert_eq!(route_of(&local_table), None);
        let blackhole = route(v4, 24, main, RouteType::BlackHole, vec![to([10, 9, 9, 0])]);
        assert_eq!(route_of(&blackhole), None);
        let no_oif = route(v4, 24, main, RouteType::Unicast, vec![to([10, 9, 9, 0])]);
        assert_eq!(route_of(&no_oif), None, "no outgoing interface");
    }

    #[test]
    fn a_datagram_of_several_messages_parses_in_order_and_a_truncated_one_stops() {
        let buf = [
            framed(RouteNetlinkMessage::NewLink(link_message(1, "a", None))),
            framed(RouteNetlinkMessage::DelLink(link_message(2, "b", None))),
        ]
        .concat();
        let kinds: Vec<u16> = messages(&buf)
            .iter()
            .map(|m| m.header.message_type)
            .collect();
        assert_eq!(kinds, [16, 17], "RTM_NEWLINK, RTM_DELLINK");
        assert!(messages(&buf[..10]).is_empty());
    }
}
