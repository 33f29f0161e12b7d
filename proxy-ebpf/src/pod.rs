//! The pod hooks, on each pod's host-side veth. `from_pod` (tc ingress: what the
//! pod sends) DNATs packets to service frontends and reverse-NATs a local
//! backend's replies; `to_pod` (tc egress: what the pod receives) reverse-NATs
//! replies that reach a client pod unchanged.

use aya_ebpf::programs::TcContext;
use proxy_common::{ct_dir, stats};

use crate::{
    ctx::{End, Packet},
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
    // address here, before it leaves the node (towards an external client or a
    // client pod on this node).
    if reverse_nat(ctx, &flow)? {
        return Ok(Out::pass(stats::REV_NAT));
    }
    Ok(Out::pass(stats::PASS_NOT_SERVICE))
}

#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> Result<Out, Drop> {
    let flow = match parse::flow(ctx) {
        Ok(flow) => flow,
        Err(early) => return early,
    };
    if reverse_nat(ctx, &flow)? {
        return Ok(Out::pass(stats::REV_NAT));
    }
    Ok(Out::pass(stats::PASS_NO_CONNTRACK))
}

/// Rewrites the source of a backend's reply to the frontend the client dialled,
/// if conntrack knows the flow. Returns whether it did.
#[inline(always)]
fn reverse_nat(ctx: &TcContext, flow: &Flow) -> Result<bool, Drop> {
    let Some(entry) = CONNTRACK.get_ptr_mut(&lb::ct_key(flow, ct_dir::REPLY)) else {
        return Ok(false);
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
    Ok(true)
}
