//! IPv4 fragments. Only the first fragment of a datagram carries its L4
//! header, so only it has ports to find a frontend or a flow by. The first
//! fragment to pass a hook leaves its ports in the fragments map, keyed by
//! the datagram (source, destination, protocol and identification, as RFC
//! 791 makes them unique); the later fragments take them from there, go the
//! way the first did, and get their addresses rewritten as it did (they
//! have no ports and no L4 checksum of their own to rewrite).
//!
//! A later fragment whose first has not passed (fragments out of order, or
//! an entry evicted from the full map) is passed untouched and counted
//! (`pass_fragment`): that datagram is lost, and the sender's retry (a DNS
//! client's, for one) gets through when its fragments come in order.

use proxy_common::{FragKey4, FragPorts, Ip4};

use crate::maps::FRAGMENTS;

/// The IPv4 header's fragment offset, and its more-fragments flag.
pub const OFFSET: u16 = 0x1fff;
pub const MORE: u16 = 0x2000;

/// The fragments-map key of a datagram.
#[inline(always)]
pub fn datagram(saddr: u32, daddr: u32, id: [u8; 2], proto: u8) -> FragKey4 {
    FragKey4 {
        saddr: Ip4::from_raw(saddr),
        daddr: Ip4::from_raw(daddr),
        id_be: u16::from_ne_bytes(id),
        proto,
        _pad: 0,
    }
}

/// Remembers a first fragment's ports for the rest of its datagram. Best
/// effort: without the entry, the later fragments pass untouched.
#[inline(always)]
pub fn remember(datagram: &FragKey4, sport_be: u16, dport_be: u16) {
    let ports = FragPorts { sport_be, dport_be };
    let _ = FRAGMENTS.insert(datagram, &ports, 0);
}

/// The ports of a datagram whose first fragment passed.
#[inline(always)]
pub fn ports(datagram: &FragKey4) -> Option<FragPorts> {
    // SAFETY: plain data, copied out at once.
    unsafe { FRAGMENTS.get(datagram) }.copied()
}
