//! A leaf of the program: the packet headers (from `network-types`), their
//! offsets, TCP's flags, the IPv4 5-tuple (`Flow`) and the parser that finds
//! it. The IPv4 header length comes from IHL, so options are handled. Reads
//! frames through `Frame` only, so nothing here depends on the rest of the
//! program.

use core::mem::offset_of;

use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{proto, stats::Stat};

pub const ETH_LEN: usize = EthHdr::LEN;
const ETH_TYPE_OFF: usize = offset_of!(EthHdr, ether_type);
const ETH_P_IP: u16 = 0x0800;
const IPV4_MIN_LEN: usize = Ipv4Hdr::LEN;
/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = offset_of!(Ipv4Hdr, check);
pub const IP_SADDR_OFF: usize = offset_of!(Ipv4Hdr, src_addr);
pub const IP_DADDR_OFF: usize = offset_of!(Ipv4Hdr, dst_addr);
const TCP_MIN_LEN: usize = TcpHdr::LEN;
const UDP_LEN: usize = UdpHdr::LEN;
/// TCP's flags byte: the one before the window (`TcpHdr` holds it in a bitfield).
const TCP_FLAGS_OFF: usize = offset_of!(TcpHdr, window) - 1;
const _: () = assert!(TCP_FLAGS_OFF == 13);
/// Both protocols put the source port first and the destination port second.
const _: () = assert!(offset_of!(TcpHdr, source) == 0 && offset_of!(TcpHdr, dest) == 2);
const _: () = assert!(offset_of!(UdpHdr, src) == 0 && offset_of!(UdpHdr, dst) == 2);

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Read access to a frame: what parsing needs from a program context
/// (`ctx::Packet` adds the rest for tc and XDP).
pub trait Frame {
    fn data(&self) -> usize;
    fn len(&self) -> u32;
    /// Makes the first `len` bytes readable by direct access if the packet has them.
    fn linear(&self, len: usize) -> bool;
    /// Reads a `T` at `offset`.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
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
        self.l4_off
            + if self.proto == proto::TCP {
                offset_of!(TcpHdr, check)
            } else {
                offset_of!(UdpHdr, check)
            }
    }

    /// A TCP SYN without ACK: a client opening a connection.
    #[inline(always)]
    pub fn syn(&self) -> bool {
        self.proto == proto::TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// A TCP packet other than a SYN: its connection was open before it.
    #[inline(always)]
    pub fn mid_flow(&self) -> bool {
        self.proto == proto::TCP && self.tcp_flags & TCP_SYN == 0
    }

    /// A FIN or an RST: one end closing the connection.
    #[inline(always)]
    pub fn fin_or_rst(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
}

/// What parsing found in a packet.
pub enum Parsed {
    /// An IPv4 TCP or UDP flow, for the programs to look at.
    Flow(Flow),
    /// No flow: the packet's outcome is decided already.
    Early(Early),
}

/// The outcome of a packet without a flow, with the stat it is counted under.
#[derive(Clone, Copy)]
pub enum Early {
    /// Not ours to judge (not IPv4, not TCP or UDP, a fragment, a truncated
    /// L4 header): passed untouched.
    Pass(Stat),
    /// An IPv4 header the kernel would drop too.
    Drop(Stat),
}

/// Finds the flow of an IPv4 TCP/UDP packet.
#[inline(always)]
pub fn parse<F: Frame>(ctx: &F) -> Parsed {
    if !ctx.linear(ETH_LEN) {
        return Parsed::Early(Early::Pass(Stat::PassNotIpv4));
    }
    // SAFETY: `linear` checked that the Ethernet header lies inside the packet.
    let ether_type = u16::from_be(unsafe { *((ctx.data() + ETH_TYPE_OFF) as *const u16) });
    if ether_type != ETH_P_IP {
        return Parsed::Early(Early::Pass(Stat::PassNotIpv4));
    }
    if !ctx.linear(ETH_LEN + IPV4_MIN_LEN) {
        return Parsed::Early(Early::Drop(Stat::DropMalformedIp));
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
        return Parsed::Early(Early::Drop(Stat::DropMalformedIp));
    }
    // More-fragments flag or a fragment offset: no ports to match on.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Parsed::Early(Early::Pass(Stat::PassFragment));
    }
    let l4_min = match ip.proto {
        p if p == proto::TCP => TCP_MIN_LEN,
        p if p == proto::UDP => UDP_LEN,
        _ => return Parsed::Early(Early::Pass(Stat::PassNotTcpUdp)),
    };
    let l4_proto = ip.proto;
    let (saddr, daddr) = (
        u32::from_ne_bytes(ip.src_addr),
        u32::from_ne_bytes(ip.dst_addr),
    );
    let l4_off = ETH_LEN + ip_hdr_len;
    if ip_hdr_len + l4_min > tot_len {
        return Parsed::Early(Early::Pass(Stat::PassTruncatedL4));
    }
    // One read: the ports (both protocols) and, for TCP, its flags byte.
    let head = if l4_proto == proto::TCP {
        ctx.read::<[u8; TCP_FLAGS_OFF + 1]>(l4_off)
            .map(|h| ([h[0], h[1], h[2], h[3]], h[TCP_FLAGS_OFF]))
    } else {
        ctx.read::<[u8; 4]>(l4_off).map(|h| (h, 0))
    };
    let Some((ports, tcp_flags)) = head else {
        return Parsed::Early(Early::Pass(Stat::PassTruncatedL4));
    };
    // The two ports as they sit on the wire: source first, then destination.
    Parsed::Flow(Flow {
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
