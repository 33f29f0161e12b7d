//! Parsing Ethernet + IPv4 + TCP/UDP far enough to find the flow's 5-tuple.
//! The IPv4 header length comes from IHL, so options are handled.

use proxy_common::{proto, stats};

use crate::{
    ctx::Packet,
    verdict::{Drop, Out},
};

pub const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_MIN_LEN: usize = 20;
/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;

/// The fixed part of an IPv4 header, as it sits in the packet.
#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len_be: u16,
    id_be: u16,
    frag_be: u16,
    ttl: u8,
    proto: u8,
    csum: u16,
    saddr_be: u32,
    daddr_be: u32,
}

/// An IPv4 TCP or UDP packet's flow. Addresses and ports are raw network-order values.
#[derive(Clone, Copy)]
pub struct Flow {
    /// Offset of the L4 header (Ethernet + IHL * 4).
    pub l4_off: usize,
    /// Length of the IPv4 header in bytes.
    pub ip_hdr_len: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// Arrived on the node's uplink (from outside) rather than from a pod.
    pub external: bool,
    /// TCP's flags byte (0 for UDP).
    pub tcp_flags: u8,
}

impl Flow {
    /// Length of the fixed L4 header, which the parser made sure is there.
    #[inline(always)]
    pub fn l4_min_len(&self) -> usize {
        if self.proto == proto::TCP {
            TCP_MIN_LEN
        } else {
            UDP_LEN
        }
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.proto == proto::TCP { 16 } else { 6 }
    }
}

/// Finds the flow of an IPv4 TCP/UDP packet. Anything else is an early outcome:
/// passed untouched (not ours to judge) or dropped (an IPv4 header the kernel
/// would drop too).
#[inline(always)]
pub fn flow<C: Packet>(ctx: &C) -> Result<Flow, Result<Out, Drop>> {
    if !ctx.linear(ETH_LEN) {
        return Err(Ok(Out::pass(stats::PASS_NOT_IPV4)));
    }
    // SAFETY: `linear` checked that the Ethernet header lies inside the packet.
    let ether_type = u16::from_be(unsafe { *((ctx.data() + 12) as *const u16) });
    if ether_type != ETH_P_IP {
        return Err(Ok(Out::pass(stats::PASS_NOT_IPV4)));
    }
    if !ctx.linear(ETH_LEN + IPV4_MIN_LEN) {
        return Err(Err(Drop(stats::DROP_MALFORMED_IP)));
    }
    // SAFETY: `linear` checked that the fixed IPv4 header lies inside the packet.
    let ip = unsafe { &*((ctx.data() + ETH_LEN) as *const Ipv4Hdr) };
    let ip_hdr_len = usize::from(ip.version_ihl & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be(ip.tot_len_be));
    if ip.version_ihl >> 4 != 4
        || ip_hdr_len < IPV4_MIN_LEN
        || tot_len < ip_hdr_len
        || ETH_LEN + tot_len > ctx.len() as usize
    {
        return Err(Err(Drop(stats::DROP_MALFORMED_IP)));
    }
    // More-fragments flag or a fragment offset: no ports to match on.
    if u16::from_be(ip.frag_be) & 0x3fff != 0 {
        return Err(Ok(Out::pass(stats::PASS_FRAGMENT)));
    }
    let l4_min = match ip.proto {
        p if p == proto::TCP => TCP_MIN_LEN,
        p if p == proto::UDP => UDP_LEN,
        _ => return Err(Ok(Out::pass(stats::PASS_NOT_TCP_UDP))),
    };
    let (l4_proto, saddr, daddr) = (ip.proto, ip.saddr_be, ip.daddr_be);
    let l4_off = ETH_LEN + ip_hdr_len;
    if ip_hdr_len + l4_min > tot_len {
        return Err(Ok(Out::pass(stats::PASS_TRUNCATED_L4)));
    }
    // One read: the ports (both protocols) and, for TCP, its flags byte.
    let (ports, tcp_flags) = if l4_proto == proto::TCP {
        let head: [u8; 14] = ctx
            .read(l4_off)
            .ok_or(Ok(Out::pass(stats::PASS_TRUNCATED_L4)))?;
        ([head[0], head[1], head[2], head[3]], head[13])
    } else {
        let head: [u8; 4] = ctx
            .read(l4_off)
            .ok_or(Ok(Out::pass(stats::PASS_TRUNCATED_L4)))?;
        (head, 0)
    };
    // The two ports as they sit on the wire: source first, then destination.
    Ok(Flow {
        l4_off,
        ip_hdr_len,
        proto: l4_proto,
        saddr,
        daddr,
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        external: false,
        tcp_flags,
    })
}
