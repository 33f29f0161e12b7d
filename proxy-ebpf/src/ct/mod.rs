//! Conntrack and NAT ports: everything that remembers a flow. `lookup` says
//! where a packet's flow stands (and refreshes, reopens or closes its entries
//! as the packet asks), `create` writes both directions of a new flow, `reply`
//! finds a backend's reply, `refresh` is the one rule for last-seen times.
//! The NAT ports of SNATed flows are in `nat`.

pub mod nat;

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use proxy_common::{
    backend_flags, ct_dir, ct_flags, ct_lifetime, stats::Stat, Backend4, CtKey4, CtValue4,
    HAIRPIN_ADDR,
};

use crate::{
    flow::Flow,
    keys,
    maps::{BACKENDS, CONNTRACK},
    verdict::Dropped,
};

/// Entries are refreshed at most this often, to keep writes off the fast path
/// of busy flows.
pub const REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// Whether an entry last seen at `last_seen_ns` is due a new last-seen time.
#[inline(always)]
pub fn stale(now: u64, last_seen_ns: u64) -> bool {
    now.wrapping_sub(last_seen_ns) > REFRESH_NS
}

/// Stamps `*last_seen_ns` with `now` if it is due (see `stale`).
///
/// # Safety
/// `last_seen_ns` points into a map value.
#[inline(always)]
pub unsafe fn refresh(last_seen_ns: *mut u64, seen: u64, now: u64) {
    if stale(now, seen) {
        // SAFETY: the caller's pointer into a map value.
        unsafe { *last_seen_ns = now };
    }
}

/// The hairpin source address as the programs hold addresses.
#[inline(always)]
pub fn hairpin_addr() -> u32 {
    u32::from_ne_bytes(HAIRPIN_ADDR)
}

/// The conntrack key of `flow` as the packet carries it, in direction `dir`.
#[inline(always)]
pub fn key(flow: &Flow, dir: u8) -> CtKey4 {
    keys::tuple(
        flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto, dir,
    )
}

/// The client reached itself through `backend`: it must not see its own
/// address as the peer.
#[inline(always)]
pub fn hairpin(flow: &Flow, backend: &Backend4) -> bool {
    backend.addr_be == flow.saddr
}

/// The conntrack key of a backend's replies to `flow`.
#[inline(always)]
fn reply_key(flow: &Flow, backend: &Backend4, hairpin: bool) -> CtKey4 {
    keys::tuple(
        backend.addr_be,
        if hairpin { hairpin_addr() } else { flow.saddr },
        backend.port_be,
        flow.sport,
        flow.proto,
        ct_dir::REPLY,
    )
}

/// A flow's backend as its conntrack entry names it.
#[derive(Clone, Copy)]
pub struct Tracked {
    pub backend_id: u32,
    pub backend: Backend4,
    /// The node port of a SNATed flow (0 until one is given).
    pub nat_port_be: u16,
}

/// Where a packet's flow stands, for the frontend it is addressed to.
pub enum State {
    /// No entry: the flow is new.
    New,
    /// An entry that outlived its lifetime, names a backend that is gone or a
    /// frontend that was recreated: the flow chooses again.
    Stale,
    /// A known flow, its backend still there (entries refreshed, and closing
    /// on a FIN or RST).
    Established(Tracked),
    /// A SYN on the tuple of a connection that closed (ports get reused): the
    /// flow is open again, on the same backend.
    Reopened(Tracked),
}

/// Looks `flow` up for the frontend with reverse-NAT id `rev_nat_id`, and
/// applies the packet to its entries: a refresh when due (or on a SYN), a
/// reopen on a SYN, closing on a FIN or RST.
#[inline(always)]
pub fn lookup(flow: &Flow, rev_nat_id: u32, now: u64) -> State {
    let Some(entry) = CONNTRACK.get_ptr_mut(&key(flow, ct_dir::FORWARD)) else {
        return State::New;
    };
    // SAFETY: conntrack values are plain data; a racing writer can at worst make
    // us read a backend id about to change, which the lookup below tolerates.
    let (backend_id, entry_rev_nat_id, nat_port_be, last_seen, flags) = unsafe {
        (
            (*entry).backend_id,
            (*entry).rev_nat_id,
            (*entry).nat_port_be,
            (*entry).last_seen_ns,
            (*entry).flags,
        )
    };
    let alive = now.wrapping_sub(last_seen) <= ct_lifetime::nanos(flow.proto, flags);
    if !alive || entry_rev_nat_id != rev_nat_id {
        return State::Stale;
    }
    // SAFETY: copied out at once.
    let Some(backend) = unsafe { BACKENDS.get(&backend_id) }.copied() else {
        return State::Stale;
    };
    let tracked = Tracked {
        backend_id,
        backend,
        nat_port_be,
    };
    let syn = flow.syn();
    let reopened = syn && flags & ct_flags::CLOSING != 0;
    let mut flags = flags;
    if reopened {
        flags &= !ct_flags::CLOSING;
        // SAFETY: plain data.
        unsafe { (*entry).flags = flags };
    }
    if stale(now, last_seen) || syn {
        // SAFETY: plain data.
        unsafe { (*entry).last_seen_ns = now };
        // The reply direction is rewritten beside it: an entry lost to the
        // agent's expiry sweep racing this flow's reuse would otherwise leave
        // every reply untranslated, and the tuple broken, while the forward
        // entry lives. Best effort: the forward entry still pins the backend.
        let _ = write_reply(flow, &tracked, rev_nat_id, flags, now);
    }
    if flow.fin_or_rst() && flags & ct_flags::CLOSING == 0 {
        // SAFETY: plain data.
        unsafe { (*entry).flags = flags | ct_flags::CLOSING };
        close_reply(flow, &backend);
    }
    if reopened {
        State::Reopened(tracked)
    } else {
        State::Established(tracked)
    }
}

