//! A leaf of the program: the packet headers (from `network-types`), their
//! offsets, TCP's flags, the 5-tuple (`Flow`, IPv4 or IPv6, of TCP, UDP or
//! SCTP) and the parser that finds it. The IPv4 header length comes from
//! IHL, so options are handled, and an IPv4 fragment gets its datagram's
//! ports (`frag`); IPv6 extension headers are walked, a few at most. Reads
//! frames through `Frame` only.
//!
//! SCTP is tracked as TCP is, by what its packet's first chunk stands for
//! in TCP's flags (`sctp_flags`). A fragmented SCTP packet passes untouched
//! (`pass_fragment`): SCTP cuts its messages to the path MTU itself, and
//! its checksum, over the whole packet, could not be fixed from one
//! fragment after a port change (`sctp`). So does SCTP behind IPv6
//! extension headers.

use core::mem::offset_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use proxy_common::{proto, sctp_chunk as chunk, stats::Stat};

use crate::{
    family::{Addr6, Family, V4, V6},
    frag,
};

pub const ETH_LEN: usize = EthHdr::LEN;
const ETH_TYPE_OFF: usize = offset_of!(EthHdr, ether_type);
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV4_MIN_LEN: usize = Ipv4Hdr::LEN;
/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = offset_of!(Ipv4Hdr, check);
const IPV4_FRAG_OFF: usize = offset_of!(Ipv4Hdr, frags);
const TCP_MIN_LEN: usize = TcpHdr::LEN;
const UDP_LEN: usize = UdpHdr::LEN;
/// SCTP's common header (ports, verification tag, CRC32c), and with the
/// first chunk's header (type, flags, length) the least an SCTP packet has.
const SCTP_HDR_LEN: usize = 12;
const SCTP_MIN_LEN: usize = SCTP_HDR_LEN + 4;
/// Offset of SCTP's CRC32c in its common header.
pub const SCTP_CSUM_OFF: usize = 8;
/// TCP's flags byte: the one before the window (`TcpHdr` holds it in a bitfield).
const TCP_FLAGS_OFF: usize = offset_of!(TcpHdr, window) - 1;
const _: () = assert!(TCP_FLAGS_OFF == 13);
/// Both protocols put the source port first and the destination port second.
const _: () = assert!(offset_of!(TcpHdr, source) == 0 && offset_of!(TcpHdr, dest) == 2);
const _: () = assert!(offset_of!(UdpHdr, src) == 0 && offset_of!(UdpHdr, dst) == 2);

/// IPv6 next-header values the parser walks past, or stops at.
mod next_header {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const DEST_OPTS: u8 = 60;
}
/// How many IPv6 extension headers the parser walks before giving up (and
/// passing the packet untouched): RFC 8200's order puts at most hop-by-hop,
/// destination options, routing and destination options again before a
/// transport header that is not fragmented.
const MAX_EXT_HEADERS: usize = 4;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Read access to a frame: what parsing needs from a program context
/// (`ctx::Packet` adds the rest for tc and XDP).
pub trait Frame {
    /// XDP, where the programs cannot have the kernel resolve a next hop
    /// (they hand such packets on to tc instead), nor serve SCTP.
    const XDP: bool;
    fn data(&self) -> usize;
    fn len(&self) -> u32;
    /// Makes the first `len` bytes readable by direct access if the packet has them.
    fn linear(&self, len: usize) -> bool;
    /// Reads a `T` at `offset`.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

/// A TCP, UDP or SCTP packet's flow, IPv4 or IPv6 (`F`). Addresses and
/// ports are raw network-order values.
#[derive(Clone, Copy)]
pub struct Flow<F: Family = V4> {
    /// Offset of the L4 header (Ethernet + the IP header and its options or
    /// extension headers).
    pub l4_off: usize,
    /// Length of the IP header in bytes, options or extension headers included.
    pub ip_hdr_len: usize,
    pub proto: u8,
    pub saddr: F::Addr,
    pub daddr: F::Addr,
    pub sport: u16,
    pub dport: u16,
    /// Arrived on the node's uplink (from outside) rather than from a pod.
    pub external: bool,
    /// TCP's flags byte; for SCTP, the flags its first chunk stands for
    /// (`sctp_flags`); 0 for UDP, and for a later fragment.
    pub tcp_flags: u8,
}

impl<F: Family> Flow<F> {
    /// Length of the fixed L4 header, which the parser made sure is there.
    #[inline(always)]
    pub fn l4_min_len(&self) -> usize {
        match self.proto {
            proto::TCP => TCP_MIN_LEN,
            proto::SCTP => SCTP_MIN_LEN,
            _ => UDP_LEN,
        }
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + match self.proto {
                proto::TCP => offset_of!(TcpHdr, check),
                proto::SCTP => SCTP_CSUM_OFF,
                _ => offset_of!(UdpHdr, check),
            }
    }

