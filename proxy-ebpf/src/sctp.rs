//! SCTP's checksum. It is a CRC32c over the SCTP packet (not the IP
//! addresses), which a port rewrite changes by an amount that depends on
//! the packet's length (`proxy_common::crc32c`): some hundred instructions
//! where a TCP port costs a few. So the paths rewrite SCTP ports and leave
//! the checksum, and each tc program fixes it once, at its end (XDP hands
//! SCTP on to tc: its program has no room for this), from the ports
//! the packet arrived with (`arrived`) and those it leaves with (`fix`):
//! one fix for all of a packet's rewrites, and one place the verifier
//! walks it.

use core::mem::offset_of;

use aya_ebpf::programs::TcContext;
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use proxy_common::{crc32c, proto};

use crate::{
    ctx::Packet,
    flow::{self, Frame, Ip, ETH_LEN, SCTP_CSUM_OFF},
    maps::ARRIVED,
};

/// The fixed IPv4 and IPv6 headers' lengths, and where in them the
/// protocol (next header) and the length fields are.
const IPV4_LEN: usize = Ipv4Hdr::LEN;
const IPV4_TOT_LEN_OFF: usize = offset_of!(Ipv4Hdr, tot_len);
const IPV4_PROTO_OFF: usize = offset_of!(Ipv4Hdr, proto);
const IPV6_LEN: usize = Ipv6Hdr::LEN;
const IPV6_PAYLOAD_LEN_OFF: usize = offset_of!(Ipv6Hdr, payload_len);
const IPV6_NEXT_OFF: usize = offset_of!(Ipv6Hdr, next_hdr);

/// An SCTP packet's ports as they are at a moment, where they sit, and the
/// length its checksum covers.
#[derive(Clone, Copy)]
pub struct Ports {
    l4_off: usize,
    len: u16,
    ports: [u8; 4],
}

/// Notes an SCTP packet's ports as it arrived, in a per-CPU slot (`ARRIVED`)
/// rather than on the stack: the verifier holds a map value's bytes as
/// unknown, where stack bytes written on some paths and not on others would
/// make it walk the whole program once for each.
#[inline(never)]
pub fn arrived(ctx: &TcContext) {
    if let (Some(ports), Some(slot)) = (find(ctx), ARRIVED.get_ptr_mut(0)) {
        // SAFETY: this CPU's slot, for this run only.
        unsafe { *slot = ports };
    }
}

/// An SCTP packet's ports: over IPv4 (fragments pass untouched, see
/// `flow`), or over IPv6 without extension headers (with them, it passes
/// untouched too). None for anything else, found at the cost of a look at
/// the IP header's protocol.
#[inline(always)]
fn find<C: Frame>(ctx: &C) -> Option<Ports> {
    let (l4_off, len) = match flow::ip_version(ctx).ok()? {
        Ip::V4 => {
            if !ctx.linear(ETH_LEN + IPV4_LEN) {
                return None;
            }
            // SAFETY: `linear` checked that the fixed IPv4 header is there.
            let ip = unsafe { *((ctx.data() + ETH_LEN) as *const [u8; IPV4_LEN]) };
            if ip[IPV4_PROTO_OFF] != proto::SCTP {
                return None;
            }
            let ip_hdr_len = usize::from(ip[0] & 0x0f) * 4;
            let tot_len = u16::from_be_bytes([ip[IPV4_TOT_LEN_OFF], ip[IPV4_TOT_LEN_OFF + 1]]);
            (
                ETH_LEN + ip_hdr_len,
                usize::from(tot_len).checked_sub(ip_hdr_len)?,
            )
        }
        Ip::V6 => {
            if !ctx.linear(ETH_LEN + IPV6_LEN) {
                return None;
            }
            // SAFETY: as above, for the fixed IPv6 header.
            let ip = unsafe { *((ctx.data() + ETH_LEN) as *const [u8; IPV6_NEXT_OFF + 1]) };
            if ip[IPV6_NEXT_OFF] != proto::SCTP {
                return None;
            }
            let payload =
                u16::from_be_bytes([ip[IPV6_PAYLOAD_LEN_OFF], ip[IPV6_PAYLOAD_LEN_OFF + 1]]);
            (ETH_LEN + IPV6_LEN, usize::from(payload))
        }
    };
    Some(Ports {
        l4_off,
        len: u16::try_from(len).ok()?,
        ports: ctx.read(l4_off)?,
    })
}

/// At a program's end, after its verdict: the SCTP packet `arrived` noted
/// gets its checksum fixed for the ports it leaves with. After the verdict,
/// where little of the program's state is left alive, so that the verifier
/// walks this once for each verdict rather than once for each path to it;
/// a redirect (set up by the verdict) takes the packet only once the
/// program returns. A packet no longer that SCTP packet (turned into an
/// ICMP error) is left alone. So is a zero checksum: one the sender's stack
/// left for the device to fill in (a pod's SCTP socket over a veth does),
/// which is then summed over the packet as it leaves, rewritten ports and
/// all. (A computed CRC that happens to be zero, one packet in 2^32, is
/// left wrong, and that packet is sent again, as is one whose fix failed.)
#[inline(never)]
pub fn fix(ctx: &TcContext) {
    let Some(after) = find(ctx) else {
        return;
    };
    // This CPU's slot, which `arrived` wrote for this packet (the same
    // `find` saw an SCTP packet then).
    let Some(before) = ARRIVED.get(0).copied() else {
        return;
    };
    if after.l4_off != before.l4_off || after.ports == before.ports {
        return;
    }
    let field_off = before.l4_off + SCTP_CSUM_OFF;
    let Some(field) = ctx.read::<[u8; 4]>(field_off) else {
        return;
    };
    if field == [0; 4] {
        return;
    }
    let check = crc32c::port_change(field, before.ports, after.ports, before.len);
    let _ = ctx.write(field_off, &check);
}
