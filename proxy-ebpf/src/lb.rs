//! Service load balancing for pod traffic: frontend lookup, backend choice by
//! flow hash, conntrack so a flow keeps its backend, and reverse NAT of replies.
//! Per packet: one service lookup, then conntrack (and on a new flow one slot and
//! one backend lookup). Never a walk over services or backends.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns, programs::TcContext};
use proxy_common::{
    ct_dir,
    hash::{flow_hash4, slot_for},
    stats, Backend4, CtKey4, CtValue4, ServiceKey4,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, REVNAT, SERVICES},
    nat::{rewrite, End},
    parse::{self, Flow},
    reject,
    verdict::{Drop, Out},
};

/// Conntrack entries are refreshed at most this often, to keep writes off the
/// fast path of busy flows.
const CT_REFRESH_NS: u64 = 1_000_000_000;

/// A packet leaving a pod: DNAT it if it is addressed to a service frontend.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> Result<Out, Drop> {
    let flow = match parse::flow(ctx) {
        Ok(flow) => flow,
        Err(early) => return early,
    };
    let mut key = ServiceKey4 {
        addr_be: flow.daddr,
        port_be: flow.dport,
        proto: flow.proto,
        scope: 0,
        slot: 0,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the agent may replace it later.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else {
        return Ok(Out::pass(stats::PASS_NOT_SERVICE));
    };
    if svc.count == 0 {
        return reject::port_unreachable(ctx, &flow);
    }

    let fwd = CtKey4 {
        saddr_be: flow.saddr,
        daddr_be: flow.daddr,
        sport_be: flow.sport,
        dport_be: flow.dport,
        proto: flow.proto,
        dir: ct_dir::FORWARD,
        _pad: 0,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = CONNTRACK.get_ptr_mut(&fwd) {
        // SAFETY: a conntrack value is plain data; a concurrent writer can at worst
        // make us read a backend id that is about to change, which the backend
        // lookup below tolerates.
        let (backend_id, rev_nat_id, last_seen) = unsafe {
            (
                (*entry).backend_id,
                (*entry).rev_nat_id,
                (*entry).last_seen_ns,
            )
        };
        if rev_nat_id == svc.rev_nat_id {
            // SAFETY: copied out at once.
            if let Some(backend) = unsafe { BACKENDS.get(&backend_id) }.copied() {
                if now.wrapping_sub(last_seen) > CT_REFRESH_NS {
                    unsafe { (*entry).last_seen_ns = now };
                }
                rewrite(
                    ctx,
                    &flow,
                    End::Destination,
                    backend.addr_be,
                    backend.port_be,
                )?;
                return Ok(Out::pass(stats::FWD_ESTABLISHED));
            }
        }
        // The pinned backend is gone (or the frontend was recreated): choose again.
    }

    key.slot = slot_for(
        flow_hash4(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto),
        svc.count,
    );
    // SAFETY: copied out at once.
    let slot = unsafe { SERVICES.get(&key) }
        .copied()
        .ok_or(Drop(stats::DROP_NO_BACKEND_ENTRY))?;
    let backend = unsafe { BACKENDS.get(&slot.backend_id) }
        .copied()
        .ok_or(Drop(stats::DROP_NO_BACKEND_ENTRY))?;
    track(&flow, &fwd, slot.backend_id, svc.rev_nat_id, &backend, now)?;
    rewrite(
        ctx,
        &flow,
        End::Destination,
        backend.addr_be,
        backend.port_be,
    )?;
    Ok(Out::pass(stats::FWD_NEW))
}

/// Records both directions of a new translated flow.
#[inline(always)]
fn track(
    flow: &Flow,
    fwd: &CtKey4,
    backend_id: u32,
    rev_nat_id: u16,
    backend: &Backend4,
    now: u64,
) -> Result<(), Drop> {
    let value = CtValue4 {
        backend_id,
        rev_nat_id,
        flags: 0,
        last_seen_ns: now,
    };
    let reply = CtKey4 {
        saddr_be: backend.addr_be,
        daddr_be: flow.saddr,
        sport_be: backend.port_be,
        dport_be: flow.sport,
        proto: flow.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    CONNTRACK
        .insert(&reply, &value, u64::from(BPF_ANY))
        .and_then(|()| CONNTRACK.insert(fwd, &value, u64::from(BPF_ANY)))
        .map_err(|_| Drop(stats::DROP_CT_INSERT))
}

/// A packet about to enter a pod: if it is a backend's reply on a translated
/// flow, give it back the frontend address the pod dialled.
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> Result<Out, Drop> {
    let flow = match parse::flow(ctx) {
        Ok(flow) => flow,
        Err(early) => return early,
    };
    let key = CtKey4 {
        saddr_be: flow.saddr,
        daddr_be: flow.daddr,
        sport_be: flow.sport,
        dport_be: flow.dport,
        proto: flow.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    let Some(entry) = CONNTRACK.get_ptr_mut(&key) else {
        return Ok(Out::pass(stats::PASS_NO_CONNTRACK));
    };
    // SAFETY: plain data, read once.
    let (rev_nat_id, last_seen) = unsafe { ((*entry).rev_nat_id, (*entry).last_seen_ns) };
    // SAFETY: copied out at once.
    let frontend = unsafe { REVNAT.get(&rev_nat_id) }
        .copied()
        .ok_or(Drop(stats::DROP_NO_REVNAT))?;
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(last_seen) > CT_REFRESH_NS {
        unsafe { (*entry).last_seen_ns = now };
    }
    rewrite(ctx, &flow, End::Source, frontend.addr_be, frontend.port_be)?;
    Ok(Out::pass(stats::REV_NAT))
}
