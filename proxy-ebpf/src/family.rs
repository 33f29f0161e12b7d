//! The two address families, IPv4 and IPv6, as one trait: their addresses,
//! their IP header's layout, their maps and the keys into them. The code of
//! a path is written once, generic over [`Family`]; each program holds one
//! copy of it per family, which the compiler makes.
//!
//! An IPv4 address is one 32-bit word, an IPv6 address four, each loaded as a
//! native integer from network order (as the maps and the packet hold them).
//! Frontend and backend ids are one space over both families, so the Maglev
//! and round-robin maps (which hold ids only) serve both.

use core::mem::{offset_of, transmute};

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_ANY, BPF_NOEXIST},
    maps::lpm_trie::Key as LpmKey,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use proxy_common::{
    hash::{flow_hash4, flow_hash6},
    AffinityKey4, AffinityKey6, AffinityValue, Backend4, Backend6, CtKey4, CtKey6, CtValue, Ip4,
    Nat4, Nat6, NatPortKey4, NatPortKey6, RevNat4, RevNat6, ServiceKey4, ServiceKey6, ServiceValue,
    SourceRange4, SourceRange6, HAIRPIN_ADDR, HAIRPIN_ADDR6,
};

use crate::{
    flow::{self, Early, Flow, Frame},
    keys,
    maps::{
        AFFINITY, AFFINITY6, BACKENDS6, CONFIG, CONFIG6, CONNTRACK, CONNTRACK6, NAT, NAT6,
        NAT_PORTS, NAT_PORTS6, REVNAT, REVNAT6, SERVICES, SERVICES6, SERVICE_CIDRS, SOURCE_RANGES,
        SOURCE_RANGES6,
    },
};

/// An IPv6 address as the programs hold it: four words in network order.
pub type Addr6 = [u32; 4];

/// A backend or a frontend as a map value holds it: an address and a port.
pub trait Endpoint<A>: Copy {
    fn addr(&self) -> A;
    fn port_be(&self) -> u16;
}

/// A backend map value.
pub trait Backend<A>: Endpoint<A> {
    /// Bits of `proxy_common::backend_flags`.
    fn flags(&self) -> u8;
}

/// A NAT map value: where a SNATed flow's replies go back to.
pub trait NatValue<A>: Copy {
    fn new(client: A, client_port_be: u16, rev_nat_id: u32, flags: u16, now: u64) -> Self;
    fn client_addr(&self) -> A;
    fn client_port_be(&self) -> u16;
    fn rev_nat_id(&self) -> u32;
    /// The backend, for the traffic counters (0 where the entry has no room).
    fn backend_id(&self) -> u32;
    fn flags(&self) -> u16;
    fn last_seen_ns(&self) -> u64;
    /// The fields the programs change in place, in the map value `entry`.
    fn flags_ptr(entry: *mut Self) -> *mut u16;
    fn last_seen_ptr(entry: *mut Self) -> *mut u64;
    /// Names the flow's backend in the map value `entry`, where there is room.
    fn set_backend_id(entry: *mut Self, backend_id: u32);
}

pub trait Family: Copy {
    /// An address: `u32` or [`Addr6`].
    type Addr: Copy + PartialEq;
    type ServiceKey: Copy;
    type Backend: Backend<Self::Addr>;
    type RevNat: Endpoint<Self::Addr>;
    type CtKey;
    type AffinityKey;
    type Nat: NatValue<Self::Addr>;
    type NatPortKey;

    /// Offsets of the source and destination addresses in the IP header.
    const SADDR_OFF: usize;
    const DADDR_OFF: usize;
    /// The IP header has a checksum to fix when an address changes (IPv4).
    const IP_CSUM: bool;
    /// The address family's number (AF_INET, AF_INET6), for FIB lookups.
    const AF: u8;
    /// The family's ICMP protocol number (ICMP, ICMPv6).
    const ICMP: u8;

    /// Writes a FIB lookup's source and destination.
    fn fib_addresses(params: &mut bpf_fib_lookup, src: Self::Addr, dst: Self::Addr);

    /// The address's 32-bit words, as the checksums cover them.
    fn words(addr: &Self::Addr) -> &[u32];

    /// The flow of a frame known to carry this family.
    fn parse<C: Frame>(ctx: &C) -> Result<Flow<Self>, Early>;

