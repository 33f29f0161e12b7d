//! The pod hooks, on each pod's host-side veth. `from_pod` (tc ingress: what the
//! pod sends) DNATs packets to service frontends and reverse-NATs a local
//! backend's replies; `to_pod` (tc egress: what the pod receives) reverse-NATs
//! replies that reach a client pod unchanged. ICMP errors about translated
//! flows are translated back on both (`icmp`). `to_pod` also sits on the
//! uplink's egress, for the replies of hostNetwork backends (the node's own
//! stack) to clients from outside, which leave through no pod's veth.

use aya_ebpf::programs::TcContext;
use proxy_common::{proto, stats::Stat, svc_flags};

use crate::{
    ct,
    ctx::{End, Packet},
    family::{Endpoint, Family, V4, V6},
    fib::{fib, send},
    flow::{self, Early, Flow, Frame, Ip},
    icmp, lb, reject,
    traffic::{self, Way},
    verdict::{Action, Dropped, Out, Outcome},
};

#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> Outcome {
    match flow::ip_version(ctx) {
        Ok(Ip::V4) => then_icmp(ctx, from_pod_flow::<V4>, icmp_from_pod::<V4>),
        Ok(Ip::V6) => then_icmp(ctx, from_pod_flow::<V6>, icmp_from_pod::<V6>),
        Err(early) => early.outcome(),
    }
}

#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> Outcome {
    match flow::ip_version(ctx) {
        Ok(Ip::V4) => then_icmp(ctx, to_pod_flow::<V4>, icmp_to_pod::<V4>),
        Ok(Ip::V6) => then_icmp(ctx, to_pod_flow::<V6>, icmp_to_pod::<V6>),
        Err(early) => early.outcome(),
    }
}

/// Runs a family's `path`, then, if it found an ICMP message (and wrote its
/// offset to `icmp_at`), the `icmp` path: one after the other, so that their
/// stack frames are never held at once (5.10 allows 512 bytes for the
/// frames of a call chain together).
#[inline(always)]
fn then_icmp(
    ctx: &TcContext,
    path: fn(&TcContext, &mut usize) -> Outcome,
    icmp: fn(&TcContext, usize) -> Outcome,
) -> Outcome {
    let mut icmp_at = 0;
    let outcome = path(ctx, &mut icmp_at);
    if icmp_at != 0 {
        return icmp(ctx, icmp_at);
    }
    outcome
}

/// One function per family, not inlined: each has a stack frame of its
/// own, where one function for both would hold both paths' (5.10 allows
/// 512 bytes for the frames of a call chain together). An ICMP message is
/// left to the ICMP path (`then_icmp`).
#[inline(never)]
fn from_pod_flow<F: Family>(ctx: &TcContext, icmp_at: &mut usize) -> Outcome {
    let flow = match F::parse(ctx) {
        Ok(flow) => flow,
        Err(Early::Icmp(icmp_off)) => {
            *icmp_at = icmp_off;
            return Ok(Out::pass(Stat::PassNotTcpUdp));
        }
        Err(early) => return early.outcome(),
    };
    if let Some((key, svc)) = lb::frontend(&flow) {
        let (svc, skip) = lb::for_cluster_client(svc);
        if svc.count == 0 {
            // internalTrafficPolicy=Local without an endpoint on this node: the
            // Service has endpoints, just none for this client. Dropped, as by
            // kube-proxy; a Service without any endpoint is rejected.
            if svc.flags & svc_flags::LOCAL_ONLY != 0 {
                return Err(Dropped(Stat::DropNoLocalBackend));
            }
            return reject::port_unreachable(ctx, &flow, Stat::RejectNoBackend);
        }
        let chosen = lb::choose(&flow, key, &svc, skip)?;
        traffic::count(svc.rev_nat_id, chosen.backend_id, Way::ToBackend, ctx.len());
        ctx.rewrite(
            &flow,
            End::Destination,
            chosen.backend.addr(),
            chosen.backend.port_be(),
        )?;
        let client_port = chosen.client_port_be;
        if chosen.hairpin(&flow) {
            // The pod reached itself: from its own address it would answer itself
            // directly. From the hairpin address, the answer comes back here.
            ctx.rewrite(&flow, End::Source, F::hairpin_addr(), client_port)?;
            return back_into_the_pod(ctx, Stat::FwdHairpin);
        }
        if client_port != flow.sport {
            ctx.rewrite(&flow, End::Source, flow.saddr, client_port)?;
        }
        return Ok(Out::pass(match (chosen.new, flow.mid_flow()) {
            (true, false) => Stat::FwdNew,
            (true, true) => Stat::FwdNewMidFlow,
            (false, _) => Stat::FwdEstablished,
        }));
    }
    // A reply from this backend pod on a translated flow: give it the frontend's
    // address here, and send it on to its next hop directly. The stack would
    // drop it as a martian when the frontend is one of the node's own addresses
    // (a NodePort).
    if let Some((addr, port, client_port, hairpin)) = reverse_nat(ctx, &flow)? {
        if hairpin {
            // Back into the pod that is both client and backend.
            return back_into_the_pod(ctx, Stat::RevNat);
        }
        return match fib::<_, F>(ctx, flow.proto, addr, flow.daddr, port, client_port) {
            Ok(hop) => send(ctx, hop, Stat::RevNat),
            Err(_) => Ok(Out::pass(Stat::RevNat)),
        };
    }
    // A new flow into the service CIDRs that no frontend serves: an
    // unallocated ClusterIP (a deleted Service's, say) or a port its
    // ClusterIP does not serve. Refused at once, where it would otherwise
    // leave for the default route and time out. Packets of flows that
    // began before (a Service deleted under them) pass as before.
    if (flow.syn() || flow.proto == proto::UDP) && F::in_service_cidr(flow.daddr) {
        return reject::port_unreachable(ctx, &flow, Stat::RejectNoService);
    }
    Ok(Out::pass(Stat::PassNotService))
}

