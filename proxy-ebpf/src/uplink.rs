//! The uplink hook: traffic entering the node from outside. IPv4 on XDP where
//! the driver allows, the same code on tc ingress otherwise (and behind XDP
//! for the packets XDP hands on: next hop not resolved yet, or a reject to
//! build). IPv6 on a second tc filter of its own (XDP hands it on): each
//! family is a program the verifier walks apart.
//!
//! - A packet to a frontend (NodePort on a node address, externalIP, LoadBalancer
//!   IP, or a routed ClusterIP) gets a backend. A backend on this node: DNAT, on
//!   to the stack (its replies are reverse-NATed on its veth). A backend on
//!   another node: DNAT and SNAT to this node's address with a NAT port, straight
//!   back out with next-hop MACs from the FIB.
//! - A remote backend's reply to such a flow (to the node address and NAT port)
//!   is translated back to the client and sent straight out again, and so is
//!   an ICMP error about it (see `icmp`).

use proxy_common::{stats::Stat, svc_flags};

use crate::{
    ct::{
        self,
        nat::{self, Snat},
    },
    ctx::{End, Packet},
    family::{Endpoint, Family, NatValue, V4, V6},
    fib::{fib, send, Hop},
    flow::{self, Early, Flow, Ip},
    icmp,
    lb::{self, Chosen},
    maps::SCRATCH,
    traffic::{self, Way},
    verdict::{Dropped, Out, Outcome},
};

/// A packet on the uplink's IPv4 tc filter (`uplink_tc`) or its XDP
/// program: IPv4, or not IP at all. None for IPv6, which is `uplink6`'s.
/// The whole IPv4 path is inline, its ICMP path too.
#[inline(always)]
pub fn uplink4<C: Packet>(ctx: &C) -> Option<Outcome> {
    match flow::ip_version(ctx) {
        Ok(Ip::V4) => {
            // SAFETY: plain data, for `uplink_flow` to fill.
            let (mut flow, mut chosen) = unsafe { (core::mem::zeroed(), core::mem::zeroed()) };
            let mut icmp_at = 0;
            let outcome = uplink_flow::<C, V4>(ctx, &mut flow, &mut chosen, &mut icmp_at);
            if icmp_at != 0 {
                return Some(icmp_error::<C, V4>(ctx, icmp_at));
            }
            count(ctx.len(), &outcome, &chosen);
            Some(outcome)
        }
        Ok(Ip::V6) => None,
        Err(early) => Some(early.outcome()),
    }
}

/// An IPv6 packet on the uplink's IPv6 tc filter (`uplink_tc6`): a
/// program of its own, verified apart from the IPv4 one. None for anything
/// else, which is `uplink4`'s. The IPv6 path is a function of its own
/// (`uplink_flow6`), and so is its ICMP path, run after it returns: 5.10
/// allows 512 bytes for the frames of a call chain together, and the two
/// would not fit in one.
#[inline(always)]
pub fn uplink6<C: Packet>(ctx: &C) -> Option<Outcome> {
    match flow::ip_version(ctx) {
        Ok(Ip::V6) => {
            let mut icmp_at = 0;
            let outcome = uplink_flow6::<C>(ctx, &mut icmp_at);
            if icmp_at != 0 {
                return Some(icmp_error6::<C>(ctx, icmp_at));
            }
            Some(outcome)
        }
        _ => None,
    }
}

/// The IPv6 flow, its flow and backend in the per-CPU scratch map: both
/// are large, and the stack (512 bytes on 5.10) holds the rest of the path.
#[inline(never)]
fn uplink_flow6<C: Packet>(ctx: &C, icmp_at: &mut usize) -> Outcome {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(Dropped(Stat::DropScratch))?;
    // SAFETY: our CPU's slot; its flow and backend are not in use by
    // anything else while we run, and `uplink_flow` fills both before it
    // reads them.
    let (flow, chosen) = unsafe { (&mut (*scratch).flow6, &mut (*scratch).chosen6) };
    let outcome = uplink_flow::<C, V6>(ctx, flow, chosen, icmp_at);
    count(ctx.len(), &outcome, chosen);
    outcome
}