    /// Slot `slot` of the frontend `addr:port` (network order) and `proto`.
    fn service_key(addr: Self::Addr, port_be: u16, proto: u8, slot: u16) -> Self::ServiceKey;
    /// The same frontend's slot `slot`.
    fn with_slot(key: &Self::ServiceKey, slot: u16) -> Self::ServiceKey;
    fn service(key: &Self::ServiceKey) -> Option<ServiceValue>;
    fn backend(id: u32) -> Option<Self::Backend>;
    fn revnat(id: u32) -> Option<Self::RevNat>;

    /// The conntrack key of one direction of a tuple (see `keys::tuple`).
    fn tuple(
        saddr: Self::Addr,
        daddr: Self::Addr,
        sport: u16,
        dport: u16,
        proto: u8,
        dir: u8,
    ) -> Self::CtKey;
    fn ct_ptr(key: &Self::CtKey) -> Option<*mut CtValue>;
    fn ct_get(key: &Self::CtKey) -> Option<CtValue>;
    /// Err: the helper's error code.
    fn ct_insert(key: &Self::CtKey, value: &CtValue) -> Result<(), i32>;

    fn affinity_key(client: Self::Addr, rev_nat_id: u32) -> Self::AffinityKey;
    fn affinity(key: &Self::AffinityKey) -> Option<AffinityValue>;
    fn set_affinity(key: &Self::AffinityKey, value: &AffinityValue);

    /// The hash of a 5-tuple (`proxy_common::hash`).
    fn flow_hash(saddr: Self::Addr, daddr: Self::Addr, sport: u16, dport: u16, proto: u8) -> u32;
    /// The hash of a client address alone (the source-hash scheduler).
    fn client_hash(addr: Self::Addr) -> u32;
    /// The source a hairpinned flow gets.
    fn hairpin_addr() -> Self::Addr;
    /// Whether `addr` lies in one of the node's service CIDRs (none unless
    /// the agent was given some).
    fn in_service_cidr(addr: Self::Addr) -> bool;

    /// The node address SNATed flows leave with, if the agent wrote one.
    fn snat_addr() -> Option<Self::Addr>;
    fn nat_ptr(key: &Self::CtKey) -> Option<*mut Self::Nat>;
    /// Inserts a NAT entry unless one is there; false if one was (or the
    /// map is full).
    fn nat_insert_new(key: &Self::CtKey, value: &Self::Nat) -> bool;
    /// Word `index` of `backend`'s NAT-port words for `proto`.
    fn nat_port_key(backend: &Self::Backend, proto: u8, index: u16) -> Self::NatPortKey;
    fn nat_word_ptr(key: &Self::NatPortKey) -> Option<*mut u64>;
    /// Writes a word (`flags`: BPF_ANY or BPF_NOEXIST); best effort.
    fn set_nat_word(key: &Self::NatPortKey, value: u64, flags: u64);
    /// A free NAT port's offset towards `backend` as its bitmaps show it
    /// (see `nat::find_free`), in a range of `size` ports.
    fn find_free_port(
        backend: &Self::Backend,
        proto: u8,
        size: u32,
        start_word: u32,
    ) -> Option<u32>;
    /// Whether loadBalancerSourceRanges of frontend `rev_nat_id` let `client` in.
    fn source_allowed(rev_nat_id: u32, client: Self::Addr) -> bool;
}

impl NatValue<u32> for Nat4 {
    #[inline(always)]
    fn new(client: u32, client_port_be: u16, rev_nat_id: u32, flags: u16, now: u64) -> Self {
        Self {
            client_addr: Ip4::from_raw(client),
            rev_nat_id,
            client_port_be,
            flags,
            backend_id: 0,
            last_seen_ns: now,
        }
    }

    #[inline(always)]
    fn client_addr(&self) -> u32 {
        self.client_addr.raw()
    }

    #[inline(always)]
    fn client_port_be(&self) -> u16 {
        self.client_port_be
    }

    #[inline(always)]
    fn rev_nat_id(&self) -> u32 {
        self.rev_nat_id
    }

    #[inline(always)]
    fn backend_id(&self) -> u32 {
        self.backend_id
    }

    #[inline(always)]
    fn flags(&self) -> u16 {
        self.flags
    }

    #[inline(always)]
    fn last_seen_ns(&self) -> u64 {
        self.last_seen_ns
    }

