//! Pure translation from services to map contents, and from (desired, actual)
//! map contents to an ordered list of writes. Only `dataplane` touches the kernel.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use proxy_common::{
    backend_flags, backend_state, capacity, svc_flags, Backend4, MaglevKey4, RevNat4, ServiceKey4,
    ServiceValue, SourceRange4,
};

use crate::model::{Endpoint, Frontend, Protocol, Scheduler, Service};

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

/// Allocates the ids that map entries refer to. Ids are handed out from a moving
/// cursor, so an id that was just released is not reused until the whole space
/// has gone round: a conntrack entry naming an old backend id never silently
/// points at a new backend.
#[derive(Debug, Default)]
pub struct Ids {
    /// By address, port and protocol: a backend keeps its id while it changes
    /// from ready to terminating, so conntrack entries naming it stay valid.
    backends: HashMap<(Ipv4Addr, u16, Protocol), u32>,
    /// The ids in `backends`, kept beside it so an allocation is O(1), not a
    /// walk over every backend.
    backend_ids: HashSet<u32>,
    backend_cursor: u32,
    revnat: HashMap<Frontend, u32>,
    revnat_ids: HashSet<u32>,
    revnat_cursor: u32,
    /// The backend ids each programmed frontend uses (its slots and the
    /// backends it keeps reachable), and how many frontends use each id: what
    /// [`update`] needs to change some frontends without looking at the others.
    programmed: HashMap<Frontend, Vec<u32>>,
    users: HashMap<u32, u32>,
}

/// The highest frontend id: ids index the round-robin array, which has
/// `capacity::REVNAT` slots.
pub const MAX_FRONTEND_ID: u32 = capacity::REVNAT - 1;

fn protocol_of(number: u8) -> Option<Protocol> {
    match number {
        proxy_common::proto::TCP => Some(Protocol::Tcp),
        proxy_common::proto::UDP => Some(Protocol::Udp),
        _ => None,
    }
}

impl Ids {
    /// Recovers the ids in use from maps an earlier agent filled.
    pub fn from_state(state: &MapState) -> Self {
        let mut ids = Self::default();
        for (&id, b) in &state.backends {
            if let Some(protocol) = protocol_of(b.proto) {
                let key = (
                    u32::from_be(b.addr_be).into(),
                    u16::from_be(b.port_be),
                    protocol,
                );
                ids.backends.insert(key, id);
                ids.backend_ids.insert(id);
                ids.backend_cursor = ids.backend_cursor.max(id);
            }
        }
        for (key, value) in &state.services {
            if key.slot != 0 {
                continue;
            }
            if let Some(protocol) = protocol_of(key.proto) {
                let frontend = Frontend {
                    address: u32::from_be(key.addr_be).into(),
                    port: u16::from_be(key.port_be),
                    protocol,
                };
                ids.revnat.insert(frontend, value.rev_nat_id);
                ids.revnat_ids.insert(value.rev_nat_id);
                ids.revnat_cursor = ids.revnat_cursor.max(value.rev_nat_id);
            }
        }
        ids
    }

    fn backend(&mut self, endpoint: &Endpoint, protocol: Protocol) -> Option<u32> {
        let key = (endpoint.address, endpoint.port, protocol);
        if let Some(&id) = self.backends.get(&key) {
            return Some(id);
        }
        let used = &self.backend_ids;
        let id = next_free(&mut self.backend_cursor, u32::MAX, |id| used.contains(&id))?;
        self.backends.insert(key, id);
        self.backend_ids.insert(id);
        Some(id)
    }

    fn revnat(&mut self, frontend: Frontend) -> Option<u32> {
        if let Some(&id) = self.revnat.get(&frontend) {
            return Some(id);
        }
        let used = &self.revnat_ids;
        let id = next_free(&mut self.revnat_cursor, MAX_FRONTEND_ID, |id| {
            used.contains(&id)
        })?;
        self.revnat.insert(frontend, id);
        self.revnat_ids.insert(id);
        Some(id)
    }

