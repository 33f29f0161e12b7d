//! Backend choice for a new flow: the frontend's scheduler (flow hash, Maglev,
//! source hash or round robin) and sessionAffinity ClientIP, which keeps a
//! client on the backend its last connection went to. The same for a packet
//! (`Flow`) and a socket (`sock::Dial`): both are a [`Client`].

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{
    hash::slot_for, maglev, stats::Stat, svc_flags, AffinityValue, MaglevKey, ServiceValue,
};

use crate::{
    ct,
    family::Family,
    flow::Flow,
    maps::{MAGLEV, ROUND_ROBIN},
    verdict::Dropped,
};

/// What the schedulers and affinity know of a new flow of family `F`.
pub trait Client<F: Family> {
    /// The client's identity for sessionAffinity and the source hash: its
    /// address (network order), or what stands for it.
    fn client(&self) -> F::Addr;
    /// A hash that differs from one flow of the client to the next.
    fn flow_hash(&self) -> u32;
}

impl<F: Family> Client<F> for Flow<F> {
    #[inline(always)]
    fn client(&self) -> F::Addr {
        self.saddr
    }

    #[inline(always)]
    fn flow_hash(&self) -> u32 {
        F::flow_hash(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }
}

/// The backend a new flow of `flow` to the frontend (`key` is its slot-0
/// key, `svc` its header, whose slots come after `skip` others: see
/// `lb::for_cluster_client`) goes to: the client's affinity backend if it
/// has one, else the scheduler's pick. Records the client's affinity.
#[inline(always)]
pub fn pick<F: Family>(
    flow: &impl Client<F>,
    key: F::ServiceKey,
    svc: &ServiceValue,
    skip: u16,
    now: u64,
) -> Result<(u32, F::Backend), Dropped> {
    let (backend_id, backend) = match affinity_backend(flow, svc, now) {
        Some(kept) => kept,
        None => {
            let backend_id = schedule(flow, &key, svc, skip)?;
            let backend = F::backend(backend_id).ok_or(Dropped(Stat::DropNoBackendEntry))?;
            (backend_id, backend)
        }
    };
    if svc.flags & svc_flags::AFFINITY != 0 {
        let used = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        F::set_affinity(&F::affinity_key(flow.client(), svc.rev_nat_id), &used);
    }
    Ok((backend_id, backend))
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

/// The backend id the frontend's scheduler picks for a new flow.
#[inline(always)]
fn schedule<F: Family>(
    flow: &impl Client<F>,
    key: &F::ServiceKey,
    svc: &ServiceValue,
    skip: u16,
) -> Result<u32, Dropped> {
    let flow_hash = || flow.flow_hash();
    let slot = match svc.flags & svc_flags::SCHEDULER_MASK {
        svc_flags::SCHEDULER_MAGLEV => {
            let size = maglev_size(svc.maglev_size).ok_or(Dropped(Stat::DropNoBackendEntry))?;
            let index = flow_hash().checked_rem(size).unwrap_or(0);
            let slot = MaglevKey {
                rev_nat_id: svc.rev_nat_id,
                index,
            };
            // SAFETY: copied out at once.
            return unsafe { MAGLEV.get(&slot) }
                .copied()
                .ok_or(Dropped(Stat::DropNoBackendEntry));
        }
        svc_flags::SCHEDULER_SOURCE_HASH => slot_for(F::client_hash(flow.client()), svc.count),
        svc_flags::SCHEDULER_ROUND_ROBIN => {
            let turn = round_robin_turn(svc.rev_nat_id);
            let turn = u32::try_from(turn).map_err(|_| Dropped(Stat::DropNoBackendEntry))?;
            slot_for(turn, svc.count)
        }
        _ => slot_for(flow_hash(), svc.count),
    };
    F::service(&F::with_slot(key, skip.wrapping_add(slot)))
        .map(|slot| slot.backend_id)
        .ok_or(Dropped(Stat::DropNoBackendEntry))
}

/// sessionAffinity ClientIP: the backend this client's last connection to the
/// frontend went to, if that was less than the timeout ago and it still exists
/// (the agent removes entries for backends that left the frontend).
#[inline(always)]
fn affinity_backend<F: Family>(
    flow: &impl Client<F>,
    svc: &ServiceValue,
    now: u64,
) -> Option<(u32, F::Backend)> {
    if svc.flags & svc_flags::AFFINITY == 0 {
        return None;
    }
    let kept = F::affinity(&F::affinity_key(flow.client(), svc.rev_nat_id))?;
    // Slot 0 holds the timeout (seconds) where slots hold backend ids.
    let timeout_ns = u64::from(svc.backend_id) * 1_000_000_000;
    if ct::age(now, kept.last_used_ns) >= timeout_ns {
        return None;
    }
    let backend = F::backend(kept.backend_id)?;
    Some((kept.backend_id, backend))
}

/// The next turn of frontend `rev_nat_id`'s round-robin counter on this CPU
/// (u64::MAX: none, the map is full). Its first round-robin flow makes the
/// frontend's counters, one per CPU, zeroed; BPF_NOEXIST keeps those another
/// CPU made meanwhile. A function of its own, so that the key and value it
/// hands the helpers sit on a frame of their own: 5.10 and 6.1 round each
/// frame of a call chain up to 32 bytes, and 8 bytes more in `from_pod`'s
/// flow frame put its chain past 512.
#[inline(never)]
fn round_robin_turn(rev_nat_id: u32) -> u64 {
    let counter = match ROUND_ROBIN.get_ptr_mut(&rev_nat_id) {
        Some(counter) => counter,
        None => {
            let _ = ROUND_ROBIN.insert(&rev_nat_id, &0, u64::from(BPF_NOEXIST));
            match ROUND_ROBIN.get_ptr_mut(&rev_nat_id) {
                Some(counter) => counter,
                None => return u64::MAX,
            }
        }
    };
    // SAFETY: this CPU's value, touched by this CPU only.
    unsafe {
        let turn = *counter;
        *counter = turn.wrapping_add(1);
        u64::from(turn)
    }
}
