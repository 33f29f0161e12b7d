//! Service load balancing shared by every hook: frontend lookup, backend choice
//! by flow hash, and conntrack so a flow keeps its backend. Per packet: one
//! service lookup, then conntrack (and on a new flow one slot and one backend
//! lookup). Never a walk over services or backends.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use proxy_common::{
    backend_flags, ct_dir, ct_flags, ct_lifetime,
    hash::{flow_hash4, slot_for},
    maglev, stats, svc_flags, AffinityKey4, AffinityValue4, Backend4, CtKey4, CtValue4, MaglevKey4,
    ServiceKey4, ServiceValue, HAIRPIN_ADDR,
};

use crate::{
    maps::{AFFINITY, BACKENDS, CONNTRACK, MAGLEV, ROUND_ROBIN, SERVICES},
    parse::Flow,
    verdict::Drop,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Conntrack entries are refreshed at most this often, to keep writes off the
/// fast path of busy flows.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// The frontend a packet is addressed to, if any: its slot-0 key and header.
#[inline(always)]
pub fn frontend(flow: &Flow) -> Option<(ServiceKey4, ServiceValue)> {
    let key = ServiceKey4 {
        addr_be: flow.daddr,
        port_be: flow.dport,
        proto: flow.proto,
        scope: 0,
        slot: 0,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the agent may replace it later.
    unsafe { SERVICES.get(&key) }.copied().map(|svc| (key, svc))
}

#[inline(always)]
pub fn ct_key(flow: &Flow, dir: u8) -> CtKey4 {
    CtKey4 {
        saddr_be: flow.saddr,
        daddr_be: flow.daddr,
        sport_be: flow.sport,
        dport_be: flow.dport,
        proto: flow.proto,
        dir,
        _pad: 0,
    }
}

/// The backend a packet of `flow` goes to.
pub struct Chosen {
    pub backend: Backend4,
    /// The node port of a SNATed flow (0 until one is given).
    pub nat_port_be: u16,
    /// True when this packet opened the flow.
    pub new: bool,
}

impl Chosen {
    #[inline(always)]
    pub fn local(&self) -> bool {
        self.backend.flags & backend_flags::LOCAL != 0
    }

    /// The client reached itself: it must not see its own address as the peer.
    #[inline(always)]
    pub fn hairpin(&self, flow: &Flow) -> bool {
        self.backend.addr_be == flow.saddr
    }
}

/// The hairpin source address as the programs hold addresses.
#[inline(always)]
pub fn hairpin_addr() -> u32 {
    u32::from_ne_bytes(HAIRPIN_ADDR)
}

/// Picks the backend for a packet to a frontend with backends: the one its
/// conntrack entry names while that backend exists, else one by flow hash,
/// recorded in conntrack. `reply_entry` also records the backend's reply
/// direction, for reverse NAT where replies pass through this node unchanged.
#[inline(always)]
pub fn choose(flow: &Flow, mut key: ServiceKey4, svc: &ServiceValue) -> Result<Chosen, Drop> {
    let fwd = ct_key(flow, ct_dir::FORWARD);
    let now = now();
    if let Some(entry) = CONNTRACK.get_ptr_mut(&fwd) {
        // SAFETY: conntrack values are plain data; a racing writer can at worst make
        // us read a backend id about to change, which the lookup below tolerates.
        let (backend_id, rev_nat_id, nat_port_be, last_seen, flags) = unsafe {
            (
                (*entry).backend_id,
                (*entry).rev_nat_id,
                (*entry).nat_port_be,
                (*entry).last_seen_ns,
                (*entry).flags,
            )
        };
        let alive = now.wrapping_sub(last_seen) <= ct_lifetime::nanos(flow.proto, flags);
        if alive && rev_nat_id == svc.rev_nat_id {
            // SAFETY: copied out at once.
            if let Some(backend) = unsafe { BACKENDS.get(&backend_id) }.copied() {
                let chosen = Chosen {
                    backend,
                    nat_port_be,
                    new: false,
                };
                // A client opening a new connection on the tuple of one that
                // closed (ports get reused): the flow is open again.
                let syn = flow.proto == proxy_common::proto::TCP
                    && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
                let refresh = now.wrapping_sub(last_seen) > CT_REFRESH_NS;
                let mut flags = flags;
                if syn && flags & ct_flags::CLOSING != 0 {
                    flags &= !ct_flags::CLOSING;
                    unsafe { (*entry).flags = flags };
                }
                if refresh || syn {
                    unsafe { (*entry).last_seen_ns = now };
                    // The reply direction is rewritten beside it: an entry lost to
                    // the agent's expiry sweep racing this flow's reuse would
                    // otherwise leave every reply untranslated, and the tuple
                    // broken, while the forward entry lives.
                    if chosen.local() || !flow.external {
                        let hairpin = chosen.hairpin(flow);
                        let reply = CtValue4 {
                            backend_id,
                            rev_nat_id,
                            flags: flags | if hairpin { ct_flags::HAIRPIN } else { 0 },
                            last_seen_ns: now,
                            ..CtValue4::default()
                        };
                        // Best effort: the forward entry still pins the backend.
                        let _ = CONNTRACK.insert(
                            &reply_key(flow, &backend, hairpin),
                            &reply,
                            u64::from(BPF_ANY),
                        );
                    }
                }
                if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 && flags & ct_flags::CLOSING == 0 {
                    unsafe { (*entry).flags = flags | ct_flags::CLOSING };
                    // The reply direction closes with it.
                    let hairpin = chosen.hairpin(flow);
                    let reply = reply_key(flow, &backend, hairpin);
                    if let Some(r) = CONNTRACK.get_ptr_mut(&reply) {
                        unsafe { (*r).flags |= ct_flags::CLOSING };
                    }
                }
                return Ok(chosen);
            }
        }
        // Expired, or the pinned backend is gone (or the frontend was recreated):
        // choose again.
    }

    let (backend_id, backend) = match affinity_backend(flow, svc, now) {
        Some(kept) => kept,
        None => {
            let backend_id = schedule(flow, &mut key, svc)?;
            // SAFETY: copied out at once.
            let backend = unsafe { BACKENDS.get(&backend_id) }
                .copied()
                .ok_or(Drop(stats::DROP_NO_BACKEND_ENTRY))?;
            (backend_id, backend)
        }
    };
    if svc.flags & svc_flags::AFFINITY != 0 {
        let used = AffinityValue4 {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        // Best effort: without the entry the next connection is hashed again.
        let _ = AFFINITY.insert(&affinity_key(flow, svc), &used, u64::from(BPF_ANY));
    }
    let value = CtValue4 {
        backend_id,
        rev_nat_id: svc.rev_nat_id,
        last_seen_ns: now,
        ..CtValue4::default()
    };
    let chosen = Chosen {
        backend,
        nat_port_be: 0,
        new: true,
    };
    // A SNATed flow's replies come back to the node address (the NAT map), not here.
    if chosen.local() || !flow.external {
        let hairpin = chosen.hairpin(flow);
        let value = if hairpin {
            CtValue4 {
                flags: ct_flags::HAIRPIN,
                ..value
            }
        } else {
            value
        };
        let reply = reply_key(flow, &backend, hairpin);
        CONNTRACK
            .insert(&reply, &value, u64::from(BPF_ANY))
            .map_err(|_| Drop(stats::DROP_CT_INSERT))?;
    }
    CONNTRACK
        .insert(&fwd, &value, u64::from(BPF_ANY))
        .map_err(|_| Drop(stats::DROP_CT_INSERT))?;
    Ok(chosen)
}

/// The size of a Maglev table from its index on the ladder. A match, not an
/// array lookup: older verifiers cannot bound a variable index into .rodata.
#[inline(always)]
fn maglev_size(index: u16) -> Option<u32> {
    let size = match index {
        0 => maglev::SIZES[0],
        1 => maglev::SIZES[1],
        2 => maglev::SIZES[2],
        3 => maglev::SIZES[3],
        4 => maglev::SIZES[4],
        5 => maglev::SIZES[5],
        6 => maglev::SIZES[6],
        7 => maglev::SIZES[7],
        8 => maglev::SIZES[8],
        9 => maglev::SIZES[9],
        _ => return None,
    };
    Some(size)
}

/// The conntrack key of a backend's replies to `flow`.
#[inline(always)]
fn reply_key(flow: &Flow, backend: &Backend4, hairpin: bool) -> CtKey4 {
    CtKey4 {
        saddr_be: backend.addr_be,
        daddr_be: if hairpin { hairpin_addr() } else { flow.saddr },
        sport_be: backend.port_be,
        dport_be: flow.sport,
        proto: flow.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    }
}

/// The backend id the frontend's scheduler picks for a new flow.
#[inline(always)]
fn schedule(flow: &Flow, key: &mut ServiceKey4, svc: &ServiceValue) -> Result<u32, Drop> {
    let flow_hash = || flow_hash4(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    key.slot = match svc.flags & svc_flags::SCHEDULER_MASK {
        svc_flags::SCHEDULER_MAGLEV => {
            let size = maglev_size(svc.maglev_size).ok_or(Drop(stats::DROP_NO_BACKEND_ENTRY))?;
            let index = flow_hash().checked_rem(size).unwrap_or(0);
            let slot = MaglevKey4 {
                rev_nat_id: svc.rev_nat_id,
                index,
            };
            // SAFETY: copied out at once.
            return unsafe { MAGLEV.get(&slot) }
                .copied()
                .ok_or(Drop(stats::DROP_NO_BACKEND_ENTRY));
        }
        svc_flags::SCHEDULER_SOURCE_HASH => slot_for(flow_hash4(flow.saddr, 0, 0, 0, 0), svc.count),
        svc_flags::SCHEDULER_ROUND_ROBIN => {
            let counter = ROUND_ROBIN
                .get_ptr_mut(svc.rev_nat_id)
                .ok_or(Drop(stats::DROP_NO_BACKEND_ENTRY))?;
            // SAFETY: a per-CPU slot, touched by this CPU only.
            let turn = unsafe {
                let turn = *counter;
                *counter = turn.wrapping_add(1);
                turn
            };
            slot_for(turn, svc.count)
        }
        _ => slot_for(flow_hash(), svc.count),
    };
    // SAFETY: copied out at once.
    unsafe { SERVICES.get(&*key) }
        .copied()
        .map(|slot| slot.backend_id)
        .ok_or(Drop(stats::DROP_NO_BACKEND_ENTRY))
}

#[inline(always)]
fn affinity_key(flow: &Flow, svc: &ServiceValue) -> AffinityKey4 {
    AffinityKey4 {
        client_addr_be: flow.saddr,
        rev_nat_id: svc.rev_nat_id,
    }
}

/// sessionAffinity ClientIP: the backend this client's last connection to the
/// frontend went to, if that was less than the timeout ago and it still exists
/// (the agent removes entries for backends that left the frontend).
#[inline(always)]
fn affinity_backend(flow: &Flow, svc: &ServiceValue, now: u64) -> Option<(u32, Backend4)> {
    if svc.flags & svc_flags::AFFINITY == 0 {
        return None;
    }
    // SAFETY: copied out at once.
    let kept = unsafe { AFFINITY.get(&affinity_key(flow, svc)) }.copied()?;
    // Slot 0 holds the timeout (seconds) where slots hold backend ids.
    let timeout_ns = u64::from(svc.backend_id) * 1_000_000_000;
    if now.wrapping_sub(kept.last_used_ns) >= timeout_ns {
        return None;
    }
    // SAFETY: copied out at once.
    let backend = unsafe { BACKENDS.get(&kept.backend_id) }.copied()?;
    Some((kept.backend_id, backend))
}

/// Records the NAT port a SNATed flow got in its forward conntrack entry.
#[inline(always)]
pub fn remember_nat_port(flow: &Flow, nat_port_be: u16) {
    if let Some(entry) = CONNTRACK.get_ptr_mut(&ct_key(flow, ct_dir::FORWARD)) {
        // SAFETY: plain data.
        unsafe { (*entry).nat_port_be = nat_port_be };
    }
}
