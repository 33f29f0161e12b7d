//! The one frame builder: Ethernet + IPv4 or IPv6 + TCP/UDP/SCTP frames,
//! their fragments and ICMP errors about them, built from scratch with
//! checksums computed in full (not incrementally; SCTP's CRC32c over the
//! whole packet), so an expected frame is independent of the code under
//! test. `simulate`, the packet tests and the benches
//! build their frames here.

use std::net::{IpAddr, Ipv4Addr};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ETH_LEN: usize = 14;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
/// SCTP chunk types, for the builder's `chunk`.
pub use proxy_common::sctp_chunk as chunk;
pub const ICMP: u8 = 1;
pub const ICMP6: u8 = 58;
/// IPv6 extension headers the builder can put before the L4 header.
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DEST_OPTS: u8 = 60;

#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Both of one family: IPv4 or IPv6.
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub id: u16,
    /// Flags and fragment offset, as in the header.
    pub frag: u16,
    /// IPv4 options (length a multiple of 4).
    pub options: Vec<u8>,
    /// IPv6 extension headers, in order, each 8 bytes: hop-by-hop and
    /// destination options hold one PadN; a routing header has
    /// `segments_left` segments left; a fragment header says offset 0, more
    /// fragments.
    pub ext6: Vec<u8>,
    pub segments_left: u8,
    /// TCP flags (SYN = 0x02, ACK = 0x10, ...).
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    /// UDP only: send no checksum (zero), as UDP over IPv4 allows. SCTP:
    /// a zero CRC32c field, as a stack leaves it for the device to fill.
    pub udp_no_csum: bool,
    /// SCTP only: the one chunk's type (its value is the payload).
    pub chunk: u8,
    /// Bytes after the IP packet (Ethernet padding).
    pub trailer: Vec<u8>,
}

impl Frame {
    pub fn tcp(saddr: &str, sport: u16, daddr: &str, dport: u16) -> Self {
        Self::new(TCP, saddr, sport, daddr, dport)
    }

    pub fn udp(saddr: &str, sport: u16, daddr: &str, dport: u16) -> Self {
        let mut f = Self::new(UDP, saddr, sport, daddr, dport);
        f.payload = b"ferry?".to_vec();
        f
    }

    /// An SCTP INIT (its chunk's value: tag, window, streams, TSN).
    pub fn sctp(saddr: &str, sport: u16, daddr: &str, dport: u16) -> Self {
        let mut f = Self::new(SCTP, saddr, sport, daddr, dport);
        f.chunk = chunk::INIT;
        f.payload = [
            0x0a, 0x0b, 0x0c, 0x0d, 0, 1, 0, 0, 0, 10, 0, 10, 0x11, 0x22, 0x33, 0x44,
        ]
        .to_vec();
        f
    }

    fn new(proto: u8, saddr: &str, sport: u16, daddr: &str, dport: u16) -> Self {
        Self::of(
            proto,
            saddr.parse::<IpAddr>().unwrap(),
            sport,
            daddr.parse::<IpAddr>().unwrap(),
            dport,
        )
    }

