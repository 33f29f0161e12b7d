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

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};

use crate::frontend::Cidr;

pub const UPLINK: &str = "uplink0";
const PEER: &str = "uplink1";

/// A route of the model: `dst` through `via` on the uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
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
pub fn build(addresses: &[IpAddr], routes: &[Route]) -> Result<(u32, Vec<String>)> {
    // Forwarding first: devices created after take it as their default,
    // and the FIB lookup refuses to route for a device that does not
    // forward. No IPv6 in this kernel: the IPv4 model still stands.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .context("turning forwarding on in the model namespace")?;
    let ipv6 = std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").is_ok();
    let mut rtnl = Rtnl::open()?;
    rtnl.add_veth(UPLINK, PEER)?;
    let index = if_index(UPLINK)?;
    let mut refused = Vec::new();
    for &addr in addresses {
        if addr.is_ipv6() && !ipv6 {
            refused.push(format!("{addr}: this kernel has no IPv6"));
            continue;
        }
        rtnl.add_address(index, addr)
            .with_context(|| format!("adding {addr} to the model's uplink"))?;
    }
    for route in routes {
        if route.via.is_ipv6() && !ipv6 {
            continue;
        }
        if let Err(e) = rtnl.add_route(index, route) {
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

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 4;

/// An rtnetlink socket that sends one request at a time and waits for its
/// acknowledgement.
struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    fn open() -> Result<Self> {
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
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0 })
    }

    /// Sends one request (`body`: the family header and its attributes) and
    /// returns the kernel's verdict on it.
    fn request(&mut self, kind: u16, create: bool, body: &[u8]) -> Result<()> {
        self.seq += 1;
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        let mut flags = NLM_F_REQUEST | NLM_F_ACK;
        if create {
            flags |= NLM_F_CREATE | NLM_F_EXCL;
        }
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
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error()).context("rtnetlink receive");
            }
            let reply = &buf[..n as usize];
            if reply.len() < 20 {
                bail!("a short rtnetlink reply");
            }
            let kind = u16::from_ne_bytes([reply[4], reply[5]]);
            let seq = u32::from_ne_bytes(reply[8..12].try_into().unwrap());
            if kind != NLMSG_ERROR || seq != self.seq {
                continue;
            }
            let errno = -i32::from_ne_bytes(reply[16..20].try_into().unwrap());
            return match errno {
                0 => Ok(()),
                e => Err(io::Error::from_raw_os_error(e).into()),
            };
        }
    }

    /// Creates a veth pair and sets both ends up: two steps, as some kernels
    /// refuse a veth created up (ENOTCONN).
    fn add_veth(&mut self, name: &str, peer: &str) -> Result<()> {
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
        self.request(RTM_NEWLINK, true, &body)
            .with_context(|| format!("creating the veth pair {name}/{peer}"))?;
        for end in [name, peer] {
            let up = libc::IFF_UP as u32;
            self.request(RTM_NEWLINK, false, &ifinfomsg(if_index(end)?, up))
                .with_context(|| format!("setting {end} up"))?;
        }
        Ok(())
    }

    fn add_address(&mut self, index: u32, addr: IpAddr) -> Result<()> {
        let (family, bytes, prefix, flags) = family_of(addr);
        let mut body = vec![family, prefix, flags, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        attr(&mut body, IFA_LOCAL, &bytes);
        attr(&mut body, IFA_ADDRESS, &bytes);
        self.request(RTM_NEWADDR, true, &body)
    }

    fn add_route(&mut self, index: u32, route: &Route) -> Result<()> {
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
        self.request(RTM_NEWROUTE, true, &body)
    }
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

fn c_string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn nest(buf: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    fill(&mut inner);
    attr(buf, kind, &inner);
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
        nest(&mut nested, IFLA_LINKINFO, |i| {
            attr(i, IFLA_INFO_KIND, b"veth")
        });
        assert_eq!(u16::from_ne_bytes([nested[0], nested[1]]), 12);
        assert_eq!(&nested[8..12], b"veth");
    }
}
