//! Full maps with IPv6 frontends: the twin of `full_maps.rs`. A map's size
//! counts both families' entries, so the IPv6 frontends that do not fit
//! are refused by name, and a removal makes room for them.

use proxy_agent::desired::{Capacity, Problem};

use super::*;

fn web6(name: &str, vip: &str) -> FrontendSpec {
    service(name, vip, 80, Protocol::Tcp, &WEB)
}

#[test]
fn a_full_map_refuses_ipv6_frontends_by_name_and_a_removal_makes_room() {
    // Slot 0 and two backend slots each: two frontends fit in eight
    // entries, of either family: a (IPv4) and b.
    support::require_root();
    let capacity = Capacity {
        services: 8,
        ..Capacity::default()
    };
    let mut p =
        Programs(harness::Programs::load_with_capacity(&capacity).expect("load the programs"));
    let a = service(
        "a",
        "10.96.1.1",
        80,
        Protocol::Tcp,
        &[(BACKEND_A, 8080), (BACKEND_B, 8080)],
    );
    let (b, c) = (web6("b", "fd00:10:96:1::2"), web6("c", "fd00:10:96:1::3"));
    let problems =
        p.0.serve_checked(&[a.clone(), b.clone(), c.clone()])
            .unwrap();
    assert!(
        matches!(&problems[..], [Problem::MapFull { name, map: "svc6_v1", capacity: 8, .. }] if name == "c"),
        "{problems:?}"
    );
    let to = |vip: &str, port| Frame::tcp(CLIENT6, port, vip, 80);
    assert_dnat_ip(&mut p, &to("fd00:10:96:1::2", 40190));
    let unserved = to("fd00:10:96:1::3", 40191);
    assert_untouched(&mut p, FROM_POD, &unserved.bytes(), TC_ACT_UNSPEC);

    // b goes: c is programmed in the same round.
    let problems = p.0.serve_checked(&[a.clone(), c.clone()]).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert_dnat_ip(&mut p, &to("fd00:10:96:1::3", 40192));
    let gone = to("fd00:10:96:1::2", 40193);
    assert_untouched(&mut p, FROM_POD, &gone.bytes(), TC_ACT_UNSPEC);
    assert_eq!(p.dp.read_state().unwrap(), *p.programmed.applied());
}
