//! The ids map entries refer to (backend ids, frontend / reverse-NAT ids):
//! allocated by the agent, recovered from the maps at start, never reused before
//! the whole range has gone round.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

// The tables below hold an entry per backend or frontend (a million at
// 100k Services) and are looked up for each one at every full round:
// foldhash, not SipHash, which with its rehashing took about a fifth of
// the first round in a perf profile of `cargo bench --bench agent_memory`.
use foldhash::HashMap;

use proxy_common::capacity;

use super::maps::{Backend, MapState};
use crate::frontend::{Endpoint, Frontend, Protocol};

/// Allocates the ids that map entries refer to. Ids are handed out from a moving
/// cursor, so an id that was just released is not reused until the whole space
/// has gone round: a conntrack entry naming an old backend id never silently
/// points at a new backend.
#[derive(Debug, Default)]
pub struct Ids {
    /// By address, port and protocol: a backend keeps its id while it changes
    /// from ready to terminating, so conntrack entries naming it stay valid.
    pub(super) backends: BackendIds,
    /// The slots of the ids in `backends` (see `capacity::backend_slot`):
    /// an id is handed out only where its slot is free, so that each IPv4
    /// backend has its entry of the backends array to itself (and no two
    /// ids in use are equal). Kept beside `backends` so an allocation is
    /// O(1), not a walk over every backend.
    pub(super) backend_slots: Slots,
    pub(super) backend_cursor: u32,
    pub(super) revnat: HashMap<Frontend, u32>,
    pub(super) revnat_ids: foldhash::HashSet<u32>,
    pub(super) revnat_cursor: u32,
    /// The backend ids each programmed frontend uses (its slots and the
    /// backends it keeps reachable), and how many frontends use each id: what
    /// [`update`] needs to change some frontends without looking at the others.
    pub(super) programmed: HashMap<Frontend, Box<[u32]>>,
    pub(super) users: HashMap<u32, u32>,
    /// Ids that flows an earlier agent saw still name (conntrack, NAT and
    /// affinity entries), though no map entry has them: never handed out, so
    /// a live flow never follows an unrelated new backend or frontend.
    reserved_backends: HashSet<u32>,
    reserved_revnat: HashSet<u32>,
    /// The highest frontend id (None: [`MAX_FRONTEND_ID`]).
    max_frontend_id: Option<u32>,
}

/// The highest frontend id with the maps' default sizes: ids key the
/// reverse-NAT and round-robin maps, which hold `capacity::REVNAT` unless
/// `--map-frontends` says otherwise.
pub const MAX_FRONTEND_ID: u32 = capacity::REVNAT - 1;