/// Counts a packet the uplink translated (see `traffic`), with the pair
/// `uplink_flow` left in `chosen`: once, after the path, where the count's
/// branches cost the verifier little. In the middle of the path each of
/// them would double the paths it walks after. A packet XDP hands to tc is
/// counted by tc.
#[inline(always)]
fn count<F: Family>(len: u32, outcome: &Outcome, chosen: &Chosen<F>) {
    let way = match outcome {
        Ok(out) if out.stat == Stat::FwdLocal || out.stat == Stat::FwdSnat => Way::ToBackend,
        Ok(out) if out.stat == Stat::RevSnat => Way::ToClient,
        _ => return,
    };
    traffic::count(chosen.rev_nat_id, chosen.backend_id, way, len);
}

#[inline(never)]
fn icmp_error6<C: Packet>(ctx: &C, icmp_off: usize) -> Outcome {
    icmp_error::<C, V6>(ctx, icmp_off)
}

/// The uplink path for one family. `flow` and `chosen` are filled here (in
/// place, as IPv6's live in the scratch map). An ICMP message is left to
/// the caller (its offset in `icmp_at`), for `icmp_error`. Every step is inline: out of
/// line, each call is verified again for every path that reaches it (over a
/// million instructions on 6.1 for IPv6), and XDP would lose the frame's
/// bounds the compiler passes as plain values.
#[inline(always)]
fn uplink_flow<C: Packet, F: Family>(
    ctx: &C,
    flow: &mut Flow<F>,
    chosen: &mut Chosen<F>,
    icmp_at: &mut usize,
) -> Outcome {
    match F::parse(ctx) {
        Ok(parsed) => *flow = parsed,
        Err(Early::Icmp(icmp_off)) => {
            *icmp_at = icmp_off;
            return Ok(Out::pass(Stat::PassNotTcpUdp));
        }
        Err(early) => return early.outcome(),
    }
    flow.external = true;
    let snat = Snat::<F>::load();
    if snat.as_ref().is_some_and(|snat| snat.addr == flow.daddr) {
        // A reply on a NAT port, or else a NodePort on the node's address.
        if let Some(entry) = nat::lookup(flow) {
            return reverse_snat(ctx, flow, entry, chosen);
        }
    }
    let Some((_, svc)) = lb::frontend(flow) else {
        return Ok(Out::pass(Stat::PassNotService));
    };
    if svc.flags & svc_flags::SOURCE_RANGES != 0 && !F::source_allowed(svc.rev_nat_id, flow.saddr) {
        return Err(Dropped(Stat::DropSourceRange));
    }
    if svc.count == 0 {
        if svc.flags & svc_flags::LOCAL_ONLY != 0 {
            return Err(Dropped(Stat::DropNoLocalBackend));
        }
        return ctx.reject(flow);
    }
    match lb::known(flow, svc.rev_nat_id, ct::now()) {
        Some(known) => *chosen = known,
        None => {
            let key = F::service_key(flow.daddr, flow.dport, flow.proto, 0);
            *chosen = lb::open(flow, key, &svc, 0, ct::now())?;
        }
    }
    if chosen.local() {
        return to_local(ctx, flow, chosen);
    }
    // No node address of this family known yet: cannot SNAT.
    let snat = snat.ok_or(Dropped(Stat::DropNatPorts))?;
    let kept = nat::kept(
        flow,
        &snat,
        &chosen.backend,
        chosen.nat_port_be,
        svc.rev_nat_id,
    );
    chosen.nat_port_be = match kept {
        Some(port) => port,
        None => {
            let port = nat::allocate(flow, &snat, &chosen.backend, svc.rev_nat_id)?;
            ct::remember_nat_port(flow, port);
            nat::name_backend(flow, &snat, &chosen.backend, port, chosen.backend_id);
            port
        }
    };
    to_remote(ctx, flow, chosen, &snat)
}

/// A packet to a backend on this node: DNAT, on to the stack (its replies
/// are reverse-NATed on its veth).
#[inline(always)]
fn to_local<C: Packet, F: Family>(ctx: &C, flow: &Flow<F>, chosen: &Chosen<F>) -> Outcome {
    let backend = chosen.backend;
    ctx.rewrite(flow, End::Destination, backend.addr(), backend.port_be())?;
    let client_port = chosen.client_port_be;
    if client_port != flow.sport {
        ctx.rewrite(flow, End::Source, flow.saddr, client_port)?;
    }
    Ok(Out::pass(Stat::FwdLocal))
}

