//! The layout each map had one version ago, and how an entry of that layout
//! becomes one of today's: what the agent needs to carry the entries of an
//! older agent's pinned maps over when it starts (proxy-agent's
//! `kernel/migrate.rs`), so that established flows keep their backend and
//! their NAT port across an upgrade.
//!
//! One older version per map, never more: when a map's layout changes again,
//! today's layout moves here, replacing the one before, and its conversion is
//! rewritten. A pinned map two or more versions old (or newer than this
//! agent) is not carried over.
//!
//! Maps with no older version in the history: `natport4_v1`, `config_v1`
//! and `stats_v1` (adopted as they are). `rr_v2` was a per-CPU
//! array (every frontend id's counters allocated on every CPU); its
//! round-robin counters are not worth carrying over.
//!
//! Every conversion is total but one: the previous layouts differ from
//! today's only by a frontend id 16 bits wide where it is 32 bits now (v1
//! and ct4_v2, see "Frontend ids are u32"), in `nat4_v2` by padding where
//! `nat4_v3` has its flags, and in `backend4_v1` by being a hash map keyed
//! by id where `backend4_v2` is an array indexed by the id's low bits: two
//! ids of one slot cannot both go over (the agent gives the other a new id,
//! and its flows a new backend).

use crate::map_names;

/// The previous version of each map that has one, with today's name beside it.
pub mod names {
    pub const SERVICES_V4: &str = "svc4_v1";
    pub const BACKENDS_V4: &str = "backend4_v1";
    pub const REVNAT_V4: &str = "revnat4_v1";
    pub const CONNTRACK_V4: &str = "ct4_v2";
    pub const NAT_V4: &str = "nat4_v2";
    pub const AFFINITY_V4: &str = "affinity4_v1";
    pub const MAGLEV_V4: &str = "maglev4_v1";
    pub const ROUND_ROBIN: &str = "rr_v2";
    pub const SOURCE_RANGES_V4: &str = "srcrange4_v1";

    /// (previous name, today's name).
    pub const ALL: [(&str, &str); 9] = [
        (SERVICES_V4, super::map_names::SERVICES_V4),
        (BACKENDS_V4, super::map_names::BACKENDS_V4),
        (REVNAT_V4, super::map_names::REVNAT_V4),
        (CONNTRACK_V4, super::map_names::CONNTRACK_V4),
        (NAT_V4, super::map_names::NAT_V4),
        (AFFINITY_V4, super::map_names::AFFINITY_V4),
        (MAGLEV_V4, super::map_names::MAGLEV_V4),
        (ROUND_ROBIN, super::map_names::ROUND_ROBIN),
        (SOURCE_RANGES_V4, super::map_names::SOURCE_RANGES_V4),
    ];
}

/// What a file in the agent's pin directory is, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// One of today's maps.
    Current,
    /// The previous version of today's map `.0`: its entries can be carried over.
    Previous(&'static str),
    /// Another version of today's map `.0` (older than the previous one, or
    /// newer than this agent): its layout is unknown here.
    Unknown(&'static str),
    /// Today's map `.0` pinned with another size, set aside (see
    /// [`RESIZED_SUFFIX`]): its entries go into the map of the wanted size.
    Resized(&'static str),
    /// Not a map of a known name (an XDP link's pin, say).
    Other,
}

/// What today's map `name` is renamed to (`name` and this suffix) while its
/// entries move into a map of another size (bpffs refuses names with a dot).
pub const RESIZED_SUFFIX: &str = "_resized";

/// The name without its `_vN` suffix, and N.
fn split_version(name: &str) -> Option<(&str, u32)> {
    let (base, version) = name.rsplit_once("_v")?;
    Some((base, version.parse().ok()?))
}

/// What the pin called `name` is.
pub fn classify(name: &str) -> Pin {
    if map_names::ALL.contains(&name) {
        return Pin::Current;
    }
    if let Some((_, current)) = names::ALL.iter().find(|(previous, _)| *previous == name) {
        return Pin::Previous(current);
    }
    if let Some(current) = name
        .strip_suffix(RESIZED_SUFFIX)
        .and_then(|base| map_names::ALL.iter().find(|current| **current == base))
    {
        return Pin::Resized(current);
    }
    let Some((base, _)) = split_version(name) else {
        return Pin::Other;
    };
    map_names::ALL
        .iter()
        .find(|current| split_version(current).is_some_and(|(b, _)| b == base))
        .map_or(Pin::Other, |current| Pin::Unknown(current))
}

/// `svc4_v1`'s value: the frontend id was 16 bits wide, before the count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub rev_nat_id: u16,
    pub flags: u16,
    pub maglev_size: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);

/// `ct4_v2`'s value: a 16-bit frontend id (its key is today's [`crate::CtKey4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue4 {
    pub backend_id: u32,
    pub rev_nat_id: u16,
    pub flags: u16,
    pub nat_port_be: u16,
    pub _pad: [u16; 3],
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtValue4>() == 24);

