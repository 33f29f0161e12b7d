//! Conntrack and NAT ports: everything that remembers a flow. `lookup` says
//! where a packet's flow stands (and refreshes, reopens or closes its entries
//! as the packet asks), `create` writes both directions of a new flow, `reply`
//! finds a backend's reply, `refresh` is the one rule for last-seen times.
//! The NAT ports of SNATed flows are in `nat`.
//!
//! One client port may dial two frontends that one backend serves: after
//! DNAT both flows have the same tuple at the backend, and the second would
//! break the first (its reply entry overwritten, its SYN taken by the
//! backend for the first connection's). As netfilter does, the second flow
//! then gets another client port (see `remap_port`), which its packets carry
//! to the backend and its replies give back.

pub mod nat;

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use proxy_common::{
    backend_flags, ct_dir, ct_flags, ct_lifetime, remap_ports, stats::Stat, CtValue,
};

use crate::{
    diag,
    family::{Backend, Endpoint, Family},
    flow::Flow,
    verdict::Dropped,
};

/// Entries are refreshed at most this often, to keep writes off the fast path
/// of busy flows.
pub const REFRESH_NS: u64 = 1_000_000_000;

/// Whether `now` reads the coarse clock: set by the agent when it loads the
/// programs, where the kernel has `bpf_ktime_get_coarse_ns` (5.11). A
/// load-time constant: the verifier walks only the chosen call, so 5.10
/// never sees a helper it lacks.
#[no_mangle]
static COARSE_CLOCK: u8 = 0;

/// CLOCK_MONOTONIC in nanoseconds, for last-seen times: the coarse clock
/// (as of the last tick, at most one tick behind) where the kernel has it,
/// else the precise one. Every flow's packets read it, and the precise
/// clock reads the clock source, a third of an established packet's cost
/// here (bench/results/per_packet_established.md); conntrack's lifetimes are
/// seconds, and a tick early is nothing to them.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a plain read of a global the loader may have set; plain
    // helper calls.
    unsafe {
        if core::ptr::read_volatile(&COARSE_CLOCK) != 0 {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    }
}

/// How far ahead of `now` a time may be and still count as now: the agent
/// stamps entries with the precise clock, which runs up to a tick ahead of
/// the programs' coarse one.
const AHEAD_NS: u64 = 1_000_000_000;

/// How long ago `then` was at `now`: 0 for a time at most [`AHEAD_NS`]
/// after `now`. The difference wraps otherwise, so a time further ahead
/// reads as long past (expired), as it always did.
#[inline(always)]
pub fn age(now: u64, then: u64) -> u64 {
    let age = now.wrapping_sub(then);
    if age > u64::MAX - AHEAD_NS {
        0
    } else {
        age
    }
}

