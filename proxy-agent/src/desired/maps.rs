//! From frontends to the contents of the service, backend, reverse-NAT,
//! source-range and Maglev maps: whole ([`map_state`]) or for the frontends a
//! change touched ([`update`]). Pure: `kernel/` writes what [`super::diff`] orders.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
};

use foldhash::{HashMap, HashMapExt};
use proxy_common::{backend_flags, backend_state, svc_flags, MaglevKey, ServiceValue};

pub use super::entries::{Backend, RevNat, ServiceKey, SourceRange};
use super::{diff::diff, ids::Ids};
use crate::frontend::{Endpoint, Frontend, FrontendSpec, Protocol, Scheduler};

/// The contents of the service, backend, reverse-NAT and source-range maps,
/// of both address families: an entry goes into its family's map. Ids are
/// one space over both, and each capacity is checked against the entries of
/// both together (each family's map has that many entries).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub revnat: BTreeMap<u32, RevNat>,
    /// loadBalancerSourceRanges entries.
    pub source_ranges: BTreeSet<SourceRange>,
    /// Maglev tables: (frontend, slot) -> backend id.
    pub maglev: BTreeMap<MaglevKey, u32>,
}

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend),
    PutRevNat(u32, RevNat),
    PutSourceRange(SourceRange),
    PutMaglev(MaglevKey, u32),
    PutService(ServiceKey, ServiceValue),
    DelService(ServiceKey),
    DelSourceRange(SourceRange),
    DelMaglev(MaglevKey),
    DelRevNat(u32),
    DelBackend(u32),
}

/// The kernel map a put goes to, for the puts a round writes in runs: one
/// run of consecutive puts into one map can be one system call
/// (`BPF_MAP_UPDATE_BATCH`). Source ranges (an LPM trie, which has no batch
/// operations) and removals are written one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutTarget {
    Services { v4: bool },
    Backends { v4: bool },
    RevNat { v4: bool },
    Maglev,
}

impl MapOp {
    /// Where this write goes, if it is a put written in runs.
    pub fn put_target(&self) -> Option<PutTarget> {
        match self {
            Self::PutService(k, _) => Some(PutTarget::Services {
                v4: k.addr.is_ipv4(),
            }),
            Self::PutBackend(_, b) => Some(PutTarget::Backends {
                v4: b.addr.is_ipv4(),
            }),
            Self::PutRevNat(_, r) => Some(PutTarget::RevNat {
                v4: r.addr.is_ipv4(),
            }),
            Self::PutMaglev(..) => Some(PutTarget::Maglev),
            _ => None,
        }
    }
}

/// A service that could not be programmed; everything else still is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("{name}: frontend {frontend} is already served by {owner}")]
    DuplicateFrontend {
        name: String,
        owner: String,
        frontend: Frontend,
    },
    #[error("{name}: {count} endpoints do not fit the {max} slots of one frontend")]
    TooManyEndpoints {
        name: String,
        frontend: Frontend,
        count: usize,
        max: usize,
    },
    #[error("{name}: no free {what} id")]
    IdsExhausted {
        name: String,
        frontend: Frontend,
        what: &'static str,
    },
    #[error(
        "{name}: frontend {frontend} not programmed: the {map} map is full ({capacity} entries)"
    )]
    MapFull {
        name: String,
        frontend: Frontend,
        map: &'static str,
        capacity: usize,
    },
    #[error("{name}: the change to frontend {frontend} does not fit the {map} map ({capacity} entries); it is served as it was")]
    ChangeRefused {
        name: String,
        frontend: Frontend,
        map: &'static str,
        capacity: usize,
    },
}

impl Problem {
    /// The frontend it is about.
    pub fn frontend(&self) -> Frontend {
        match self {
            Self::DuplicateFrontend { frontend, .. }
            | Self::TooManyEndpoints { frontend, .. }
            | Self::IdsExhausted { frontend, .. }
            | Self::MapFull { frontend, .. }
            | Self::ChangeRefused { frontend, .. } => *frontend,
        }
    }

