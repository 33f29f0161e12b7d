//! From frontends to the contents of the service, backend, reverse-NAT,
//! source-range and Maglev maps: whole ([`map_state`]) or for the frontends a
//! change touched ([`update`]). Pure: `kernel/` writes what [`super::diff`] orders.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
};

use proxy_common::{
    backend_flags, backend_state, svc_flags, Backend4, MaglevKey4, RevNat4, ServiceKey4,
    ServiceValue, SourceRange4,
};

use super::{diff::diff, ids::Ids};
use crate::frontend::{Endpoint, Frontend, FrontendSpec, Protocol, Scheduler};

/// The contents of the service, backend, reverse-NAT and source-range maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey4, ServiceValue>,
    pub backends: BTreeMap<u32, Backend4>,
    pub revnat: BTreeMap<u32, RevNat4>,
    /// loadBalancerSourceRanges entries: (LPM prefix length, data).
    pub source_ranges: BTreeSet<(u32, SourceRange4)>,
    /// Maglev tables: (frontend, slot) -> backend id.
    pub maglev: BTreeMap<MaglevKey4, u32>,
}

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend4),
    PutRevNat(u32, RevNat4),
    PutSourceRange(u32, SourceRange4),
    PutMaglev(MaglevKey4, u32),
    PutService(ServiceKey4, ServiceValue),
    DelService(ServiceKey4),
    DelSourceRange(u32, SourceRange4),
    DelMaglev(MaglevKey4),
    DelRevNat(u32),
    DelBackend(u32),
}

/// A service that could not be programmed; everything else still is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("{name}: frontend {frontend:?} is already served by {owner}")]
    DuplicateFrontend {
        name: String,
        owner: String,
        frontend: Frontend,
    },
    #[error("{name}: {count} endpoints do not fit the {max} slots of one frontend")]
    TooManyEndpoints {
        name: String,
        count: usize,
        max: usize,
    },
    #[error("{name}: no free {what} id")]
    IdsExhausted { name: String, what: &'static str },
}

/// Most backend slots one frontend can have (slots are numbered by a `u16`).
pub const MAX_SLOTS: usize = u16::MAX as usize;

fn service_key(frontend: &Frontend, slot: u16) -> ServiceKey4 {
    ServiceKey4::new(
        frontend.address,
        frontend.port,
        frontend.protocol.number(),
        slot,
    )
}

/// The map contents that serve `services`. A service that cannot be programmed is
/// left out and reported; the others are unaffected.
pub fn map_state<S: Borrow<FrontendSpec>>(
    services: &[S],
    ids: &mut Ids,
) -> (MapState, Vec<Problem>) {
    let (state, problems, programmed) = build(services, ids);
    ids.users.clear();
    for id in programmed.values().flatten() {
        *ids.users.entry(*id).or_default() += 1;
    }
    ids.programmed = programmed;
    ids.retain(&state);
    (state, problems)
}

/// The map contents of `services` alone, and the backend ids each programmed
/// frontend uses.
fn build<S: Borrow<FrontendSpec>>(
    services: &[S],
    ids: &mut Ids,
) -> (MapState, Vec<Problem>, HashMap<Frontend, Vec<u32>>) {
    let mut state = MapState::default();
    let mut problems = Vec::new();
    let mut programmed = HashMap::new();
    let mut owners: HashMap<Frontend, &str> = HashMap::new();
    let mut ordered: Vec<&FrontendSpec> = services.iter().map(Borrow::borrow).collect();
    // Deterministic ownership of a contested frontend: the first name wins.
    ordered.sort_by(|a, b| a.name.cmp(&b.name));
    for service in ordered {
        let frontend = service.frontend;
        if let Some(owner) = owners.get(&frontend) {
            problems.push(Problem::DuplicateFrontend {
                name: service.name.clone(),
                owner: (*owner).to_string(),
                frontend,
            });
            continue;
        }
        match add_frontend(&mut state, service, ids) {
            Ok(used) => {
                owners.insert(frontend, &service.name);
                programmed.insert(frontend, used);
            }
            Err(problem) => problems.push(problem),
        }
    }
    (state, problems, programmed)
}