fn protocol_of(number: u8) -> Option<Protocol> {
    match number {
        proxy_common::proto::TCP => Some(Protocol::Tcp),
        proxy_common::proto::UDP => Some(Protocol::Udp),
        proxy_common::proto::SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

impl Ids {
    /// The id of a programmed frontend.
    pub fn frontend_id(&self, frontend: &Frontend) -> Option<u32> {
        self.revnat.get(frontend).copied()
    }

    /// Recovers the ids in use from maps an earlier agent filled.
    pub fn from_state(state: &MapState) -> Self {
        let mut ids = Self::default();
        for (&id, b) in &state.backends {
            if let Some(protocol) = protocol_of(b.proto) {
                ids.backends.insert(b.addr, b.port, protocol, id);
                ids.backend_slots.insert(id);
                ids.backend_cursor = ids.backend_cursor.max(id);
            }
        }
        for (key, value) in &state.services {
            if key.slot != 0 {
                continue;
            }
            if let Some(protocol) = protocol_of(key.proto) {
                let frontend = Frontend {
                    address: key.addr,
                    port: key.port,
                    protocol,
                };
                ids.revnat.insert(frontend, value.rev_nat_id);
                ids.revnat_ids.insert(value.rev_nat_id);
                ids.revnat_cursor = ids.revnat_cursor.max(value.rev_nat_id);
            }
        }
        ids
    }

    /// Hands out frontend ids up to `max` (one less than the reverse-NAT
    /// map's entries), not [`MAX_FRONTEND_ID`].
    pub fn limit_frontend_ids(&mut self, max: u32) {
        self.max_frontend_id = Some(max.max(1));
    }

    /// Hands out backend ids for an IPv4 backends array of `slots` entries
    /// (a power of two), not `capacity::BACKENDS`.
    pub fn set_backend_slots(&mut self, slots: u32) {
        self.backend_slots = Slots::new(slots);
        for id in self.backends.ids() {
            self.backend_slots.insert(id);
        }
    }

    fn max_frontend_id(&self) -> u32 {
        self.max_frontend_id.unwrap_or(MAX_FRONTEND_ID)
    }

    /// Keeps `backends` and `frontends` (ids live flows name) from being
    /// handed out, and starts the cursors after the highest of them.
    pub fn reserve(&mut self, backends: &HashSet<u32>, frontends: &HashSet<u32>) {
        let highest = |ids: &HashSet<u32>| ids.iter().copied().max().unwrap_or(0);
        self.backend_cursor = self.backend_cursor.max(highest(backends));
        self.revnat_cursor = self
            .revnat_cursor
            .max(highest(frontends).min(self.max_frontend_id()));
        self.reserved_backends.extend(backends);
        self.reserved_revnat.extend(frontends);
    }

    pub(super) fn backend(&mut self, endpoint: &Endpoint, protocol: Protocol) -> Option<u32> {
        if let Some(id) = self.backends.get(endpoint.address, endpoint.port, protocol) {
            return Some(id);
        }
        // Every slot taken: no id would do (and the search would go
        // round the whole id space).
        if self.backend_slots.full() {
            return None;
        }
        let (used, reserved) = (&self.backend_slots, &self.reserved_backends);
        let id = next_free(&mut self.backend_cursor, u32::MAX, |id| {
            used.holds(id) || reserved.contains(&id)
        })?;
        self.backends
            .insert(endpoint.address, endpoint.port, protocol, id);
        self.backend_slots.insert(id);
        Some(id)
    }

    pub(super) fn revnat(&mut self, frontend: Frontend) -> Option<u32> {
        if let Some(&id) = self.revnat.get(&frontend) {
            return Some(id);
        }
        let max = self.max_frontend_id();
        let (used, reserved) = (&self.revnat_ids, &self.reserved_revnat);
        let id = next_free(&mut self.revnat_cursor, max, |id| {
            used.contains(&id) || reserved.contains(&id)
        })?;
        self.revnat.insert(frontend, id);
        self.revnat_ids.insert(id);
        Some(id)
    }

    /// Forgets a backend no frontend uses any more.
    pub(super) fn forget_backend(&mut self, id: u32, value: &Backend) {
        self.users.remove(&id);
        let Some(protocol) = protocol_of(value.proto) else {
            return;
        };
        if self.backends.get(value.addr, value.port, protocol) == Some(id) {
            self.backends.remove(value.addr, value.port, protocol);
            self.backend_slots.remove(id);
        }
    }

    /// Forgets the reverse-NAT id of a frontend no longer served.
    pub(super) fn forget_revnat(&mut self, frontend: &Frontend) {
        if let Some(id) = self.revnat.remove(frontend) {
            self.revnat_ids.remove(&id);
        }
    }

    /// Forgets ids that `state` no longer uses. Every id in `state` was
    /// handed out here, so as many ids as `state` has entries means none to
    /// forget: the usual full round skips a lookup per backend (a tenth of
    /// the round at 1M backends).
    pub(super) fn retain(&mut self, state: &MapState) {
        if self.backends.len() > state.backends.len() {
            let slots = &mut self.backend_slots;
            self.backends.retain(|id| {
                let keep = state.backends.contains_key(&id);
                if !keep {
                    slots.remove(id);
                }
                keep
            });
        }
        if self.revnat_ids.len() > state.revnat.len() {
            self.revnat.retain(|_, id| state.revnat.contains_key(id));
            self.revnat_ids.retain(|id| state.revnat.contains_key(id));
        }
    }
}

/// Backend ids by address, port and protocol, a map per family: at a
/// million backends an entry of one map for both families took 24 bytes
/// (the 17 of an `IpAddr`, padded), an IPv4 one takes 12.
#[derive(Debug, Default)]
pub(super) struct BackendIds {
    v4: HashMap<(Ipv4Addr, u16, Protocol), u32>,
    v6: HashMap<(Ipv6Addr, u16, Protocol), u32>,
}

impl BackendIds {
    fn get(&self, address: IpAddr, port: u16, protocol: Protocol) -> Option<u32> {
        match address {
            IpAddr::V4(a) => self.v4.get(&(a, port, protocol)),
            IpAddr::V6(a) => self.v6.get(&(a, port, protocol)),
        }
        .copied()
    }

    fn insert(&mut self, address: IpAddr, port: u16, protocol: Protocol, id: u32) {
        match address {
            IpAddr::V4(a) => self.v4.insert((a, port, protocol), id),
            IpAddr::V6(a) => self.v6.insert((a, port, protocol), id),
        };
    }

    fn remove(&mut self, address: IpAddr, port: u16, protocol: Protocol) {
        match address {
            IpAddr::V4(a) => self.v4.remove(&(a, port, protocol)),
            IpAddr::V6(a) => self.v6.remove(&(a, port, protocol)),
        };
    }

    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.v4.values().chain(self.v6.values()).copied()
    }

    fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        self.v4.retain(|_, id| keep(*id));
        self.v6.retain(|_, id| keep(*id));
    }

    pub(super) fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which slots of the IPv4 backends array hold a backend, one bit each
/// (a `HashSet` of ids took 16 bytes or more per backend).
#[derive(Debug)]
pub(super) struct Slots {
    bits: Vec<u64>,
    taken: usize,
    slots: u32,
}

impl Default for Slots {
    fn default() -> Self {
        Self::new(capacity::BACKENDS)
    }
}

impl Slots {
    /// Slots for an array of `slots` entries (rounded up to a power of two,
    /// as the array is).
    fn new(slots: u32) -> Self {
        let slots = capacity::backend_slots(slots);
        Self {
            bits: vec![0; (slots as usize).div_ceil(64)],
            taken: 0,
            slots,
        }
    }

    fn at(&self, id: u32) -> (usize, u64) {
        let slot = capacity::backend_slot(id, self.slots) as usize;
        (slot / 64, 1 << (slot % 64))
    }

    /// Whether `id`'s slot holds a backend.
    pub(super) fn holds(&self, id: u32) -> bool {
        let (word, bit) = self.at(id);
        self.bits[word] & bit != 0
    }

    fn insert(&mut self, id: u32) {
        let (word, bit) = self.at(id);
        if self.bits[word] & bit == 0 {
            self.bits[word] |= bit;
            self.taken += 1;
        }
    }

    fn remove(&mut self, id: u32) {
        let (word, bit) = self.at(id);
        if self.bits[word] & bit != 0 {
            self.bits[word] &= !bit;
            self.taken -= 1;
        }
    }

    fn full(&self) -> bool {
        self.taken >= self.slots as usize
    }

    /// How many slots hold a backend.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.taken
    }
}

/// The next id after `cursor` (wrapping, skipping 0) that is not in use.
pub(super) fn next_free<T>(cursor: &mut T, max: T, used: impl Fn(T) -> bool) -> Option<T>
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