    /// A frontend left out (or left as it was) because a map had no room.
    pub fn map_full(&self) -> bool {
        matches!(self, Self::MapFull { .. } | Self::ChangeRefused { .. })
    }
}

/// How many entries each map the agent programs holds at most (its
/// `max_entries`), or, as `base` below, how many it holds outside a round's scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: usize,
    pub backends: usize,
    pub revnat: usize,
    pub maglev: usize,
    pub source_ranges: usize,
}

impl Default for Capacity {
    /// The sizes the programs declare.
    fn default() -> Self {
        use proxy_common::capacity as c;
        Self {
            services: c::SERVICES as usize,
            backends: c::BACKENDS as usize,
            revnat: c::REVNAT as usize,
            maglev: c::MAGLEV as usize,
            source_ranges: c::SOURCE_RANGES as usize,
        }
    }
}

impl Capacity {
    const NONE: Self = Self {
        services: 0,
        backends: 0,
        revnat: 0,
        maglev: 0,
        source_ranges: 0,
    };
}

/// The room a round programs into: the maps' capacity, what they hold
/// outside the round's frontends, and which backend ids that is.
struct Room<'a> {
    capacity: &'a Capacity,
    base: Capacity,
    in_base: &'a dyn Fn(u32) -> bool,
}

impl Room<'_> {
    /// The first map (name, capacity) that what is `placed` plus `part`
    /// would overflow. A map's capacity counts both families' entries
    /// together; the name is that of `frontend`'s family (Maglev tables hold
    /// ids only, one map for both).
    fn overflow(
        &self,
        placed: &Placed,
        part: &MapState,
        frontend: &Frontend,
    ) -> Option<(&'static str, usize)> {
        use proxy_common::map_names as names;
        let v6 = frontend.address.is_ipv6();
        let of_family = |v4, v6_name| if v6 { v6_name } else { v4 };
        let new_backends = part
            .backends
            .keys()
            .filter(|id| !placed.has_backend(**id) && !(self.in_base)(**id))
            .count();
        let (c, b, held) = (self.capacity, &self.base, placed.held());
        [
            (
                of_family(names::SERVICES_V4, names::SERVICES_V6),
                b.services + held.services + part.services.len(),
                c.services,
            ),
            (
                of_family(names::BACKENDS_V4, names::BACKENDS_V6),
                b.backends + held.backends + new_backends,
                c.backends,
            ),
            (
                of_family(names::REVNAT_V4, names::REVNAT_V6),
                b.revnat + held.revnat + part.revnat.len(),
                c.revnat,
            ),
            (
                names::MAGLEV_V4,
                b.maglev + held.maglev + part.maglev.len(),
                c.maglev,
            ),
            (
                of_family(names::SOURCE_RANGES_V4, names::SOURCE_RANGES_V6),
                b.source_ranges + held.source_ranges + part.source_ranges.len(),
                c.source_ranges,
            ),
        ]
        .into_iter()
        .find(|(_, wanted, max)| wanted > max)
        .map(|(map, _, max)| (map, max))
    }
}

/// Whether `added` entries are few beside the `held` ones: inserted one at a
/// time, they cost less than building the table again.
fn few(added: usize, held: usize) -> bool {
    added < held / 8
}

/// Adds `added` to `map`, each replacing an entry with its key (the last of
/// several wins), building the table again from its sorted entries unless
/// they are [`few`].
fn settle_map<K: Ord, V>(map: &mut BTreeMap<K, V>, added: Vec<(K, V)>) {
    if few(added.len(), map.len()) {
        map.extend(added);
        return;
    }
    // A stable sort (in `collect`) keeps the entries of one key in order.
    *map = std::mem::take(map).into_iter().chain(added).collect();
}

/// A backend two frontends name (one pod in two Services) is active if
/// either has it active, whichever comes first: a later placement's entry
/// replaces the `kept` one unless that one is active.
fn replaces(kept: &Backend) -> bool {
    kept.state != backend_state::ACTIVE
}

