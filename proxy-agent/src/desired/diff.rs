//! From (desired, actual) map contents to an ordered list of writes, make before
//! break. Pure: `kernel/` applies the list.

use super::maps::{MapOp, MapState};

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
