//! NAT ports of flows SNATed to backends on other nodes, and their NAT
//! entries (the conntrack of SNATed replies). A flow's NAT entry
//! (the backend's reply tuple -> the client) holds one node port towards that
//! backend; the flow's forward conntrack entry names the port.
//!
//! - A new flow takes its hashed port when that is free, else the first free
//!   one the backend's bitmaps show: a fixed number of lookups however large
//!   and however full the range, and a port whenever one is free. Inserting the
//!   NAT entry (never overwriting) is what takes the port; the bitmaps are a
//!   hint kept in step with it, and repaired by the agent.
//! - Every packet of the flow, either way, refreshes its entry; a FIN or RST
//!   marks it closing, a SYN on a reused tuple opens it again.
//! - The agent's garbage collection removes entries whose flow ended (closed,
//!   idle past their lifetime, or without conntrack entry) and clears their
//!   bits: ports go back as flows end.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use proxy_common::{ct_dir, ct_flags, nat_ports, stats::Stat};

use super::{now, refresh};
use crate::{
    family::{Endpoint, Family, NatValue},
    flow::Flow,
    maps::CONFIG,
    verdict::Dropped,
};

/// How many times a new flow searches the bitmaps. More than once only when
/// another CPU took the port found first, or the bitmap lagged the NAT map.
const SEARCHES: u32 = 4;

/// The node's SNAT settings for one family: the address SNATed flows leave
/// with and the NAT port range (one range for both families).
#[derive(Clone, Copy)]
pub struct Snat<F: Family> {
    pub addr: F::Addr,
    /// Empty while the agent wrote none. Not an `Option`: a `None` leaves
    /// the payload's registers unset, and copying them fails the verifier.
    range: Range,
}

impl<F: Family> Snat<F> {
    /// The settings the agent wrote; None while it wrote no address.
    #[inline(always)]
    pub fn load() -> Option<Self> {
        let addr = F::snat_addr()?;
        let range = CONFIG
            .get(0)
            .map_or(Range::EMPTY, |c| Range::new(c.nat_port_min, c.nat_port_max));
        Some(Self { addr, range })
    }

    /// The NAT entry key of a remote backend's replies to node port `nat_port_be`.
    #[inline(always)]
    fn key(&self, backend: &F::Backend, nat_port_be: u16, proto: u8) -> F::CtKey {
        F::tuple(
            backend.addr(),
            self.addr,
            backend.port_be(),
            nat_port_be,
            proto,
            ct_dir::NAT,
        )
    }
}

/// The node's NAT port range: `min..min + size`.
#[derive(Clone, Copy)]
struct Range {
    min: u32,
    size: u32,
}

impl Range {
    const EMPTY: Self = Self { min: 0, size: 0 };

    #[inline(always)]
    fn new(min: u16, max: u16) -> Self {
        let (min, max) = (u32::from(min), u32::from(max));
        if min != 0 && max >= min {
            Self {
                min,
                size: max - min + 1,
            }
        } else {
            Self::EMPTY
        }
    }

    #[inline(always)]
    fn get(self) -> Option<Self> {
        (self.size != 0).then_some(self)
    }

    #[inline(always)]
    fn port_be(self, offset: u32) -> u16 {
        ((self.min + offset) as u16).to_be()
    }

    /// The offset of a port in network order, if it is in the range.
    #[inline(always)]
    fn offset(self, port_be: u16) -> Option<u32> {
        let offset = u32::from(u16::from_be(port_be)).checked_sub(self.min)?;
        (offset < self.size).then_some(offset)
    }
}

#[inline(always)]
fn word<F: Family>(key: &F::NatPortKey) -> u64 {
    // SAFETY: copied out at once.
    F::nat_word_ptr(key).map_or(0, |w| unsafe { *w })
}

/// Sets `bits` in a word; returns the word as it is now. A racing CPU can
/// lose a bit here: the NAT map still refuses the port, and the bit comes
/// back when a flow next tries it.
#[inline(always)]
fn set_bits<F: Family>(key: &F::NatPortKey, bits: u64) -> u64 {
    if let Some(w) = F::nat_word_ptr(key) {
        // SAFETY: plain data.
        unsafe {
            *w |= bits;
            return *w;
        }
    }
    // Best effort: a full map only costs the hint.
    F::set_nat_word(key, bits, u64::from(BPF_NOEXIST));
    bits
}

