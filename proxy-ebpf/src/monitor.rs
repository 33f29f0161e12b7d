//! Drops, rejects and (when asked) traces as they happen, for `proxy-agent
//! monitor`: the verdict, the interface, and the packet's first bytes,
//! through a perf buffer per CPU. Only while a monitor holds the lease in
//! `MONITOR` (it renews it while it reads): otherwise a drop or reject
//! costs a call and one array read more, a translated packet one
//! comparison and one array read (does the lease ask for traces?), any
//! other packet one comparison. A perf event array, not a ring buffer: its
//! output helper appends the packet's bytes itself, for tc and XDP alike,
//! where a ring buffer would need a copy loop the verifier walks in every
//! path that drops.

use aya_ebpf::{helpers::bpf_ktime_get_ns, EbpfContext};
use proxy_common::{
    monitor::{CAPTURE, TRACE},
    stats::Stat,
    MonitorEvent,
};

use crate::{
    ctx::Packet,
    maps::{EVENTS, MONITOR},
};

/// Whether a monitor asked for traces (its lease may have run out since:
/// `report` checks).
#[inline(always)]
pub fn tracing() -> bool {
    MONITOR.get(0).is_some_and(|until| until & TRACE != 0)
}

/// Reports a packet `program` (a `proxy_common::monitor` index) gave
/// verdict `stat`, if a monitor reads. A function of its own, so that the
/// event is on its own frame: on 5.10 and 6.1, which round each frame of a
/// call chain up to 32 bytes, 8 bytes more in a program's own frame put
/// `from_pod`'s deepest chain past 512 bytes.
#[inline(never)]
pub fn report<C: EbpfContext + Packet>(ctx: &C, program: u32, stat: Stat) {
    let until = match MONITOR.get(0) {
        Some(until) => *until,
        None => return,
    };
    // SAFETY: a helper without arguments.
    if until == 0 || unsafe { bpf_ktime_get_ns() } >= until {
        return;
    }
    let len = ctx.len();
    let event = MonitorEvent {
        stat: stat.index(),
        ifindex: ctx.ifindex(),
        len,
        program,
    };
    // The helper appends this many of the packet's bytes to the event.
    EVENTS.output(ctx, &event, len.min(CAPTURE));
}