/// Whether an entry last seen at `last_seen_ns` is due a new last-seen time.
#[inline(always)]
pub fn stale(now: u64, last_seen_ns: u64) -> bool {
    age(now, last_seen_ns) > REFRESH_NS
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

/// The conntrack key of `flow` as the packet carries it, in direction `dir`.
#[inline(always)]
pub fn key<F: Family>(flow: &Flow<F>, dir: u8) -> F::CtKey {
    F::tuple(
        flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto, dir,
    )
}

/// The client reached itself through `backend`: it must not see its own
/// address as the peer.
#[inline(always)]
pub fn hairpin<F: Family>(flow: &Flow<F>, backend: &F::Backend) -> bool {
    backend.addr() == flow.saddr
}

/// The conntrack key of a backend's replies to `flow`, whose client port
/// the backend sees as `client_port_be`.
#[inline(always)]
fn reply_key<F: Family>(flow: &Flow<F>, backend: &F::Backend, client_port_be: u16) -> F::CtKey {
    F::tuple(
        backend.addr(),
        if hairpin(flow, backend) {
            F::hairpin_addr()
        } else {
            flow.saddr
        },
        backend.port_be(),
        client_port_be,
        flow.proto,
        ct_dir::REPLY,
    )
}

/// A flow's backend as its conntrack entry names it.
#[derive(Clone, Copy)]
pub struct Tracked<F: Family> {
    pub backend_id: u32,
    pub backend: F::Backend,
    /// The node port of a SNATed flow (0 until one is given).
    pub nat_port_be: u16,
    /// The client port the backend sees instead of the client's own (0: the
    /// client's own; see `remap_port`).
    pub remap_port_be: u16,
}

impl<F: Family> Tracked<F> {
    /// The client port the backend sees for `flow`.
    #[inline(always)]
    pub fn client_port_be(&self, flow: &Flow<F>) -> u16 {
        if self.remap_port_be != 0 {
            self.remap_port_be
        } else {
            flow.sport
        }
    }
}

/// Where a packet's flow stands, for the frontend it is addressed to.
pub enum State<F: Family> {
    /// No entry: the flow is new.
    New,
    /// An entry that outlived its lifetime, names a backend that is gone or a
    /// frontend that was recreated: the flow chooses again.
    Stale,
    /// A known flow, its backend still there (entries refreshed, and closing
    /// on a FIN or RST).
    Established(Tracked<F>),
    /// A SYN on the tuple of a connection that closed (ports get reused): the
    /// flow is open again, on the same backend.
    Reopened(Tracked<F>),
}

/// Looks `flow` up for the frontend with reverse-NAT id `rev_nat_id`, and
/// applies the packet to its entries: a refresh when due (or on a SYN), a
/// reopen on a SYN, closing on a FIN or RST.
#[inline(always)]
pub fn lookup<F: Family>(flow: &Flow<F>, rev_nat_id: u32, now: u64) -> State<F> {
    let Some(entry) = F::ct_ptr(&key(flow, ct_dir::FORWARD)) else {
        return State::New;
    };
    // SAFETY: conntrack values are plain data; a racing writer can at worst make
    // us read a backend id about to change, which the lookup below tolerates.
    let (backend_id, entry_rev_nat_id, nat_port_be, remap_port_be, last_seen, flags) = unsafe {
        (
            (*entry).backend_id,
            (*entry).rev_nat_id,
            (*entry).nat_port_be,
            (*entry).remap_port_be,
            (*entry).last_seen_ns,
            (*entry).flags,
        )
    };
    let alive = age(now, last_seen) <= ct_lifetime::nanos(flow.proto, flags);
    if !alive || entry_rev_nat_id != rev_nat_id {
        return State::Stale;
    }
    let Some(backend) = F::backend(backend_id) else {
        return State::Stale;
    };
    let tracked = Tracked {
        backend_id,
        backend,
        nat_port_be,
        remap_port_be,
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
        close_reply(flow, &tracked);
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
fn replies_here<F: Family>(flow: &Flow<F>, backend: &F::Backend) -> bool {
    backend.flags() & backend_flags::LOCAL != 0 || !flow.external
}

/// Writes the reply direction of `flow` to `tracked`'s backend, for reverse
/// NAT, when its replies pass through this node. The one place a reply entry
/// is built.
#[inline(always)]
fn write_reply<F: Family>(
    flow: &Flow<F>,
    tracked: &Tracked<F>,
    rev_nat_id: u32,
    flags: u16,
    now: u64,
) -> Result<(), Dropped> {
    if !replies_here(flow, &tracked.backend) {
        return Ok(());
    }
    let hairpin = hairpin(flow, &tracked.backend);
    let reply = CtValue {
        backend_id: tracked.backend_id,
        rev_nat_id,
        flags: flags | if hairpin { ct_flags::HAIRPIN } else { 0 },
        // A remapped flow's replies get the client's own port back.
        remap_port_be: if tracked.remap_port_be != 0 {
            flow.sport
        } else {
            0
        },
        last_seen_ns: now,
        ..CtValue::default()
    };
    F::ct_insert(
        &reply_key(flow, &tracked.backend, tracked.client_port_be(flow)),
        &reply,
    )
    .map_err(insert_failed)
}

/// A conntrack entry the kernel would not take: its error, for the log.
#[inline(always)]
fn insert_failed(error: i32) -> Dropped {
    diag::record(i64::from(error));
    Dropped(Stat::DropCtInsert)
}

/// Marks the reply direction of `flow` closing with its forward entry.
#[inline(always)]
fn close_reply<F: Family>(flow: &Flow<F>, tracked: &Tracked<F>) {
    let reply = reply_key(flow, &tracked.backend, tracked.client_port_be(flow));
    if let Some(r) = F::ct_ptr(&reply) {
        // SAFETY: plain data.
        unsafe { (*r).flags |= ct_flags::CLOSING };
    }
}

/// Records a new flow to `tracked`'s backend: both directions, the reply
/// first so that no forward entry exists without it. A flow whose tuple at
/// the backend is taken gets another client port first (`tracked` says it).
#[inline(always)]
pub fn create<F: Family>(
    flow: &Flow<F>,
    tracked: &mut Tracked<F>,
    rev_nat_id: u32,
    now: u64,
) -> Result<(), Dropped> {
    if replies_here(flow, &tracked.backend) {
        tracked.remap_port_be = remap_port(flow, &tracked.backend, rev_nat_id, now)?;
    }
    write_reply(flow, tracked, rev_nat_id, 0, now)?;
    let forward = CtValue {
        backend_id: tracked.backend_id,
        rev_nat_id,
        remap_port_be: tracked.remap_port_be,
        last_seen_ns: now,
        ..CtValue::default()
    };
    F::ct_insert(&key(flow, ct_dir::FORWARD), &forward).map_err(insert_failed)
}

/// Whether the reply entry `entry` leaves the tuple free for a new flow of
/// frontend `rev_nat_id` from its client's own port: it is gone or outlived
/// its lifetime, or it is that same flow's (the same frontend, no remapped
/// port: a tuple reused after its connection closed).
#[inline(always)]
fn free_for(entry: Option<&CtValue>, proto: u8, rev_nat_id: u32, own: bool, now: u64) -> bool {
    let Some(e) = entry else {
        return true;
    };
    age(now, e.last_seen_ns) > ct_lifetime::nanos(proto, e.flags)
        || (own && e.rev_nat_id == rev_nat_id && e.remap_port_be == 0)
}

/// The client port a new flow of frontend `rev_nat_id` to `backend` must
/// carry to it: 0 (its own) unless a live flow of another frontend holds
/// that tuple at the backend; then the first free of a few ports hashed from
/// the flow. None free: the flow is dropped (the client's SYN is sent again).
#[inline(always)]
fn remap_port<F: Family>(
    flow: &Flow<F>,
    backend: &F::Backend,
    rev_nat_id: u32,
    now: u64,
) -> Result<u16, Dropped> {
    let own = F::ct_get(&reply_key(flow, backend, flow.sport));
    if free_for(own.as_ref(), flow.proto, rev_nat_id, true, now) {
        return Ok(0);
    }
    let hash = F::flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    for i in 0..remap_ports::TRIES {
        let port_be = remap_ports::nth(hash, i).to_be();
        let taken = F::ct_get(&reply_key(flow, backend, port_be));
        if free_for(taken.as_ref(), flow.proto, rev_nat_id, false, now) {
            return Ok(port_be);
        }
    }
    Err(Dropped(Stat::DropNatPorts))
}

/// Records the NAT port a SNATed flow got in its forward conntrack entry.
#[inline(always)]
pub fn remember_nat_port<F: Family>(flow: &Flow<F>, nat_port_be: u16) {
    if let Some(entry) = F::ct_ptr(&key(flow, ct_dir::FORWARD)) {
        // SAFETY: plain data.
        unsafe { (*entry).nat_port_be = nat_port_be };
    }
}

/// A backend's reply on a flow conntrack knows, as its reply entry holds it.
pub struct Reply {
    entry: *mut CtValue,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// The client reached itself: the reply goes back into the same pod.
    pub hairpin: bool,
    /// The client's own port, where the flow's was remapped (else 0).
    pub remap_port_be: u16,
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
pub fn reply<F: Family>(flow: &Flow<F>) -> Option<Reply> {
    let entry = F::ct_ptr(&key(flow, ct_dir::REPLY))?;
    // SAFETY: plain data, read once.
    let (rev_nat_id, backend_id, flags, remap_port_be, last_seen_ns) = unsafe {
        (
            (*entry).rev_nat_id,
            (*entry).backend_id,
            (*entry).flags,
            (*entry).remap_port_be,
            (*entry).last_seen_ns,
        )
    };
    Some(Reply {
        entry,
        rev_nat_id,
        backend_id,
        hairpin: flags & ct_flags::HAIRPIN != 0,
        remap_port_be,
        last_seen_ns,
    })
}
