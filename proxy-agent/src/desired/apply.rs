//! Carrying out an ordered list of writes ([`super::diff`]) when some of them
//! fail, a full map say. Pure: the caller passes the function that writes one
//! entry to the kernel.
//!
//! A failed write does not stop the round. It fails the frontend it belongs
//! to: that frontend's remaining writes are skipped, so it stays as a prefix
//! of its make-before-break sequence left it (its old slot 0 still names only
//! slots and backends that exist), and so does every frontend whose new slots
//! would name a backend that could not be written. Everything else, removals
//! included, is still written, and `applied` follows exactly what landed.

use std::collections::{BTreeMap, HashSet};

use proxy_common::ServiceValue;

use super::maps::ServiceKey;

use super::maps::{Capacity, MapOp, MapState};

/// Checks that every frontend in `maps` is whole: its reverse-NAT entry, each
/// of its slots and their backends, and its Maglev table there. What the
/// writes of a round keep true after each one; a hole is a packet dropped.
pub fn check_whole(maps: &MapState) -> Result<(), String> {
    match holes(maps).into_iter().next() {
        Some((key, hole)) => Err(format!("{key:?}: {hole}")),
        None => Ok(()),
    }
}

/// Every frontend of `maps` with a hole (see [`check_whole`]): its slot-0 key
/// and the first hole found.
pub fn holes(maps: &MapState) -> Vec<(ServiceKey, String)> {
    maps.services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .filter_map(|(key, head)| Some((*key, hole(maps, key, head)?)))
        .collect()
}

fn hole(maps: &MapState, key: &ServiceKey, head: &ServiceValue) -> Option<String> {
    if !maps.revnat.contains_key(&head.rev_nat_id) {
        return Some("no reverse-NAT entry".into());
    }
    for slot in 1..=head.slots() {
        match maps
            .services
            .get(&key.with_slot(slot))
            .map(|v| v.backend_id)
        {
            None => return Some(format!("slot {slot} missing")),
            Some(id) if !maps.backends.contains_key(&id) => {
                return Some(format!("slot {slot}'s backend {id} missing"))
            }
            Some(_) => {}
        }
    }
    let scheduler = head.flags & proxy_common::svc_flags::SCHEDULER_MASK;
    if scheduler == proxy_common::svc_flags::SCHEDULER_MAGLEV && head.count > 0 {
        let size = proxy_common::maglev::SIZES
            .get(usize::from(head.maglev_size))
            .copied()
            .unwrap_or(0);
        for index in 0..size {
            let key4 = proxy_common::MaglevKey {
                rev_nat_id: head.rev_nat_id,
                index,
            };
            if !maps
                .maglev
                .get(&key4)
                .is_some_and(|b| maps.backends.contains_key(b))
            {
                return Some(format!("Maglev slot {index} names no backend"));
            }
        }
    }
    None
}

/// Slots no frontend's slot 0 reaches: its slot 0 is gone, or counts fewer
/// slots. What a services map shrunk below its entries leaves beside the
/// frontends with holes. No packet reads them, but they hold room: left in
/// place, a round's new entries would meet a full map before the round's
/// own removals make room.
pub fn orphan_slots(maps: &MapState) -> Vec<ServiceKey> {
    maps.services
        .keys()
        .filter(|k| {
            k.slot != 0
                && maps
                    .services
                    .get(&k.with_slot(0))
                    .is_none_or(|head| k.slot > head.slots())
        })
        .copied()
        .collect()
}

/// The writes that take the frontend whose slot 0 is `head` out of `maps`:
/// slot 0 first, so that no packet meets it half gone, then its slots and
/// its Maglev table. Its backends and reverse-NAT entry stay for a round to
/// reuse or remove.
pub fn removal(maps: &MapState, head: &ServiceKey) -> Vec<MapOp> {
    let mut ops = vec![MapOp::DelService(*head)];
    let Some(value) = maps.services.get(head) else {
        return Vec::new();
    };
    ops.extend(
        maps.services
            .range(head.with_slot(1)..=head.with_slot(u16::MAX))
            .map(|(k, _)| MapOp::DelService(*k)),
    );
    ops.extend(
        maps.maglev
            .range(super::maps::maglev_table_keys(value.rev_nat_id))
            .map(|(k, _)| MapOp::DelMaglev(*k)),
    );
    ops
}

/// Whether `op` adds an entry to a map of `capacity` that `maps` fill: what
/// the kernel refuses (E2BIG, ENOSPC for the LPM trie). For the models of
/// the kernel's maps that tests and fuzz targets write through.
pub fn overflows(op: &MapOp, maps: &MapState, capacity: &Capacity) -> bool {
    let (m, c) = (maps, capacity);
    match op {
        MapOp::PutService(k, _) => !m.services.contains_key(k) && m.services.len() >= c.services,
        MapOp::PutBackend(id, _) => !m.backends.contains_key(id) && m.backends.len() >= c.backends,
        MapOp::PutRevNat(id, _) => !m.revnat.contains_key(id) && m.revnat.len() >= c.revnat,
        MapOp::PutMaglev(k, _) => !m.maglev.contains_key(k) && m.maglev.len() >= c.maglev,
        MapOp::PutSourceRange(r) => {
            !m.source_ranges.contains(r) && m.source_ranges.len() >= c.source_ranges
        }
        _ => false,
    }
}