/// Adds one frontend's entries to `state`: its reverse-NAT entry, slot 0, a
/// slot and a backend per endpoint, the backends it keeps reachable, its Maglev
/// table and source ranges. Returns the backend ids it uses.
fn add_frontend(
    state: &mut MapState,
    service: &FrontendSpec,
    ids: &mut Ids,
) -> Result<Vec<u32>, Problem> {
    let frontend = service.frontend;
    let mut endpoints = service.endpoints.clone();
    endpoints.sort();
    endpoints.dedup();
    if endpoints.len() > MAX_SLOTS {
        return Err(Problem::TooManyEndpoints {
            name: service.name.clone(),
            count: endpoints.len(),
            max: MAX_SLOTS,
        });
    }
    let exhausted = |what| Problem::IdsExhausted {
        name: service.name.clone(),
        what,
    };
    let rev_nat_id = ids
        .revnat(frontend)
        .ok_or_else(|| exhausted("reverse NAT"))?;
    let slots: Vec<(u32, Endpoint)> = endpoints
        .iter()
        .map(|endpoint| Some((ids.backend(endpoint, frontend.protocol)?, *endpoint)))
        .collect::<Option<_>>()
        .ok_or_else(|| exhausted("backend"))?;
    state.revnat.insert(
        rev_nat_id,
        RevNat4 {
            addr_be: u32::from(frontend.address).to_be(),
            port_be: frontend.port.to_be(),
            _pad: 0,
        },
    );
    let head = slot0(state, service, rev_nat_id, &slots);
    state.services.insert(service_key(&frontend, 0), head);
    let mut used = Vec::with_capacity(slots.len() + service.reachable.len());
    for (slot, (id, endpoint)) in slots.into_iter().enumerate() {
        used.push(id);
        state.services.insert(
            service_key(&frontend, slot as u16 + 1),
            ServiceValue {
                backend_id: id,
                rev_nat_id,
                count: 0,
                flags: 0,
                maglev_size: 0,
                _pad: 0,
            },
        );
        state
            .backends
            .insert(id, backend_value(&endpoint, frontend.protocol));
    }
    // Backends no new connection goes to keep the ones they have: conntrack
    // finds them here.
    for endpoint in &service.reachable {
        if let Some(id) = ids.backend(endpoint, frontend.protocol) {
            state
                .backends
                .entry(id)
                .or_insert_with(|| backend_value(endpoint, frontend.protocol));
            used.push(id);
        }
    }
    used.sort_unstable();
    used.dedup();
    Ok(used)
}

/// A frontend's slot 0 (backend count, flags, affinity timeout, Maglev table
/// size), adding the Maglev table and source ranges its flags refer to.
fn slot0(
    state: &mut MapState,
    service: &FrontendSpec,
    rev_nat_id: u32,
    slots: &[(u32, Endpoint)],
) -> ServiceValue {
    let mut flags = 0;
    if service.local_only {
        flags |= svc_flags::LOCAL_ONLY;
    }
    // Slot 0 names no backend; with affinity its backend_id holds the timeout.
    let mut slot0_value = 0;
    if let Some(timeout) = service.affinity_timeout.filter(|t| *t > 0) {
        flags |= svc_flags::AFFINITY;
        slot0_value = timeout;
    }
    let mut maglev_size = 0;
    match service.scheduler.unwrap_or_default() {
        Scheduler::FlowHash => {}
        Scheduler::SourceHash => flags |= svc_flags::SCHEDULER_SOURCE_HASH,
        Scheduler::RoundRobin => flags |= svc_flags::SCHEDULER_ROUND_ROBIN,
        Scheduler::Maglev if slots.is_empty() => flags |= svc_flags::SCHEDULER_MAGLEV,
        Scheduler::Maglev => {
            flags |= svc_flags::SCHEDULER_MAGLEV;
            maglev_size = maglev_table(state, rev_nat_id, slots);
        }
    }
    if let Some(ranges) = &service.source_ranges {
        // No range at all: the flag alone, which no client matches.
        flags |= svc_flags::SOURCE_RANGES;
        for range in ranges {
            let data = SourceRange4 {
                rev_nat_id_be: rev_nat_id.to_be(),
                addr_be: u32::from(range.address).to_be(),
            };
            state
                .source_ranges
                .insert((SourceRange4::prefix_len(range.prefix), data));
        }
    }
    ServiceValue {
        backend_id: slot0_value,
        rev_nat_id,
        count: slots.len() as u16,
        flags,
        maglev_size,
        _pad: 0,
    }
}

/// Adds a frontend's Maglev table over its slots' backends; returns the
/// table's size index (what slot 0 carries).
fn maglev_table(state: &mut MapState, rev_nat_id: u32, slots: &[(u32, Endpoint)]) -> u16 {
    let size = super::maglev::table_size(slots.len());
    let keys: Vec<u64> = slots.iter().map(|(id, _)| u64::from(*id)).collect();
    for (index, owner) in super::maglev::build(&keys, size).into_iter().enumerate() {
        let key = MaglevKey4 {
            rev_nat_id,
            index: index as u32,
        };
        state.maglev.insert(key, slots[owner as usize].0);
    }
    proxy_common::maglev::SIZES
        .iter()
        .position(|s| *s == size)
        .unwrap_or(0) as u16
}

