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
//! Requests go over rtnetlink directly: the agent's image has no `ip`.

use std::{io, net::IpAddr};

use anyhow::{bail, Context, Result};

use super::rtnl::{
    attr, c_string, nest, Rtnl, IFLA_IFNAME, IFLA_INFO_KIND, IFLA_LINKINFO, NLM_F_CREATE,
    NLM_F_EXCL, RTA_DST, RTA_OIF, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE, RTN_UNICAST,
    RT_TABLE_MAIN,
};
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

const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const RTA_GATEWAY: u16 = 5;
const RTPROT_STATIC: u8 = 4;
const RTNH_F_ONLINK: u32 = 4;
const CREATE: u16 = NLM_F_CREATE | NLM_F_EXCL;

/// Creates a veth pair and sets both ends up: two steps, as some kernels
/// refuse a veth created up (ENOTCONN).
fn add_veth(rtnl: &mut Rtnl, name: &str, peer: &str) -> Result<()> {
    let mut body = ifinfomsg(0, 0);
    attr(&mut body, IFLA_IFNAME, &c_string(name));
    nest(&mut body, IFLA_LINKINFO, |info| {
        attr(info, IFLA_INFO_KIND, b"veth");
        nest(info, IFLA_INFO_DATA, |data| {
            nest(data, VETH_INFO_PEER, |p| {
                p.extend_from_slice(&ifinfomsg(0, 0));
                attr(p, IFLA_IFNAME, &c_string(peer));
            });
        });
    });
    rtnl.request(RTM_NEWLINK, CREATE, &body)
        .with_context(|| format!("creating the veth pair {name}/{peer}"))?;
    for end in [name, peer] {
        let up = libc::IFF_UP as u32;
        rtnl.request(RTM_NEWLINK, 0, &ifinfomsg(if_index(end)?, up))
            .with_context(|| format!("setting {end} up"))?;
    }
    Ok(())
}

fn add_address(rtnl: &mut Rtnl, index: u32, addr: IpAddr) -> Result<()> {
    let (family, bytes, prefix, flags) = family_of(addr);
    let mut body = vec![family, prefix, flags, 0];
    body.extend_from_slice(&index.to_ne_bytes());
    attr(&mut body, IFA_LOCAL, &bytes);
    attr(&mut body, IFA_ADDRESS, &bytes);
    rtnl.request(RTM_NEWADDR, CREATE, &body)?;
    Ok(())
}

fn add_route(rtnl: &mut Rtnl, index: u32, route: &GatewayRoute) -> Result<()> {
    let (family, dst, _, _) = family_of(route.dst.address);
    let (via_family, via, _, _) = family_of(route.via);
    if via_family != family {
        bail!("the next hop is of the other family");
    }
    let mut body = vec![
        family,
        route.dst.prefix,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_STATIC,
        0, // RT_SCOPE_UNIVERSE
        RTN_UNICAST,
    ];
    body.extend_from_slice(&RTNH_F_ONLINK.to_ne_bytes());
    attr(&mut body, RTA_DST, &dst);
    attr(&mut body, RTA_GATEWAY, &via);
    attr(&mut body, RTA_OIF, &index.to_ne_bytes());
    rtnl.request(RTM_NEWROUTE, CREATE, &body)?;
    Ok(())
}
/// An ifinfomsg for device `index` (0: one to create) that sets `flags`
/// (and changes only those).
fn ifinfomsg(index: u32, flags: u32) -> Vec<u8> {
    let mut m = vec![0u8; 4]; // family, pad, type
    m.extend_from_slice(&index.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m
}

/// Family, address bytes, the host prefix length and the ifaddrmsg flags
/// (no duplicate address detection: usable at once).
fn family_of(addr: IpAddr) -> (u8, Vec<u8>, u8, u8) {
    match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec(), 32, 0),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec(), 128, IFA_F_NODAD),
    }
}
