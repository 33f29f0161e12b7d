//! Map I/O on the loaded programs: the node settings, reading the map state
//! back, applying ordered writes, applying the garbage-collection plan, and
//! the readers tests and tools use.

use std::collections::HashSet;

use aya::maps::{IterableMap, MapError};

use super::{
    batch::{self, Reading, Writing},
    *,
};
use crate::desired::{apply, entries::Family, PutTarget, SourceRange};

impl Dataplane {
    /// Writes the node-wide settings: IPv4's with the NAT port range,
    /// IPv6's, and the service CIDRs.
    pub fn set_config(&mut self, config: &crate::settings::NodeConfig) -> Result<()> {
        self.config.set(0, config.v4, 0)?;
        self.v6.config.set(0, config.v6, 0)?;
        match &mut self.service_cidrs {
            Some(map) => map.set(0, config.service_cidrs, 0)?,
            None if config.service_cidrs != ServiceCidrs::default() => {
                anyhow::bail!("this object has no {} map", map_names::SERVICE_CIDRS)
            }
            None => {}
        }
        Ok(())
    }

    /// Every (frontend, backend) pair's traffic, summed over the CPUs.
    pub fn traffic(&self) -> Result<Vec<(TrafficKey, Traffic)>> {
        match &self.traffic {
            Some(map) => proxy_common::pinned::sum_traffic(map),
            None => Ok(Vec::new()),
        }
    }

    /// Removes the traffic counters of pairs whose frontend or backend is
    /// gone from `state`; returns them with their last counts. Backend id 0
    /// (a reply whose backend the programs did not know) goes with its
    /// frontend.
    pub fn prune_traffic(&mut self, state: &MapState) -> Result<Vec<(TrafficKey, Traffic)>> {
        let pairs = self.traffic()?;
        let Some(map) = &mut self.traffic else {
            return Ok(Vec::new());
        };
        let gone: Vec<(TrafficKey, Traffic)> = pairs
            .into_iter()
            .filter(|(k, _)| {
                !state.revnat.contains_key(&k.rev_nat_id)
                    || (k.backend_id != 0 && !state.backends.contains_key(&k.backend_id))
            })
            .collect();
        // Gone already (removed by another hand) is fine.
        for (key, _) in &gone {
            let _ = map.remove(key);
        }
        Ok(gone)
    }

    /// Removes affinity entries that name a backend their frontend no longer
    /// sends new connections to. Returns how many went.
    pub fn prune_affinity(&mut self, state: &MapState) -> Result<usize> {
        let entries: Vec<(AffinityKey4, AffinityValue)> =
            self.affinity.iter().filter_map(Result::ok).collect();
        let entries6: Vec<(AffinityKey6, AffinityValue)> =
            self.v6.affinity.iter().filter_map(Result::ok).collect();
        if entries.is_empty() && entries6.is_empty() {
            // The usual case: no sessionAffinity client. Skip the set of every
            // (frontend, backend) pair, which costs a walk over all slots.
            return Ok(0);
        }
        let allowed = state.slot_pairs();
        let stale = |id: u32, v: &AffinityValue| !allowed.contains(&(id, v.backend_id));
        let mut pruned = 0;
        for (key, _) in entries.iter().filter(|(k, v)| stale(k.rev_nat_id, v)) {
            // Gone already (LRU) is fine.
            let _ = self.affinity.remove(key);
            pruned += 1;
        }
        for (key, _) in entries6.iter().filter(|(k, v)| stale(k.rev_nat_id, v)) {
            let _ = self.v6.affinity.remove(key);
            pruned += 1;
        }
        Ok(pruned)
    }

    /// The backend and frontend ids that conntrack, NAT and affinity entries
    /// name: what flows still follow, whatever the service maps hold.
    pub fn live_ids(&self) -> Result<(HashSet<u32>, HashSet<u32>)> {
        let (mut backends, mut frontends) = (HashSet::new(), HashSet::new());
        for (_, v) in self.conntrack.iter().filter_map(Result::ok) {
            backends.insert(v.backend_id);
            frontends.insert(v.rev_nat_id);
        }
        for (_, v) in self.nat.iter().filter_map(Result::ok) {
            frontends.insert(v.rev_nat_id);
        }
        for (k, v) in self.affinity.iter().filter_map(Result::ok) {
            backends.insert(v.backend_id);
            frontends.insert(k.rev_nat_id);
        }
        for (_, v) in self.v6.conntrack.iter().filter_map(Result::ok) {
            backends.insert(v.backend_id);
            frontends.insert(v.rev_nat_id);
        }
        for (k, v) in self.v6.affinity.iter().filter_map(Result::ok) {
            backends.insert(v.backend_id);
            frontends.insert(k.rev_nat_id);
        }
        backends.remove(&0);
        frontends.remove(&0);
        Ok((backends, frontends))
    }

