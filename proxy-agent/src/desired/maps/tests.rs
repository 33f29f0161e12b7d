//! Unit tests of the desired map state: slots, ids, update against a full
//! recompute, diff order, Maglev tables.

use proxy_common::{SourceRange4, SourceRange6};

use super::*;
use crate::desired::{entries::Family, ids::next_free, Programmed, MAX_FRONTEND_ID};

fn svc(name: &str, vip: [u8; 4], port: u16, endpoints: &[([u8; 4], u16)]) -> FrontendSpec {
    let frontend = Frontend {
        address: vip.into(),
        port,
        protocol: Protocol::Tcp,
    };
    let endpoints = endpoints
        .iter()
        .map(|(a, p)| Endpoint::new(std::net::Ipv4Addr::from(*a), *p))
        .collect();
    FrontendSpec::new(name, frontend, endpoints)
}

/// What the maps hold after `ops`, as the dataplane would write them.
fn applied_after(mut state: MapState, ops: &[MapOp]) -> MapState {
    ops.iter().for_each(|op| state.apply(op));
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
    let (before, _) = map_state(&[&a, &b, &c], &mut ids);

    // b drops the backend it shares with a and gains one; c goes; d comes.
    let b2 = svc(
        "b",
        [10, 96, 0, 2],
        80,
        &[([10, 0, 0, 2], 80), ([10, 0, 0, 4], 80)],
    );
    let d = svc("d", [10, 96, 0, 4], 80, &[([10, 0, 0, 5], 80)]);
    let capacity = Capacity::default();
    let (ops, problems) = update(&[&b2, &d], &[c.frontend], &before, &mut ids, &capacity);
    assert!(problems.is_empty());
    // The writes turn the old maps into what a full recompute gives, a's
    // shared backend kept.
    let applied = applied_after(before, &ops);
    let (full, _) = map_state(&[&a, &b2, &d], &mut ids);
    assert_eq!(applied, full);
    assert!(!ops.iter().any(
        |op| matches!(op, MapOp::PutService(k, _) | MapOp::DelService(k)
            if k.addr == std::net::Ipv4Addr::new(10, 96, 0, 1))
    ));
    assert!(applied.maglev.is_empty());
}