#[inline(never)]
fn to_pod_flow<F: Family>(ctx: &TcContext, icmp_at: &mut usize) -> Outcome {
    let flow = match F::parse(ctx) {
        Ok(flow) => flow,
        Err(Early::Icmp(icmp_off)) => {
            *icmp_at = icmp_off;
            return Ok(Out::pass(Stat::PassNotTcpUdp));
        }
        Err(early) => return early.outcome(),
    };
    if reverse_nat(ctx, &flow)?.is_some() {
        return Ok(Out::pass(Stat::RevNat));
    }
    Ok(Out::pass(Stat::PassNoConntrack))
}

/// An ICMP error a backend pod (or its own stack) sent about a translated
/// flow: translated back (see `icmp`) and sent on to the client as a reply
/// is. Any other ICMP passes untouched.
#[inline(never)]
fn icmp_from_pod<F: Family>(ctx: &TcContext, icmp_off: usize) -> Outcome {
    let Some(back) = icmp::reverse_nat::<_, F>(ctx, icmp_off)? else {
        return Ok(Out::pass(Stat::PassNotTcpUdp));
    };
    if back.hairpin {
        return back_into_the_pod(ctx, Stat::RevNatIcmp);
    }
    match fib::<_, F>(ctx, F::ICMP, back.frontend, back.client, 0, 0) {
        Ok(hop) => send(ctx, hop, Stat::RevNatIcmp),
        Err(_) => Ok(Out::pass(Stat::RevNatIcmp)),
    }
}

/// An ICMP error reaching a client pod about a translated flow whose
/// backend is elsewhere (from that backend, a router on the way, or this
/// node's own stack): translated back. Any other ICMP passes untouched.
#[inline(never)]
fn icmp_to_pod<F: Family>(ctx: &TcContext, icmp_off: usize) -> Outcome {
    match icmp::reverse_nat::<_, F>(ctx, icmp_off)? {
        Some(_) => Ok(Out::pass(Stat::RevNatIcmp)),
        None => Ok(Out::pass(Stat::PassNotTcpUdp)),
    }
}

/// Rewrites the source of a backend's reply to the frontend the client dialled,
/// if conntrack knows the flow (and the destination back to the pod itself
/// for a hairpinned flow, to the client's own port for a remapped one).
/// Returns the frontend, the client's port and whether it was a hairpin.
#[inline(always)]
fn reverse_nat<F: Family>(
    ctx: &TcContext,
    flow: &Flow<F>,
) -> Result<Option<(F::Addr, u16, u16, bool)>, Dropped> {
    let Some(reply) = ct::reply(flow) else {
        return Ok(None);
    };
    let frontend = F::revnat(reply.rev_nat_id).ok_or(Dropped(Stat::DropNoRevnat))?;
    reply.refresh(ct::now());
    traffic::count(reply.rev_nat_id, reply.backend_id, Way::ToClient, ctx.len());
    let hairpin = reply.hairpin;
    let client_port = if reply.remap_port_be != 0 {
        reply.remap_port_be
    } else {
        flow.dport
    };
    if hairpin {
        ctx.rewrite(flow, End::Destination, flow.saddr, client_port)?;
    } else if client_port != flow.dport {
        ctx.rewrite(flow, End::Destination, flow.daddr, client_port)?;
    }
    ctx.rewrite(flow, End::Source, frontend.addr(), frontend.port_be())?;
    Ok(Some((
        frontend.addr(),
        frontend.port_be(),
        client_port,
        hairpin,
    )))
}

/// Sends a packet back out of the interface it came in on, into the pod it came
/// from, with the Ethernet addresses swapped so the pod takes it as its own.
#[inline(always)]
fn back_into_the_pod(ctx: &TcContext, stat: Stat) -> Outcome {
    let macs: [u8; 12] = ctx.read(0).ok_or(Dropped(Stat::DropRewrite))?;
    let (mut pod, mut gateway) = ([0u8; 6], [0u8; 6]);
    pod.copy_from_slice(&macs[6..]);
    gateway.copy_from_slice(&macs[..6]);
    ctx.set_macs(&pod, &gateway)?;
    Ok(Out::new(Action::Tx, stat))
}