    /// Every affinity entry.
    pub fn affinity(&self) -> Result<Vec<(AffinityKey4, AffinityValue)>> {
        Ok(self.affinity.iter().collect::<Result<_, _>>()?)
    }

    /// Every NAT entry.
    pub fn nat(&self) -> Result<Vec<(CtKey4, Nat4)>> {
        Ok(self.nat.iter().collect::<Result<_, _>>()?)
    }

    /// Every NAT-port word (see `proxy_common::NatPortKey4`).
    pub fn nat_ports(&self) -> Result<Vec<(NatPortKey4, u64)>> {
        Ok(self.nat_ports.iter().collect::<Result<_, _>>()?)
    }

    /// What the service, backend and reverse-NAT maps of both families hold
    /// now, the hash maps read in batches.
    pub fn read_state(&self) -> Result<MapState> {
        self.read_state_by(Reading::Batched)
    }

    /// [`Dataplane::read_state`], its hash maps read as `reading` says (the
    /// map-read benchmark compares the two).
    pub fn read_state_by(&self, reading: Reading) -> Result<MapState> {
        // Each table is collected from its whole list: a B-tree built from
        // sorted entries, not two million inserts in the hash maps' order
        // (at 100k Services, most of what a resync costs).
        let mut state = MapState {
            services: batch::entries(&self.services, reading)?
                .into_iter()
                .map(|(k, v)| (k.into(), v))
                .chain(
                    batch::entries(&self.v6.services, reading)?
                        .into_iter()
                        .map(|(k, v)| (k.into(), v)),
                )
                .collect(),
            backends: batch::array_values(&self.backends, reading)?
                .into_iter()
                .filter(|b| b.id != 0)
                .map(|b| (b.id, b.into()))
                .chain(
                    batch::entries(&self.v6.backends, reading)?
                        .into_iter()
                        .map(|(k, v)| (k, v.into())),
                )
                .collect(),
            revnat: batch::entries(&self.revnat, reading)?
                .into_iter()
                .map(|(k, v)| (k, v.into()))
                .chain(
                    batch::entries(&self.v6.revnat, reading)?
                        .into_iter()
                        .map(|(k, v)| (k, v.into())),
                )
                .collect(),
            maglev: batch::entries(&self.maglev, reading)?.into_iter().collect(),
            ..MapState::default()
        };
        for entry in self.source_ranges.iter() {
            let (k, _) = entry?;
            state
                .source_ranges
                .extend(SourceRange::from_v4(k.prefix_len(), k.data()));
        }
        for entry in self.v6.source_ranges.iter() {
            let (k, _) = entry?;
            state
                .source_ranges
                .extend(SourceRange::from_v6(k.prefix_len(), k.data()));
        }
        Ok(state)
    }

    /// Writes one entry (see [`crate::desired::apply`] for the order and
    /// what a failure skips). Removing an entry already gone succeeds.
    pub fn write(&mut self, op: &MapOp) -> Result<()> {
        debug!(?op, "map write");
        let result = match *op {
            MapOp::PutBackend(id, b) => match b.kernel(id) {
                Family::V4(b) => self.put_backend4(b),
                Family::V6(b) => self.v6.backends.insert(id, b, 0),
            },
            MapOp::PutRevNat(id, r) => match r.kernel() {
                Family::V4(r) => self.revnat.insert(id, r, 0),
                Family::V6(r) => self.v6.revnat.insert(id, r, 0),
            },
            MapOp::PutService(k, v) => match k.kernel() {
                Family::V4(k) => self.services.insert(k, v, 0),
                Family::V6(k) => self.v6.services.insert(k, v, 0),
            },
            MapOp::PutSourceRange(r) => match r.kernel() {
                Family::V4((prefix, data)) => {
                    self.source_ranges.insert(&LpmKey::new(prefix, data), 1, 0)
                }
                Family::V6((prefix, data)) => {
                    self.v6
                        .source_ranges
                        .insert(&LpmKey::new(prefix, data), 1, 0)
                }
            },
            MapOp::PutMaglev(key, backend_id) => self.maglev.insert(key, backend_id, 0),
            MapOp::DelMaglev(key) => self.maglev.remove(&key),
            MapOp::DelSourceRange(r) => match r.kernel() {
                Family::V4((prefix, data)) => self.source_ranges.remove(&LpmKey::new(prefix, data)),
                Family::V6((prefix, data)) => {
                    self.v6.source_ranges.remove(&LpmKey::new(prefix, data))
                }
            },
            MapOp::DelService(k) => match k.kernel() {
                Family::V4(k) => self.services.remove(&k),
                Family::V6(k) => self.v6.services.remove(&k),
            },
            // An id is of one family: the other map does not hold it.
            MapOp::DelRevNat(id) => self.revnat.remove(&id).and(self.v6.revnat.remove(&id)),
            MapOp::DelBackend(id) => self.del_backend4(id).and(self.v6.backends.remove(&id)),
        };
        match result {
            Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(MapError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) =>
            {
                bail!("the map is full ({})", e.call)
            }
            other => other.with_context(|| format!("map write {op:?}")),
        }
    }