/// What a round's writes came to.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Writes that landed.
    pub written: usize,
    /// Writes that failed or were skipped, with why.
    pub failures: Vec<Failure>,
    /// The frontends (reverse-NAT ids) left as they were, or half way.
    pub failed_frontends: BTreeMap<u32, String>,
}

/// One write that did not land.
#[derive(Debug)]
pub struct Failure {
    pub op: MapOp,
    pub reason: String,
}

/// The frontend (reverse-NAT id) a write belongs to; backends belong to none.
fn owner(op: &MapOp, applied: &MapState) -> Option<u32> {
    match op {
        MapOp::PutService(_, v) => Some(v.rev_nat_id),
        MapOp::DelService(k) => applied.services.get(k).map(|v| v.rev_nat_id),
        MapOp::PutMaglev(k, _) | MapOp::DelMaglev(k) => Some(k.rev_nat_id),
        MapOp::PutSourceRange(r) | MapOp::DelSourceRange(r) => Some(r.rev_nat_id),
        MapOp::PutRevNat(id, _) | MapOp::DelRevNat(id) => Some(*id),
        MapOp::PutBackend(..) | MapOp::DelBackend(_) => None,
    }
}

/// Why `op` must not be written now, if it must not.
fn missing(
    op: &MapOp,
    applied: &MapState,
    referenced: &mut Option<HashSet<u32>>,
) -> Option<String> {
    match op {
        MapOp::PutService(k, v) if k.slot != 0 && !applied.backends.contains_key(&v.backend_id) => {
            Some(format!("its backend {} is not in the maps", v.backend_id))
        }
        MapOp::PutService(k, v) if k.slot == 0 && !applied.revnat.contains_key(&v.rev_nat_id) => {
            Some(format!(
                "its reverse-NAT entry {} is not in the maps",
                v.rev_nat_id
            ))
        }
        MapOp::PutMaglev(_, b) if !applied.backends.contains_key(b) => {
            Some(format!("its backend {b} is not in the maps"))
        }
        MapOp::DelBackend(id) => {
            let named = referenced.get_or_insert_with(|| {
                applied
                    .services
                    .iter()
                    .filter(|(k, _)| k.slot != 0)
                    .map(|(_, v)| v.backend_id)
                    .chain(applied.maglev.values().copied())
                    .collect()
            });
            named
                .contains(id)
                .then(|| "a frontend left as it was still names it".to_string())
        }
        _ => None,
    }
}

/// What carries a round's writes to the maps.
pub trait Write {
    /// Writes one entry.
    fn write(&mut self, op: &MapOp) -> anyhow::Result<()>;

    /// Writes `ops`, consecutive puts into one map (one [`PutTarget`](super::maps::PutTarget)), in
    /// order, stopping at the first that fails: how many landed, and why the
    /// next one did not. A kernel writer makes it one system call per few
    /// thousand entries.
    fn write_run(&mut self, ops: &[MapOp]) -> (usize, Option<anyhow::Error>) {
        one_at_a_time(ops, |op| self.write(op))
    }
}

/// Writes `ops` one at a time through `write`, stopping at the first that
/// fails: [`Write::write_run`] without batches.
pub fn one_at_a_time(
    ops: &[MapOp],
    mut write: impl FnMut(&MapOp) -> anyhow::Result<()>,
) -> (usize, Option<anyhow::Error>) {
    for (landed, op) in ops.iter().enumerate() {
        if let Err(e) = write(op) {
            return (landed, Some(e));
        }
    }
    (ops.len(), None)
}

impl<F: FnMut(&MapOp) -> anyhow::Result<()>> Write for F {
    fn write(&mut self, op: &MapOp) -> anyhow::Result<()> {
        self(op)
    }
}

/// Why `op` is not to be written now, given what landed and what failed so
/// far: its frontend failed earlier in the round, or an entry it names is
/// not in the maps.
fn refusal(
    op: &MapOp,
    applied: &MapState,
    outcome: &Outcome,
    referenced: &mut Option<HashSet<u32>>,
) -> Option<String> {
    let owner = owner(op, applied);
    if let Some(reason) = owner.and_then(|rev| outcome.failed_frontends.get(&rev)) {
        return Some(format!("skipped: {reason}"));
    }
    // A backend the plan removes can still be named only after a failure
    // (by a frontend left as it was): only then is that looked at.
    let check = match op {
        MapOp::DelBackend(_) if outcome.failures.is_empty() => None,
        _ => missing(op, applied, referenced),
    };
    check.map(|reason| format!("not written: {reason}"))
}