    #[inline(always)]
    fn flags_ptr(entry: *mut Self) -> *mut u16 {
        // SAFETY: a field address, nothing read.
        unsafe { &raw mut (*entry).flags }
    }

    #[inline(always)]
    fn last_seen_ptr(entry: *mut Self) -> *mut u64 {
        // SAFETY: as above.
        unsafe { &raw mut (*entry).last_seen_ns }
    }

    #[inline(always)]
    fn set_backend_id(entry: *mut Self, backend_id: u32) {
        // SAFETY: a map value's field.
        unsafe { (*entry).backend_id = backend_id };
    }
}

impl NatValue<Addr6> for Nat6 {
    #[inline(always)]
    fn new(client: Addr6, client_port_be: u16, rev_nat_id: u32, flags: u16, now: u64) -> Self {
        Self {
            client_addr: bytes6(client),
            rev_nat_id,
            client_port_be,
            flags,
            last_seen_ns: now,
        }
    }

    #[inline(always)]
    fn client_addr(&self) -> Addr6 {
        words6(self.client_addr)
    }

    #[inline(always)]
    fn client_port_be(&self) -> u16 {
        self.client_port_be
    }

    #[inline(always)]
    fn rev_nat_id(&self) -> u32 {
        self.rev_nat_id
    }

    #[inline(always)]
    fn backend_id(&self) -> u32 {
        0
    }

    #[inline(always)]
    fn flags(&self) -> u16 {
        self.flags
    }

    #[inline(always)]
    fn last_seen_ns(&self) -> u64 {
        self.last_seen_ns
    }

    #[inline(always)]
    fn flags_ptr(entry: *mut Self) -> *mut u16 {
        // SAFETY: a field address, nothing read.
        unsafe { &raw mut (*entry).flags }
    }

    #[inline(always)]
    fn last_seen_ptr(entry: *mut Self) -> *mut u64 {
        // SAFETY: as above.
        unsafe { &raw mut (*entry).last_seen_ns }
    }

    /// No room in `nat6_v1`: its replies are counted under backend id 0.
    #[inline(always)]
    fn set_backend_id(_: *mut Self, _: u32) {}
}

#[derive(Clone, Copy)]
pub struct V4;

#[derive(Clone, Copy)]
pub struct V6;

impl Endpoint<u32> for Backend4 {
    #[inline(always)]
    fn addr(&self) -> u32 {
        self.addr.raw()
    }

    #[inline(always)]
    fn port_be(&self) -> u16 {
        self.port_be
    }
}

impl Backend<u32> for Backend4 {
    #[inline(always)]
    fn flags(&self) -> u8 {
        self.flags
    }
}

impl Endpoint<u32> for RevNat4 {
    #[inline(always)]
    fn addr(&self) -> u32 {
        self.addr.raw()
    }

    #[inline(always)]
    fn port_be(&self) -> u16 {
        self.port_be
    }
}

impl Endpoint<Addr6> for Backend6 {
    #[inline(always)]
    fn addr(&self) -> Addr6 {
        words6(self.addr)
    }

    #[inline(always)]
    fn port_be(&self) -> u16 {
        self.port_be
    }
}

impl Backend<Addr6> for Backend6 {
    #[inline(always)]
    fn flags(&self) -> u8 {
        self.flags
    }
}

impl Endpoint<Addr6> for RevNat6 {
    #[inline(always)]
    fn addr(&self) -> Addr6 {
        words6(self.addr)
    }

    #[inline(always)]
    fn port_be(&self) -> u16 {
        self.port_be
    }
}

/// An IPv6 address's bytes as the programs' words.
#[inline(always)]
pub fn words6(bytes: [u8; 16]) -> Addr6 {
    // SAFETY: 16 bytes either way; any bit pattern is valid for both.
    unsafe { transmute::<[u8; 16], Addr6>(bytes) }
}

/// The programs' words of an IPv6 address as the maps' bytes.
#[inline(always)]
pub fn bytes6(words: Addr6) -> [u8; 16] {
    // SAFETY: as for `words6`.
    unsafe { transmute::<Addr6, [u8; 16]>(words) }
}

impl Family for V4 {
    type Addr = u32;
    type ServiceKey = ServiceKey4;
    type Backend = Backend4;
    type RevNat = RevNat4;
    type CtKey = CtKey4;
    type AffinityKey = AffinityKey4;
    type Nat = Nat4;
    type NatPortKey = NatPortKey4;