#[test]
fn update_forgets_the_ids_of_what_went() {
    let a = svc("a", [10, 96, 0, 1], 80, &[([10, 0, 0, 1], 80)]);
    let mut ids = Ids::default();
    let (applied, _) = map_state(&[&a], &mut ids);
    let (ops, _) = update(&[], &[a.frontend], &applied, &mut ids, &Capacity::default());
    assert_eq!(applied_after(applied, &ops), MapState::default());
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
    let (state, problems) = map_state(std::slice::from_ref(&s), &mut ids);
    assert!(problems.is_empty());
    assert_eq!(state.services[&service_key(&s.frontend, 0)].count, 2);
    let slot1 = state.services[&service_key(&s.frontend, 1)].backend_id;
    assert_eq!(
        state.backends[&slot1].addr,
        std::net::Ipv4Addr::new(10, 0, 0, 2)
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
    let (actual, _) = map_state(&[old], &mut ids);
    let new = svc("a", [10, 96, 0, 1], 80, &[([10, 0, 0, 4], 80)]);
    let (wanted, _) = map_state(std::slice::from_ref(&new), &mut ids);
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
    let (actual, _) = map_state(
        &[svc("a", [10, 96, 0, 1], 80, &[([10, 0, 0, 2], 80)])],
        &mut ids,
    );
    let (wanted, _) = map_state::<FrontendSpec>(&[], &mut ids);
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
fn a_full_round_forgets_the_ids_of_what_went_and_keeps_the_rest() {
    let mut ids = Ids::default();
    let a = svc("a", [10, 96, 0, 1], 80, &[([10, 0, 0, 2], 80)]);
    let b = svc("b", [10, 96, 0, 2], 80, &[([10, 0, 0, 3], 80)]);
    let (both, _) = map_state(&[&a, &b], &mut ids);
    let known = |ids: &Ids| {
        (
            ids.backends.len(),
            ids.backend_slots.len(),
            ids.revnat.len(),
        )
    };
    assert_eq!(known(&ids), (2, 2, 2));
    // Nothing went: every id stays.
    let (again, _) = map_state(&[&a, &b], &mut ids);
    assert_eq!(again, both);
    assert_eq!(known(&ids), (2, 2, 2));
    // b and its backend went: their ids are forgotten, a's kept.
    let (only_a, _) = map_state(&[&a], &mut ids);
    assert_eq!(known(&ids), (1, 1, 1));
    assert_eq!(ids.frontend_id(&b.frontend), None);
    assert_eq!(
        ids.frontend_id(&a.frontend),
        Some(only_a.revnat.keys().copied().next().unwrap())
    );
    let kept = only_a.backends.keys().copied().next().unwrap();
    assert!(ids.backend_slots.holds(kept));
    let gone = both
        .backends
        .keys()
        .copied()
        .find(|id| *id != kept)
        .unwrap();
    assert!(!ids.backend_slots.holds(gone), "b's backend's slot is free");
}

/// Backend ids go where their slot of the IPv4 backends array is free:
/// no two ids in use share one, whatever the cursor meets; every slot
/// taken, there is no id to give.
#[test]
fn backend_ids_each_get_a_slot_of_their_own() {
    let mut ids = Ids::default();
    ids.set_backend_slots(4);
    let endpoints: Vec<_> = (0..4u8).map(|i| ([10, 0, 0, i + 2], 80)).collect();
    let a = svc("a", [10, 96, 0, 1], 80, &endpoints[..2]);
    map_state(&[&a], &mut ids);
    // a's two backends went: their ids are not reused at once, and the
    // next ones take their slots only once the cursor has gone past.
    map_state::<FrontendSpec>(&[], &mut ids);
    let b = svc("b", [10, 96, 0, 2], 80, &endpoints);
    let (state, problems) = map_state(&[&b], &mut ids);
    assert!(problems.is_empty(), "{problems:?}");
    let mut slots: Vec<u32> = state
        .backends
        .keys()
        .map(|id| proxy_common::capacity::backend_slot(*id, 4))
        .collect();
    slots.sort_unstable();
    assert_eq!(slots, [0, 1, 2, 3], "ids {:?}", state.backends.keys());
    assert!(
        state.backends.keys().all(|id| *id > 2),
        "no id reused at once"
    );
    // A fifth backend has no slot.
    let c = svc("c", [10, 96, 0, 3], 80, &[([10, 0, 0, 9], 80)]);
    let (_, problems) = map_state(&[&b, &c], &mut ids);
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn ids_are_stable_and_not_reused_at_once() {
    let mut ids = Ids::default();
    let a = ([10, 0, 0, 2], 80);
    let b = ([10, 0, 0, 3], 80);
    let (first, _) = map_state(&[svc("s", [10, 96, 0, 1], 80, &[a, b])], &mut ids);
    let (second, _) = map_state(&[svc("s", [10, 96, 0, 1], 80, &[b])], &mut ids);
    let id_b = |s: &MapState| {
        *s.backends
            .iter()
            .find(|(_, v)| v.addr == std::net::Ipv4Addr::from(b.0))
            .unwrap()
            .0
    };
    assert_eq!(id_b(&first), id_b(&second));
    let (third, _) = map_state(
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
    let (state, _) = map_state(&services, &mut ids);
    let mut recovered = Ids::from_state(&state);
    let (again, _) = map_state(&services, &mut recovered);
    assert_eq!(again, state);
    assert!(diff(&again, &state).is_empty());
}

#[test]
fn duplicate_frontend_is_reported_and_the_rest_served() {
    let mut ids = Ids::default();
    let (state, problems) = map_state(
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
    let (state, _) = map_state(std::slice::from_ref(&s), &mut ids);
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
    let (state, _) = map_state(std::slice::from_ref(&s), &mut ids);
    let slot0 = state.services[&service_key(&s.frontend, 0)];
    assert_eq!(
        slot0.flags,
        svc_flags::LOCAL_ONLY | svc_flags::SOURCE_RANGES
    );
    let backend = state.backends.values().next().unwrap();
    assert_eq!(backend.flags, backend_flags::LOCAL);
    let range = SourceRange4 {
        rev_nat_id_be: slot0.rev_nat_id.to_be(),
        addr: proxy_common::Ip4 {
            octets: [198, 51, 100, 0],
        },
    };
    assert_eq!(kernel_ranges(&state), BTreeSet::from([(56, range)]));
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
fn in_cluster_endpoints_follow_the_local_ones_and_an_update_keeps_them() {
    let mut ids = Ids::default();
    let mut s = svc("np", [10, 250, 0, 11], 30080, &[([10, 0, 0, 2], 80)]);
    s.endpoints[0].local = true;
    s.local_only = true;
    s.scheduler = Some(Scheduler::Maglev);
    s.cluster_endpoints = vec![
        Endpoint::new(std::net::Ipv4Addr::new(10, 0, 1, 2), 80),
        s.endpoints[0],
    ];
    let (state, problems) = map_state(std::slice::from_ref(&s), &mut ids);
    assert!(problems.is_empty());
    let head = state.services[&service_key(&s.frontend, 0)];
    assert_eq!((head.count, head.cluster_count, head.slots()), (1, 2, 3));
    let backend_at = |slot| {
        let id = state.services[&service_key(&s.frontend, slot)].backend_id;
        state.backends[&id].addr.to_string()
    };
    // Local first, then the cluster's, each sorted: the local endpoint
    // keeps one backend id in both.
    assert_eq!(
        [backend_at(1), backend_at(2), backend_at(3)],
        ["10.0.0.2", "10.0.0.2", "10.0.1.2"]
    );
    assert_eq!(state.backends.len(), 2);
    assert!(crate::desired::apply::orphan_slots(&state).is_empty());
    assert!(crate::desired::apply::holes(&state).is_empty());
    // The Maglev table covers the local slots only.
    assert!(state
        .maglev
        .values()
        .all(|id| { state.backends[id].addr == std::net::IpAddr::from([10, 0, 0, 2]) }));
    // A change to the cluster's endpoints alone reaches the maps, and
    // leaves them as a recompute would.
    let mut s2 = s.clone();
    s2.cluster_endpoints.pop();
    let (ops, problems) = update(&[&s2], &[], &state, &mut ids, &Capacity::default());
    assert!(problems.is_empty());
    let applied = applied_after(state, &ops);
    let (full, _) = map_state(std::slice::from_ref(&s2), &mut ids);
    assert_eq!(applied, full);
    assert_eq!(
        applied.services[&service_key(&s.frontend, 0)].cluster_count,
        1
    );
    assert!(!applied.services.contains_key(&service_key(&s.frontend, 3)));
}

/// The IPv4 source-range trie's keys (prefix length, data) for `state`.
fn kernel_ranges(state: &MapState) -> BTreeSet<(u32, SourceRange4)> {
    state
        .source_ranges
        .iter()
        .filter_map(|r| r.kernel().v4())
        .collect()
}

#[test]
fn an_ipv6_frontend_gets_its_familys_ranges_in_the_ipv6_trie() {
    let mut ids = Ids::default();
    let mut s = svc("lb6", [192, 0, 2, 10], 80, &[([10, 0, 0, 2], 80)]);
    s.frontend.address = "2001:db8::5".parse().unwrap();
    s.endpoints[0].address = "fd00:10:244:1::3".parse().unwrap();
    s.source_ranges = Some(vec![
        "198.51.100.0/24".parse().unwrap(),
        "fd00:10:250::100/120".parse().unwrap(),
    ]);
    let (state, _) = map_state(std::slice::from_ref(&s), &mut ids);
    let id = state.services[&service_key(&s.frontend, 0)].rev_nat_id;
    let ranges: Vec<_> = state.source_ranges.iter().collect();
    assert_eq!(ranges.len(), 1, "the IPv4 range matches no IPv6 client");
    let Family::V6((prefix, data)) = ranges[0].kernel() else {
        panic!("{ranges:?} is not IPv6")
    };
    assert_eq!(prefix, 32 + 120);
    assert_eq!(data.rev_nat_id_be, id.to_be());
    let want: std::net::Ipv6Addr = "fd00:10:250::100".parse().unwrap();
    assert_eq!(data.addr, want.octets());
    assert_eq!(SourceRange::from_v6(prefix, data).as_ref(), Some(ranges[0]));
    assert_eq!(SourceRange6::LOOKUP_PREFIX_LEN, 32 + 128);
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
fn frontends(first: u32, n: u32) -> Vec<FrontendSpec> {
    (first..first + n)
        .map(|i| {
            let vip = u32::from_be_bytes([10, 96, 0, 0]) + i;
            svc(&format!("s{i}"), vip.to_be_bytes(), 80, &[])
        })
        .collect()
}

/// Ids and maps for more frontends than the default sizes hold (as with
/// `--map-services` and `--map-frontends` of 262,144).
fn wide_ids() -> (Ids, Capacity) {
    let mut ids = Ids::default();
    ids.limit_frontend_ids(262_143);
    let capacity = Capacity {
        services: 262_144,
        revnat: 262_144,
        ..Capacity::default()
    };
    (ids, capacity)
}

fn map_state_wide(
    services: &[FrontendSpec],
    ids: &mut Ids,
    capacity: &Capacity,
) -> (MapState, Vec<Problem>) {
    map_state_in(services, ids, &MapState::default(), capacity)
}

#[test]
fn frontend_ids_go_past_16_bits() {
    let (mut ids, capacity) = wide_ids();
    let (state, problems) = map_state_wide(&frontends(0, 70_000), &mut ids, &capacity);
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
    let (state, _) = map_state_wide(&more, &mut ids, &capacity);
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
    let (mut filled, _) = map_state(&frontends(0, 1), &mut ids);
    let (key, mut value) = filled.services.pop_first().unwrap();
    value.rev_nat_id = MAX_FRONTEND_ID;
    filled.services.insert(key, value);
    let mut ids = Ids::from_state(&filled);
    let (state, problems) = map_state(&frontends(0, 3), &mut ids);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        state.revnat.keys().copied().collect::<Vec<_>>(),
        [1, 2, MAX_FRONTEND_ID]
    );
}

#[test]
fn source_ranges_match_the_whole_wide_id_then_the_address_prefix() {
    let (mut ids, capacity) = wide_ids();
    let mut services = frontends(0, 65_536);
    // Last by name, so its id comes after the 65536 others.
    let mut wide = svc("~wide", [192, 0, 2, 10], 80, &[]);
    wide.source_ranges = Some(vec![
        "198.51.100.0/24".parse().unwrap(),
        "0.0.0.0/0".parse().unwrap(),
    ]);
    services.push(wide.clone());
    let (state, _) = map_state_wide(&services, &mut ids, &capacity);
    let id = state.services[&service_key(&wide.frontend, 0)].rev_nat_id;
    assert_eq!(id, 65_537);
    let key = |addr: [u8; 4]| SourceRange4 {
        rev_nat_id_be: id.to_be(),
        addr: proxy_common::Ip4 { octets: addr },
    };
    assert_eq!(
        kernel_ranges(&state),
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
    let (before, _) = map_state(std::slice::from_ref(&ready), &mut ids);
    let mut terminating = ready.clone();
    terminating.endpoints[0].terminating = true;
    let (after, _) = map_state(std::slice::from_ref(&terminating), &mut ids);
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
    let (only_kept, _) = map_state(std::slice::from_ref(&kept), &mut ids);
    assert_eq!(
        only_kept.backends.keys().collect::<Vec<_>>(),
        before.backends.keys().collect::<Vec<_>>()
    );
    assert_eq!(only_kept.services.len(), 1, "slot 0 only");
}

/// A pod in two Services, terminating in one of them and ready in the
/// other (its slice of one Service not yet updated, say), is one backend:
/// active, whichever Service comes first, whether the round places both
/// among many (its tables built whole) or among few (entries added one by one).
#[test]
fn a_backend_two_frontends_name_is_active_if_either_has_it_active() {
    let pod = ([10, 0, 0, 2], 80);
    let mut others = frontends(100, 40);
    for (i, other) in others.iter_mut().enumerate() {
        other.endpoints = vec![Endpoint::new(
            std::net::Ipv4Addr::new(10, 1, 0, i as u8),
            80,
        )];
    }
    for (first, second) in [("a", "b"), ("b", "a")] {
        let ready = svc(first, [10, 96, 0, 1], 80, &[pod]);
        let mut terminating = svc(second, [10, 96, 0, 2], 80, &[pod]);
        terminating.endpoints[0].terminating = true;
        // Kept for its connections only, by a third.
        let mut kept = svc("c", [10, 96, 0, 3], 80, &[]);
        kept.reachable = vec![terminating.endpoints[0]];
        let pair = [ready, terminating, kept];
        let mut ids = Ids::default();
        let (alone, _) = map_state(&pair, &mut ids);
        // Among 40 Services already served: few entries go in.
        let mut ids = Ids::default();
        let (served, _) = map_state(&others, &mut ids);
        let mut programmed = Programmed::adopt(served, ids, Capacity::default());
        others.extend(pair);
        programmed.full(&others, |_: &MapOp| Ok(()));
        for state in [&alone, programmed.applied()] {
            let states: Vec<u8> = (state.backends.values())
                .filter(|b| b.addr == IpAddr::from(pod.0))
                .map(|b| b.state)
                .collect();
            assert_eq!(states, [backend_state::ACTIVE], "{first} first");
        }
        others.truncate(40);
    }
}

#[test]
fn maglev_tables_fill_their_frontend_and_go_in_before_slot_0() {
    let mut ids = Ids::default();
    let backends: Vec<([u8; 4], u16)> = (2..12).map(|i| ([10, 0, 0, i], 80)).collect();
    let mut s = svc("m", [10, 96, 0, 1], 80, &backends);
    s.scheduler = Some(Scheduler::Maglev);
    let (state, _) = map_state(std::slice::from_ref(&s), &mut ids);
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
    let (after, _) = map_state(std::slice::from_ref(&fewer), &mut ids);
    let changed = diff(&after, &state)
        .iter()
        .filter(|op| matches!(op, MapOp::PutMaglev(..)))
        .count();
    assert!(
        changed < size as usize / 6,
        "{changed} of {size} slots changed"
    );
}

/// Maps with a kernel's limits: a write that adds an entry to a full map
/// fails, as BPF_MAP_UPDATE_ELEM does with E2BIG. After every write that
/// lands, every frontend must be whole: its slots, their backends and its
/// Maglev table there, so no packet ever finds a hole.
struct Kernel {
    maps: MapState,
    capacity: Capacity,
    writes: usize,
}

impl Kernel {
    fn new(capacity: Capacity) -> Self {
        Self {
            maps: MapState::default(),
            capacity,
            writes: 0,
        }
    }

    fn write(&mut self, op: &MapOp) -> anyhow::Result<()> {
        if crate::desired::apply::overflows(op, &self.maps, &self.capacity) {
            anyhow::bail!("the map is full");
        }
        self.maps.apply(op);
        self.writes += 1;
        self.check_whole();
        Ok(())
    }

    fn check_whole(&self) {
        if let Err(hole) = crate::desired::apply::check_whole(&self.maps) {
            panic!("{hole}");
        }
    }
}

fn small(services: usize) -> Capacity {
    Capacity {
        services,
        ..Capacity::default()
    }
}

/// Kernel maps with room for `services` slots, and the agent's view of them.
fn programmed_in(services: usize) -> (Kernel, Programmed) {
    let capacity = small(services);
    let programmed = Programmed::adopt(MapState::default(), Ids::default(), capacity);
    (Kernel::new(capacity), programmed)
}

fn endpoints(first: u8, count: u8) -> Vec<([u8; 4], u16)> {
    (first..first + count)
        .map(|i| ([10, 0, 0, i], 80))
        .collect()
}

fn served_by(kernel: &Kernel, spec: &FrontendSpec) -> Vec<u32> {
    let head = kernel.maps.services.get(&service_key(&spec.frontend, 0));
    let Some(head) = head else { return Vec::new() };
    (1..=head.count)
        .map(|slot| kernel.maps.services[&service_key(&spec.frontend, slot)].backend_id)
        .map(|id| match kernel.maps.backends[&id].addr {
            std::net::IpAddr::V4(a) => u32::from(a),
            std::net::IpAddr::V6(_) => unreachable!("IPv4 tests"),
        })
        .collect()
}

#[test]
fn a_full_map_refuses_by_name_what_does_not_fit_and_removals_make_room() {
    // Three slots (slot 0 and two backends) per Service: two fit in eight.
    let (mut kernel, mut programmed) = programmed_in(8);
    let a = svc("a", [10, 96, 0, 1], 80, &endpoints(1, 2));
    let b = svc("b", [10, 96, 0, 2], 80, &endpoints(3, 2));
    let c = svc("c", [10, 96, 0, 3], 80, &endpoints(5, 2));
    let report = programmed.full(&[&a, &b, &c], |op: &_| kernel.write(op));
    assert!(report.complete(), "{:?}", report.outcome);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let refusal = report.problems[0].to_string();
    assert!(
        refusal.contains("c:") && refusal.contains("svc4_v2") && refusal.contains("8 entries"),
        "{refusal}"
    );
    assert_eq!(served_by(&kernel, &a).len(), 2);
    assert_eq!(served_by(&kernel, &b).len(), 2);
    assert!(served_by(&kernel, &c).is_empty());
    assert_eq!(kernel.maps, *programmed.applied());

    // b goes: its room is freed before c's entries go in, in the same round.
    let report = programmed.partial(&[&c], &[b.frontend], |op: &_| kernel.write(op));
    assert!(
        report.complete() && report.problems.is_empty(),
        "{report:?}"
    );
    assert_eq!(served_by(&kernel, &c).len(), 2);
    assert!(served_by(&kernel, &b).is_empty());
    assert_eq!(kernel.maps, *programmed.applied());
    assert_eq!(kernel.maps.services.len(), 6);
}

/// Writes as the kernel's batches do: each run stops at its first failure.
/// Records the runs it was given.
struct Runs<'a> {
    kernel: &'a mut Kernel,
    runs: &'a mut Vec<Vec<MapOp>>,
}

impl crate::desired::apply::Write for Runs<'_> {
    fn write(&mut self, op: &MapOp) -> anyhow::Result<()> {
        self.runs.push(vec![*op]);
        self.kernel.write(op)
    }

    fn write_run(&mut self, ops: &[MapOp]) -> (usize, Option<anyhow::Error>) {
        self.runs.push(ops.to_vec());
        crate::desired::apply::one_at_a_time(ops, |op| self.kernel.write(op))
    }
}

/// A round hands consecutive puts into one map to the writer as one run,
/// removals one at a time. A run that meets a full map stops there: its
/// frontend fails as a write one at a time would, its other writes are
/// skipped, and the other frontends' writes go on in a new run.
#[test]
fn a_round_writes_runs_of_puts_into_one_map_and_a_failure_ends_its_run() {
    let (mut kernel, mut programmed) = programmed_in(64);
    let specs: Vec<FrontendSpec> = (0..4u8)
        .map(|i| {
            svc(
                &format!("s{i}"),
                [10, 96, 0, i + 1],
                80,
                &endpoints(10 * i + 1, 3),
            )
        })
        .collect();
    let mut runs = Vec::new();
    let writer = Runs {
        kernel: &mut kernel,
        runs: &mut runs,
    };
    let report = programmed.full(&specs, writer);
    assert!(report.complete(), "{report:?}");
    let targets: Vec<_> = runs
        .iter()
        .map(|run| {
            let target = run[0].put_target().expect("puts only");
            assert!(
                run.iter().all(|op| op.put_target() == Some(target)),
                "{run:?}"
            );
            (target, run.len())
        })
        .collect();
    use crate::desired::PutTarget as T;
    assert_eq!(
        targets,
        [
            (T::Backends { v4: true }, 12),
            (T::RevNat { v4: true }, 4),
            (T::Services { v4: true }, 16)
        ]
    );

    // The kernel's services map holds three more entries than now: s4's
    // slots land, its slot 0 does not. The agent believes there is room.
    let (mut kernel, mut programmed) = programmed_in(64);
    kernel.capacity.services = 16 + 3;
    let mut more = specs.clone();
    more.push(svc("s4", [10, 96, 0, 5], 80, &endpoints(41, 3)));
    more.push(svc("s5", [10, 96, 0, 6], 80, &endpoints(51, 3)));
    assert!(programmed
        .full(&specs, |op: &_| kernel.write(op))
        .complete());
    let mut runs = Vec::new();
    let writer = Runs {
        kernel: &mut kernel,
        runs: &mut runs,
    };
    let report = programmed.full(&more, writer);
    let failed: Vec<_> = report.outcome.failures.iter().map(|f| f.op).collect();
    // The first service put to fail is where its run stopped (after the
    // three that fit); the run after it starts past it and leaves out the
    // failed frontend's other writes, which are skipped.
    let services_runs: Vec<&Vec<MapOp>> = runs
        .iter()
        .filter(|run| matches!(run[0], MapOp::PutService(..)))
        .collect();
    assert_eq!(services_runs.len(), 2, "{runs:?}");
    assert!(report.outcome.failures[0].reason.contains("map is full"));
    assert_eq!(
        services_runs[0].iter().position(|op| *op == failed[0]),
        Some(3)
    );
    let MapOp::PutService(_, first_failed) = failed[0] else {
        panic!("{failed:?}")
    };
    assert!(
        !services_runs[1].iter().any(
            |op| matches!(op, MapOp::PutService(_, v) if v.rev_nat_id == first_failed.rev_nat_id)
        ),
        "{runs:?}"
    );
    assert!(report.outcome.failures[1].reason.starts_with("skipped"));
    assert_eq!(report.outcome.failed_frontends.len(), 2, "{report:?}");
    assert_eq!(kernel.maps, *programmed.applied());
}

#[test]
fn a_new_service_never_pushes_out_one_already_served() {
    let (mut kernel, mut programmed) = programmed_in(6);
    let y = svc("y", [10, 96, 0, 1], 80, &endpoints(1, 2));
    let z = svc("z", [10, 96, 0, 2], 80, &endpoints(3, 2));
    assert!(programmed
        .full(&[&y, &z], |op: &_| kernel.write(op))
        .problems
        .is_empty());
    // "a" sorts first, but y and z were there before it.
    let a = svc("a", [10, 96, 0, 3], 80, &endpoints(5, 1));
    let report = programmed.full(&[&a, &y, &z], |op: &_| kernel.write(op));
    assert!(report.complete());
    assert!(
        matches!(&report.problems[..], [Problem::MapFull { name, .. }] if name == "a"),
        "{:?}",
        report.problems
    );
    assert_eq!(served_by(&kernel, &y).len(), 2);
    assert_eq!(served_by(&kernel, &z).len(), 2);
}

#[test]
fn a_served_frontend_that_outgrows_the_room_is_served_as_it_was() {
    let (mut kernel, mut programmed) = programmed_in(7);
    let a = svc("a", [10, 96, 0, 1], 80, &endpoints(1, 2));
    let b = svc("b", [10, 96, 0, 2], 80, &endpoints(3, 2));
    assert!(programmed
        .full(&[&a, &b], |op: &_| kernel.write(op))
        .problems
        .is_empty());
    let before = served_by(&kernel, &a);
    // a scales up to four endpoints: five entries next to b's three.
    let grown = svc("a", [10, 96, 0, 1], 80, &endpoints(10, 4));
    for partial in [false, true] {
        let report = if partial {
            programmed.partial(&[&grown], &[], |op: &_| kernel.write(op))
        } else {
            programmed.full(&[&grown, &b], |op: &_| kernel.write(op))
        };
        assert!(report.complete(), "{:?}", report.outcome);
        assert!(
            matches!(&report.problems[..], [Problem::ChangeRefused { name, .. }] if name == "a"),
            "{:?}",
            report.problems
        );
        assert_eq!(served_by(&kernel, &a), before);
        assert_eq!(served_by(&kernel, &b).len(), 2);
        assert_eq!(kernel.maps, *programmed.applied());
    }
    // Room again (b went): a gets its four.
    let report = programmed.full(&[&grown], |op: &_| kernel.write(op));
    assert!(report.complete() && report.problems.is_empty());
    assert_eq!(served_by(&kernel, &a).len(), 4);
}

#[test]
fn a_write_that_fails_leaves_its_frontend_whole_and_the_rest_is_written() {
    // The agent believes the maps are large; the kernel's are not: writes fail.
    let mut kernel = Kernel::new(small(9));
    let mut programmed = Programmed::default();
    let a = svc("a", [10, 96, 0, 1], 80, &endpoints(1, 2));
    let b = svc("b", [10, 96, 0, 2], 80, &endpoints(3, 2));
    let mut m = svc("m", [10, 96, 0, 3], 53, &endpoints(5, 2));
    m.scheduler = Some(Scheduler::Maglev);
    assert!(programmed
        .full(&[&a, &b, &m], |op: &_| kernel.write(op))
        .complete());
    // b goes, a grows by four backends, c and d come: not all of it fits.
    let a2 = svc("a", [10, 96, 0, 1], 80, &endpoints(1, 6));
    let c = svc("c", [10, 96, 0, 4], 80, &endpoints(20, 2));
    let d = svc("d", [10, 96, 0, 5], 80, &endpoints(30, 2));
    let report = programmed.full(&[&a2, &c, &d, &m], |op: &_| kernel.write(op));
    assert!(!report.complete());
    assert!(!report.outcome.failed_frontends.is_empty());
    // What landed is known exactly, removals included.
    assert_eq!(kernel.maps, *programmed.applied());
    assert!(served_by(&kernel, &b).is_empty());
    assert_eq!(served_by(&kernel, &m).len(), 2);
    // a is whole: its old two backends, or its new six.
    assert!([2, 6].contains(&served_by(&kernel, &a).len()));
    // The next round, in bigger maps, writes the rest.
    kernel.capacity = Capacity::default();
    let report = programmed.full(&[&a2, &c, &d, &m], |op: &_| kernel.write(op));
    assert!(report.complete(), "{:?}", report.outcome);
    assert_eq!(served_by(&kernel, &a).len(), 6);
    assert_eq!(served_by(&kernel, &c).len(), 2);
    assert_eq!(served_by(&kernel, &d).len(), 2);
    assert_eq!(kernel.maps, *programmed.applied());
}

#[test]
fn a_partial_round_keeps_the_counts_by_family_that_counting_again_finds() {
    // Nine slots: one round below does not fit, and in one the kernel's
    // writes fail.
    let (mut kernel, mut programmed) = programmed_in(9);
    let a = svc("a", [10, 96, 0, 1], 80, &endpoints(1, 2));
    let mut m = svc("m", [10, 96, 0, 2], 53, &endpoints(2, 2));
    m.scheduler = Some(Scheduler::Maglev);
    m.source_ranges = Some(vec!["198.51.100.0/24".parse().unwrap()]);
    let mut v6 = svc("v6", [0; 4], 80, &[]);
    v6.frontend.address = "fd00:96::1".parse().unwrap();
    let backend: std::net::Ipv6Addr = "fd00:10::1".parse().unwrap();
    v6.endpoints = vec![Endpoint::new(backend, 80)];
    v6.source_ranges = Some(vec!["fd00:1::/64".parse().unwrap()]);
    let b = svc("b", [10, 96, 0, 3], 80, &endpoints(7, 3));
    let a1 = svc("a", [10, 96, 0, 1], 80, &endpoints(1, 1));
    let rounds: [(&[&FrontendSpec], &[Frontend]); 5] = [
        (&[&a, &m], &[]),
        // The kernel's maps are smaller than the agent thinks: writes fail.
        (&[&v6], &[]),
        // Does not fit: refused, nothing written.
        (&[&b], &[]),
        (&[], &[a.frontend]),
        (&[&v6, &a1], &[m.frontend]),
    ];
    for (i, (frontends, gone)) in rounds.into_iter().enumerate() {
        kernel.capacity = small(if i == 1 { 6 } else { 9 });
        let report = programmed.partial(frontends, gone, |op: &_| kernel.write(op));
        assert_eq!(report.complete(), i != 1, "round {i}: {report:?}");
        assert_eq!(report.problems.is_empty(), i != 2, "round {i}: {report:?}");
        assert_eq!(
            programmed.fill(),
            Fill::of(programmed.applied()),
            "round {i}"
        );
        assert_eq!(kernel.maps, *programmed.applied(), "round {i}");
    }
    let rows = programmed.fill().rows();
    assert!(rows.contains(&("services", "ipv6", 2)), "{rows:?}");
    assert!(rows.contains(&("source_ranges", "ipv6", 1)), "{rows:?}");
    assert!(rows.contains(&("backends", "ipv4", 1)), "{rows:?}");
    assert!(rows.contains(&("maglev", "both", 0)), "{rows:?}");
}

#[test]
fn ids_live_flows_name_are_not_handed_out() {
    let mut ids = Ids::default();
    ids.reserve(&HashSet::from([1, 2, 7]), &HashSet::from([3]));
    let (state, _) = map_state(&[svc("s", [10, 96, 0, 1], 80, &endpoints(1, 2))], &mut ids);
    let backend_ids: Vec<u32> = state.backends.keys().copied().collect();
    assert_eq!(backend_ids, [8, 9]);
    assert_eq!(state.revnat.keys().copied().collect::<Vec<_>>(), [4]);
}

/// Frontends with holes (a slot, or a Maglev entry, missing: what a map
/// resized below its entries leaves) are found, and their removal takes slot
/// 0 first and leaves every other frontend as it was.
#[test]
fn holes_are_found_and_removed_slot0_first() {
    let a = svc(
        "a",
        [10, 96, 0, 1],
        80,
        &[([10, 0, 0, 1], 80), ([10, 0, 0, 2], 80)],
    );
    let b = svc("b", [10, 96, 0, 2], 80, &[([10, 0, 0, 2], 80)]);
    let mut c = svc("c", [10, 96, 0, 3], 53, &[([10, 0, 0, 3], 53)]);
    c.scheduler = Some(Scheduler::Maglev);
    let (whole, _) = map_state(&[&a, &b, &c], &mut Ids::default());
    assert!(crate::desired::apply::holes(&whole).is_empty());

    let mut broken = whole.clone();
    let a_head = service_key(&a.frontend, 0);
    broken.services.remove(&a_head.with_slot(2));
    let c_head = service_key(&c.frontend, 0);
    let c_id = whole.services[&c_head].rev_nat_id;
    let first_maglev = *broken
        .maglev
        .range(maglev_table_keys(c_id))
        .next()
        .unwrap()
        .0;
    broken.maglev.remove(&first_maglev);
    let holes = crate::desired::apply::holes(&broken);
    assert_eq!(
        holes,
        [
            (a_head, "slot 2 missing".to_string()),
            (c_head, "Maglev slot 0 names no backend".to_string())
        ]
    );

    let mut after = broken.clone();
    for (head, _) in &holes {
        let ops = crate::desired::apply::removal(&after, head);
        assert_eq!(ops[0], MapOp::DelService(*head), "slot 0 first");
        ops.iter().for_each(|op| after.apply(op));
    }
    crate::desired::apply::check_whole(&after).unwrap();
    let b_entries = |s: &MapState| {
        s.services
            .iter()
            .filter(|(k, _)| k.addr == service_key(&b.frontend, 0).addr)
            .map(|(k, v)| (*k, *v))
            .collect::<Vec<_>>()
    };
    assert_eq!(b_entries(&after), b_entries(&whole), "b untouched");
    assert_eq!(after.services.len(), b_entries(&whole).len());
    assert!(after.maglev.is_empty());
    assert_eq!(after.backends, whole.backends, "backends stay for a round");

    // Slots whose slot 0 is gone, or past its count, are orphans.
    assert!(crate::desired::apply::orphan_slots(&whole).is_empty());
    let mut orphaned = whole.clone();
    orphaned.services.remove(&a_head);
    let b_head = service_key(&b.frontend, 0);
    let b_value = orphaned.services[&b_head];
    orphaned.services.insert(
        b_head,
        ServiceValue {
            count: 0,
            ..b_value
        },
    );
    assert_eq!(
        crate::desired::apply::orphan_slots(&orphaned),
        [
            a_head.with_slot(1),
            a_head.with_slot(2),
            b_head.with_slot(1)
        ]
    );
}

/// A full round's writes, taken whole while they all land, come to what
/// the careful way (each write checked against, and copied into, what
/// landed before it) comes to: with no failure, and with the k-th write
/// failing, for every k.
#[test]
fn a_full_rounds_writes_taken_whole_come_to_what_written_one_by_one_do() {
    use crate::desired::apply::{run, run_whole, Outcome};
    let mut m = svc("m", [10, 96, 0, 3], 53, &endpoints(5, 2));
    m.scheduler = Some(Scheduler::Maglev);
    m.source_ranges = Some(vec!["198.51.100.0/24".parse().unwrap()]);
    let mut ids = Ids::default();
    let (before, _) = map_state(
        &[
            &svc("a", [10, 96, 0, 1], 80, &endpoints(1, 3)),
            &svc("b", [10, 96, 0, 2], 80, &endpoints(3, 2)),
            &m,
        ],
        &mut ids,
    );
    // b goes, a and m change backends, c comes.
    let mut m2 = svc("m", [10, 96, 0, 3], 53, &endpoints(6, 2));
    m2.scheduler = m.scheduler;
    m2.source_ranges = Some(vec!["203.0.113.0/24".parse().unwrap()]);
    let (wanted, _) = map_state(
        &[
            &svc("a", [10, 96, 0, 1], 80, &endpoints(2, 3)),
            &svc("c", [10, 96, 0, 4], 80, &endpoints(20, 2)),
            &m2,
        ],
        &mut ids,
    );
    let ops = diff(&wanted, &before);
    for kind in [
        "DelService",
        "PutMaglev",
        "PutSourceRange",
        "DelSourceRange",
        "DelBackend",
    ] {
        assert!(
            ops.iter().any(|op| format!("{op:?}").starts_with(kind)),
            "{kind}: {ops:?}"
        );
    }
    let summary = |o: &Outcome| {
        let failures: Vec<_> = o
            .failures
            .iter()
            .map(|f| (f.op, f.reason.clone()))
            .collect();
        (o.written, failures, o.failed_frontends.clone())
    };
    for failing in (0..=ops.len()).rev() {
        // Fails the `failing`-th write that reaches the maps.
        let writer = || {
            let mut count = 0;
            move |_: &MapOp| {
                count += 1;
                if count == failing + 1 {
                    anyhow::bail!("write {failing} fails")
                }
                Ok(())
            }
        };
        let mut careful = before.clone();
        let expected = run(&ops, &mut careful, writer());
        let mut whole = before.clone();
        let outcome = run_whole(&ops, &mut whole, wanted.clone(), writer());
        assert_eq!(
            summary(&outcome),
            summary(&expected),
            "failing write {failing}"
        );
        assert_eq!(whole, careful, "failing write {failing}");
        assert_eq!(outcome.failures.is_empty(), failing == ops.len());
    }
}