    /// The writer a round writes through, runs of puts written as `writing`
    /// says.
    pub fn writes(&mut self, writing: Writing) -> Writes<'_> {
        Writes {
            dataplane: self,
            writing,
        }
    }

    /// Writes a run of puts into one map (see [`apply::Write::write_run`])
    /// in batches. None: the map has no batched writes here, or the run is
    /// not one map's (nothing written either way).
    fn put_batch(&mut self, ops: &[MapOp]) -> Option<(usize, Option<anyhow::Error>)> {
        fn all<T>(ops: &[MapOp], each: impl Fn(&MapOp) -> Option<T>) -> Option<Vec<T>> {
            ops.iter().map(each).collect()
        }
        let updated = match ops.first()?.put_target()? {
            PutTarget::Services { v4: true } => batch::update(
                self.services.map(),
                &all(ops, |op| match op {
                    MapOp::PutService(k, v) => Some((k.kernel().v4()?, *v)),
                    _ => None,
                })?,
            ),
            PutTarget::Services { v4: false } => batch::update(
                self.v6.services.map(),
                &all(ops, |op| match op {
                    MapOp::PutService(k, v) => match k.kernel() {
                        Family::V6(k) => Some((k, *v)),
                        Family::V4(_) => None,
                    },
                    _ => None,
                })?,
            ),
            PutTarget::Backends { v4: true } => {
                let slots = self.backends.len();
                if !slots.is_power_of_two() {
                    return None;
                }
                batch::update(
                    self.backends.map(),
                    &all(ops, |op| match op {
                        MapOp::PutBackend(id, b) if *id != 0 => {
                            Some((capacity::backend_slot(*id, slots), b.kernel(*id).v4()?))
                        }
                        _ => None,
                    })?,
                )
            }
            PutTarget::Backends { v4: false } => batch::update(
                self.v6.backends.map(),
                &all(ops, |op| match op {
                    MapOp::PutBackend(id, b) => match b.kernel(*id) {
                        Family::V6(b) => Some((*id, b)),
                        Family::V4(_) => None,
                    },
                    _ => None,
                })?,
            ),
            PutTarget::RevNat { v4: true } => batch::update(
                self.revnat.map(),
                &all(ops, |op| match op {
                    MapOp::PutRevNat(id, r) => Some((*id, r.kernel().v4()?)),
                    _ => None,
                })?,
            ),
            PutTarget::RevNat { v4: false } => batch::update(
                self.v6.revnat.map(),
                &all(ops, |op| match op {
                    MapOp::PutRevNat(id, r) => match r.kernel() {
                        Family::V6(r) => Some((*id, r)),
                        Family::V4(_) => None,
                    },
                    _ => None,
                })?,
            ),
            PutTarget::Maglev => batch::update(
                self.maglev.map(),
                &all(ops, |op| match op {
                    MapOp::PutMaglev(k, b) => Some((*k, *b)),
                    _ => None,
                })?,
            ),
        };
        match updated {
            batch::Updated::All => {
                debug!(entries = ops.len(), first = ?ops[0], "map writes, batched");
                Some((ops.len(), None))
            }
            batch::Updated::Stopped { landed, error } => {
                let op = &ops[landed.min(ops.len() - 1)];
                let error = if matches!(error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) {
                    anyhow::anyhow!("the map is full (bpf_map_update_batch)")
                } else {
                    anyhow::Error::new(error).context(format!("map write {op:?} (batched)"))
                };
                Some((landed, Some(error)))
            }
            batch::Updated::Refused => None,
        }
    }

    /// Writes IPv4 backend `b` at its id's slot, without reading it first
    /// (a system call per backend more at the first sync). The ids hand a
    /// slot to one id at a time (`Ids`): another id there is one whose
    /// removal failed and that no frontend names any more, whose flows this
    /// write sends to the scheduler again (see [`Dataplane::del_backend4`]).
    fn put_backend4(&mut self, b: Backend4) -> Result<(), MapError> {
        let slot = self.backend_slot(b.id)?;
        self.backends.set(slot, b, 0)
    }

    /// What IPv4 backend `id`'s slot holds now (id 0: no backend).
    fn backend4_slot(&self, id: u32) -> Result<Backend4, MapError> {
        self.backends.get(&self.backend_slot(id)?, 0)
    }

    /// Writes IPv4 backend `b` at its id's slot if that slot is empty (or
    /// holds it already): what a migration carries over. Ok(false): the
    /// slot holds another id.
    pub(super) fn put_backend4_if_free(&mut self, b: Backend4) -> Result<bool, MapError> {
        let held = self.backend4_slot(b.id)?.id;
        if held != 0 && held != b.id {
            return Ok(false);
        }
        self.put_backend4(b)?;
        Ok(true)
    }

    /// Empties the slot of IPv4 backend `id`, if it holds that id (a slot
    /// a removed id left may hold a newer one). Only the id is cleared: an
    /// array's value is copied in place, and a packet reading it meanwhile
    /// must never pair this id with another address (half a write of a
    /// zeroed value would).
    fn del_backend4(&mut self, id: u32) -> Result<(), MapError> {
        let held = self.backend4_slot(id)?;
        if held.id == id {
            let emptied = Backend4 { id: 0, ..held };
            self.backends.set(self.backend_slot(id)?, emptied, 0)?;
        }
        Ok(())
    }

    /// Where backend `id` lives in the IPv4 backends array.
    fn backend_slot(&self, id: u32) -> Result<u32, MapError> {
        let slots = self.backends.len();
        if id == 0 || !slots.is_power_of_two() {
            return Err(MapError::SyscallError(aya::sys::SyscallError {
                call:
                    "bpf_map_update_elem (no slot for backend id 0, or an array not a power of two)",
                io_error: io::Error::from_raw_os_error(libc::EINVAL),
            }));
        }
        Ok(capacity::backend_slot(id, slots))
    }

    /// How many entries the maps the agent programs hold at most.
    pub fn capacity(&self) -> Result<Capacity> {
        fn max(map: &MapData) -> Result<usize> {
            Ok(map.info()?.max_entries() as usize)
        }
        Ok(Capacity {
            services: max(self.services.map())?,
            backends: max(self.backends.map())?,
            revnat: max(self.revnat.map())?,
            maglev: max(self.maglev.map())?,
            source_ranges: max(self.source_ranges.map())?,
        })
    }

    /// Removes the conntrack and NAT entries whose flows ended, frees their
    /// NAT ports and takes the per-backend exhaustion counts (see [`gc`]), at
    /// `now_ns` (the programs' clock, see [`monotonic_ns`]), for both families.
    pub fn gc(&mut self, now_ns: u64, lifetimes: &gc::Lifetimes) -> Result<gc::Report> {
        let nat_range = self
            .config
            .get(&0, 0)
            .ok()
            .map(|c| (c.nat_port_min, c.nat_port_max));
        let mut report = gc::Report::default();
        let revnat = self.revnat.iter().filter_map(Result::ok).collect();
        collect::<gc::V4>(
            &mut self.conntrack,
            &mut self.nat,
            &mut self.nat_ports,
            revnat,
            nat_range,
            now_ns,
            lifetimes,
            &mut report,
        );
        let revnat6 = self.v6.revnat.iter().filter_map(Result::ok).collect();
        collect::<gc::V6>(
            &mut self.v6.conntrack,
            &mut self.v6.nat,
            &mut self.v6.nat_ports,
            revnat6,
            nat_range,
            now_ns,
            lifetimes,
            &mut report,
        );
        Ok(report)
    }

    /// Writes one conntrack entry (for tests and repairs).
    pub fn set_conntrack(&mut self, key: CtKey4, value: CtValue) -> Result<()> {
        self.conntrack.insert(key, value, 0)?;
        Ok(())
    }

    /// Removes every conntrack entry of both families; returns how many.
    pub fn flush_conntrack(&mut self) -> Result<usize> {
        Ok(remove_all(&mut self.conntrack)? + remove_all(&mut self.v6.conntrack)?)
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Result<Vec<(CtKey4, CtValue)>> {
        Ok(self.conntrack.iter().collect::<Result<_, _>>()?)
    }

    /// The statistics counters summed over CPUs, by name.
    pub fn stats(&self) -> Result<Vec<(&'static str, StatCounter)>> {
        proxy_common::pinned::sum_stats(&self.stats)
    }
}

