//! The pod hooks, on each pod's host-side veth. `from_pod` (tc ingress: what the
//! pod sends) DNATs packets to service frontends and reverse-NATs a local
//! backend's replies; `to_pod` (tc egress: what the pod receives) reverse-NATs
//! replies that reach a client pod unchanged.

use aya_ebpf::programs::TcContext;
use proxy_common::{ct_dir, stats};

use crate::{
    ctx::{End, Packet},
    fib::{fib, send},
    lb,
    maps::{CONNTRACK, REVNAT},
    parse::{self, Flow},
    reject,
    verdict::{Drop, Out},
};

#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> Result<Out, Drop> {
    let flow = match parse::flow(ctx) {
        Ok(flow) => flow,
        Err(early) => return early,
    };
    if let Some((key, svc)) = lb::frontend(&flow) {
        if svc.count == 0 {
            return reject::port_unreachable(ctx, &flow);
        }
        let chosen = lb::choose(&flow, key, &svc)?;
        ctx.rewrite(
            &flow,
            End::Destination,
            chosen.backend.addr_be,
            chosen.backend.port_be,
        )?;
        return Ok(Out::pass(if chosen.new {
            stats::FWD_NEW
        } else {
            stats::FWD_ESTABLISHED
        }));
    }
    // A reply from this backend pod on a translated flow: give it the frontend's
    // address here, and send it on to its next hop directly. The stack would
    // drop it as a martian when the frontend is one of the node's own addresses
    // (a NodePort).
    if let Some((addr, port)) = reverse_nat(ctx, &flow)? {
        return match fib(ctx, &flow, addr, flow.daddr, port, flow.dport) {
            Ok(hop) => send(ctx, hop, stats::REV_NAT),
            Err(_) => Ok(Out::pass(stats::REV_NAT)),
        };
    }
    Ok(Out::pass(stats::PASS_NOT_SERVICE))
}

#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> Result<Out, Drop> {
    let flow = match parse::flow(ctx) {
        Ok(flow) => flow,
        Err(early) => return early,
    };
    if reverse_nat(ctx, &flow)?.is_some() {
        return Ok(Out::pass(stats::REV_NAT));
    }
    Ok(Out::pass(stats::PASS_NO_CONNTRACK))
}

/// Rewrites the source of a backend's reply to the frontend the client dialled,
/// if conntrack knows the flow. Returns the frontend if it did.
#[inline(always)]
fn reverse_nat(ctx: &TcContext, flow: &Flow) -> Result<Option<(u32, u16)>, Drop> {
    let Some(entry) = CONNTRACK.get_ptr_mut(&lb::ct_key(flow, ct_dir::REPLY)) else {
        return Ok(None);
    };
    // SAFETY: plain data, read once.
    let (rev_nat_id, last_seen) = unsafe { ((*entry).rev_nat_id, (*entry).last_seen_ns) };
    // SAFETY: copied out at once.
    let frontend = unsafe { REVNAT.get(&rev_nat_id) }
        .copied()
        .ok_or(Drop(stats::DROP_NO_REVNAT))?;
    let now = lb::now();
    if now.wrapping_sub(last_seen) > lb::CT_REFRESH_NS {
        unsafe { (*entry).last_seen_ns = now };
    }
    ctx.rewrite(flow, End::Source, frontend.addr_be, frontend.port_be)?;
    Ok(Some((frontend.addr_be, frontend.port_be)))
}