/// The writes that change only some frontends, in the order [`diff`] gives:
/// `services` is what those frontends (and new ones) serve now, `gone` the
/// frontends no longer served; every other frontend stays as `applied` holds
/// it and is not looked at, so the cost follows the change, not the number of
/// Services. `applied` and `ids` are updated as if the writes succeeded. The
/// caller makes sure no frontend in `services` belongs to a Service outside
/// them (contested frontends need [`map_state`], which sees every claimant).
pub fn update(
    services: &[&FrontendSpec],
    gone: &[Frontend],
    applied: &mut MapState,
    ids: &mut Ids,
) -> (Vec<MapOp>, Vec<Problem>) {
    let scope: BTreeSet<Frontend> = services
        .iter()
        .map(|s| s.frontend)
        .chain(gone.iter().copied())
        .collect();
    let mut old = take_programmed(&scope, applied, ids);

    let (mut new, problems, programmed) = build(services, ids);
    for (frontend, used) in programmed {
        for id in &used {
            *ids.users.entry(*id).or_default() += 1;
        }
        ids.programmed.insert(frontend, used);
    }
    // Backends other frontends still use stay as they are; backends these
    // frontends share with others are compared with what the maps hold.
    for (&id, &b) in &old.backends {
        if ids.users.get(&id).is_some_and(|u| *u > 0) {
            new.backends.entry(id).or_insert(b);
        }
    }
    for id in new.backends.keys() {
        if let Some(&b) = applied.backends.get(id) {
            old.backends.entry(*id).or_insert(b);
        }
    }
    for id in new.revnat.keys() {
        if let Some(&r) = applied.revnat.get(id) {
            old.revnat.entry(*id).or_insert(r);
        }
    }
    let ops = diff(&new, &old);

    for key in old.services.keys() {
        applied.services.remove(key);
    }
    for key in old.maglev.keys() {
        applied.maglev.remove(key);
    }
    for range in &old.source_ranges {
        applied.source_ranges.remove(range);
    }
    for id in old.revnat.keys() {
        applied.revnat.remove(id);
    }
    for (id, b) in &old.backends {
        applied.backends.remove(id);
        if !new.backends.contains_key(id) {
            ids.forget_backend(*id, b);
        }
    }
    for frontend in &scope {
        if !ids.programmed.contains_key(frontend) {
            ids.forget_revnat(frontend);
        }
    }
    applied.services.extend(new.services);
    applied.maglev.extend(new.maglev);
    applied.source_ranges.extend(new.source_ranges);
    applied.revnat.extend(new.revnat);
    applied.backends.extend(new.backends);
    (ops, problems)
}

/// What `applied` holds for the frontends in `scope` (their slots, reverse-NAT
/// entries, Maglev tables, source ranges and backends), with their backend ids
/// released in `ids` until they are programmed again.
fn take_programmed(scope: &BTreeSet<Frontend>, applied: &MapState, ids: &mut Ids) -> MapState {
    let mut old = MapState::default();
    for frontend in scope {
        if let Some(&head) = applied.services.get(&service_key(frontend, 0)) {
            for slot in 0..=head.count {
                let key = service_key(frontend, slot);
                if let Some(&value) = applied.services.get(&key) {
                    old.services.insert(key, value);
                }
            }
            let rev = head.rev_nat_id;
            if let Some(&r) = applied.revnat.get(&rev) {
                old.revnat.insert(rev, r);
            }
            let table = MaglevKey4 {
                rev_nat_id: rev,
                index: 0,
            }..=MaglevKey4 {
                rev_nat_id: rev,
                index: u32::MAX,
            };
            old.maglev
                .extend(applied.maglev.range(table).map(|(k, v)| (*k, *v)));
            old.source_ranges.extend(
                applied
                    .source_ranges
                    .iter()
                    .filter(|(_, d)| u32::from_be(d.rev_nat_id_be) == rev),
            );
        }
        for id in ids.programmed.remove(frontend).unwrap_or_default() {
            if let Some(&b) = applied.backends.get(&id) {
                old.backends.insert(id, b);
            }
            if let Some(users) = ids.users.get_mut(&id) {
                *users = users.saturating_sub(1);
            }
        }
    }
    old
}

fn backend_value(endpoint: &Endpoint, protocol: Protocol) -> Backend4 {
    Backend4 {
        addr_be: u32::from(endpoint.address).to_be(),
        port_be: endpoint.port.to_be(),
        proto: protocol.number(),
        state: if endpoint.terminating {
            backend_state::TERMINATING
        } else {
            backend_state::ACTIVE
        },
        flags: if endpoint.local {
            backend_flags::LOCAL
        } else {
            0
        },
        _pad: [0; 3],
    }
}

impl MapState {
    /// (frontend, backend) pairs new connections may go to: what affinity entries
    /// may still name.
    pub fn slot_pairs(&self) -> HashSet<(u32, u32)> {
        self.services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .map(|(_, v)| (v.rev_nat_id, v.backend_id))
            .collect()
    }
}

#[cfg(test)]
mod tests;
