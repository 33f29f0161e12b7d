//! A network namespace of our own whose FIB stands in for a node's, so the
//! uplink programs' route lookups (`bpf_fib_lookup`) answer under
//! BPF_PROG_TEST_RUN as they would on the node: `simulate` runs its packet
//! inside one. The namespace is anonymous (unshared by one thread) and ends
//! with that thread; nothing outside it changes.
//!
//! It holds one veth pair standing for the uplink (`uplink0`, its peer
//! `uplink1`), the node's addresses on it, forwarding on, and a route per
//! pod CIDR of the other nodes through that node's address (on-link, so no
//! subnet needs to be known). Next hops have no neighbour entries: tc sends
//! such a packet with `bpf_redirect_neigh`, which is what the verdict shows.
//! Requests go over rtnetlink (`rtnl`): the agent's image has no `ip`.

use std::{io, net::IpAddr};

use anyhow::{bail, Context, Result};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteType},
    RouteNetlinkMessage,
};

use super::rtnl::{route_address, Rtnl};
use crate::frontend::Cidr;

pub const UPLINK: &str = "uplink0";
const PEER: &str = "uplink1";

/// A route of the model: `dst` through `via` on the uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRoute {
    pub dst: Cidr,
    pub via: IpAddr,
}

/// Runs `f` on a thread of its own in a new, empty network namespace,
/// which ends with it.
pub fn in_new_netns<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare affects the calling thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .context("unshare(CLONE_NEWNET) for a namespace of our own");
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("the thread in the new namespace panicked"))
    })
}

/// Builds the model in the calling thread's namespace (a new one, see
/// [`in_new_netns`]): returns the uplink's ifindex, and one line per route
/// the kernel refused (two Nodes claiming one pod CIDR, say), which the
/// model goes without.
pub fn build(addresses: &[IpAddr], routes: &[GatewayRoute]) -> Result<(u32, Vec<String>)> {
    // Forwarding first: devices created after take it as their default,
    // and the FIB lookup refuses to route for a device that does not
    // forward. No IPv6 in this kernel: the IPv4 model still stands.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .context("turning forwarding on in the model namespace")?;
    let ipv6 = std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").is_ok();
    let mut rtnl = Rtnl::open()?;
    add_veth(&mut rtnl, UPLINK, PEER)?;
    let index = if_index(UPLINK)?;
    let mut refused = Vec::new();
    for &addr in addresses {
        if addr.is_ipv6() && !ipv6 {
            refused.push(format!("{addr}: this kernel has no IPv6"));
            continue;
        }
        add_address(&mut rtnl, index, addr)
            .with_context(|| format!("adding {addr} to the model's uplink"))?;
    }
    for route in routes {
        if route.via.is_ipv6() && !ipv6 {
            continue;
        }
        if let Err(e) = add_route(&mut rtnl, index, route) {
            refused.push(format!("{} via {}: {e:#}", route.dst, route.via));
        }
    }
    Ok((index, refused))
}

fn if_index(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()).with_context(|| format!("the index of {name}")),
        index => Ok(index),
    }
}

const CREATE: u16 = NLM_F_CREATE | NLM_F_EXCL;

/// A link message naming a device.
fn named(name: &str) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.into()));
    msg
}

/// Creates a veth pair and sets both ends up: two steps, as some kernels
/// refuse a veth created up (ENOTCONN).
fn add_veth(rtnl: &mut Rtnl, name: &str, peer: &str) -> Result<()> {
    let mut pair = named(name);
    pair.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(named(peer)))),
    ]));
    rtnl.request(RouteNetlinkMessage::NewLink(pair), CREATE)
        .with_context(|| format!("creating the veth pair {name}/{peer}"))?;
    for end in [name, peer] {
        let mut up = LinkMessage::default();
        up.header.index = if_index(end)?;
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        rtnl.request(RouteNetlinkMessage::NewLink(up), 0)
            .with_context(|| format!("setting {end} up"))?;
    }
    Ok(())
}

fn add_address(rtnl: &mut Rtnl, index: u32, addr: IpAddr) -> Result<()> {
    let (family, prefix, _) = route_address(addr);
    let mut msg = AddressMessage::default();
    msg.header.family = family;
    msg.header.prefix_len = prefix;
    msg.header.index = index;
    if addr.is_ipv6() {
        // No duplicate address detection: usable at once.
        msg.header.flags = AddressHeaderFlags::Nodad;
    }
    msg.attributes.push(AddressAttribute::Local(addr));
    msg.attributes.push(AddressAttribute::Address(addr));
    rtnl.request(RouteNetlinkMessage::NewAddress(msg), CREATE)?;
    Ok(())
}

fn add_route(rtnl: &mut Rtnl, index: u32, route: &GatewayRoute) -> Result<()> {
    let (family, _, dst) = route_address(route.dst.address);
    let (via_family, _, via) = route_address(route.via);
    if via_family != family {
        bail!("the next hop is of the other family");
    }
    let mut msg = RouteMessage::default();
    msg.header.address_family = family;
    msg.header.destination_prefix_length = route.dst.prefix;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Static;
    msg.header.kind = RouteType::Unicast;
    msg.header.flags = RouteFlags::Onlink;
    msg.attributes.push(RouteAttribute::Destination(dst));
    msg.attributes.push(RouteAttribute::Gateway(via));
    msg.attributes.push(RouteAttribute::Oif(index));
    rtnl.request(RouteNetlinkMessage::NewRoute(msg), CREATE)?;
    Ok(())
}