    /// TCP or SCTP: a protocol with connections, opened and closed.
    #[inline(always)]
    pub fn connected(&self) -> bool {
        self.proto == proto::TCP || self.proto == proto::SCTP
    }

    /// A TCP SYN without ACK (an SCTP INIT): a client opening a connection.
    /// (UDP's flags are 0: no protocol test needed.)
    #[inline(always)]
    pub fn syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// A TCP or SCTP packet other than a SYN (an INIT): its connection was
    /// open before it.
    #[inline(always)]
    pub fn mid_flow(&self) -> bool {
        self.connected() && self.tcp_flags & TCP_SYN == 0
    }

    /// A FIN or an RST (an SCTP ABORT or SHUTDOWN COMPLETE): one end
    /// closing the connection.
    #[inline(always)]
    pub fn fin_or_rst(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
}

/// The outcome of a packet without a flow, with the stat it is counted under.
#[derive(Clone, Copy)]
pub enum Early {
    /// Not ours to judge (not IP, not TCP, UDP or SCTP, an IPv6 fragment,
    /// an IPv4 one whose first fragment has not passed or of SCTP, a
    /// truncated L4 header,
    /// IPv6 extension headers past the walk): passed untouched.
    Pass(Stat),
    /// An IP header the kernel would drop too.
    Drop(Stat),
    /// An ICMP (ICMPv6) message, its header at this offset: an error about a
    /// translated flow is translated back (`icmp`), anything else passes
    /// untouched as not TCP or UDP.
    Icmp(usize),
}

/// The IP version of a frame.
pub enum Ip {
    V4,
    V6,
}

/// Which IP version a frame carries, from its Ethernet type.
#[inline(always)]
pub fn ip_version<C: Frame>(ctx: &C) -> Result<Ip, Early> {
    if !ctx.linear(ETH_LEN) {
        return Err(Early::Pass(Stat::PassNotIp));
    }
    // SAFETY: `linear` checked that the Ethernet header lies inside the packet.
    let ether_type = u16::from_be(unsafe { *((ctx.data() + ETH_TYPE_OFF) as *const u16) });
    match ether_type {
        ETH_P_IP => Ok(Ip::V4),
        ETH_P_IPV6 => Ok(Ip::V6),
        _ => Err(Early::Pass(Stat::PassNotIp)),
    }
}

/// The flow of a frame known to carry IPv4.
#[inline(always)]
pub fn parse4<C: Frame>(ctx: &C) -> Result<Flow<V4>, Early> {
    if !ctx.linear(ETH_LEN + IPV4_MIN_LEN) {
        return Err(Early::Drop(Stat::DropMalformedIp));
    }
    // SAFETY: `linear` checked that the fixed IPv4 header lies inside the packet.
    let ip = unsafe { &*((ctx.data() + ETH_LEN) as *const Ipv4Hdr) };
    let ip_hdr_len = usize::from(ip.ihl());
    let tot_len = usize::from(ip.tot_len());
    if ip.version() != 4
        || ip_hdr_len < IPV4_MIN_LEN
        || tot_len < ip_hdr_len
        || ETH_LEN + tot_len > ctx.len() as usize
    {
        return Err(Early::Drop(Stat::DropMalformedIp));
    }
    let (saddr, daddr) = (
        u32::from_ne_bytes(ip.src_addr),
        u32::from_ne_bytes(ip.dst_addr),
    );
    let frags = u16::from_be_bytes(ip.frags);
    if ip.proto == proto::SCTP && frags & (frag::OFFSET | frag::MORE) != 0 {
        return Err(Early::Pass(Stat::PassFragment));
    }
    let datagram = frag::datagram(saddr, daddr, ip.id, ip.proto);
    if frags & frag::OFFSET != 0 {
        // A later fragment: its datagram's ports, if its first fragment
        // came this way.
        let Some(ports) = frag::ports(&datagram) else {
            return Err(Early::Pass(Stat::PassFragment));
        };
        return Ok(Flow {
            l4_off: ETH_LEN + ip_hdr_len,
            ip_hdr_len,
            proto: ip.proto,
            saddr,
            daddr,
            sport: ports.sport_be,
            dport: ports.dport_be,
            external: false,
            tcp_flags: 0,
        });
    }
    let flow = l4(ctx, ip.proto, ip_hdr_len, tot_len, saddr, daddr)?;
    if frags & frag::MORE != 0 {
        frag::remember(&datagram, flow.sport, flow.dport);
    }
    Ok(flow)
}

/// Whether a frame of family `F` is an IPv4 fragment after the first: its
/// flow has its datagram's ports (`frag`), and it has no L4 header to
/// rewrite (its ports and checksum are in the first fragment). Read from
/// the frame where a rewrite needs it rather than carried in `Flow`: as a
/// flag there, the verifier would walk each path twice, once for later
/// fragments and once for everything else.
#[inline(always)]
pub fn later_fragment<C: Frame, F: Family>(ctx: &C) -> bool {
    if !F::IP_CSUM || !ctx.linear(ETH_LEN + IPV4_MIN_LEN) {
        return false;
    }
    // SAFETY: `linear` checked that the fixed IPv4 header lies inside the
    // packet. Direct access: on tc, `read` would be a helper call per rewrite.
    let frags = unsafe { *((ctx.data() + ETH_LEN + IPV4_FRAG_OFF) as *const [u8; 2]) };
    u16::from_be_bytes(frags) & frag::OFFSET != 0
}

/// The flow of a frame known to carry IPv6.
#[inline(always)]
pub fn parse6<C: Frame>(ctx: &C) -> Result<Flow<V6>, Early> {
    if !ctx.linear(ETH_LEN + Ipv6Hdr::LEN) {
        return Err(Early::Drop(Stat::DropMalformedIp));
    }
    // SAFETY: `linear` checked that the fixed IPv6 header lies inside the packet.
    let ip = unsafe { &*((ctx.data() + ETH_LEN) as *const Ipv6Hdr) };
    let tot_len = Ipv6Hdr::LEN + usize::from(ip.payload_len());
    if ip.version() != 6 || ETH_LEN + tot_len > ctx.len() as usize {
        return Err(Early::Drop(Stat::DropMalformedIp));
    }
    let (saddr, daddr): (Addr6, Addr6) = (
        crate::family::words6(ip.src_addr),
        crate::family::words6(ip.dst_addr),
    );
    let mut next = ip.next_hdr;
    let mut ip_hdr_len = Ipv6Hdr::LEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            next_header::HOP_BY_HOP | next_header::DEST_OPTS | next_header::ROUTING => {
                // Next header, length in 8-octet units past the first 8,
                // and (routing) its type and segments left.
                let ext: [u8; 4] = ctx
                    .read(ETH_LEN + ip_hdr_len)
                    .ok_or(Early::Pass(Stat::PassTruncatedL4))?;
                // A routing header with segments left: the destination is
                // a waypoint, not the frontend the packet is for.
                if next == next_header::ROUTING && ext[3] != 0 {
                    return Err(Early::Pass(Stat::PassNotTcpUdp));
                }
                next = ext[0];
                ip_hdr_len += (usize::from(ext[1]) + 1) * 8;
            }
            next_header::FRAGMENT => return Err(Early::Pass(Stat::PassFragment)),
            _ => break,
        }
    }
    if tot_len < ip_hdr_len {
        return Err(Early::Pass(Stat::PassTruncatedL4));
    }
    // SCTP behind extension headers: `sctp` could not fix its checksum.
    if next == proto::SCTP && ip_hdr_len != Ipv6Hdr::LEN {
        return Err(Early::Pass(Stat::PassNotTcpUdp));
    }
    l4(ctx, next, ip_hdr_len, tot_len, saddr, daddr)
}