/// Records in the bitmaps that the port at `offset` is held.
#[inline(always)]
fn mark<F: Family>(backend: &F::Backend, proto: u8, range: Range, offset: u32) {
    let w = offset / 64;
    let now = set_bits::<F>(
        &F::nat_port_key(backend, proto, w as u16),
        1 << (offset % 64),
    );
    let full = nat_ports::word_mask(range.size, w);
    if now & full == full {
        set_bits::<F>(
            &F::nat_port_key(backend, proto, nat_ports::SUMMARY + (w / 64) as u16),
            1 << (w % 64),
        );
    }
}

/// A free port's offset as the bitmaps show it: from the summary word of
/// `start_word` on, the first word not full, and its first free bit. Called
/// through `Family::find_free_port`, which for IPv4 makes it a function the
/// verifier walks once.
#[inline(always)]
pub fn find_free<F: Family>(
    backend: &F::Backend,
    proto: u8,
    size: u32,
    start_word: u32,
) -> Option<u32> {
    let words = nat_ports::words(size);
    let summaries = words.div_ceil(64);
    let first = start_word / 64;
    let mut i = 0;
    while i < u32::from(nat_ports::SUMMARY_WORDS) {
        if i >= summaries {
            break;
        }
        let s = (first + i).checked_rem(summaries).unwrap_or(0);
        let summary_key = F::nat_port_key(backend, proto, nat_ports::SUMMARY + s as u16);
        let open = !word::<F>(&summary_key) & nat_ports::word_mask(words, s);
        if open != 0 {
            // Near the hashed word first, so flows spread over the range.
            let near = if i == 0 {
                open & (u64::MAX << (start_word % 64))
            } else {
                0
            };
            let w = s * 64 + nat_ports::lowest_bit(if near != 0 { near } else { open });
            let free = !word::<F>(&F::nat_port_key(backend, proto, w as u16))
                & nat_ports::word_mask(size, w);
            if free != 0 {
                return Some(w * 64 + nat_ports::lowest_bit(free));
            }
            // Full, and its summary bit lost to a race: put it back. A later
            // search sees the other words of this summary.
            set_bits::<F>(&summary_key, 1 << (w % 64));
        }
        i += 1;
    }
    None
}

/// A flow's NAT entry as it starts.
#[inline(always)]
fn entry<F: Family>(flow: &Flow<F>, rev_nat_id: u32, now: u64) -> F::Nat {
    F::Nat::new(flow.saddr, flow.sport, rev_nat_id, next_flags(flow, 0), now)
}

/// The flags of a flow's entries after one of its packets.
#[inline(always)]
fn next_flags<F: Family>(flow: &Flow<F>, flags: u16) -> u16 {
    if flow.fin_or_rst() {
        flags | ct_flags::CLOSING
    } else if flow.syn() {
        flags & !ct_flags::CLOSING
    } else {
        flags
    }
}

/// Refreshes a NAT entry for one of its flow's packets (`nat`: as read from
/// `entry`): its flags after the packet, and its last-seen time when the
/// flags changed or it is older than the refresh interval. Returns the flags.
#[inline(always)]
fn touch<F: Family>(flow: &Flow<F>, entry: *mut F::Nat, nat: &F::Nat, now: u64) -> u16 {
    let flags = next_flags(flow, nat.flags());
    let last_seen = F::Nat::last_seen_ptr(entry);
    // SAFETY: pointers into the map value.
    unsafe {
        if flags != nat.flags() {
            *F::Nat::flags_ptr(entry) = flags;
            *last_seen = now;
        } else {
            refresh(last_seen, nat.last_seen_ns(), now);
        }
    }
    flags
}

/// Takes the port at `offset` for `value`'s flow if no flow holds it.
#[inline(always)]
fn take<F: Family>(
    snat: &Snat<F>,
    backend: &F::Backend,
    range: Range,
    offset: u32,
    value: &F::Nat,
    proto: u8,
) -> bool {
    let key = snat.key(backend, range.port_be(offset), proto);
    let taken = F::nat_insert_new(&key, value);
    // Taken now, or held by another flow the bitmap did not show.
    mark::<F>(backend, proto, range, offset);
    taken
}