    const SADDR_OFF: usize = offset_of!(Ipv4Hdr, src_addr);
    const DADDR_OFF: usize = offset_of!(Ipv4Hdr, dst_addr);
    const IP_CSUM: bool = true;
    const AF: u8 = 2;
    const ICMP: u8 = 1;

    #[inline(always)]
    fn fib_addresses(params: &mut bpf_fib_lookup, src: u32, dst: u32) {
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    }

    #[inline(always)]
    fn words(addr: &u32) -> &[u32] {
        core::slice::from_ref(addr)
    }

    #[inline(always)]
    fn parse<C: Frame>(ctx: &C) -> Result<Flow<Self>, Early> {
        flow::parse4(ctx)
    }

    #[inline(always)]
    fn service_key(addr: u32, port_be: u16, proto: u8, slot: u16) -> ServiceKey4 {
        keys::service(addr, port_be, proto, slot)
    }

    #[inline(always)]
    fn with_slot(key: &ServiceKey4, slot: u16) -> ServiceKey4 {
        keys::service(key.addr.raw(), key.port_be, key.proto, slot)
    }

    #[inline(always)]
    fn service(key: &ServiceKey4) -> Option<ServiceValue> {
        // SAFETY: copied out at once; the agent may replace it later.
        unsafe { SERVICES.get(key) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend4> {
        crate::maps::backend4(id)
    }

    #[inline(always)]
    fn revnat(id: u32) -> Option<RevNat4> {
        // SAFETY: copied out at once.
        unsafe { REVNAT.get(&id) }.copied()
    }

    #[inline(always)]
    fn tuple(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey4 {
        keys::tuple(saddr, daddr, sport, dport, proto, dir)
    }

    #[inline(always)]
    fn ct_ptr(key: &CtKey4) -> Option<*mut CtValue> {
        CONNTRACK.get_ptr_mut(key)
    }

    #[inline(always)]
    fn ct_get(key: &CtKey4) -> Option<CtValue> {
        // SAFETY: copied out at once.
        unsafe { CONNTRACK.get(key) }.copied()
    }

    #[inline(always)]
    fn ct_insert(key: &CtKey4, value: &CtValue) -> Result<(), i32> {
        CONNTRACK.insert(key, value, u64::from(BPF_ANY))
    }

    #[inline(always)]
    fn affinity_key(client: u32, rev_nat_id: u32) -> AffinityKey4 {
        AffinityKey4 {
            client_addr: Ip4::from_raw(client),
            rev_nat_id,
        }
    }

    #[inline(always)]
    fn affinity(key: &AffinityKey4) -> Option<AffinityValue> {
        // SAFETY: copied out at once.
        unsafe { AFFINITY.get(key) }.copied()
    }

    #[inline(always)]
    fn set_affinity(key: &AffinityKey4, value: &AffinityValue) {
        // Best effort: without the entry the next connection is hashed again.
        let _ = AFFINITY.insert(key, value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
        flow_hash4(saddr, daddr, sport, dport, proto)
    }

    #[inline(always)]
    fn client_hash(addr: u32) -> u32 {
        flow_hash4(addr, 0, 0, 0, 0)
    }

    #[inline(always)]
    fn hairpin_addr() -> u32 {
        u32::from_ne_bytes(HAIRPIN_ADDR)
    }

    #[inline(always)]
    fn in_service_cidr(addr: u32) -> bool {
        let Some(cidrs) = SERVICE_CIDRS.get(0) else {
            return false;
        };
        let count = cidrs.count4 as usize;
        for (i, net) in cidrs.v4.iter().enumerate() {
            if i < count && addr & net.mask.raw() == net.addr.raw() {
                return true;
            }
        }
        false
    }

    #[inline(always)]
    fn snat_addr() -> Option<u32> {
        let addr = CONFIG.get(0).map_or(0, |c| c.snat_addr.raw());
        (addr != 0).then_some(addr)
    }

    #[inline(always)]
    fn nat_ptr(key: &CtKey4) -> Option<*mut Nat4> {
        NAT.get_ptr_mut(key)
    }

    #[inline(always)]
    fn nat_insert_new(key: &CtKey4, value: &Nat4) -> bool {
        NAT.insert(key, value, u64::from(BPF_NOEXIST)).is_ok()
    }

    #[inline(always)]
    fn nat_port_key(backend: &Backend4, proto: u8, index: u16) -> NatPortKey4 {
        NatPortKey4 {
            backend_addr: backend.addr,
            backend_port_be: backend.port_be,
            proto,
            _pad: 0,
            index,
            _pad2: 0,
        }
    }

    #[inline(always)]
    fn nat_word_ptr(key: &NatPortKey4) -> Option<*mut u64> {
        NAT_PORTS.get_ptr_mut(key)
    }

    #[inline(always)]
    fn find_free_port(backend: &Backend4, proto: u8, size: u32, start_word: u32) -> Option<u32> {
        let found = ferry_find_free_port4(
            backend.addr.raw(),
            u32::from(backend.port_be) | u32::from(proto) << 16,
            size,
            start_word,
        );
        (found != u32::MAX).then_some(found)
    }

    #[inline(always)]
    fn set_nat_word(key: &NatPortKey4, value: u64, flags: u64) {
        let _ = NAT_PORTS.insert(key, &value, flags);
    }

    #[inline(always)]
    fn source_allowed(rev_nat_id: u32, client: u32) -> bool {
        let data = SourceRange4 {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr: Ip4::from_raw(client),
        };
        SOURCE_RANGES
            .get(&LpmKey::new(SourceRange4::LOOKUP_PREFIX_LEN, data))
            .is_some()
    }
}

impl Family for V6 {
    type Addr = Addr6;
    type ServiceKey = ServiceKey6;
    type Backend = Backend6;
    type RevNat = RevNat6;
    type CtKey = CtKey6;
    type AffinityKey = AffinityKey6;
    type Nat = Nat6;
    type NatPortKey = NatPortKey6;

    const SADDR_OFF: usize = offset_of!(Ipv6Hdr, src_addr);
    const DADDR_OFF: usize = offset_of!(Ipv6Hdr, dst_addr);
    const IP_CSUM: bool = false;
    const AF: u8 = 10;
    const ICMP: u8 = 58;

    #[inline(always)]
    fn fib_addresses(params: &mut bpf_fib_lookup, src: Addr6, dst: Addr6) {
        params.__bindgen_anon_3.ipv6_src = src;
        params.__bindgen_anon_4.ipv6_dst = dst;
    }

    #[inline(always)]
    fn words(addr: &Addr6) -> &[u32] {
        addr
    }

    #[inline(always)]
    fn parse<C: Frame>(ctx: &C) -> Result<Flow<Self>, Early> {
        flow::parse6(ctx)
    }

    #[inline(always)]
    fn service_key(addr: Addr6, port_be: u16, proto: u8, slot: u16) -> ServiceKey6 {
        keys::service6(addr, port_be, proto, slot)
    }

    #[inline(always)]
    fn with_slot(key: &ServiceKey6, slot: u16) -> ServiceKey6 {
        ServiceKey6 { slot, ..*key }
    }

    #[inline(always)]
    fn service(key: &ServiceKey6) -> Option<ServiceValue> {
        // SAFETY: copied out at once; the agent may replace it later.
        unsafe { SERVICES6.get(key) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend6> {
        // SAFETY: copied out at once.
        unsafe { BACKENDS6.get(&id) }.copied()
    }

    #[inline(always)]
    fn revnat(id: u32) -> Option<RevNat6> {
        // SAFETY: copied out at once.
        unsafe { REVNAT6.get(&id) }.copied()
    }

    #[inline(always)]
    fn tuple(saddr: Addr6, daddr: Addr6, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey6 {
        keys::tuple6(saddr, daddr, sport, dport, proto, dir)
    }

    #[inline(always)]
    fn ct_ptr(key: &CtKey6) -> Option<*mut CtValue> {
        CONNTRACK6.get_ptr_mut(key)
    }

    #[inline(always)]
    fn ct_get(key: &CtKey6) -> Option<CtValue> {
        // SAFETY: copied out at once.
        unsafe { CONNTRACK6.get(key) }.copied()
    }

    #[inline(always)]
    fn ct_insert(key: &CtKey6, value: &CtValue) -> Result<(), i32> {
        CONNTRACK6.insert(key, value, u64::from(BPF_ANY))
    }

    #[inline(always)]
    fn affinity_key(client: Addr6, rev_nat_id: u32) -> AffinityKey6 {
        AffinityKey6 {
            client_addr: bytes6(client),
            rev_nat_id,
        }
    }

    #[inline(always)]
    fn affinity(key: &AffinityKey6) -> Option<AffinityValue> {
        // SAFETY: copied out at once.
        unsafe { AFFINITY6.get(key) }.copied()
    }

    #[inline(always)]
    fn set_affinity(key: &AffinityKey6, value: &AffinityValue) {
        // Best effort, as for IPv4.
        let _ = AFFINITY6.insert(key, value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn flow_hash(saddr: Addr6, daddr: Addr6, sport: u16, dport: u16, proto: u8) -> u32 {
        flow_hash6(saddr, daddr, sport, dport, proto)
    }

    #[inline(always)]
    fn client_hash(addr: Addr6) -> u32 {
        flow_hash6(addr, [0; 4], 0, 0, 0)
    }

    #[inline(always)]
    fn hairpin_addr() -> Addr6 {
        words6(HAIRPIN_ADDR6)
    }

    #[inline(always)]
    fn in_service_cidr(addr: Addr6) -> bool {
        let Some(cidrs) = SERVICE_CIDRS.get(0) else {
            return false;
        };
        let count = cidrs.count6 as usize;
        for (i, net) in cidrs.v6.iter().enumerate() {
            let (base, mask) = (words6(net.addr), words6(net.mask));
            if i < count && (0..4).all(|w| addr[w] & mask[w] == base[w]) {
                return true;
            }
        }
        false
    }

    #[inline(always)]
    fn snat_addr() -> Option<Addr6> {
        let addr = words6(CONFIG6.get(0).map_or([0; 16], |c| c.snat_addr));
        (addr != [0; 4]).then_some(addr)
    }

    #[inline(always)]
    fn nat_ptr(key: &CtKey6) -> Option<*mut Nat6> {
        NAT6.get_ptr_mut(key)
    }

    #[inline(always)]
    fn nat_insert_new(key: &CtKey6, value: &Nat6) -> bool {
        NAT6.insert(key, value, u64::from(BPF_NOEXIST)).is_ok()
    }

    #[inline(always)]
    fn nat_port_key(backend: &Backend6, proto: u8, index: u16) -> NatPortKey6 {
        NatPortKey6 {
            backend_addr: backend.addr,
            backend_port_be: backend.port_be,
            proto,
            _pad: 0,
            index,
            _pad2: 0,
        }
    }

    #[inline(always)]
    fn nat_word_ptr(key: &NatPortKey6) -> Option<*mut u64> {
        NAT_PORTS6.get_ptr_mut(key)
    }

    #[inline(always)]
    fn find_free_port(backend: &Backend6, proto: u8, size: u32, start_word: u32) -> Option<u32> {
        crate::ct::nat::find_free::<V6>(backend, proto, size, start_word)
    }

    #[inline(always)]
    fn set_nat_word(key: &NatPortKey6, value: u64, flags: u64) {
        let _ = NAT_PORTS6.insert(key, &value, flags);
    }

    #[inline(always)]
    fn source_allowed(rev_nat_id: u32, client: Addr6) -> bool {
        let data = SourceRange6 {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr: bytes6(client),
        };
        SOURCE_RANGES6
            .get(&LpmKey::new(SourceRange6::LOOKUP_PREFIX_LEN, data))
            .is_some()
    }
}

/// [`Family::find_free_port`] for IPv4: a global function, which the
/// verifier walks once with unknown arguments, not once in every path of
/// uplink_tc that gives a flow a NAT port (its loop cost uplink_tc most of
/// its million instructions on 5.10 and 6.1). Arguments are plain numbers,
/// as 5.10 requires of global functions; u32::MAX is none.
#[no_mangle]
#[inline(never)]
pub extern "C" fn ferry_find_free_port4(
    backend_addr: u32,
    port_be_and_proto: u32,
    size: u32,
    start_word: u32,
) -> u32 {
    let backend = Backend4 {
        addr: Ip4::from_raw(backend_addr),
        port_be: port_be_and_proto as u16,
        proto: (port_be_and_proto >> 16) as u8,
        state: 0,
        flags: 0,
        _pad: [0; 3],
        id: 0,
    };
    crate::ct::nat::find_free::<V4>(&backend, backend.proto, size, start_word).unwrap_or(u32::MAX)
}