    /// Forgets a backend no frontend uses any more.
    fn forget_backend(&mut self, id: u32, value: &Backend4) {
        self.users.remove(&id);
        let Some(protocol) = protocol_of(value.proto) else {
            return;
        };
        let key = (
            u32::from_be(value.addr_be).into(),
            u16::from_be(value.port_be),
            protocol,
        );
        if self.backends.get(&key) == Some(&id) {
            self.backends.remove(&key);
            self.backend_ids.remove(&id);
        }
    }

    /// Forgets the reverse-NAT id of a frontend no longer served.
    fn forget_revnat(&mut self, frontend: &Frontend) {
        if let Some(id) = self.revnat.remove(frontend) {
            self.revnat_ids.remove(&id);
        }
    }

    /// Forgets ids that `state` no longer uses.
    fn retain(&mut self, state: &MapState) {
        self.backends
            .retain(|_, id| state.backends.contains_key(id));
        self.backend_ids
            .retain(|id| state.backends.contains_key(id));
        self.revnat.retain(|_, id| state.revnat.contains_key(id));
        self.revnat_ids.retain(|id| state.revnat.contains_key(id));
    }
}

/// The next id after `cursor` (wrapping, skipping 0) that is not in use.
fn next_free<T>(cursor: &mut T, max: T, used: impl Fn(T) -> bool) -> Option<T>
where
    T: Copy + PartialEq + From<u8> + std::ops::Add<Output = T>,
{
    let (zero, one) = (T::from(0), T::from(1));
    let start = *cursor;
    loop {
        *cursor = if *cursor == max { one } else { *cursor + one };
        if *cursor != zero && !used(*cursor) {
            return Some(*cursor);
        }
        if *cursor == start {
            return None;
        }
    }
}

/// Most backend slots one frontend can have (slots are numbered by a `u16`).
pub const MAX_SLOTS: usize = u16::MAX as usize;

fn service_key(frontend: &Frontend, slot: u16) -> ServiceKey4 {
    ServiceKey4 {
        addr_be: u32::from(frontend.address).to_be(),
        port_be: frontend.port.to_be(),
        proto: frontend.protocol.number(),
        scope: 0,
        slot,
        _pad: 0,
    }
}

/// The map contents that serve `services`. A service that cannot be programmed is
/// left out and reported; the others are unaffected.
pub fn desired<S: Borrow<Service>>(services: &[S], ids: &mut Ids) -> (MapState, Vec<Problem>) {
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
fn build<S: Borrow<Service>>(
    services: &[S],
    ids: &mut Ids,
) -> (MapState, Vec<Problem>, HashMap<Frontend, Vec<u32>>) {
    let mut state = MapState::default();
    let mut problems = Vec::new();
    let mut programmed = HashMap::new();
    let mut owners: HashMap<Frontend, &str> = HashMap::new();
    let mut ordered: Vec<&Service> = services.iter().map(Borrow::borrow).collect();
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
        let mut endpoints = service.endpoints.clone();
        endpoints.sort();
        endpoints.dedup();
        if endpoints.len() > MAX_SLOTS {
            problems.push(Problem::TooManyEndpoints {
                name: service.name.clone(),
                count: endpoints.len(),
                max: MAX_SLOTS,
            });
            continue;
        }
        let Some(rev_nat_id) = ids.revnat(frontend) else {
            problems.push(Problem::IdsExhausted {
                name: service.name.clone(),
                what: "reverse NAT",
            });
            continue;
        };
        let mut used = Vec::with_capacity(endpoints.len() + service.reachable.len());
        let mut slots = Vec::with_capacity(endpoints.len());
        for endpoint in &endpoints {
            let Some(id) = ids.backend(endpoint, frontend.protocol) else {
                problems.push(Problem::IdsExhausted {
                    name: service.name.clone(),
                    what: "backend",
                });
                break;
            };
            slots.push((id, *endpoint));
        }
        if slots.len() != endpoints.len() {
            continue;
        }
        owners.insert(frontend, &service.name);
        state.revnat.insert(
            rev_nat_id,
            RevNat4 {
                addr_be: u32::from(frontend.address).to_be(),
                port_be: frontend.port.to_be(),
                _pad: 0,
            },
        );
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
                let size = crate::maglev::table_size(slots.len());
                maglev_size = proxy_common::maglev::SIZES
                    .iter()
                    .position(|s| *s == size)
                    .unwrap_or(0) as u16;
                let keys: Vec<u64> = slots.iter().map(|(id, _)| u64::from(*id)).collect();
                for (index, owner) in crate::maglev::build(&keys, size).into_iter().enumerate() {
                    let key = MaglevKey4 {
                        rev_nat_id,
                        index: index as u32,
                    };
                    state.maglev.insert(key, slots[owner as usize].0);
                }
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
        state.services.insert(
            service_key(&frontend, 0),
            ServiceValue {
                backend_id: slot0_value,
                rev_nat_id,
                count: slots.len() as u16,
                flags,
                maglev_size,
                _pad: 0,
            },
        );
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
        programmed.insert(frontend, used);
    }
    (state, problems, programmed)
}