/// Gives a new flow to a remote backend a node port no other flow to that
/// backend holds, and its NAT entry.
#[inline(always)]
pub fn allocate<F: Family>(
    flow: &Flow<F>,
    snat: &Snat<F>,
    backend: &F::Backend,
    rev_nat_id: u32,
) -> Result<u16, Dropped> {
    let range = snat.range.get().ok_or(Dropped(Stat::DropNatPorts))?;
    let value = entry(flow, rev_nat_id, now());
    let start = F::flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
        .checked_rem(range.size)
        .unwrap_or(0);
    let start_bit = 1 << (start % 64);
    if word::<F>(&F::nat_port_key(backend, flow.proto, (start / 64) as u16)) & start_bit == 0
        && take(snat, backend, range, start, &value, flow.proto)
    {
        return Ok(range.port_be(start));
    }
    let mut i = 0;
    while i < SEARCHES {
        let Some(offset) = F::find_free_port(backend, flow.proto, range.size, start / 64) else {
            break;
        };
        if take(snat, backend, range, offset, &value, flow.proto) {
            return Ok(range.port_be(offset));
        }
        i += 1;
    }
    // Every port towards this backend is held: count it against the backend,
    // so that the agent can name it. Not atomic: the exact total is the
    // per-CPU drop_nat_ports counter.
    let drops = F::nat_port_key(backend, flow.proto, nat_ports::DROPS);
    let count = word::<F>(&drops).wrapping_add(1);
    F::set_nat_word(&drops, count, u64::from(BPF_ANY));
    Err(Dropped(Stat::DropNatPorts))
}

/// Names the backend in the NAT entry a new flow just got (`allocate`),
/// for the traffic counters of its replies. Written after the insert, not
/// in the value `allocate` inserts: an id in that value, where 0 was,
/// costs the verifier a fifth more of uplink_tc's paths.
#[inline(always)]
pub fn name_backend<F: Family>(
    flow: &Flow<F>,
    snat: &Snat<F>,
    backend: &F::Backend,
    port_be: u16,
    backend_id: u32,
) {
    if let Some(entry) = F::nat_ptr(&snat.key(backend, port_be, flow.proto)) {
        F::Nat::set_backend_id(entry, backend_id);
    }
}

/// An established flow's NAT port: its entry refreshed (closing on a FIN or
/// RST, open again on a SYN), or put back if it was collected while the port
/// is free. `None` when another flow holds the port now: the flow needs a
/// new one.
#[inline(always)]
fn keep<F: Family>(
    flow: &Flow<F>,
    snat: &Snat<F>,
    backend: &F::Backend,
    port_be: u16,
    rev_nat_id: u32,
) -> Option<u16> {
    let key = snat.key(backend, port_be, flow.proto);
    let now = now();
    if let Some(e) = F::nat_ptr(&key) {
        // SAFETY: plain data, read once.
        let nat = unsafe { *e };
        if nat.client_addr() != flow.saddr
            || nat.client_port_be() != flow.sport
            || nat.rev_nat_id() != rev_nat_id
        {
            return None;
        }
        touch(flow, e, &nat, now);
        return Some(port_be);
    }
    let value = entry(flow, rev_nat_id, now);
    if !F::nat_insert_new(&key, &value) {
        return None;
    }
    if let Some(range) = snat.range.get() {
        if let Some(offset) = range.offset(port_be) {
            mark::<F>(backend, flow.proto, range, offset);
        }
    }
    Some(port_be)
}

/// The port the flow's conntrack entry names (`nat_port_be`, 0 for none),
/// while the flow still holds it. Else the flow needs a new one
/// (`allocate`), which its forward conntrack entry then records.
#[inline(always)]
pub fn kept<F: Family>(
    flow: &Flow<F>,
    snat: &Snat<F>,
    backend: &F::Backend,
    nat_port_be: u16,
    rev_nat_id: u32,
) -> Option<u16> {
    if nat_port_be == 0 {
        return None;
    }
    keep(flow, snat, backend, nat_port_be, rev_nat_id)
}

/// The NAT entry of a remote backend's reply to a SNATed flow.
#[inline(always)]
pub fn lookup<F: Family>(flow: &Flow<F>) -> Option<*mut F::Nat> {
    F::nat_ptr(&super::key(flow, ct_dir::NAT))
}

/// A remote backend's reply to a SNATed flow: refreshes its NAT entry and, on
/// a FIN or RST, marks it and the flow's forward conntrack entry closing.
#[inline(always)]
pub fn on_reply<F: Family>(flow: &Flow<F>, entry: *mut F::Nat, nat: &F::Nat, frontend: &F::RevNat) {
    let flags = touch(flow, entry, nat, now());
    if flags & ct_flags::CLOSING != 0 && nat.flags() & ct_flags::CLOSING == 0 {
        let forward = F::tuple(
            nat.client_addr(),
            frontend.addr(),
            nat.client_port_be(),
            frontend.port_be(),
            flow.proto,
            ct_dir::FORWARD,
        );
        if let Some(ct) = F::ct_ptr(&forward) {
            // SAFETY: plain data.
            unsafe { (*ct).flags |= ct_flags::CLOSING };
        }
    }
}