fn merge_backend(backends: &mut BTreeMap<u32, Backend>, id: u32, backend: Backend) {
    if backends.get(&id).is_none_or(replaces) {
        backends.insert(id, backend);
    }
}

/// Most backend slots one frontend can have (slots are numbered by a `u16`).
pub const MAX_SLOTS: usize = u16::MAX as usize;

fn service_key(frontend: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey::new(
        frontend.address,
        frontend.port,
        frontend.protocol.number(),
        slot,
    )
}

/// The map contents that serve `services`, in maps of the default capacity,
/// from nothing. A service that cannot be programmed is left out and
/// reported; the others are unaffected.
pub fn map_state<S: Borrow<FrontendSpec>>(
    services: &[S],
    ids: &mut Ids,
) -> (MapState, Vec<Problem>) {
    map_state_in(services, ids, &MapState::default(), &Capacity::default())
}

/// The map contents that serve `services` in maps of `capacity` that hold
/// `applied` now. Frontends already served come first, so a new Service never
/// pushes one out; one that does not fit is left out (or, if served, kept as
/// it was) and reported.
pub fn map_state_in<S: Borrow<FrontendSpec>>(
    services: &[S],
    ids: &mut Ids,
    applied: &MapState,
    capacity: &Capacity,
) -> (MapState, Vec<Problem>) {
    let previous_used = std::mem::take(&mut ids.programmed);
    let room = Room {
        capacity,
        base: Capacity::NONE,
        in_base: &|_| false,
    };
    let (state, problems, programmed) = build(
        services,
        ids,
        (applied, previous_used),
        MapState::default(),
        &room,
    );
    ids.users.clear();
    for id in programmed.values().flatten() {
        *ids.users.entry(*id).or_default() += 1;
    }
    ids.programmed = programmed;
    ids.retain(&state);
    (state, problems)
}

/// The map contents of `services` added to `state`, and the backend ids each
/// programmed frontend uses. `previous` is what the maps hold for these
/// frontends now, with the backend ids each used.
///
/// Room is handed out in three passes: every frontend already served keeps
/// its room as it is; then each one's change takes the place of what it
/// replaces if it fits (else it stays as it was); then new frontends, by
/// name, while they fit. So neither a new Service nor another one's growth
/// ever pushes out one already served.
fn build<S: Borrow<FrontendSpec>>(
    services: &[S],
    ids: &mut Ids,
    previous: (&MapState, HashMap<Frontend, Box<[u32]>>),
    state: MapState,
    room: &Room<'_>,
) -> (MapState, Vec<Problem>, HashMap<Frontend, Box<[u32]>>) {
    let (previous, mut previous_used) = previous;
    let mut problems = Vec::new();
    let mut owners: HashMap<Frontend, &str> = HashMap::new();
    let mut ordered: Vec<&FrontendSpec> = services.iter().map(Borrow::borrow).collect();
    // Deterministic ownership of a contested frontend: the first name wins.
    ordered.sort_by(|a, b| a.name.cmp(&b.name));
    ordered.retain(|service| match owners.get(&service.frontend) {
        Some(owner) => {
            problems.push(Problem::DuplicateFrontend {
                name: service.name.clone(),
                owner: (*owner).to_string(),
                frontend: service.frontend,
            });
            false
        }
        None => {
            owners.insert(service.frontend, &service.name);
            true
        }
    });
    let (served, new): (Vec<&FrontendSpec>, Vec<&FrontendSpec>) = ordered
        .into_iter()
        .partition(|s| previous.services.contains_key(&service_key(&s.frontend, 0)));

    // What `state` starts with is used outside this round: held once.
    let mut placed = Placed {
        refs: state.backends.keys().map(|id| (*id, 1)).collect(),
        state,
        pending: Pending::default(),
        programmed: HashMap::new(),
    };
    let mut kept = HashMap::new();
    for service in &served {
        let used = previous_used.remove(&service.frontend).unwrap_or_default();
        let old = entries_of(&service.frontend, previous, &used);
        let used: Box<[u32]> = old.backends.keys().copied().collect();
        placed.place(service.frontend, old.clone(), used.clone());
        kept.insert(service.frontend, (old, used));
    }
    placed.settle();
    let order = served.iter().map(|s| (*s, true));
    for (service, was_served) in order.chain(new.iter().map(|s| (*s, false))) {
        let frontend = service.frontend;
        let old = was_served.then(|| {
            let (old, used) = kept.remove(&frontend).unwrap_or_default();
            placed.unplace(&frontend, &old);
            (old, used)
        });
        let mut part = MapState::default();
        let used = match add_frontend(&mut part, &placed, service, ids) {
            Ok(used) => used,
            Err(problem) => {
                problems.push(problem);
                continue;
            }
        };
        let Some((map, capacity)) = room.overflow(&placed, &part, &frontend) else {
            placed.place(frontend, part, used.into_boxed_slice());
            continue;
        };
        placed.release(ids, &part, previous, room);
        let name = service.name.clone();
        problems.push(match old {
            Some((old, old_used)) => {
                placed.place(frontend, old, old_used);
                Problem::ChangeRefused {
                    name,
                    frontend,
                    map,
                    capacity,
                }
            }
            None => {
                ids.forget_revnat(&frontend);
                Problem::MapFull {
                    name,
                    frontend,
                    map,
                    capacity,
                }
            }
        });
    }
    placed.settle();
    (placed.state, problems, placed.programmed)
}

