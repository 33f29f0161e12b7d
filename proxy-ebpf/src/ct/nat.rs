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

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{
    ct_dir, ct_flags, hash::flow_hash4, nat_ports, stats::Stat, Backend4, Config, CtKey4, Nat4,
    NatPortKey4, RevNat4,
};

use super::{now, refresh, remember_nat_port};
use crate::{
    flow::Flow,
    keys,
    maps::{CONNTRACK, NAT, NAT_PORTS},
    verdict::Dropped,
};

/// How many times a new flow searches the bitmaps. More than once only when
/// another CPU took the port found first, or the bitmap lagged the NAT map.
const SEARCHES: u32 = 4;

/// The NAT entry key of a remote backend's replies to node port `nat_port_be`.
#[inline(always)]
pub fn key(backend: &Backend4, config: &Config, nat_port_be: u16, proto: u8) -> CtKey4 {
    keys::tuple(
        backend.addr_be,
        config.snat_addr_be,
        backend.port_be,
        nat_port_be,
        proto,
        ct_dir::NAT,
    )
}

/// The node's NAT port range: `min..min + size`.
#[derive(Clone, Copy)]
struct Range {
    min: u32,
    size: u32,
}

impl Range {
    #[inline(always)]
    fn of(config: &Config) -> Option<Self> {
        let min = u32::from(config.nat_port_min);
        let max = u32::from(config.nat_port_max);
        (min != 0 && max >= min).then_some(Self {
            min,
            size: max - min + 1,
        })
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
fn word_key(backend: &Backend4, proto: u8, index: u16) -> NatPortKey4 {
    NatPortKey4 {
        backend_addr_be: backend.addr_be,
        backend_port_be: backend.port_be,
        proto,
        _pad: 0,
        index,
        _pad2: 0,
    }
}

#[inline(always)]
fn word(key: &NatPortKey4) -> u64 {
    // SAFETY: copied out at once.
    unsafe { NAT_PORTS.get(key) }.copied().unwrap_or(0)
}

/// Sets `bits` in a word; returns the word as it is now. A racing CPU can
/// lose a bit here: the NAT map still refuses the port, and the bit comes
/// back when a flow next tries it.
#[inline(always)]
fn set_bits(key: &NatPortKey4, bits: u64) -> u64 {
    if let Some(w) = NAT_PORTS.get_ptr_mut(key) {
        // SAFETY: plain data.
        unsafe {
            *w |= bits;
            return *w;
        }
    }
    // Best effort: a full map only costs the hint.
    let _ = NAT_PORTS.insert(key, &bits, u64::from(BPF_NOEXIST));
    bits
}

/// Records in the bitmaps that the port at `offset` is held.
#[inline(always)]
fn mark(backend: &Backend4, proto: u8, range: Range, offset: u32) {
    let w = offset / 64;
    let now = set_bits(&word_key(backend, proto, w as u16), 1 << (offset % 64));
    let full = nat_ports::word_mask(range.size, w);
    if now & full == full {
        set_bits(
            &word_key(backend, proto, nat_ports::SUMMARY + (w / 64) as u16),
            1 << (w % 64),
        );
    }
}

/// A free port's offset as the bitmaps show it: from the summary word of
/// `start_word` on, the first word not full, and its first free bit.
#[inline(always)]
fn find_free(backend: &Backend4, proto: u8, range: Range, start_word: u32) -> Option<u32> {
    let words = nat_ports::words(range.size);
    let summaries = words.div_ceil(64);
    let first = start_word / 64;
    let mut i = 0;
    while i < u32::from(nat_ports::SUMMARY_WORDS) {
        if i >= summaries {
            break;
        }
        let s = (first + i).checked_rem(summaries).unwrap_or(0);
        let summary_key = word_key(backend, proto, nat_ports::SUMMARY + s as u16);
        let open = !word(&summary_key) & nat_ports::word_mask(words, s);
        if open != 0 {
            // Near the hashed word first, so flows spread over the range.
            let near = if i == 0 {
                open & (u64::MAX << (start_word % 64))
            } else {
                0
            };
            let w = s * 64 + nat_ports::lowest_bit(if near != 0 { near } else { open });
            let free =
                !word(&word_key(backend, proto, w as u16)) & nat_ports::word_mask(range.size, w);
            if free != 0 {
                return Some(w * 64 + nat_ports::lowest_bit(free));
            }
            // Full, and its summary bit lost to a race: put it back. A later
            // search sees the other words of this summary.
            set_bits(&summary_key, 1 << (w % 64));
        }
        i += 1;
    }
    None
}

/// A flow's NAT entry as it starts.
#[inline(always)]
fn entry(flow: &Flow, rev_nat_id: u32, now: u64) -> Nat4 {
    Nat4 {
        client_addr_be: flow.saddr,
        rev_nat_id,
        client_port_be: flow.sport,
        flags: next_flags(flow, 0),
        _pad: 0,
        last_seen_ns: now,
    }
}

/// The flags of a flow's entries after one of its packets.
#[inline(always)]
fn next_flags(flow: &Flow, flags: u16) -> u16 {
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
fn touch(flow: &Flow, entry: *mut Nat4, nat: &Nat4, now: u64) -> u16 {
    let flags = next_flags(flow, nat.flags);
    // SAFETY: plain data.
    unsafe {
        if flags != nat.flags {
            (*entry).flags = flags;
            (*entry).last_seen_ns = now;
        } else {
            refresh(&raw mut (*entry).last_seen_ns, nat.last_seen_ns, now);
        }
    }
    flags
}

/// Takes the port at `offset` for `value`'s flow if no flow holds it.
#[inline(always)]
fn take(
    backend: &Backend4,
    config: &Config,
    range: Range,
    offset: u32,
    value: &Nat4,
    proto: u8,
) -> bool {
    let key = key(backend, config, range.port_be(offset), proto);
    let taken = NAT.insert(&key, value, u64::from(BPF_NOEXIST)).is_ok();
    // Taken now, or held by another flow the bitmap did not show.
    mark(backend, proto, range, offset);
    taken
}

/// Gives a new flow to a remote backend a node port no other flow to that
/// backend holds, and its NAT entry.
#[inline(always)]
fn allocate(
    flow: &Flow,
    config: &Config,
    backend: &Backend4,
    rev_nat_id: u32,
) -> Result<u16, Dropped> {
    let range = Range::of(config).ok_or(Dropped(Stat::DropNatPorts))?;
    let value = entry(flow, rev_nat_id, now());
    let start = flow_hash4(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
        .checked_rem(range.size)
        .unwrap_or(0);
    let start_bit = 1 << (start % 64);
    if word(&word_key(backend, flow.proto, (start / 64) as u16)) & start_bit == 0
        && take(backend, config, range, start, &value, flow.proto)
    {
        return Ok(range.port_be(start));
    }
    let mut i = 0;
    while i < SEARCHES {
        let Some(offset) = find_free(backend, flow.proto, range, start / 64) else {
            break;
        };
        if take(backend, config, range, offset, &value, flow.proto) {
            return Ok(range.port_be(offset));
        }
        i += 1;
    }
    // Every port towards this backend is held: count it against the backend,
    // so that the agent can name it. Not atomic: the exact total is the
    // per-CPU drop_nat_ports counter.
    let drops = word_key(backend, flow.proto, nat_ports::DROPS);
    let count = word(&drops).wrapping_add(1);
    let _ = NAT_PORTS.insert(&drops, &count, 0);
    Err(Dropped(Stat::DropNatPorts))
}

/// An established flow's NAT port: its entry refreshed (closing on a FIN or
/// RST, open again on a SYN), or put back if it was collected while the port
/// is free. `None` when another flow holds the port now: the flow needs a
/// new one.
#[inline(always)]
fn keep(
    flow: &Flow,
    config: &Config,
    backend: &Backend4,
    port_be: u16,
    rev_nat_id: u32,
) -> Option<u16> {
    let key = key(backend, config, port_be, flow.proto);
    let now = now();
    if let Some(e) = NAT.get_ptr_mut(&key) {
        // SAFETY: plain data, read once.
        let nat = unsafe { *e };
        if nat.client_addr_be != flow.saddr
            || nat.client_port_be != flow.sport
            || nat.rev_nat_id != rev_nat_id
        {
            return None;
        }
        touch(flow, e, &nat, now);
        return Some(port_be);
    }
    let value = entry(flow, rev_nat_id, now);
    if NAT.insert(&key, &value, u64::from(BPF_NOEXIST)).is_err() {
        return None;
    }
    if let Some(range) = Range::of(config) {
        if let Some(offset) = range.offset(port_be) {
            mark(backend, flow.proto, range, offset);
        }
    }
    Some(port_be)
}

/// The NAT port of a packet of `flow` SNATed to the remote `backend`: the one
/// its conntrack entry names (`nat_port_be`, 0 for none) while the flow still
/// holds it, else a new one, recorded in the forward conntrack entry.
#[inline(always)]
pub fn port(
    flow: &Flow,
    config: &Config,
    backend: &Backend4,
    nat_port_be: u16,
    rev_nat_id: u32,
) -> Result<u16, Dropped> {
    let kept = if nat_port_be != 0 {
        keep(flow, config, backend, nat_port_be, rev_nat_id)
    } else {
        None
    };
    match kept {
        Some(port) => Ok(port),
        None => {
            let port = allocate(flow, config, backend, rev_nat_id)?;
            remember_nat_port(flow, port);
            Ok(port)
        }
    }
}

/// The NAT entry of a remote backend's reply to a SNATed flow, and its value
/// as read once.
#[inline(always)]
pub fn lookup(flow: &Flow) -> Option<(*mut Nat4, Nat4)> {
    let entry = NAT.get_ptr_mut(&super::key(flow, ct_dir::NAT))?;
    // SAFETY: plain data, read once.
    Some((entry, unsafe { *entry }))
}

/// A remote backend's reply to a SNATed flow: refreshes its NAT entry and, on
/// a FIN or RST, marks it and the flow's forward conntrack entry closing.
#[inline(always)]
pub fn on_reply(flow: &Flow, entry: *mut Nat4, nat: &Nat4, frontend: &RevNat4) {
    let flags = touch(flow, entry, nat, now());
    if flags & ct_flags::CLOSING != 0 && nat.flags & ct_flags::CLOSING == 0 {
        let forward = keys::tuple(
            nat.client_addr_be,
            frontend.addr_be,
            nat.client_port_be,
            frontend.port_be,
            flow.proto,
            ct_dir::FORWARD,
        );
        if let Some(ct) = CONNTRACK.get_ptr_mut(&forward) {
            // SAFETY: plain data.
            unsafe { (*ct).flags |= ct_flags::CLOSING };
        }
    }
}