/// The TCP, UDP or SCTP header behind an IP header of `ip_hdr_len` bytes,
/// in a packet of `tot_len` bytes past the Ethernet header.
#[inline(always)]
fn l4<C: Frame, F: Family>(
    ctx: &C,
    l4_proto: u8,
    ip_hdr_len: usize,
    tot_len: usize,
    saddr: F::Addr,
    daddr: F::Addr,
) -> Result<Flow<F>, Early> {
    let l4_off = ETH_LEN + ip_hdr_len;
    let l4_min = match l4_proto {
        p if p == proto::TCP => TCP_MIN_LEN,
        p if p == proto::UDP => UDP_LEN,
        p if p == proto::SCTP && C::XDP => return Err(Early::Pass(Stat::PassSctpToTc)),
        p if p == proto::SCTP => SCTP_MIN_LEN,
        p if p == F::ICMP => return Err(Early::Icmp(l4_off)),
        _ => return Err(Early::Pass(Stat::PassNotTcpUdp)),
    };
    if ip_hdr_len + l4_min > tot_len {
        return Err(Early::Pass(Stat::PassTruncatedL4));
    }
    // One read: the ports (all three protocols) and TCP's flags byte, or
    // SCTP's first chunk type.
    let head = match l4_proto {
        proto::TCP => ctx
            .read::<[u8; TCP_FLAGS_OFF + 1]>(l4_off)
            .map(|h| ([h[0], h[1], h[2], h[3]], h[TCP_FLAGS_OFF])),
        proto::SCTP => ctx
            .read::<[u8; SCTP_HDR_LEN + 1]>(l4_off)
            .map(|h| ([h[0], h[1], h[2], h[3]], sctp_flags(h[SCTP_HDR_LEN]))),
        _ => ctx.read::<[u8; 4]>(l4_off).map(|h| (h, 0)),
    };
    let Some((ports, tcp_flags)) = head else {
        return Err(Early::Pass(Stat::PassTruncatedL4));
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

/// What an SCTP packet's first chunk stands for in TCP's flags, for
/// conntrack: an INIT opens an association (a SYN), an INIT ACK answers it
/// (a SYN-ACK), an ABORT or a SHUTDOWN COMPLETE ends it (an RST, a FIN);
/// any other chunk belongs to an open association (an ACK). INIT, INIT ACK
/// and SHUTDOWN COMPLETE travel alone (RFC 9260, 6.10); an ABORT bundled
/// behind data is missed, and its entries then age out.
///
/// Looked up in two words of flags, a byte per chunk type, rather than
/// matched: each arm of a match would be a path of its own, with its own
/// constant flags, for the verifier to walk through the rest of the program.
#[inline(always)]
fn sctp_flags(first_chunk: u8) -> u8 {
    const fn table(first: u8) -> u64 {
        let mut word = 0u64;
        let mut i = 0;
        while i < 8 {
            let flags = match first + i {
                chunk::INIT => TCP_SYN,
                chunk::INIT_ACK => TCP_SYN | TCP_ACK,
                chunk::ABORT => TCP_RST | TCP_ACK,
                chunk::SHUTDOWN_COMPLETE => TCP_FIN | TCP_ACK,
                _ => TCP_ACK,
            };
            word |= (flags as u64) << (i * 8);
            i += 1;
        }
        word
    }
    const LOW: u64 = table(0);
    const HIGH: u64 = table(8);
    let chunk = u64::from(first_chunk);
    // Types 16 and up are all ACKs: a mask, not a branch.
    let known = (chunk >> 4 == 0) as u64;
    let word = if chunk & 8 == 0 { LOW } else { HIGH };
    let flags = (word >> ((chunk & 7) * 8)) as u8;
    // `known` is 0 or 1: the table's flags, or an ACK.
    (flags & (known as u8).wrapping_neg()) | (TCP_ACK & !(known as u8).wrapping_neg())
}