/// The entries a round has placed so far, and how many placed frontends use
/// each backend id (so its keys are the backends placed).
struct Placed {
    state: MapState,
    /// Entries placed since `state` was last settled, in the order placed.
    pending: Pending,
    refs: HashMap<u32, u32>,
    programmed: HashMap<Frontend, Box<[u32]>>,
}

/// Entries waiting to go into a round's tables, each table at once. Merged
/// in one frontend at a time, in name order, a million entries at 100k
/// Services each cost a B-tree search at a random key, and left the nodes
/// half empty: a rebuild after the round (compaction) cost as much again.
#[derive(Default)]
struct Pending {
    services: Vec<(ServiceKey, ServiceValue)>,
    backends: Vec<(u32, Backend)>,
    revnat: Vec<(u32, RevNat)>,
    source_ranges: Vec<SourceRange>,
    maglev: Vec<(MaglevKey, u32)>,
}

impl Placed {
    fn place(&mut self, frontend: Frontend, part: MapState, used: Box<[u32]>) {
        for id in &used {
            *self.refs.entry(*id).or_default() += 1;
        }
        let pending = &mut self.pending;
        pending.services.extend(part.services);
        pending.backends.extend(part.backends);
        pending.revnat.extend(part.revnat);
        pending.source_ranges.extend(part.source_ranges);
        pending.maglev.extend(part.maglev);
        self.programmed.insert(frontend, used);
    }

    /// Whether a placed frontend uses backend `id`.
    fn has_backend(&self, id: u32) -> bool {
        self.refs.contains_key(&id)
    }

    /// How many entries each table holds with what is pending: a frontend's
    /// keys are its own, so only backends are shared.
    fn held(&self) -> Capacity {
        let (state, pending) = (&self.state, &self.pending);
        Capacity {
            services: state.services.len() + pending.services.len(),
            backends: self.refs.len(),
            revnat: state.revnat.len() + pending.revnat.len(),
            maglev: state.maglev.len() + pending.maglev.len(),
            source_ranges: state.source_ranges.len() + pending.source_ranges.len(),
        }
    }

    /// Builds what is pending into `state`, as [`MapState::merge`] of each
    /// placed part in turn would.
    fn settle(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let state = &mut self.state;
        settle_map(&mut state.services, pending.services);
        settle_map(&mut state.revnat, pending.revnat);
        settle_map(&mut state.maglev, pending.maglev);
        state.source_ranges.extend(pending.source_ranges);
        let backends = &mut state.backends;
        if few(pending.backends.len(), backends.len()) {
            for (id, backend) in pending.backends {
                merge_backend(backends, id, backend);
            }
            return;
        }
        let mut all: Vec<(u32, Backend)> = std::mem::take(backends)
            .into_iter()
            .chain(pending.backends)
            .collect();
        // Stable: each id's entries stay in the order they were placed.
        all.sort_by_key(|(id, _)| *id);
        let mut merged: Vec<(u32, Backend)> = Vec::with_capacity(all.len());
        for (id, backend) in all {
            match merged.last_mut() {
                Some((last, kept)) if *last == id => {
                    if replaces(kept) {
                        *kept = backend;
                    }
                }
                _ => merged.push((id, backend)),
            }
        }
        *backends = merged.into_iter().collect();
    }