/// `nat4_v2`'s value: padding where `nat4_v3` has flags (its key is today's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nat4 {
    pub client_addr_be: u32,
    pub rev_nat_id: u32,
    pub client_port_be: u16,
    pub _pad: [u16; 3],
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Nat4>() == 24);

/// `affinity4_v1`'s key: a 16-bit frontend id (its value is today's).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey4 {
    pub client_addr_be: u32,
    pub rev_nat_id: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<AffinityKey4>() == 8);

/// `maglev4_v1`'s key: a 16-bit frontend id (its value is today's).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevKey4 {
    pub rev_nat_id: u16,
    pub _pad: u16,
    pub index: u32,
}
const _: () = assert!(core::mem::size_of::<MaglevKey4>() == 8);

/// `srcrange4_v1`'s key data: a 16-bit frontend id and its padding made the
/// 32 bits an entry's prefix length counted before the address, as
/// [`crate::SourceRange4::ID_BITS`] does now, so prefix lengths carry over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRange4 {
    pub rev_nat_id_be: u16,
    pub _pad: u16,
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<SourceRange4>() == 8);

/// `backend4_v1`'s value (keyed by id, in a hash map): no id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend4 {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub state: u8,
    pub flags: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Backend4>() == 12);

/// A `backend4_v1` entry as a `backend4_v2` value, which names its id (its
/// slot is [`crate::capacity::backend_slot`]).
pub const fn backend(id: u32, v: Backend4) -> crate::Backend4 {
    crate::Backend4 {
        addr: crate::Ip4::from_raw(v.addr_be),
        port_be: v.port_be,
        proto: v.proto,
        state: v.state,
        flags: v.flags,
        _pad: [0; 3],
        id,
    }
}

// `revnat4_v1` had a 16-bit key and today's value: see [`revnat_id`].

/// A `revnat4_v1` key (a frontend id) as today's.
pub const fn revnat_id(id: u16) -> u32 {
    id as u32
}

/// A `svc4_v1` value as a `svc4_v2` one (its key is unchanged).
pub const fn service(v: ServiceValue) -> crate::ServiceValue {
    crate::ServiceValue {
        backend_id: v.backend_id,
        rev_nat_id: v.rev_nat_id as u32,
        count: v.count,
        flags: v.flags,
        maglev_size: v.maglev_size,
        cluster_count: 0,
    }
}

/// A `ct4_v2` value as a `ct4_v3` one.
pub const fn conntrack(v: CtValue4) -> crate::CtValue {
    crate::CtValue {
        backend_id: v.backend_id,
        rev_nat_id: v.rev_nat_id as u32,
        flags: v.flags,
        nat_port_be: v.nat_port_be,
        remap_port_be: 0,
        _pad: 0,
        last_seen_ns: v.last_seen_ns,
    }
}