    /// A frame of protocol `proto` (a TCP SYN, or a UDP datagram with no
    /// payload) between the two endpoints, both IPv4 or both IPv6.
    pub fn of(
        proto: u8,
        saddr: impl Into<IpAddr>,
        sport: u16,
        daddr: impl Into<IpAddr>,
        dport: u16,
    ) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            saddr: saddr.into(),
            daddr: daddr.into(),
            proto,
            sport,
            dport,
            ttl: 64,
            id: 0x1234,
            frag: 0x4000, // DF
            options: Vec::new(),
            ext6: Vec::new(),
            segments_left: 0,
            tcp_flags: 0x02,
            seq: 1_000_000,
            ack: 0,
            payload: Vec::new(),
            udp_no_csum: false,
            // SCTP's first packet, as a SYN is TCP's.
            chunk: chunk::INIT,
            trailer: Vec::new(),
        }
    }

    /// The programs' flow hash of this frame's tuple (see
    /// `proxy_common::hash`): what picks its backend slot, NAT port or
    /// remapped client port first.
    pub fn flow_hash(&self) -> u32 {
        let (sport, dport) = (self.sport.to_be(), self.dport.to_be());
        match (self.saddr, self.daddr) {
            (IpAddr::V4(s), IpAddr::V4(d)) => proxy_common::hash::flow_hash4(
                u32::from(s).to_be(),
                u32::from(d).to_be(),
                sport,
                dport,
                self.proto,
            ),
            (s, d) => {
                proxy_common::hash::flow_hash6(words6(s), words6(d), sport, dport, self.proto)
            }
        }
    }

    /// The IPv4 source, for tests of IPv4 paths.
    pub fn saddr4(&self) -> Ipv4Addr {
        v4(self.saddr)
    }

    /// The IPv4 destination, for tests of IPv4 paths.
    pub fn daddr4(&self) -> Ipv4Addr {
        v4(self.daddr)
    }

    pub fn v6(&self) -> bool {
        self.saddr.is_ipv6()
    }

    /// The same frame with a new destination.
    pub fn with_dst(&self, daddr: impl Into<IpAddr>, dport: u16) -> Self {
        Self {
            daddr: daddr.into(),
            dport,
            ..self.clone()
        }
    }

    /// The same frame with a new source.
    pub fn with_src(&self, saddr: impl Into<IpAddr>, sport: u16) -> Self {
        Self {
            saddr: saddr.into(),
            sport,
            ..self.clone()
        }
    }

    /// The next segment of this SYN's connection: PSH and ACK, with `len`
    /// bytes of data.
    pub fn segment(&self, len: usize) -> Self {
        Self {
            tcp_flags: 0x18,
            seq: self.seq.wrapping_add(1),
            ack: 7_000_001,
            ..self.with_payload(len)
        }
    }

    /// The same frame with `len` bytes of payload (a pattern), and DF clear,
    /// so that it may be cut into fragments (see [`fragments`]).
    pub fn with_payload(&self, len: usize) -> Self {
        Self {
            payload: (0..len).map(|i| (i * 7) as u8).collect(),
            frag: 0,
            ..self.clone()
        }
    }

    /// The reply a server would send to this frame, with the addresses swapped.
    pub fn reply(&self) -> Self {
        Self {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            tcp_flags: 0x12,
            ack: self.seq.wrapping_add(1),
            seq: 7_000_000,
            chunk: if self.chunk == chunk::INIT {
                chunk::INIT_ACK
            } else {
                self.chunk
            },
            payload: if self.proto == UDP {
                b"answer".to_vec()
            } else {
                Vec::new()
            },
            ..self.clone()
        }
    }

    pub fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.sport.to_be_bytes());
        l4.extend(self.dport.to_be_bytes());
        match self.proto {
            TCP => {
                l4.extend(self.seq.to_be_bytes());
                l4.extend(self.ack.to_be_bytes());
                l4.push(5 << 4);
                l4.push(self.tcp_flags);
                l4.extend(64240u16.to_be_bytes());
                l4.extend([0, 0, 0, 0]); // checksum, urgent pointer
            }
            UDP => {
                l4.extend(((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend([0, 0]);
            }
            SCTP => {
                // Verification tag, CRC32c (below), then one chunk: type,
                // flags, length (header and value), value padded to 4.
                l4.extend(0x5ca1_ab1eu32.to_be_bytes());
                l4.extend([0; 4]);
                l4.extend([self.chunk, 0]);
                l4.extend(((4 + self.payload.len()) as u16).to_be_bytes());
                l4.extend(&self.payload);
                l4.resize(l4.len().next_multiple_of(4), 0);
                if !self.udp_no_csum {
                    let crc = proxy_common::crc32c::checksum(&l4);
                    l4[8..12].copy_from_slice(&crc.to_le_bytes());
                }
                return l4;
            }
            _ => {}
        }
        l4.extend(&self.payload);
        let csum_at = match self.proto {
            TCP => Some(16),
            UDP if !self.udp_no_csum => Some(6),
            _ => None,
        };
        if let Some(at) = csum_at {
            let mut pseudo = pseudo_header(self.saddr, self.daddr, self.proto, l4.len());
            pseudo.extend(&l4);
            let mut sum = checksum(&pseudo);
            if sum == 0 && self.proto == UDP {
                sum = 0xffff;
            }
            l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
        l4
    }

    /// The IP header, IPv4 (with its options) or IPv6 (with its extension
    /// headers), before an L4 header of `l4_len` bytes.
    pub fn ip_header(&self, l4_len: usize) -> Vec<u8> {
        if let (IpAddr::V6(s), IpAddr::V6(d)) = (self.saddr, self.daddr) {
            let mut ext = Vec::new();
            let kinds: Vec<u8> = self.ext6.iter().copied().chain([self.proto]).collect();
            for pair in kinds.windows(2) {
                let (kind, next) = (pair[0], pair[1]);
                ext.extend(match kind {
                    ROUTING => [next, 0, 4, self.segments_left, 0, 0, 0, 0],
                    FRAGMENT => [next, 0, 0, 1, 0, 0, 0x12, 0x34],
                    _ => [next, 0, 1, 4, 0, 0, 0, 0],
                });
            }
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend(((ext.len() + l4_len) as u16).to_be_bytes());
            ip.extend([kinds[0], self.ttl]);
            ip.extend(s.octets());
            ip.extend(d.octets());
            ip.extend(ext);
            return ip;
        }
        let (s, d) = (self.saddr4(), self.daddr4());
        let ihl = 5 + self.options.len() / 4;
        let mut ip = vec![(4 << 4) | ihl as u8, 0];
        ip.extend(((ihl * 4 + l4_len) as u16).to_be_bytes());
        ip.extend(self.id.to_be_bytes());
        ip.extend(self.frag.to_be_bytes());
        ip.extend([self.ttl, self.proto, 0, 0]);
        ip.extend(s.octets());
        ip.extend(d.octets());
        ip.extend(&self.options);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip
    }

    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4();
        let ether_type = if self.v6() { 0x86dd } else { 0x0800 };
        let mut out = ethernet(self.dst_mac, self.src_mac, ether_type);
        out.extend(self.ip_header(l4.len()));
        out.extend(l4);
        out.extend(&self.trailer);
        out
    }
}

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(dst);
    out.extend(src);
    out.extend(ether_type.to_be_bytes());
    out
}

