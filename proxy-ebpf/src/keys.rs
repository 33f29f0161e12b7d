//! The keys of the conntrack, NAT and services maps, the one way the programs
//! build them: as whole words, never field by field.
//!
//! A map's hash reads the key in 32-bit words as soon as the program has
//! written it, and a load that spans several narrower stores still in flight
//! cannot take its bytes from them: it waits until they reach the cache.
//! Field by field, that wait made the uplink's established path 6% slower
//! than before the eBPF layout change, and words make every path faster
//! (bench/results/per_packet_layout.md). The words follow the field order
//! of the little-endian target, which the assertions below pin.

use core::mem::{offset_of, size_of, transmute};

use proxy_common::{CtKey4, CtKey6, ServiceKey4, ServiceKey6};

use crate::family::Addr6;

const _: () = assert!(cfg!(target_endian = "little"));
const _: () = assert!(
    offset_of!(CtKey4, daddr) == 4
        && offset_of!(CtKey4, sport_be) == 8
        && offset_of!(CtKey4, dport_be) == 10
        && offset_of!(CtKey4, proto) == 12
        && offset_of!(CtKey4, dir) == 13
        && size_of::<CtKey4>() == 16
);
const _: () = assert!(
    offset_of!(ServiceKey4, port_be) == 4
        && offset_of!(ServiceKey4, proto) == 6
        && offset_of!(ServiceKey4, scope) == 7
        && offset_of!(ServiceKey4, slot) == 8
        && size_of::<ServiceKey4>() == 12
);

const _: () = assert!(
    offset_of!(CtKey6, daddr) == 16
        && offset_of!(CtKey6, sport_be) == 32
        && offset_of!(CtKey6, dport_be) == 34
        && offset_of!(CtKey6, proto) == 36
        && offset_of!(CtKey6, dir) == 37
        && size_of::<CtKey6>() == 40
);
const _: () = assert!(
    offset_of!(ServiceKey6, port_be) == 16
        && offset_of!(ServiceKey6, proto) == 18
        && offset_of!(ServiceKey6, scope) == 19
        && offset_of!(ServiceKey6, slot) == 20
        && size_of::<ServiceKey6>() == 24
);

/// The conntrack or NAT key of one direction of a tuple, `saddr:sport ->
/// daddr:dport` (network order), with its protocol and `ct_dir`.
#[inline(always)]
pub fn tuple(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey4 {
    let words = [
        u64::from(saddr) | u64::from(daddr) << 32,
        u64::from(sport) | u64::from(dport) << 16 | u64::from(proto) << 32 | u64::from(dir) << 40,
    ];
    // SAFETY: `CtKey4` is 16 bytes of plain integers (any bit pattern is a
    // key), laid out as these words (asserted above).
    unsafe { transmute::<[u64; 2], CtKey4>(words) }
}

/// The services-map key of frontend `addr:port` (network order) and
/// `proto`, slot `slot` (0: its header), for every client (scope 0).
#[inline(always)]
pub fn service(addr: u32, port_be: u16, proto: u8, slot: u16) -> ServiceKey4 {
    let words = [
        addr,
        u32::from(port_be) | u32::from(proto) << 16,
        u32::from(slot),
    ];
    // SAFETY: `ServiceKey4` is 12 bytes of plain integers, laid out as these
    // words (asserted above).
    unsafe { transmute::<[u32; 3], ServiceKey4>(words) }
}

/// [`tuple`] for IPv6.
#[inline(always)]
pub fn tuple6(saddr: Addr6, daddr: Addr6, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey6 {
    let words = [
        saddr[0],
        saddr[1],
        saddr[2],
        saddr[3],
        daddr[0],
        daddr[1],
        daddr[2],
        daddr[3],
        u32::from(sport) | u32::from(dport) << 16,
        u32::from(proto) | u32::from(dir) << 8,
    ];
    // SAFETY: `CtKey6` is 40 bytes of plain integers, laid out as these
    // words (asserted above).
    unsafe { transmute::<[u32; 10], CtKey6>(words) }
}

/// [`service`] for IPv6.
#[inline(always)]
pub fn service6(addr: Addr6, port_be: u16, proto: u8, slot: u16) -> ServiceKey6 {
    let words = [
        addr[0],
        addr[1],
        addr[2],
        addr[3],
        u32::from(port_be) | u32::from(proto) << 16,
        u32::from(slot),
    ];
    // SAFETY: `ServiceKey6` is 24 bytes of plain integers, laid out as these
    // words (asserted above).
    unsafe { transmute::<[u32; 6], ServiceKey6>(words) }
}