/// The writes that change only some frontends, in the order [`diff`] gives:
/// `services` is what those frontends (and new ones) serve now, `gone` the
/// frontends no longer served; every other frontend stays as `applied` holds
/// it and is not looked at, so the cost follows the change, not the number of
/// Services. `applied` and `ids` are updated as if the writes succeeded. The
/// caller makes sure no frontend in `services` belongs to a Service outside
/// them (contested frontends need [`desired`], which sees every claimant).
pub fn update(
    services: &[&Service],
    gone: &[Frontend],
    applied: &mut MapState,
    ids: &mut Ids,
) -> (Vec<MapOp>, Vec<Problem>) {
    let scope: BTreeSet<Frontend> = services
        .iter()
        .map(|s| s.frontend)
        .chain(gone.iter().copied())
        .collect();
    let mut old = MapState::default();
    for frontend in &scope {
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

/// The writes that turn `actual` into `desired`, make before break: backends and
/// reverse-NAT entries first, then backend slots, then each service's slot 0
/// (which makes new slots reachable); removals afterwards in the reverse order,
/// so no packet ever finds a slot or backend that is not there.
pub fn diff(desired: &MapState, actual: &MapState) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for (&id, b) in &desired.backends {
        if actual.backends.get(&id) != Some(b) {
            ops.push(MapOp::PutBackend(id, *b));
        }
    }
    for (&id, r) in &desired.revnat {
        if actual.revnat.get(&id) != Some(r) {
            ops.push(MapOp::PutRevNat(id, *r));
        }
    }
    // Source ranges before the flag that enforces them, so a new LoadBalancer
    // frontend never drops its allowed clients.
    for range in desired.source_ranges.difference(&actual.source_ranges) {
        ops.push(MapOp::PutSourceRange(range.0, range.1));
    }
    for (k, v) in &desired.maglev {
        if actual.maglev.get(k) != Some(v) {
            ops.push(MapOp::PutMaglev(*k, *v));
        }
    }
    for pass_slot0 in [false, true] {
        for (k, v) in &desired.services {
            if (k.slot == 0) == pass_slot0 && actual.services.get(k) != Some(v) {
                ops.push(MapOp::PutService(*k, *v));
            }
        }
    }
    for pass_slot0 in [true, false] {
        for k in actual.services.keys() {
            if (k.slot == 0) == pass_slot0 && !desired.services.contains_key(k) {
                ops.push(MapOp::DelService(*k));
            }
        }
    }
    for k in actual.maglev.keys() {
        if !desired.maglev.contains_key(k) {
            ops.push(MapOp::DelMaglev(*k));
        }
    }
    for range in actual.source_ranges.difference(&desired.source_ranges) {
        ops.push(MapOp::DelSourceRange(range.0, range.1));
    }
    for &id in actual.revnat.keys() {
        if !desired.revnat.contains_key(&id) {
            ops.push(MapOp::DelRevNat(id));
        }
    }
    for &id in actual.backends.keys() {
        if !desired.backends.contains_key(&id) {
            ops.push(MapOp::DelBackend(id));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, vip: [u8; 4], port: u16, endpoints: &[([u8; 4], u16)]) -> Service {
        let frontend = Frontend {
            address: vip.into(),
            port,
            protocol: Protocol::Tcp,
        };
        let endpoints = endpoints
            .iter()
            .map(|(a, p)| Endpoint::new((*a).into(), *p))
            .collect();
        Service::new(name, frontend, endpoints)
    }

    /// What the maps hold after `ops`, as the dataplane would write them.
    fn applied_after(mut state: MapState, ops: &[MapOp]) -> MapState {
        for op in ops {
            match *op {
                MapOp::PutBackend(id, b) => drop(state.backends.insert(id, b)),
                MapOp::PutRevNat(id, r) => drop(state.revnat.insert(id, r)),
                MapOp::PutSourceRange(p, d) => drop(state.source_ranges.insert((p, d))),
                MapOp::PutMaglev(k, v) => drop(state.maglev.insert(k, v)),
                MapOp::PutService(k, v) => drop(state.services.insert(k, v)),
                MapOp::DelService(k) => drop(state.services.remove(&k)),
                MapOp::DelSourceRange(p, d) => drop(state.source_ranges.remove(&(p, d))),
                MapOp::DelMaglev(k) => drop(state.maglev.remove(&k)),
                MapOp::DelRevNat(id) => drop(state.revnat.remove(&id)),
                MapOp::DelBackend(id) => drop(state.backends.remove(&id)),
            }
        }
        state
    }

    #[test]
    fn update_of_some_frontends_ends_where_a_full_recompute_does() {
        let shared = ([10, 0, 0, 9], 80);
        let a = svc("a", [10, 96, 0, 1], 80, &[shared, ([10, 0, 0, 1], 80)]);
        let b = svc("b", [10, 96, 0, 2], 80, &[shared, ([10, 0, 0, 2], 80)]);
        let mut c = svc("c", [10, 96, 0, 3], 53, &[([10, 0, 0, 3], 53)]);
        c.scheduler = Some(Scheduler::Maglev);
        let mut ids = Ids::default();
        let (before, _) = desired(&[&a, &b, &c], &mut ids);

        // b drops the backend it shares with a and gains one; c goes; d comes.
        let b2 = svc(
            "b",
            [10, 96, 0, 2],
            80,
            &[([10, 0, 0, 2], 80), ([10, 0, 0, 4], 80)],
        );
        let d = svc("d", [10, 96, 0, 4], 80, &[([10, 0, 0, 5], 80)]);
        let mut applied = before.clone();
        let (ops, problems) = update(&[&b2, &d], &[c.frontend], &mut applied, &mut ids);
        assert!(problems.is_empty());
        // The writes turn the old maps into the new ones...
        assert_eq!(applied_after(before, &ops), applied);
        // ...which are what a full recompute gives, a's shared backend kept.
        let (full, _) = desired(&[&a, &b2, &d], &mut ids);
        assert_eq!(applied, full);
        assert!(!ops.iter().any(
            |op| matches!(op, MapOp::PutService(k, _) | MapOp::DelService(k)
            if u32::from_be(k.addr_be) == u32::from_be_bytes([10, 96, 0, 1]))
        ));
        assert!(applied.maglev.is_empty());
    }

    #[test]
    fn update_forgets_the_ids_of_what_went() {
        let a = svc("a", [10, 96, 0, 1], 80, &[([10, 0, 0, 1], 80)]);
        let mut ids = Ids::default();
        let (mut applied, _) = desired(&[&a], &mut ids);
        let (ops, _) = update(&[], &[a.frontend], &mut applied, &mut ids);
        assert_eq!(applied, MapState::default());
        assert!(ops.iter().any(|op| matches!(op, MapOp::DelBackend(_))));
        assert!(ids.backends.is_empty() && ids.revnat.is_empty() && ids.users.is_empty());
    }

    fn position(ops: &[MapOp], wanted: impl Fn(&MapOp) -> bool) -> usize {
        ops.iter().position(wanted).expect("op present")
    }

    #[test]
    fn slots_follow_sorted_unique_endpoints() {
        let mut ids = Ids::default();
        let s = svc(
            "a",
            [10, 96, 0, 1],
            80,
            &[
                ([10, 0, 0, 3], 80),
                ([10, 0, 0, 2], 80),
                ([10, 0, 0, 3], 80),
            ],
        );
        let (state, problems) = desired(std::slice::from_ref(&s), &mut ids);
        assert!(problems.is_empty());
        assert_eq!(state.services[&service_key(&s.frontend, 0)].count, 2);
        let slot1 = state.services[&service_key(&s.frontend, 1)].backend_id;
        assert_eq!(
            state.backends[&slot1].addr_be,
            u32::from_be_bytes([10, 0, 0, 2]).to_be()
        );
        assert_eq!(state.revnat.len(), 1);
    }

    #[test]
    fn diff_makes_before_it_breaks() {
        let mut ids = Ids::default();
        let old = svc(
            "a",
            [10, 96, 0, 1],
            80,
            &[([10, 0, 0, 2], 80), ([10, 0, 0, 3], 80)],
        );
        let (actual, _) = desired(&[old], &mut ids);
        let new = svc("a", [10, 96, 0, 1], 80, &[([10, 0, 0, 4], 80)]);
        let (wanted, _) = desired(std::slice::from_ref(&new), &mut ids);
        let ops = diff(&wanted, &actual);
        let put_backend = position(&ops, |op| matches!(op, MapOp::PutBackend(..)));
        let put_slot1 = position(
            &ops,
            |op| matches!(op, MapOp::PutService(k, _) if k.slot == 1),
        );
        let put_slot0 = position(
            &ops,
            |op| matches!(op, MapOp::PutService(k, _) if k.slot == 0),
        );
        let del_slot2 = position(&ops, |op| matches!(op, MapOp::DelService(k) if k.slot == 2));
        let del_backend = position(&ops, |op| matches!(op, MapOp::DelBackend(..)));
        assert!(put_backend < put_slot1 && put_slot1 < put_slot0, "{ops:?}");
        assert!(put_slot0 < del_slot2 && del_slot2 < del_backend, "{ops:?}");
        assert!(diff(&wanted, &wanted).is_empty());
    }

    #[test]
    fn removed_service_goes_slot0_first_then_slots_then_ids() {
        let mut ids = Ids::default();
        let (actual, _) = desired(
            &[svc("a", [10, 96, 0, 1], 80, &[([10, 0, 0, 2], 80)])],
            &mut ids,
        );
        let (wanted, _) = desired::<Service>(&[], &mut ids);
        let ops = diff(&wanted, &actual);
        assert!(
            matches!(ops[0], MapOp::DelService(k) if k.slot == 0),
            "{ops:?}"
        );
        assert!(
            matches!(ops[1], MapOp::DelService(k) if k.slot == 1),
            "{ops:?}"
        );
        assert!(matches!(ops[2], MapOp::DelRevNat(_)));
        assert!(matches!(ops[3], MapOp::DelBackend(_)));
    }

    #[test]
    fn ids_are_stable_and_not_reused_at_once() {
        let mut ids = Ids::default();
        let a = ([10, 0, 0, 2], 80);
        let b = ([10, 0, 0, 3], 80);
        let (first, _) = desired(&[svc("s", [10, 96, 0, 1], 80, &[a, b])], &mut ids);
        let (second, _) = desired(&[svc("s", [10, 96, 0, 1], 80, &[b])], &mut ids);
        let id_b = |s: &MapState| {
            *s.backends
                .iter()
                .find(|(_, v)| v.addr_be == u32::from_be_bytes(b.0).to_be())
                .unwrap()
                .0
        };
        assert_eq!(id_b(&first), id_b(&second));
        let (third, _) = desired(
            &[svc("s", [10, 96, 0, 1], 80, &[b, ([10, 0, 0, 9], 80)])],
            &mut ids,
        );
        let new_id = third
            .backends
            .keys()
            .copied()
            .find(|id| *id != id_b(&third))
            .unwrap();
        assert!(
            !first.backends.contains_key(&new_id),
            "a released id came back at once"
        );
    }

    #[test]
    fn ids_are_recovered_from_maps() {
        let mut ids = Ids::default();
        let services = [svc("s", [10, 96, 0, 1], 80, &[([10, 0, 0, 2], 80)])];
        let (state, _) = desired(&services, &mut ids);
        let mut recovered = Ids::from_state(&state);
        let (again, _) = desired(&services, &mut recovered);
        assert_eq!(again, state);
        assert!(diff(&again, &state).is_empty());
    }

    #[test]
    fn duplicate_frontend_is_reported_and_the_rest_served() {
        let mut ids = Ids::default();
        let (state, problems) = desired(
            &[
                svc("b", [10, 96, 0, 1], 80, &[([10, 0, 0, 3], 80)]),
                svc("a", [10, 96, 0, 1], 80, &[([10, 0, 0, 2], 80)]),
                svc("c", [10, 96, 0, 2], 80, &[([10, 0, 0, 4], 80)]),
            ],
            &mut ids,
        );
        assert_eq!(problems.len(), 1);
        assert!(
            matches!(&problems[0], Problem::DuplicateFrontend { name, owner, .. } if name == "b" && owner == "a")
        );
        assert_eq!(state.revnat.len(), 2);
        assert_eq!(state.backends.len(), 2);
    }

    #[test]
    fn source_ranges_with_no_range_set_the_flag_that_no_client_matches() {
        let mut ids = Ids::default();
        let mut s = svc("lb", [192, 0, 2, 10], 80, &[([10, 0, 0, 2], 80)]);
        s.source_ranges = Some(Vec::new());
        let (state, _) = desired(std::slice::from_ref(&s), &mut ids);
        let slot0 = state.services[&service_key(&s.frontend, 0)];
        assert_eq!(
            slot0.flags & svc_flags::SOURCE_RANGES,
            svc_flags::SOURCE_RANGES
        );
        assert!(state.source_ranges.is_empty());
    }

    #[test]
    fn local_backends_policy_and_source_ranges_reach_the_maps() {
        let mut ids = Ids::default();
        let mut s = svc("lb", [192, 0, 2, 10], 80, &[([10, 0, 0, 2], 80)]);
        s.endpoints[0].local = true;
        s.local_only = true;
        s.source_ranges = Some(vec!["198.51.100.7/24".parse().unwrap()]);
        let (state, _) = desired(std::slice::from_ref(&s), &mut ids);
        let slot0 = state.services[&service_key(&s.frontend, 0)];
        assert_eq!(
            slot0.flags,
            svc_flags::LOCAL_ONLY | svc_flags::SOURCE_RANGES
        );
        let backend = state.backends.values().next().unwrap();
        assert_eq!(backend.flags, backend_flags::LOCAL);
        let range = SourceRange4 {
            rev_nat_id_be: slot0.rev_nat_id.to_be(),
            addr_be: u32::from_be_bytes([198, 51, 100, 0]).to_be(),
        };
        assert_eq!(state.source_ranges, BTreeSet::from([(56, range)]));
        // The ranges go in before the frontend that enforces them, and out after.
        let ops = diff(&state, &MapState::default());
        let put_range = position(&ops, |op| matches!(op, MapOp::PutSourceRange(..)));
        let put_slot0 = position(
            &ops,
            |op| matches!(op, MapOp::PutService(k, _) if k.slot == 0),
        );
        assert!(put_range < put_slot0, "{ops:?}");
        let ops = diff(&MapState::default(), &state);
        let del_range = position(&ops, |op| matches!(op, MapOp::DelSourceRange(..)));
        let del_slot0 = position(&ops, |op| matches!(op, MapOp::DelService(k) if k.slot == 0));
        assert!(del_slot0 < del_range, "{ops:?}");
    }

    #[test]
    fn next_free_wraps_and_skips_zero_and_used() {
        let mut cursor: u16 = u16::MAX - 1;
        assert_eq!(
            next_free(&mut cursor, u16::MAX, |id| id == u16::MAX),
            Some(1)
        );
        let mut full: u16 = 5;
        assert_eq!(next_free(&mut full, 8, |_| true), None);
    }

    /// `n` frontends without endpoints, on consecutive addresses from `first`.
    fn frontends(first: u32, n: u32) -> Vec<Service> {
        (first..first + n)
            .map(|i| {
                let vip = u32::from_be_bytes([10, 96, 0, 0]) + i;
                svc(&format!("s{i}"), vip.to_be_bytes(), 80, &[])
            })
            .collect()
    }

    #[test]
    fn frontend_ids_go_past_16_bits() {
        let mut ids = Ids::default();
        let (state, problems) = desired(&frontends(0, 70_000), &mut ids);
        assert!(problems.is_empty(), "{:?}", &problems[..1]);
        assert_eq!(state.revnat.len(), 70_000, "one id per frontend");
        let slot0_ids: HashSet<u32> = state.services.values().map(|v| v.rev_nat_id).collect();
        assert_eq!(slot0_ids.len(), 70_000, "no two frontends share an id");
        let highest = *state.revnat.keys().last().unwrap();
        assert!(highest > 65_536, "highest id {highest}");
        // Handed out from the cursor, not by a walk over the ids in use: a
        // second batch continues where the first stopped.
        let mut more = frontends(0, 70_000);
        more.extend(frontends(70_000, 10));
        let (state, _) = desired(&more, &mut ids);
        assert_eq!(
            state.revnat.keys().last().copied(),
            Some(highest + 10),
            "the new frontends follow the highest id"
        );
    }

    #[test]
    fn frontend_ids_stay_inside_the_round_robin_array() {
        // An earlier agent left a frontend at the highest id: the next one wraps
        // round to 1, never past the array the ids index.
        let mut ids = Ids::default();
        let (mut filled, _) = desired(&frontends(0, 1), &mut ids);
        let (key, mut value) = filled.services.pop_first().unwrap();
        value.rev_nat_id = MAX_FRONTEND_ID;
        filled.services.insert(key, value);
        let mut ids = Ids::from_state(&filled);
        let (state, problems) = desired(&frontends(0, 3), &mut ids);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            state.revnat.keys().copied().collect::<Vec<_>>(),
            [1, 2, MAX_FRONTEND_ID]
        );
    }

    #[test]
    fn source_ranges_match_the_whole_wide_id_then_the_address_prefix() {
        let mut ids = Ids::default();
        let mut services = frontends(0, 65_536);
        // Last by name, so its id comes after the 65536 others.
        let mut wide = svc("~wide", [192, 0, 2, 10], 80, &[]);
        wide.source_ranges = Some(vec![
            "198.51.100.0/24".parse().unwrap(),
            "0.0.0.0/0".parse().unwrap(),
        ]);
        services.push(wide.clone());
        let (state, _) = desired(&services, &mut ids);
        let id = state.services[&service_key(&wide.frontend, 0)].rev_nat_id;
        assert_eq!(id, 65_537);
        let key = |addr: [u8; 4]| SourceRange4 {
            rev_nat_id_be: id.to_be(),
            addr_be: u32::from_be_bytes(addr).to_be(),
        };
        assert_eq!(
            state.source_ranges,
            BTreeSet::from([(32 + 24, key([198, 51, 100, 0])), (32, key([0, 0, 0, 0]))])
        );
        // Big endian, the id's high half leads the key: where id 65537 differs
        // from id 1, which a 16-bit id would have made of it.
        assert_eq!(
            key([0, 0, 0, 0]).rev_nat_id_be.to_ne_bytes(),
            [0, 1, 0, 1],
            "network order in the trie"
        );
        assert_eq!(SourceRange4::LOOKUP_PREFIX_LEN, 64);
    }

    #[test]
    fn a_backend_keeps_its_id_when_it_starts_terminating() {
        let mut ids = Ids::default();
        let ready = svc("s", [10, 96, 0, 1], 80, &[([10, 0, 0, 2], 80)]);
        let (before, _) = desired(std::slice::from_ref(&ready), &mut ids);
        let mut terminating = ready.clone();
        terminating.endpoints[0].terminating = true;
        let (after, _) = desired(std::slice::from_ref(&terminating), &mut ids);
        assert_eq!(
            before.backends.keys().collect::<Vec<_>>(),
            after.backends.keys().collect::<Vec<_>>()
        );
        assert_eq!(
            after.backends.values().next().unwrap().state,
            backend_state::TERMINATING
        );
        // Kept only for its connections: a backend entry, no slot.
        let mut kept = ready.clone();
        kept.reachable = std::mem::take(&mut kept.endpoints);
        let (only_kept, _) = desired(std::slice::from_ref(&kept), &mut ids);
        assert_eq!(
            only_kept.backends.keys().collect::<Vec<_>>(),
            before.backends.keys().collect::<Vec<_>>()
        );
        assert_eq!(only_kept.services.len(), 1, "slot 0 only");
    }

    #[test]
    fn maglev_tables_fill_their_frontend_and_go_in_before_slot_0() {
        let mut ids = Ids::default();
        let backends: Vec<([u8; 4], u16)> = (2..12).map(|i| ([10, 0, 0, i], 80)).collect();
        let mut s = svc("m", [10, 96, 0, 1], 80, &backends);
        s.scheduler = Some(Scheduler::Maglev);
        let (state, _) = desired(std::slice::from_ref(&s), &mut ids);
        let slot0 = state.services[&service_key(&s.frontend, 0)];
        assert_eq!(
            slot0.flags & svc_flags::SCHEDULER_MASK,
            svc_flags::SCHEDULER_MAGLEV
        );
        let size = proxy_common::maglev::SIZES[usize::from(slot0.maglev_size)];
        assert_eq!(size, 1_021, "100 slots for each of 10 backends");
        assert_eq!(state.maglev.len(), size as usize);
        assert!(state
            .maglev
            .values()
            .all(|id| state.backends.contains_key(id)));
        let ops = diff(&state, &MapState::default());
        let maglev = position(&ops, |op| matches!(op, MapOp::PutMaglev(..)));
        let slot0_put = position(
            &ops,
            |op| matches!(op, MapOp::PutService(k, _) if k.slot == 0),
        );
        assert!(maglev < slot0_put);
        // One backend fewer: about a tenth of the table changes.
        let mut fewer = s.clone();
        fewer.endpoints.pop();
        let (after, _) = desired(std::slice::from_ref(&fewer), &mut ids);
        let changed = diff(&after, &state)
            .iter()
            .filter(|op| matches!(op, MapOp::PutMaglev(..)))
            .count();
        assert!(
            changed < size as usize / 6,
            "{changed} of {size} slots changed"
        );
    }
}