/// A packet to a backend on another node, with its NAT port (in `chosen`):
/// DNAT, and SNAT to the node's address, straight out to the next hop.
#[inline(always)]
fn to_remote<C: Packet, F: Family>(
    ctx: &C,
    flow: &Flow<F>,
    chosen: &Chosen<F>,
    snat: &Snat<F>,
) -> Outcome {
    let (snat, nat_port) = (snat.addr, chosen.nat_port_be);
    let backend = chosen.backend;
    let hop = fib::<_, F>(
        ctx,
        flow.proto,
        snat,
        backend.addr(),
        nat_port,
        backend.port_be(),
    )?;
    if C::XDP && matches!(hop, Hop::Unresolved { .. }) {
        // The tc program behind XDP finds the same conntrack and NAT entries and
        // lets the kernel resolve the next hop.
        return Ok(Out::pass(Stat::PassNoNeigh));
    }
    ctx.rewrite(flow, End::Destination, backend.addr(), backend.port_be())?;
    ctx.rewrite(flow, End::Source, snat, nat_port)?;
    send(ctx, hop, Stat::FwdSnat)
}

/// A remote backend's reply to a SNATed flow (`entry`, its NAT entry): back
/// to the client, from the frontend it dialled.
#[inline(always)]
fn reverse_snat<C: Packet, F: Family>(
    ctx: &C,
    flow: &Flow<F>,
    entry: *mut F::Nat,
    chosen: &mut Chosen<F>,
) -> Outcome {
    // SAFETY: plain data, read once.
    let nat = unsafe { *entry };
    chosen.rev_nat_id = nat.rev_nat_id();
    chosen.backend_id = nat.backend_id();
    let frontend = F::revnat(nat.rev_nat_id()).ok_or(Dropped(Stat::DropNoRevnat))?;
    nat::on_reply(flow, entry, &nat, &frontend);
    let hop = fib::<_, F>(
        ctx,
        flow.proto,
        frontend.addr(),
        nat.client_addr(),
        frontend.port_be(),
        nat.client_port_be(),
    )?;
    if C::XDP && matches!(hop, Hop::Unresolved { .. }) {
        return Ok(Out::pass(Stat::PassNoNeigh));
    }
    ctx.rewrite(
        flow,
        End::Destination,
        nat.client_addr(),
        nat.client_port_be(),
    )?;
    ctx.rewrite(flow, End::Source, frontend.addr(), frontend.port_be())?;
    send(ctx, hop, Stat::RevSnat)
}

/// An ICMP error to the node's address about a SNATed flow (its quote: a
/// packet the node sent from a NAT port to a remote backend): translated
/// back for the client, from the frontend it dialled, and sent straight
/// out as the flow's replies are. Any other ICMP passes untouched (an error
/// for a pod reaches its veth, where `to_pod` translates it).
#[inline(always)]
fn icmp_error<C: Packet, F: Family>(ctx: &C, icmp_off: usize) -> Outcome {
    let untouched = Ok(Out::pass(Stat::PassNotTcpUdp));
    let Some(snat) = Snat::<F>::load() else {
        return untouched;
    };
    let Some(q) = icmp::quote::<C, F>(ctx, icmp_off) else {
        return untouched;
    };
    if q.inner.saddr != snat.addr {
        return untouched;
    }
    let Some(entry) = nat::lookup(&q.answer()) else {
        return untouched;
    };
    // SAFETY: plain data, read once.
    let nat = unsafe { *entry };
    let frontend = F::revnat(nat.rev_nat_id()).ok_or(Dropped(Stat::DropNoRevnat))?;
    let hop = fib::<_, F>(ctx, F::ICMP, frontend.addr(), nat.client_addr(), 0, 0)?;
    if C::XDP && matches!(hop, Hop::Unresolved { .. }) {
        return Ok(Out::pass(Stat::PassNoNeigh));
    }
    icmp::translate(
        ctx,
        &q,
        nat.client_addr(),
        nat.client_port_be(),
        frontend.addr(),
        frontend.port_be(),
    )?;
    send(ctx, hop, Stat::RevNatIcmp)
}