/// One family's collection (see [`Dataplane::gc`]), added to `report`.
#[allow(clippy::too_many_arguments)]
fn collect<F: gc::Family>(
    conntrack: &mut HashMap<MapData, F::CtKey, CtValue>,
    nat: &mut HashMap<MapData, F::CtKey, F::Nat>,
    nat_ports: &mut HashMap<MapData, F::Word, u64>,
    revnat: std::collections::BTreeMap<u32, F::RevNat>,
    nat_range: Option<(u16, u16)>,
    now_ns: u64,
    lifetimes: &gc::Lifetimes,
    report: &mut gc::Report,
) where
    F::CtKey: aya::Pod,
    F::Nat: aya::Pod,
    F::Word: aya::Pod,
{
    // In batches, as the resync reads; one entry at a time if that fails
    // (an entry the programs change meanwhile is read again next time).
    fn read<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
        batch::entries(map, Reading::Batched)
            .unwrap_or_else(|_| map.iter().filter_map(Result::ok).collect())
    }
    let snapshot = gc::Snapshot::<F> {
        conntrack: read(conntrack).into_iter().collect(),
        nat: read(nat).into_iter().collect(),
        nat_ports: read(nat_ports).into_iter().collect(),
        revnat,
        nat_range,
    };
    let plan = gc::plan(&snapshot, now_ns, lifetimes);
    let mut conntrack_removed = 0;
    // The programs may have renewed an entry since the snapshot (a client
    // reusing the tuple): only one still expired is deleted, read again
    // just before. Deleting a renewed entry would cut its flow.
    for key in &plan.conntrack {
        let still = conntrack.get(key, 0);
        if still.is_ok_and(|v| lifetimes.expired(now_ns, F::proto(key), v.flags, v.last_seen_ns))
            && conntrack.remove(key).is_ok()
        {
            conntrack_removed += 1;
        }
    }
    let before: std::collections::HashMap<F::CtKey, F::Nat> =
        snapshot.nat.iter().copied().collect();
    let mut nat_removed = 0;
    for key in &plan.nat {
        // Unchanged since the snapshot: no packet of its flow came by.
        if nat.get(key, 0).ok() == before.get(key).copied() && nat.remove(key).is_ok() {
            nat_removed += 1;
        }
    }
    // Bits the programs set since the snapshot are kept: they belong to
    // flows the snapshot did not see.
    for (key, seen, wanted) in &plan.nat_ports {
        let now = nat_ports.get(key, 0).unwrap_or(0);
        let since = now & !seen;
        let drops = F::word_of(key).1 == proxy_common::nat_ports::DROPS;
        let result = match wanted {
            None if since == 0 || drops => nat_ports.remove(key),
            None => nat_ports.insert(key, since, 0),
            Some(bits) if bits | since == now => continue,
            Some(bits) => nat_ports.insert(key, bits | since, 0),
        };
        // Gone already, or a full map: the next collection tries again.
        if let Err(e) = result {
            debug!(?key, error = %e, "NAT-port word");
        }
    }
    report.conntrack_removed += conntrack_removed;
    report.nat_removed += nat_removed;
    let conntrack_left = snapshot.conntrack.len() - conntrack_removed;
    let nat_left = snapshot.nat.len() - nat_removed;
    report.conntrack_entries += conntrack_left;
    report.nat_entries += nat_left;
    report.entries.push(("conntrack", F::NAME, conntrack_left));
    report.entries.push(("nat", F::NAME, nat_left));
    report.exhausted.extend(plan.exhausted);
    report.held.extend(plan.held);
    for (state, flows) in plan.flows {
        *report.flows.entry(state).or_default() += flows;
    }
}

/// Removes every entry of `map` (one by one: entries a program adds
/// meanwhile may stay); returns how many were there.
pub fn remove_all<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<MapData, K, V>,
) -> Result<usize> {
    let keys: Vec<K> = map.keys().collect::<Result<_, _>>()?;
    for key in &keys {
        let _ = map.remove(key);
    }
    Ok(keys.len())
}

/// What a round writes through (see [`Dataplane::writes`]).
pub struct Writes<'a> {
    dataplane: &'a mut Dataplane,
    writing: Writing,
}

impl apply::Write for Writes<'_> {
    fn write(&mut self, op: &MapOp) -> Result<()> {
        self.dataplane.write(op)
    }

    fn write_run(&mut self, ops: &[MapOp]) -> (usize, Option<anyhow::Error>) {
        if self.writing == Writing::Batched && ops.len() > 1 {
            if let Some(result) = self.dataplane.put_batch(ops) {
                return result;
            }
        }
        apply::one_at_a_time(ops, |op| self.dataplane.write(op))
    }
}
