//! Service load balancing shared by every hook: the frontend a packet is
//! addressed to, then a match on its flow's conntrack state: a known flow
//! keeps its backend, a new one gets the scheduler's (see `sched`) and is
//! recorded (see `ct`). Per packet: one service lookup, then conntrack (and on
//! a new flow one slot and one backend lookup). Never a walk over services or
//! backends.

use proxy_common::{backend_flags, svc_flags, ServiceValue};

use crate::{
    ct::{self, State, Tracked},
    family::{Backend, Family},
    flow::Flow,
    sched,
    verdict::Dropped,
};

/// The frontend a packet is addressed to, if any: its slot-0 key and header.
#[inline(always)]
pub fn frontend<F: Family>(flow: &Flow<F>) -> Option<(F::ServiceKey, ServiceValue)> {
    let key = F::service_key(flow.daddr, flow.dport, flow.proto, 0);
    F::service(&key).map(|svc| (key, svc))
}

/// The frontend as a client inside the cluster sees it: a pod on this node,
/// or one of the node's own processes. An external frontend under
/// externalTrafficPolicy=Local sends those to the Service's cluster-wide
/// endpoints, in the slots after its local ones, as kube-proxy does: to
/// them it is as if they had gone out to the load balancer and come back
/// in. Returns the header to schedule with (those slots, without the Local
/// policy, and without Maglev, whose table covers the local slots) and how
/// many slots come before them.
#[inline(always)]
pub fn for_cluster_client(svc: ServiceValue) -> (ServiceValue, u16) {
    if svc.cluster_count == 0 {
        return (svc, 0);
    }
    let mut flags = svc.flags & !svc_flags::LOCAL_ONLY;
    if flags & svc_flags::SCHEDULER_MASK == svc_flags::SCHEDULER_MAGLEV {
        flags &= !svc_flags::SCHEDULER_MASK;
    }
    let view = ServiceValue {
        count: svc.cluster_count,
        cluster_count: 0,
        flags,
        maglev_size: 0,
        ..svc
    };
    (view, svc.count)
}

/// The backend a packet of `flow` goes to.
pub struct Chosen<F: Family> {
    /// The frontend (set by the uplink path, for the traffic counters).
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub backend: F::Backend,
    /// The node port of a SNATed flow (0 until one is given).
    pub nat_port_be: u16,
    /// The client port the packet carries to the backend: the client's own,
    /// or another where the flow's own tuple was taken there (see `ct`).
    pub client_port_be: u16,
    /// True when this packet opened the flow.
    pub new: bool,
}

impl<F: Family> Chosen<F> {
    #[inline(always)]
    pub fn local(&self) -> bool {
        self.backend.flags() & backend_flags::LOCAL != 0
    }

    /// The client reached itself: it must not see its own address as the peer.
    #[inline(always)]
    pub fn hairpin(&self, flow: &Flow<F>) -> bool {
        ct::hairpin(flow, &self.backend)
    }
}

/// Picks the backend for a packet to a frontend with backends (`key` is its
/// slot-0 key, `svc` its header, whose slots come after `skip` others): the
/// one its conntrack entry names while that backend exists, else the
/// scheduler's, recorded in conntrack (both directions where replies pass
/// through this node).
#[inline(always)]
pub fn choose<F: Family>(
    flow: &Flow<F>,
    key: F::ServiceKey,
    svc: &ServiceValue,
    skip: u16,
) -> Result<Chosen<F>, Dropped> {
    let now = ct::now();
    match known(flow, svc.rev_nat_id, now) {
        Some(chosen) => Ok(chosen),
        None => open(flow, key, svc, skip, now),
    }
}

/// The backend of a flow conntrack knows, while that backend exists.
#[inline(always)]
pub fn known<F: Family>(flow: &Flow<F>, rev_nat_id: u32, now: u64) -> Option<Chosen<F>> {
    match ct::lookup(flow, rev_nat_id, now) {
        State::Established(known) | State::Reopened(known) => Some(Chosen {
            rev_nat_id,
            backend_id: known.backend_id,
            backend: known.backend,
            nat_port_be: known.nat_port_be,
            client_port_be: known.client_port_be(flow),
            new: false,
        }),
        State::New | State::Stale => None,
    }
}

/// The scheduler's backend for a new flow, recorded in conntrack.
#[inline(always)]
pub fn open<F: Family>(
    flow: &Flow<F>,
    key: F::ServiceKey,
    svc: &ServiceValue,
    skip: u16,
    now: u64,
) -> Result<Chosen<F>, Dropped> {
    let (backend_id, backend) = sched::pick(flow, key, svc, skip, now)?;
    let mut tracked = Tracked {
        backend_id,
        backend,
        nat_port_be: 0,
        remap_port_be: 0,
    };
    ct::create(flow, &mut tracked, svc.rev_nat_id, now)?;
    Ok(Chosen {
        rev_nat_id: svc.rev_nat_id,
        backend_id,
        backend,
        nat_port_be: 0,
        client_port_be: tracked.client_port_be(flow),
        new: true,
    })
}