    /// Takes a placed frontend's entries (`part`) out again.
    fn unplace(&mut self, frontend: &Frontend, part: &MapState) {
        self.settle();
        let used = self.programmed.remove(frontend).unwrap_or_default();
        for key in part.services.keys() {
            self.state.services.remove(key);
        }
        for key in part.maglev.keys() {
            self.state.maglev.remove(key);
        }
        for range in &part.source_ranges {
            self.state.source_ranges.remove(range);
        }
        for id in part.revnat.keys() {
            self.state.revnat.remove(id);
        }
        for id in used {
            let refs = self.refs.entry(id).or_default();
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.refs.remove(&id);
                self.state.backends.remove(&id);
            }
        }
    }

    /// Forgets the backend ids just given to `part`, which did not fit.
    fn release(&self, ids: &mut Ids, part: &MapState, previous: &MapState, room: &Room<'_>) {
        for (id, b) in &part.backends {
            if !self.has_backend(*id) && !previous.backends.contains_key(id) && !(room.in_base)(*id)
            {
                ids.forget_backend(*id, b);
            }
        }
    }
}

/// Writes one frontend's entries into `part`: its reverse-NAT entry, slot 0,
/// a slot and a backend per endpoint, the backends it keeps reachable (those
/// not `placed` already), its Maglev table and source ranges. Returns the
/// backend ids it uses.
fn add_frontend(
    part: &mut MapState,
    placed: &Placed,
    service: &FrontendSpec,
    ids: &mut Ids,
) -> Result<Vec<u32>, Problem> {
    let frontend = service.frontend;
    let sorted = |endpoints: &[Endpoint]| {
        let mut endpoints = endpoints.to_vec();
        endpoints.sort();
        endpoints.dedup();
        endpoints
    };
    let endpoints = sorted(&service.endpoints);
    let in_cluster = sorted(&service.cluster_endpoints);
    if endpoints.len() + in_cluster.len() > MAX_SLOTS {
        return Err(Problem::TooManyEndpoints {
            name: service.name.clone(),
            frontend,
            count: endpoints.len() + in_cluster.len(),
            max: MAX_SLOTS,
        });
    }
    let exhausted = |what| Problem::IdsExhausted {
        name: service.name.clone(),
        frontend,
        what,
    };
    let rev_nat_id = ids
        .revnat(frontend)
        .ok_or_else(|| exhausted("reverse NAT"))?;
    let mut with_ids = |endpoints: &[Endpoint]| -> Result<Vec<(u32, Endpoint)>, Problem> {
        endpoints
            .iter()
            .map(|endpoint| Some((ids.backend(endpoint, frontend.protocol)?, *endpoint)))
            .collect::<Option<_>>()
            .ok_or_else(|| exhausted("backend"))
    };
    let slots = with_ids(&endpoints)?;
    let in_cluster = with_ids(&in_cluster)?;
    part.revnat.insert(
        rev_nat_id,
        RevNat {
            addr: frontend.address,
            port: frontend.port,
        },
    );
    let head = ServiceValue {
        cluster_count: in_cluster.len() as u16,
        ..slot0(part, service, rev_nat_id, &slots)
    };
    part.services.insert(service_key(&frontend, 0), head);
    let mut used = Vec::with_capacity(slots.len() + in_cluster.len() + service.reachable.len());
    // The frontend's own slots, then those for clients inside the cluster.
    for (slot, (id, endpoint)) in slots.into_iter().chain(in_cluster).enumerate() {
        used.push(id);
        part.services.insert(
            service_key(&frontend, slot as u16 + 1),
            ServiceValue {
                backend_id: id,
                rev_nat_id,
                count: 0,
                flags: 0,
                maglev_size: 0,
                cluster_count: 0,
            },
        );
        part.backends
            .insert(id, backend_value(&endpoint, frontend.protocol));
    }
    // Backends no new connection goes to keep the ones they have: conntrack
    // finds them here.
    for endpoint in &service.reachable {
        if let Some(id) = ids.backend(endpoint, frontend.protocol) {
            if !placed.has_backend(id) {
                part.backends
                    .entry(id)
                    .or_insert_with(|| backend_value(endpoint, frontend.protocol));
            }
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
        // A range of the other family matches none of the frontend's clients.
        let family = service.frontend.address.is_ipv4();
        for range in ranges.iter().filter(|r| r.address.is_ipv4() == family) {
            state.source_ranges.insert(SourceRange {
                rev_nat_id,
                range: *range,
            });
        }
    }
    ServiceValue {
        backend_id: slot0_value,
        rev_nat_id,
        count: slots.len() as u16,
        flags,
        maglev_size,
        cluster_count: 0,
    }
}

/// Adds a frontend's Maglev table over its slots' backends; returns the
/// table's size index (what slot 0 carries).
fn maglev_table(state: &mut MapState, rev_nat_id: u32, slots: &[(u32, Endpoint)]) -> u16 {
    let size = super::maglev::table_size(slots.len());
    let keys: Vec<u64> = slots.iter().map(|(id, _)| u64::from(*id)).collect();
    for (index, owner) in super::maglev::build(&keys, size).into_iter().enumerate() {
        let key = MaglevKey {
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

/// The writes that change only some frontends, in the order [`diff`] gives,
/// for maps of `capacity` that hold `applied`: `services` is what those
/// frontends (and new ones) serve now, `gone` the frontends no longer served;
/// every other frontend stays as `applied` holds it and is not looked at, so
/// the cost follows the change, not the number of Services. `ids` are updated
/// as if the writes succeeded. The caller makes sure no frontend in
/// `services` belongs to a Service outside them (contested frontends need
/// [`map_state_in`], which sees every claimant).
pub fn update(
    services: &[&FrontendSpec],
    gone: &[Frontend],
    applied: &MapState,
    ids: &mut Ids,
    capacity: &Capacity,
) -> (Vec<MapOp>, Vec<Problem>) {
    let scope: BTreeSet<Frontend> = services
        .iter()
        .map(|s| s.frontend)
        .chain(gone.iter().copied())
        .collect();
    let (mut old, old_used) = take_programmed(&scope, applied, ids);

    // What stays outside the scope, and the backends the scope shares with
    // it: those stay whatever these frontends do.
    let outside = Capacity {
        services: applied.services.len() - old.services.len(),
        backends: applied.backends.len() - old.backends.len(),
        revnat: applied.revnat.len() - old.revnat.len(),
        maglev: applied.maglev.len() - old.maglev.len(),
        source_ranges: applied.source_ranges.len() - old.source_ranges.len(),
    };
    let shared = MapState {
        backends: old
            .backends
            .iter()
            .filter(|(id, _)| ids.users.get(id).is_some_and(|u| *u > 0))
            .map(|(id, b)| (*id, *b))
            .collect(),
        ..MapState::default()
    };
    let in_outside =
        |id: u32| applied.backends.contains_key(&id) && !old.backends.contains_key(&id);
    let room = Room {
        capacity,
        base: outside,
        in_base: &in_outside,
    };
    let (new, problems, programmed) = build(services, ids, (&old, old_used), shared, &room);
    for (frontend, used) in programmed {
        for id in &used {
            *ids.users.entry(*id).or_default() += 1;
        }
        ids.programmed.insert(frontend, used);
    }
    // Entries these frontends take over from others are compared with what
    // the maps hold.
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
    for (id, b) in &old.backends {
        if !new.backends.contains_key(id) {
            ids.forget_backend(*id, b);
        }
    }
    for frontend in &scope {
        if !ids.programmed.contains_key(frontend) {
            ids.forget_revnat(frontend);
        }
    }
    (ops, problems)
}

/// What `applied` holds for the frontends in `scope`, and the backend ids
/// each used, released in `ids` until they are programmed again.
fn take_programmed(
    scope: &BTreeSet<Frontend>,
    applied: &MapState,
    ids: &mut Ids,
) -> (MapState, HashMap<Frontend, Box<[u32]>>) {
    let mut old = MapState::default();
    let mut old_used = HashMap::new();
    for frontend in scope {
        let used = ids.programmed.remove(frontend).unwrap_or_default();
        for id in &used {
            if let Some(users) = ids.users.get_mut(id) {
                *users = users.saturating_sub(1);
            }
        }
        old.merge(entries_of(frontend, applied, &used));
        old_used.insert(*frontend, used);
    }
    (old, old_used)
}

/// What `applied` holds for one frontend: its slots, reverse-NAT entry,
/// Maglev table, source ranges, and their backends and those of `used` (the
/// backend ids it keeps reachable too).
fn entries_of(frontend: &Frontend, applied: &MapState, used: &[u32]) -> MapState {
    let mut entries = MapState::default();
    if let Some(&head) = applied.services.get(&service_key(frontend, 0)) {
        for slot in 0..=head.slots() {
            let key = service_key(frontend, slot);
            if let Some(&value) = applied.services.get(&key) {
                entries.services.insert(key, value);
            }
        }
        let rev = head.rev_nat_id;
        if let Some(&r) = applied.revnat.get(&rev) {
            entries.revnat.insert(rev, r);
        }
        entries.maglev.extend(
            applied
                .maglev
                .range(maglev_table_keys(rev))
                .map(|(k, v)| (*k, *v)),
        );
        entries
            .source_ranges
            .extend(applied.source_ranges.iter().filter(|r| r.rev_nat_id == rev));
    }
    let referenced = entries
        .services
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .map(|(_, v)| v.backend_id)
        .chain(entries.maglev.values().copied());
    for id in used.iter().copied().chain(referenced) {
        if let Some(&b) = applied.backends.get(&id) {
            entries.backends.insert(id, b);
        }
    }
    entries
}

/// Every key of one frontend's Maglev table.
pub(super) fn maglev_table_keys(rev_nat_id: u32) -> std::ops::RangeInclusive<MaglevKey> {
    MaglevKey {
        rev_nat_id,
        index: 0,
    }..=MaglevKey {
        rev_nat_id,
        index: u32::MAX,
    }
}

fn backend_value(endpoint: &Endpoint, protocol: Protocol) -> Backend {
    Backend {
        addr: endpoint.address,
        port: endpoint.port,
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
    }
}

/// Entries by map and family (`ipv4`, `ipv6`; Maglev's table serves both),
/// for the metrics. Counting them takes tens of milliseconds at 100k
/// Services, so a partial round corrects the counts for the keys it wrote
/// ([`Fill::entries_at`]) instead of counting again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    services: [usize; 2],
    backends: [usize; 2],
    revnat: [usize; 2],
    source_ranges: [usize; 2],
    maglev: usize,
}

impl Fill {
    /// Counts every entry of `state`.
    pub fn of(state: &MapState) -> Self {
        fn split(addrs: impl Iterator<Item = IpAddr>) -> [usize; 2] {
            addrs.fold([0, 0], |[v4, v6], a| match a.is_ipv6() {
                false => [v4 + 1, v6],
                true => [v4, v6 + 1],
            })
        }
        Self {
            services: split(state.services.keys().map(|k| k.addr)),
            backends: split(state.backends.values().map(|b| b.addr)),
            revnat: split(state.revnat.values().map(|r| r.addr)),
            source_ranges: split(state.source_ranges.iter().map(|r| r.range.address)),
            maglev: state.maglev.len(),
        }
    }

    /// The entries of `state` at the keys `ops` write: counted before and
    /// after the writes, their difference is what the writes changed.
    pub fn entries_at(state: &MapState, ops: &[MapOp]) -> MapState {
        fn copy<K: Ord + Copy, V: Copy>(from: &BTreeMap<K, V>, to: &mut BTreeMap<K, V>, key: K) {
            if let Some(&value) = from.get(&key) {
                to.insert(key, value);
            }
        }
        let mut at = MapState::default();
        for op in ops {
            match *op {
                MapOp::PutBackend(id, _) | MapOp::DelBackend(id) => {
                    copy(&state.backends, &mut at.backends, id)
                }
                MapOp::PutRevNat(id, _) | MapOp::DelRevNat(id) => {
                    copy(&state.revnat, &mut at.revnat, id)
                }
                MapOp::PutMaglev(k, _) | MapOp::DelMaglev(k) => {
                    copy(&state.maglev, &mut at.maglev, k)
                }
                MapOp::PutService(k, _) | MapOp::DelService(k) => {
                    copy(&state.services, &mut at.services, k)
                }
                MapOp::PutSourceRange(r) | MapOp::DelSourceRange(r) => {
                    if state.source_ranges.contains(&r) {
                        at.source_ranges.insert(r);
                    }
                }
            }
        }
        at
    }

    /// These counts with the entries of `before` replaced by those of `after`.
    pub fn replaced(self, before: &MapState, after: &MapState) -> Self {
        let (b, a) = (Self::of(before), Self::of(after));
        let one = |n: usize, b: usize, a: usize| (n + a).saturating_sub(b);
        let pair = |n: [usize; 2], b: [usize; 2], a: [usize; 2]| {
            [one(n[0], b[0], a[0]), one(n[1], b[1], a[1])]
        };
        Self {
            services: pair(self.services, b.services, a.services),
            backends: pair(self.backends, b.backends, a.backends),
            revnat: pair(self.revnat, b.revnat, a.revnat),
            source_ranges: pair(self.source_ranges, b.source_ranges, a.source_ranges),
            maglev: one(self.maglev, b.maglev, a.maglev),
        }
    }

    /// (map, family, entries) rows.
    pub fn rows(&self) -> Vec<(&'static str, &'static str, usize)> {
        let maps = [
            ("services", self.services),
            ("backends", self.backends),
            ("revnat", self.revnat),
            ("source_ranges", self.source_ranges),
        ];
        let mut out: Vec<_> = maps
            .into_iter()
            .flat_map(|(map, [v4, v6])| [(map, "ipv4", v4), (map, "ipv6", v6)])
            .collect();
        out.push(("maglev", "both", self.maglev));
        out
    }
}

impl MapState {
    /// Adds `other`'s entries, replacing those with the same keys; a backend
    /// two frontends name (one pod in two Services) is active if either has
    /// it active, whichever comes first, so the outcome does not depend on
    /// the order frontends are placed in.
    pub(super) fn merge(&mut self, other: MapState) {
        self.services.extend(other.services);
        for (id, backend) in other.backends {
            merge_backend(&mut self.backends, id, backend);
        }
        self.revnat.extend(other.revnat);
        self.source_ranges.extend(other.source_ranges);
        self.maglev.extend(other.maglev);
    }

    /// What the maps hold after one more successful write.
    pub fn apply(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutBackend(id, b) => drop(self.backends.insert(id, b)),
            MapOp::PutRevNat(id, r) => drop(self.revnat.insert(id, r)),
            MapOp::PutSourceRange(r) => drop(self.source_ranges.insert(r)),
            MapOp::PutMaglev(k, v) => drop(self.maglev.insert(k, v)),
            MapOp::PutService(k, v) => drop(self.services.insert(k, v)),
            MapOp::DelService(k) => drop(self.services.remove(&k)),
            MapOp::DelSourceRange(r) => drop(self.source_ranges.remove(&r)),
            MapOp::DelMaglev(k) => drop(self.maglev.remove(&k)),
            MapOp::DelRevNat(id) => drop(self.revnat.remove(&id)),
            MapOp::DelBackend(id) => drop(self.backends.remove(&id)),
        }
    }

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