/// Whether the backend's replies to `flow` pass through this node unchanged
/// and so need a reply entry: a SNATed flow's replies come back to the node
/// address instead (the NAT map).
#[inline(always)]
fn replies_here(flow: &Flow, backend: &Backend4) -> bool {
    backend.flags & backend_flags::LOCAL != 0 || !flow.external
}

/// Writes the reply direction of `flow` to `tracked`'s backend, for reverse
/// NAT, when its replies pass through this node. The one place a reply entry
/// is built.
#[inline(always)]
fn write_reply(
    flow: &Flow,
    tracked: &Tracked,
    rev_nat_id: u32,
    flags: u16,
    now: u64,
) -> Result<(), Dropped> {
    if !replies_here(flow, &tracked.backend) {
        return Ok(());
    }
    let hairpin = hairpin(flow, &tracked.backend);
    let reply = CtValue4 {
        backend_id: tracked.backend_id,
        rev_nat_id,
        flags: flags | if hairpin { ct_flags::HAIRPIN } else { 0 },
        last_seen_ns: now,
        ..CtValue4::default()
    };
    CONNTRACK
        .insert(
            &reply_key(flow, &tracked.backend, hairpin),
            &reply,
            u64::from(BPF_ANY),
        )
        .map_err(|_| Dropped(Stat::DropCtInsert))
}

/// Marks the reply direction of `flow` closing with its forward entry.
#[inline(always)]
fn close_reply(flow: &Flow, backend: &Backend4) {
    let reply = reply_key(flow, backend, hairpin(flow, backend));
    if let Some(r) = CONNTRACK.get_ptr_mut(&reply) {
        // SAFETY: plain data.
        unsafe { (*r).flags |= ct_flags::CLOSING };
    }
}

/// Records a new flow to `tracked`'s backend: both directions, the reply
/// first so that no forward entry exists without it.
#[inline(always)]
pub fn create(flow: &Flow, tracked: &Tracked, rev_nat_id: u32, now: u64) -> Result<(), Dropped> {
    write_reply(flow, tracked, rev_nat_id, 0, now)?;
    let forward = CtValue4 {
        backend_id: tracked.backend_id,
        rev_nat_id,
        last_seen_ns: now,
        ..CtValue4::default()
    };
    CONNTRACK
        .insert(&key(flow, ct_dir::FORWARD), &forward, u64::from(BPF_ANY))
        .map_err(|_| Dropped(Stat::DropCtInsert))
}

/// Records the NAT port a SNATed flow got in its forward conntrack entry.
#[inline(always)]
pub fn remember_nat_port(flow: &Flow, nat_port_be: u16) {
    if let Some(entry) = CONNTRACK.get_ptr_mut(&key(flow, ct_dir::FORWARD)) {
        // SAFETY: plain data.
        unsafe { (*entry).nat_port_be = nat_port_be };
    }
}

/// A backend's reply on a flow conntrack knows, as its reply entry holds it.
pub struct Reply {
    entry: *mut CtValue4,
    pub rev_nat_id: u32,
    /// The client reached itself: the reply goes back into the same pod.
    pub hairpin: bool,
    last_seen_ns: u64,
}

impl Reply {
    /// Refreshes the reply entry's last-seen time when due.
    #[inline(always)]
    pub fn refresh(&self, now: u64) {
        // SAFETY: a pointer into the conntrack value found by `reply`.
        unsafe { refresh(&raw mut (*self.entry).last_seen_ns, self.last_seen_ns, now) };
    }
}

/// The reply entry of a packet from a backend, if conntrack knows its flow.
#[inline(always)]
pub fn reply(flow: &Flow) -> Option<Reply> {
    let entry = CONNTRACK.get_ptr_mut(&key(flow, ct_dir::REPLY))?;
    // SAFETY: plain data, read once.
    let (rev_nat_id, flags, last_seen_ns) =
        unsafe { ((*entry).rev_nat_id, (*entry).flags, (*entry).last_seen_ns) };
    Some(Reply {
        entry,
        rev_nat_id,
        hairpin: flags & ct_flags::HAIRPIN != 0,
        last_seen_ns,
    })
}
