//! The uplink hook: traffic entering the node from outside. XDP where the
//! driver allows, the same code on tc ingress otherwise (and behind XDP for the
//! packets XDP hands on: next hop not resolved yet, or a reject to build).
//!
//! - A packet to a frontend (NodePort on a node address, externalIP, LoadBalancer
//!   IP, or a routed ClusterIP) gets a backend. A backend on this node: DNAT, on
//!   to the stack (its replies are reverse-NATed on its veth). A backend on
//!   another node: DNAT and SNAT to this node's address with a NAT port, straight
//!   back out with next-hop MACs from the FIB.
//! - A remote backend's reply to such a flow (to the node address and NAT port)
//!   is translated back to the client and sent straight out again.

use proxy_common::{stats::Stat, svc_flags, Config, SourceRange4};

use crate::{
    ct::nat,
    ctx::{End, Packet},
    fib::{fib, send, Hop},
    flow::{self, Flow, Parsed},
    lb,
    maps::{CONFIG, REVNAT, SOURCE_RANGES},
    verdict::{Action, Dropped, Out, Outcome},
};

/// Which program runs the code: the next-hop handling differs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

#[inline(always)]
pub fn uplink<C: Packet>(ctx: &C, hook: Hook) -> Outcome {
    let mut flow = match flow::parse(ctx) {
        Parsed::V4(flow) => flow,
        // No IPv6 frontend is served on the uplink yet.
        Parsed::V6(_) => return Ok(Out::pass(Stat::PassNotService)),
        Parsed::Early(early) => return early.outcome(),
    };
    flow.external = true;
    let config: Config = CONFIG.get(0).copied().unwrap_or_default();

    if config.snat_addr_be != 0 && flow.daddr == config.snat_addr_be {
        if let Some(out) = reverse_snat(ctx, &flow, hook)? {
            return Ok(out);
        }
    }

    let Some((key, svc)) = lb::frontend(&flow) else {
        return Ok(Out::pass(Stat::PassNotService));
    };
    if svc.flags & svc_flags::SOURCE_RANGES != 0 {
        let data = SourceRange4 {
            rev_nat_id_be: svc.rev_nat_id.to_be(),
            addr_be: flow.saddr,
        };
        if SOURCE_RANGES
            .get(&aya_ebpf::maps::lpm_trie::Key::new(
                SourceRange4::LOOKUP_PREFIX_LEN,
                data,
            ))
            .is_none()
        {
            return Err(Dropped(Stat::DropSourceRange));
        }
    }
    if svc.count == 0 {
        if svc.flags & svc_flags::LOCAL_ONLY != 0 {
            return Err(Dropped(Stat::DropNoLocalBackend));
        }
        return Ok(Out::new(Action::Reject, Stat::RejectNoBackend));
    }
    let chosen = lb::choose(&flow, key, &svc)?;
    let backend = chosen.backend;
    if chosen.local() {
        ctx.rewrite(&flow, End::Destination, backend.addr_be, backend.port_be)?;
        let client_port = chosen.client_port_be;
        if client_port != flow.sport {
            ctx.rewrite(&flow, End::Source, flow.saddr, client_port)?;
        }
        return Ok(Out::pass(Stat::FwdLocal));
    }
    if config.snat_addr_be == 0 {
        // No node address known yet: cannot SNAT.
        return Err(Dropped(Stat::DropNatPorts));
    }
    let nat_port = nat::port(&flow, &config, &backend, chosen.nat_port_be, svc.rev_nat_id)?;
    let hop = fib(
        ctx,
        &flow,
        config.snat_addr_be,
        backend.addr_be,
        nat_port,
        backend.port_be,
    )?;
    if hook == Hook::Xdp && matches!(hop, Hop::Unresolved { .. }) {
        // The tc program behind XDP finds the same conntrack and NAT entries and
        // lets the kernel resolve the next hop.
        return Ok(Out::pass(Stat::PassNoNeigh));
    }
    ctx.rewrite(&flow, End::Destination, backend.addr_be, backend.port_be)?;
    ctx.rewrite(&flow, End::Source, config.snat_addr_be, nat_port)?;
    send(ctx, hop, Stat::FwdSnat)
}

/// A remote backend's reply to a SNATed flow: back to the client, from the
/// frontend it dialled.
#[inline(always)]
fn reverse_snat<C: Packet>(ctx: &C, flow: &Flow, hook: Hook) -> Result<Option<Out>, Dropped> {
    let Some((entry, nat)) = nat::lookup(flow) else {
        return Ok(None);
    };
    // SAFETY: copied out at once.
    let frontend = unsafe { REVNAT.get(&nat.rev_nat_id) }
        .copied()
        .ok_or(Dropped(Stat::DropNoRevnat))?;
    nat::on_reply(flow, entry, &nat, &frontend);
    let hop = fib(
        ctx,
        flow,
        frontend.addr_be,
        nat.client_addr_be,
        frontend.port_be,
        nat.client_port_be,
    )?;
    if hook == Hook::Xdp && matches!(hop, Hop::Unresolved { .. }) {
        return Ok(Some(Out::pass(Stat::PassNoNeigh)));
    }
    ctx.rewrite(
        flow,
        End::Destination,
        nat.client_addr_be,
        nat.client_port_be,
    )?;
    ctx.rewrite(flow, End::Source, frontend.addr_be, frontend.port_be)?;
    send(ctx, hop, Stat::RevSnat).map(Some)
}