/// Writes `ops` in order through `writer`, updating `applied` with each write
/// that lands (see the module comment for what a failure skips).
///
/// Consecutive puts into one map that are all to be written go to the
/// writer as one run. That changes nothing of what is written: whether a
/// put is written depends on its frontend's earlier failures (which end a
/// run) and on entries of other maps (which a run does not touch), so each
/// op of a run would have been written one at a time too. A run that stops
/// at a failure goes on, after the failed op, as the ops would have.
pub fn run(ops: &[MapOp], applied: &mut MapState, writer: impl Write) -> Outcome {
    carry_on(ops, 0, applied, Outcome::default(), writer)
}

/// [`run`] for the writes [`super::diff`] orders from `applied` to `wanted`
/// (a full round), which leave `applied` equal to `wanted` when they all
/// land. Until one fails none can be refused: nothing has failed, and diff
/// writes every entry an entry names before it (backends and reverse-NAT
/// entries, then slots, then slot 0) and removes it after. So the writes go
/// out in runs without a look at `applied` or a copy of each into it, and
/// `wanted` is taken whole at the end (at 100k Services, two million
/// B-tree inserts and as many lookups fewer in the first round). At the
/// first failure `applied` is brought up to what landed and the round goes
/// on as [`run`] would have.
pub fn run_whole(
    ops: &[MapOp],
    applied: &mut MapState,
    wanted: MapState,
    mut writer: impl Write,
) -> Outcome {
    let mut next = 0;
    while next < ops.len() {
        let end = run_end(ops, next, |_| true);
        let run = &ops[next..end];
        let (landed, error) = writer.write_run(run);
        let landed = landed.min(run.len());
        if landed < run.len() {
            let failed = next + landed;
            for op in &ops[..failed] {
                applied.apply(op);
            }
            let mut outcome = Outcome {
                written: failed,
                ..Outcome::default()
            };
            fail(&mut outcome, applied, &ops[failed], why(error));
            return carry_on(ops, failed + 1, applied, outcome, writer);
        }
        next = end;
    }
    if cfg!(debug_assertions) {
        let mut carried = std::mem::take(applied);
        for op in ops {
            carried.apply(op);
        }
        assert!(
            carried == wanted,
            "the writes do not lead to what was wanted"
        );
    }
    *applied = wanted;
    Outcome {
        written: ops.len(),
        ..Outcome::default()
    }
}

/// The end of the run that starts at `ops[next]`: the puts into the same map
/// that follow it and that `writable` lets through (an op of another kind
/// is a run of its own).
fn run_end(ops: &[MapOp], next: usize, mut writable: impl FnMut(&MapOp) -> bool) -> usize {
    let mut end = next + 1;
    if let Some(target) = ops[next].put_target() {
        while end < ops.len() && ops[end].put_target() == Some(target) && writable(&ops[end]) {
            end += 1;
        }
    }
    end
}

fn why(error: Option<anyhow::Error>) -> String {
    error.map_or_else(
        || "the writer stopped without a reason".to_string(),
        |e| format!("{e:#}"),
    )
}

/// [`run`] from `ops[next]` on, with `outcome` what the writes before it came to.
fn carry_on(
    ops: &[MapOp],
    mut next: usize,
    applied: &mut MapState,
    mut outcome: Outcome,
    mut writer: impl Write,
) -> Outcome {
    // Backend ids named by slots and Maglev tables: built on the first
    // backend removal after a failure, dropped when slots change.
    let mut referenced: Option<HashSet<u32>> = None;
    while next < ops.len() {
        let op = &ops[next];
        if let Some(reason) = refusal(op, applied, &outcome, &mut referenced) {
            fail(&mut outcome, applied, op, reason);
            next += 1;
            continue;
        }
        let end = run_end(ops, next, |op| {
            refusal(op, applied, &outcome, &mut referenced).is_none()
        });
        let run = &ops[next..end];
        let (landed, error) = writer.write_run(run);
        let landed = landed.min(run.len());
        for op in &run[..landed] {
            applied.apply(op);
            outcome.written += 1;
            if matches!(
                op,
                MapOp::PutService(..)
                    | MapOp::DelService(_)
                    | MapOp::PutMaglev(..)
                    | MapOp::DelMaglev(_)
            ) {
                referenced = None;
            }
        }
        next += landed;
        if landed < run.len() {
            fail(&mut outcome, applied, &ops[next], why(error));
            next += 1;
        }
    }
    outcome
}

/// Records that `op` did not land, and fails its frontend.
fn fail(outcome: &mut Outcome, applied: &MapState, op: &MapOp, reason: String) {
    if let Some(rev) = owner(op, applied) {
        outcome
            .failed_frontends
            .entry(rev)
            .or_insert(reason.clone());
    }
    outcome.failures.push(Failure { op: *op, reason });
}
