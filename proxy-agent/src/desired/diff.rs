//! From (desired, actual) map contents to an ordered list of writes, make before
//! break. Pure: `kernel/` applies the list (through [`super::apply`]).

use std::collections::HashSet;

use super::maps::{maglev_table_keys, MapOp, MapState, SourceRange};

/// The writes that turn `actual` into `desired`, make before break.
///
/// First the frontends no longer served go (slot 0, then their slots, Maglev
/// tables, source ranges and reverse-NAT entries), with the backends only they
/// used: no frontend still served can reach those, and in full maps their room
/// is what the new entries need. Then backends and reverse-NAT entries are
/// written, then backend slots, then each service's slot 0 (which makes new
/// slots reachable); the remaining removals come last in the reverse order, so
/// no packet ever finds a slot or backend that is not there.
pub fn diff(desired: &MapState, actual: &MapState) -> Vec<MapOp> {
    let mut ops = Vec::new();

    let gone: Vec<_> = actual
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0 && !desired.services.contains_key(k))
        .map(|(k, v)| (*k, v.rev_nat_id))
        .collect();
    let gone_revs: HashSet<u32> = gone.iter().map(|(_, rev)| *rev).collect();
    let gone_heads: HashSet<_> = gone.iter().map(|(head, _)| *head).collect();
    for (head, rev) in &gone {
        ops.push(MapOp::DelService(*head));
        let slots = head.with_slot(1)..=head.with_slot(u16::MAX);
        ops.extend(
            actual
                .services
                .range(slots)
                .map(|(k, _)| MapOp::DelService(*k)),
        );
        ops.extend(
            actual
                .maglev
                .range(maglev_table_keys(*rev))
                .filter(|(k, _)| !desired.maglev.contains_key(k))
                .map(|(k, _)| MapOp::DelMaglev(*k)),
        );
    }
    let gone_range = |r: &SourceRange| gone_revs.contains(&r.rev_nat_id);
    for range in actual.source_ranges.difference(&desired.source_ranges) {
        if gone_range(range) {
            ops.push(MapOp::DelSourceRange(*range));
        }
    }
    for rev in &gone_revs {
        if actual.revnat.contains_key(rev) && !desired.revnat.contains_key(rev) {
            ops.push(MapOp::DelRevNat(*rev));
        }
    }
    // Backends still named by a slot or Maglev table of a frontend that stays
    // go only after it moved off them.
    let mut early_backends = HashSet::new();
    if !gone.is_empty() {
        let kept: HashSet<u32> = actual
            .services
            .iter()
            .filter(|(k, v)| k.slot != 0 && !gone_revs.contains(&v.rev_nat_id))
            .map(|(_, v)| v.backend_id)
            .chain(
                actual
                    .maglev
                    .iter()
                    .filter(|(k, _)| !gone_revs.contains(&k.rev_nat_id))
                    .map(|(_, b)| *b),
            )
            .collect();
        for &id in actual.backends.keys() {
            if !desired.backends.contains_key(&id) && !kept.contains(&id) {
                ops.push(MapOp::DelBackend(id));
                early_backends.insert(id);
            }
        }
    }

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
        ops.push(MapOp::PutSourceRange(*range));
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

    let removed_early = |rev: u32| gone_revs.contains(&rev);
    for pass_slot0 in [true, false] {
        for (k, v) in &actual.services {
            if (k.slot == 0) == pass_slot0
                && !desired.services.contains_key(k)
                && !removed_early(v.rev_nat_id)
                && !gone_heads.contains(&k.with_slot(0))
            {
                ops.push(MapOp::DelService(*k));
            }
        }
    }
    for k in actual.maglev.keys() {
        if !desired.maglev.contains_key(k) && !removed_early(k.rev_nat_id) {
            ops.push(MapOp::DelMaglev(*k));
        }
    }
    for range in actual.source_ranges.difference(&desired.source_ranges) {
        if !gone_range(range) {
            ops.push(MapOp::DelSourceRange(*range));
        }
    }
    for &id in actual.revnat.keys() {
        if !desired.revnat.contains_key(&id) && !removed_early(id) {
            ops.push(MapOp::DelRevNat(id));
        }
    }
    for &id in actual.backends.keys() {
        if !desired.backends.contains_key(&id) && !early_backends.contains(&id) {
            ops.push(MapOp::DelBackend(id));
        }
    }
    ops
}