/// A `nat4_v2` value as a `nat4_v3` one. v2 entries never marked a closing
/// flow, so none is marked: the entry ends with its flow's conntrack entry,
/// which the agent's garbage collection follows.
pub const fn nat(v: Nat4) -> crate::Nat4 {
    crate::Nat4 {
        client_addr: crate::Ip4::from_raw(v.client_addr_be),
        rev_nat_id: v.rev_nat_id,
        client_port_be: v.client_port_be,
        flags: 0,
        backend_id: 0,
        last_seen_ns: v.last_seen_ns,
    }
}

/// An `affinity4_v1` key as an `affinity4_v2` one.
pub const fn affinity_key(k: AffinityKey4) -> crate::AffinityKey4 {
    crate::AffinityKey4 {
        client_addr: crate::Ip4::from_raw(k.client_addr_be),
        rev_nat_id: k.rev_nat_id as u32,
    }
}

/// A `maglev4_v1` key as a `maglev4_v2` one.
pub const fn maglev_key(k: MaglevKey4) -> crate::MaglevKey {
    crate::MaglevKey {
        rev_nat_id: k.rev_nat_id as u32,
        index: k.index,
    }
}

/// A `srcrange4_v1` key's data as a `srcrange4_v2` one (same prefix length).
pub const fn source_range(k: SourceRange4) -> crate::SourceRange4 {
    crate::SourceRange4 {
        rev_nat_id_be: (u16::from_be(k.rev_nat_id_be) as u32).to_be(),
        addr: crate::Ip4::from_raw(k.addr_be),
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is repr(C), has explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for CtValue4 {}
    unsafe impl aya::Pod for Nat4 {}
    unsafe impl aya::Pod for AffinityKey4 {}
    unsafe impl aya::Pod for MaglevKey4 {}
    unsafe impl aya::Pod for SourceRange4 {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    /// The bytes of a `repr(C)` value, as the kernel stores them.
    fn bytes<T: Copy>(v: &T) -> std::vec::Vec<u8> {
        // SAFETY: every type here is repr(C) with explicit padding: no
        // uninitialised bytes.
        unsafe {
            core::slice::from_raw_parts((v as *const T).cast::<u8>(), core::mem::size_of::<T>())
        }
        .to_vec()
    }

    /// A value of `T` read from bytes as the kernel hands them over.
    fn from_bytes<T: Copy>(b: &[u8]) -> T {
        assert_eq!(b.len(), core::mem::size_of::<T>());
        // SAFETY: the length matches, and every bit pattern is valid for these types.
        unsafe { core::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
    }

    #[test]
    fn names_are_classified_by_version() {
        assert_eq!(classify("ct4_v3"), Pin::Current);
        assert_eq!(classify("ct4_v2"), Pin::Previous("ct4_v3"));
        assert_eq!(classify("nat4_v2"), Pin::Previous("nat4_v3"));
        assert_eq!(classify("svc4_v1"), Pin::Previous("svc4_v2"));
        assert_eq!(
            classify("ct4_v1"),
            Pin::Unknown("ct4_v3"),
            "two versions old"
        );
        assert_eq!(classify("nat4_v1"), Pin::Unknown("nat4_v3"));
        assert_eq!(classify("nat4_v4"), Pin::Unknown("nat4_v3"), "newer");
        assert_eq!(classify("backend4_v1"), Pin::Previous("backend4_v2"));
        assert_eq!(classify("backend4_v0"), Pin::Unknown("backend4_v2"));
        assert_eq!(classify("xdp_native_eth0"), Pin::Other);
        assert_eq!(classify("ct4_v3_resized"), Pin::Resized("ct4_v3"));
        assert_eq!(
            classify("ct4_v2_resized"),
            Pin::Other,
            "only today's maps are resized"
        );
        assert_eq!(classify("natport4_vx"), Pin::Other);
        assert_eq!(classify("other_v1"), Pin::Other);
    }

    #[test]
    fn every_previous_name_is_an_older_version_of_a_current_map() {
        for (previous, current) in names::ALL {
            let (pb, pv) = split_version(previous).unwrap();
            let (cb, cv) = split_version(current).unwrap();
            assert_eq!(pb, cb);
            assert_eq!(
                pv + 1,
                cv,
                "{previous} is the version just before {current}"
            );
            assert!(map_names::ALL.contains(&current));
        }
    }

    #[test]
    fn a_v2_conntrack_value_keeps_every_field() {
        // backend 7, frontend 0x1234, flags CLOSING, NAT port 61000 (network
        // order), padding, last seen 0x0102030405060708, little endian.
        let old: [u8; 24] = [
            7, 0, 0, 0, 0x34, 0x12, 2, 0, 0xee, 0x48, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1,
        ];
        let new = conntrack(from_bytes(&old));
        let expected: [u8; 24] = [
            7, 0, 0, 0, 0x34, 0x12, 0, 0, 2, 0, 0xee, 0x48, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1,
        ];
        assert_eq!(bytes(&new), expected);
        assert_eq!(new.nat_port_be, 61000u16.to_be());
        assert_eq!(new.flags, crate::ct_flags::CLOSING);
    }

    #[test]
    fn a_v2_nat_value_gets_no_flags() {
        let old = Nat4 {
            client_addr_be: u32::from_be_bytes([10, 250, 0, 100]).to_be(),
            rev_nat_id: 70_000,
            client_port_be: 40_000u16.to_be(),
            _pad: [0; 3],
            last_seen_ns: 99,
        };
        let new = nat(old);
        assert_eq!(
            (new.client_addr.raw(), new.rev_nat_id, new.client_port_be),
            (old.client_addr_be, 70_000, old.client_port_be)
        );
        assert_eq!((new.flags, new.last_seen_ns), (0, 99));
        // The same bytes but the flags' two: v2's padding was zero.
        assert_eq!(bytes(&new), bytes(&old));
    }

    #[test]
    fn a_v1_backend_keeps_every_field_and_gets_its_id() {
        // 10.244.1.7:8080 TCP, terminating, local.
        let old: [u8; 12] = [10, 244, 1, 7, 0x1f, 0x90, 6, 1, 1, 0, 0, 0];
        let new = backend(70_000, from_bytes(&old));
        let mut expected = old.to_vec();
        expected.extend(70_000u32.to_ne_bytes());
        assert_eq!(bytes(&new), expected);
        assert_eq!((new.port_be, new.id), (8080u16.to_be(), 70_000));
    }

    #[test]
    fn a_v1_service_value_moves_its_id() {
        let old: [u8; 12] = [9, 0, 0, 0, 3, 0, 0xff, 0xff, 0b1_1100, 0, 2, 0];
        let new = service(from_bytes(&old));
        assert_eq!(
            new,
            crate::ServiceValue {
                backend_id: 9,
                rev_nat_id: 0xffff,
                count: 3,
                flags: crate::svc_flags::AFFINITY | crate::svc_flags::SCHEDULER_ROUND_ROBIN,
                maglev_size: 2,
                cluster_count: 0,
            }
        );
    }

    #[test]
    fn v1_keys_widen_their_frontend_id() {
        let client = u32::from_be_bytes([10, 244, 1, 2]).to_be();
        let key = affinity_key(AffinityKey4 {
            client_addr_be: client,
            rev_nat_id: 65_535,
            _pad: 0,
        });
        assert_eq!((key.client_addr.raw(), key.rev_nat_id), (client, 65_535));
        let key = maglev_key(MaglevKey4 {
            rev_nat_id: 300,
            _pad: 0,
            index: 250,
        });
        assert_eq!((key.rev_nat_id, key.index), (300, 250));
        assert_eq!(revnat_id(65_535), 65_535);
    }

    #[test]
    fn a_v1_source_range_matches_the_same_bits_after_the_id() {
        // Frontend 0x0102 and 10.250.0.96: v1 put the id's two bytes first.
        let old: [u8; 8] = [1, 2, 0, 0, 10, 250, 0, 96];
        let new = source_range(from_bytes(&old));
        assert_eq!(bytes(&new), [0, 0, 1, 2, 10, 250, 0, 96]);
        assert_eq!(
            crate::SourceRange4::ID_BITS,
            32,
            "prefix lengths carry over"
        );
    }
}