fn v4(addr: IpAddr) -> Ipv4Addr {
    match addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("{a} is not an IPv4 address"),
    }
}

/// An IPv6 address as the programs hold it: four words loaded from network
/// order. An IPv4 address here is a test's mistake.
fn words6(addr: IpAddr) -> [u32; 4] {
    let IpAddr::V6(a) = addr else {
        panic!("{addr} is not an IPv6 address")
    };
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The pseudo-header an L4 checksum covers (RFC 793, RFC 8200 8.1).
fn pseudo_header(saddr: IpAddr, daddr: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut pseudo = Vec::new();
    match (saddr, daddr) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend([0, proto]);
            pseudo.extend((len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend((len as u32).to_be_bytes());
            pseudo.extend([0, 0, 0, proto]);
        }
        _ => panic!("{saddr} and {daddr} are of two families"),
    }
    pseudo
}

/// RFC 1071 checksum over `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The ICMP (ICMPv6) port unreachable a rejecting node sends back for
/// `sent`: from the address the client dialled, quoting the IP header
/// (options and extension headers too) and the fixed L4 header.
pub fn port_unreachable(sent: &Frame) -> Vec<u8> {
    let original = sent.bytes();
    let l4 = match sent.proto {
        TCP => 20,
        SCTP => 16,
        _ => 8,
    };
    if sent.v6() {
        let ip_len = 40 + 8 * sent.ext6.len();
        let quote = &original[14..14 + (ip_len + l4).min(128)];
        let mut icmp = vec![1, 4, 0, 0, 0, 0, 0, 0];
        icmp.extend(quote);
        let mut pseudo = pseudo_header(sent.daddr, sent.saddr, ICMP6, icmp.len());
        pseudo.extend(&icmp);
        let sum = checksum(&pseudo);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let reply = Frame {
            saddr: sent.daddr,
            daddr: sent.saddr,
            proto: ICMP6,
            ext6: Vec::new(),
            ..sent.clone()
        };
        let mut out = ethernet(sent.src_mac, sent.dst_mac, 0x86dd);
        out.extend(reply.ip_header(icmp.len()));
        out.extend(icmp);
        return out;
    }
    let ihl = 20 + sent.options.len();
    let quote = &original[14..14 + ihl + l4];
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend(quote);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend([0, 0, 0, 0, 64, ICMP, 0, 0]);
    ip.extend(sent.daddr4().octets());
    ip.extend(sent.saddr4().octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut out = ethernet(sent.src_mac, sent.dst_mac, 0x0800);
    out.extend(ip);
    out.extend(icmp);
    out
}

/// `f`'s IPv4 datagram cut into fragments of `size` bytes of its payload
/// each (a multiple of 8; the last takes the rest), as the sender's stack or
/// a router cuts it: each fragment with its own IPv4 header (the
/// more-fragments flag and its offset), checksums computed in full over the
/// whole datagram.
pub fn fragments(f: &Frame, size: usize) -> Vec<Vec<u8>> {
    assert!(
        size.is_multiple_of(8) && !f.v6(),
        "IPv4 fragments of a multiple of 8 bytes"
    );
    let l4 = f.l4();
    l4.chunks(size)
        .enumerate()
        .map(|(i, chunk)| {
            let more = (i + 1) * size < l4.len();
            let part = Frame {
                frag: if more { 0x2000 } else { 0 } | (i * size / 8) as u16,
                ..f.clone()
            };
            let mut out = ethernet(f.dst_mac, f.src_mac, 0x0800);
            out.extend(part.ip_header(chunk.len()));
            out.extend(chunk);
            out
        })
        .collect()
}

/// An ICMP (ICMPv6) error about a packet, as routers and hosts send them.
#[derive(Clone, Copy, Debug)]
pub enum IcmpError {
    /// Fragmentation needed (ICMPv6: packet too big), with the next hop's MTU.
    TooBig(u16),
    PortUnreachable,
    /// Time (hop limit) exceeded in transit.
    TimeExceeded,
}

impl IcmpError {
    /// The ICMP header: type, code, checksum (zero here) and the four bytes
    /// after it.
    fn header(self, v6: bool) -> [u8; 8] {
        let [hi, lo] = match self {
            Self::TooBig(mtu) => mtu.to_be_bytes(),
            _ => [0, 0],
        };
        let (kind, code) = match (self, v6) {
            (Self::TooBig(_), false) => (3, 4),
            (Self::TooBig(_), true) => (2, 0),
            (Self::PortUnreachable, false) => (3, 3),
            (Self::PortUnreachable, true) => (1, 4),
            (Self::TimeExceeded, false) => (11, 0),
            (Self::TimeExceeded, true) => (3, 0),
        };
        [kind, code, 0, 0, 0, 0, hi, lo]
    }
}

/// The ICMP (ICMPv6) `error` from `from` to `to` about `about`, as that
/// packet was where the error arose, quoting at most `quote` bytes of its
/// IP packet. Sent back the way `about` came (its MACs swapped), with the
/// outer header's id and TTL those of `about`; checksums in full.
pub fn icmp_error(
    error: IcmpError,
    from: IpAddr,
    to: IpAddr,
    about: &Frame,
    quote: usize,
) -> Vec<u8> {
    let original = about.bytes();
    let ip_len = original.len() - ETH_LEN - about.trailer.len();
    let mut icmp = error.header(about.v6()).to_vec();
    icmp.extend(&original[ETH_LEN..ETH_LEN + ip_len.min(quote)]);
    let sum = if about.v6() {
        let mut pseudo = pseudo_header(from, to, ICMP6, icmp.len());
        pseudo.extend(&icmp);
        checksum(&pseudo)
    } else {
        checksum(&icmp)
    };
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let outer = Frame {
        saddr: from,
        daddr: to,
        proto: if about.v6() { ICMP6 } else { ICMP },
        options: Vec::new(),
        ext6: Vec::new(),
        ..about.clone()
    };
    let ether_type = if about.v6() { 0x86dd } else { 0x0800 };
    let mut out = ethernet(about.src_mac, about.dst_mac, ether_type);
    out.extend(outer.ip_header(icmp.len()));
    out.extend(icmp);
    out
}

/// Checks the IPv4 header checksum and the TCP/UDP/ICMP checksum of a
/// frame, or an IPv6 frame's TCP/UDP/ICMPv6 checksum (behind extension
/// headers as this builder makes them).
/// An SCTP packet's CRC32c: over the packet with the field zeroed (a zero
/// field is one left for the device to fill).
fn assert_sctp_checksum(l4: &[u8]) {
    let field = [l4[8], l4[9], l4[10], l4[11]];
    if field == [0; 4] {
        return;
    }
    let mut zeroed = l4.to_vec();
    zeroed[8..12].copy_from_slice(&[0; 4]);
    let crc = proxy_common::crc32c::checksum(&zeroed);
    assert_eq!(field, crc.to_le_bytes(), "bad SCTP checksum");
}

pub fn assert_checksums_valid(frame: &[u8]) {
    if frame[12..14] == [0x86, 0xdd] {
        let payload = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
        let (mut next, mut at) = (frame[20], 54);
        while matches!(next, HOP_BY_HOP | ROUTING | DEST_OPTS) {
            next = frame[at];
            at += (usize::from(frame[at + 1]) + 1) * 8;
        }
        let l4 = &frame[at..54 + payload];
        if next == SCTP {
            assert_sctp_checksum(l4);
            return;
        }
        let src: [u8; 16] = frame[22..38].try_into().unwrap();
        let dst: [u8; 16] = frame[38..54].try_into().unwrap();
        let mut pseudo = pseudo_header(src.into(), dst.into(), next, l4.len());
        pseudo.extend(l4);
        assert_eq!(checksum(&pseudo), 0, "bad L4 checksum");
        return;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let ip = &frame[14..14 + ihl];
    assert_eq!(checksum(ip), 0, "bad IPv4 header checksum");
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let l4 = &frame[14 + ihl..14 + total];
    let proto = frame[23];
    if proto == SCTP {
        assert_sctp_checksum(l4);
        return;
    }
    if proto == ICMP {
        assert_eq!(checksum(l4), 0, "bad ICMP checksum");
        return;
    }
    if proto == UDP && l4[6..8] == [0, 0] {
        return;
    }
    let mut pseudo = Vec::new();
    pseudo.extend(&ip[12..20]);
    pseudo.extend([0, proto]);
    pseudo.extend((l4.len() as u16).to_be_bytes());
    pseudo.extend(l4);
    assert_eq!(checksum(&pseudo), 0, "bad L4 checksum");
}
