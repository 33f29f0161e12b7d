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

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{
    ct_dir, hash::flow_hash4, stats, svc_flags, Config, CtKey4, Nat4, SourceRange4,
};

use crate::{
    ctx::{End, Packet},
    fib::{fib, send, Hop},
    lb,
    maps::{CONFIG, NAT, REVNAT, SOURCE_RANGES},
    parse::{self, Flow},
    verdict::{Action, Drop, Out},
};

/// How many NAT ports a new flow tries before giving up.
const NAT_PORT_TRIES: u32 = 8;

/// Which program runs the code: the next-hop handling differs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

#[inline(always)]
pub fn uplink<C: Packet>(ctx: &C, hook: Hook) -> Result<Out, Drop> {
    let mut flow = match parse::flow(ctx) {
        Ok(flow) => flow,
        Err(early) => return early,
    };
    flow.external = true;
    let config: Config = CONFIG.get(0).copied().unwrap_or_default();

    if config.snat_addr_be != 0 && flow.daddr == config.snat_addr_be {
        if let Some(out) = reverse_snat(ctx, &flow, hook)? {
            return Ok(out);
        }
    }

    let Some((key, svc)) = lb::frontend(&flow) else {
        return Ok(Out::pass(stats::PASS_NOT_SERVICE));
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
            return Err(Drop(stats::DROP_SOURCE_RANGE));
        }
    }
    if svc.count == 0 {
        if svc.flags & svc_flags::LOCAL_ONLY != 0 {
            return Err(Drop(stats::DROP_NO_LOCAL_BACKEND));
        }
        return Ok(Out {
            action: Action::Reject,
            stat: stats::REJECT_NO_BACKEND,
        });
    }
    let chosen = lb::choose(&flow, key, &svc)?;
    let backend = chosen.backend;
    if chosen.local() {
        ctx.rewrite(&flow, End::Destination, backend.addr_be, backend.port_be)?;
        return Ok(Out::pass(stats::FWD_LOCAL));
    }
    if config.snat_addr_be == 0 {
        // No node address known yet: cannot SNAT.
        return Err(Drop(stats::DROP_NAT_PORTS));
    }
    let nat_port = if chosen.nat_port_be != 0 {
        refresh_nat(&flow, &config, &backend, chosen.nat_port_be, svc.rev_nat_id);
        chosen.nat_port_be
    } else {
        let port = allocate_nat_port(&flow, &config, &backend, svc.rev_nat_id)?;
        lb::remember_nat_port(&flow, port);
        port
    };
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
        return Ok(Out::pass(stats::PASS_NO_NEIGH));
    }
    ctx.rewrite(&flow, End::Destination, backend.addr_be, backend.port_be)?;
    ctx.rewrite(&flow, End::Source, config.snat_addr_be, nat_port)?;
    send(ctx, hop, stats::FWD_SNAT)
}

#[inline(always)]
fn nat_key(
    backend_addr: u32,
    backend_port: u16,
    config: &Config,
    nat_port: u16,
    proto: u8,
) -> CtKey4 {
    CtKey4 {
        saddr_be: backend_addr,
        daddr_be: config.snat_addr_be,
        sport_be: backend_port,
        dport_be: nat_port,
        proto,
        dir: ct_dir::NAT,
        _pad: 0,
    }
}

/// Gives a new SNATed flow a node port no other flow to the same backend holds.
#[inline(always)]
fn allocate_nat_port(
    flow: &Flow,
    config: &Config,
    backend: &proxy_common::Backend4,
    rev_nat_id: u32,
) -> Result<u16, Drop> {
    let min = u32::from(config.nat_port_min);
    let max = u32::from(config.nat_port_max);
    if min == 0 || max < min {
        return Err(Drop(stats::DROP_NAT_PORTS));
    }
    let range = max - min + 1;
    let start = flow_hash4(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    let value = Nat4 {
        client_addr_be: flow.saddr,
        rev_nat_id,
        client_port_be: flow.sport,
        _pad: [0; 3],
        last_seen_ns: lb::now(),
    };
    let mut i = 0;
    while i < NAT_PORT_TRIES {
        let offset = start.wrapping_add(i).checked_rem(range).unwrap_or(0);
        let port = ((min + offset) as u16).to_be();
        let key = nat_key(backend.addr_be, backend.port_be, config, port, flow.proto);
        if NAT.insert(&key, &value, u64::from(BPF_NOEXIST)).is_ok() {
            return Ok(port);
        }
        i += 1;
    }
    Err(Drop(stats::DROP_NAT_PORTS))
}

/// Keeps an established SNATed flow's NAT entry alive (and restores it if the
/// LRU evicted it).
#[inline(always)]
fn refresh_nat(
    flow: &Flow,
    config: &Config,
    backend: &proxy_common::Backend4,
    port: u16,
    rev_nat_id: u32,
) {
    let key = nat_key(backend.addr_be, backend.port_be, config, port, flow.proto);
    let now = lb::now();
    match NAT.get_ptr_mut(&key) {
        Some(entry) => {
            // SAFETY: plain data.
            unsafe {
                if now.wrapping_sub((*entry).last_seen_ns) > lb::CT_REFRESH_NS {
                    (*entry).last_seen_ns = now;
                }
            }
        }
        None => {
            let value = Nat4 {
                client_addr_be: flow.saddr,
                rev_nat_id,
                client_port_be: flow.sport,
                _pad: [0; 3],
                last_seen_ns: now,
            };
            let _ = NAT.insert(&key, &value, 0);
        }
    }
}

/// A remote backend's reply to a SNATed flow: back to the client, from the
/// frontend it dialled.
#[inline(always)]
fn reverse_snat<C: Packet>(ctx: &C, flow: &Flow, hook: Hook) -> Result<Option<Out>, Drop> {
    let key = lb::ct_key(flow, ct_dir::NAT);
    let Some(entry) = NAT.get_ptr_mut(&key) else {
        return Ok(None);
    };
    // SAFETY: plain data, read once.
    let nat = unsafe { *entry };
    // SAFETY: copied out at once.
    let frontend = unsafe { REVNAT.get(&nat.rev_nat_id) }
        .copied()
        .ok_or(Drop(stats::DROP_NO_REVNAT))?;
    let now = lb::now();
    if now.wrapping_sub(nat.last_seen_ns) > lb::CT_REFRESH_NS {
        unsafe { (*entry).last_seen_ns = now };
    }
    let hop = fib(
        ctx,
        flow,
        frontend.addr_be,
        nat.client_addr_be,
        frontend.port_be,
        nat.client_port_be,
    )?;
    if hook == Hook::Xdp && matches!(hop, Hop::Unresolved { .. }) {
        return Ok(Some(Out::pass(stats::PASS_NO_NEIGH)));
    }
    ctx.rewrite(
        flow,
        End::Destination,
        nat.client_addr_be,
        nat.client_port_be,
    )?;
    ctx.rewrite(flow, End::Source, frontend.addr_be, frontend.port_be)?;
    send(ctx, hop, stats::REV_SNAT).map(Some)
}
