//! Full maps: the frontends that do not fit are refused by name, everything
//! else is served, and a removal makes room for them; a write the kernel
//! refuses leaves its frontend whole and the rest is still written.

use proxy_agent::{
    desired::{Capacity, Problem},
    kernel::batch::Writing,
};

use super::*;

fn web(name: &str, vip: &str) -> FrontendSpec {
    service(
        name,
        vip,
        80,
        Protocol::Tcp,
        &[(BACKEND_A, 8080), (BACKEND_B, 8080)],
    )
}

/// Maps whose services map holds `slots` entries.
fn small(slots: usize) -> Programs {
    support::require_root();
    let capacity = Capacity {
        services: slots,
        ..Capacity::default()
    };
    Programs(harness::Programs::load_with_capacity(&capacity).expect("load the programs"))
}

/// `f` leaves the pod as it was sent: no frontend claims it.
fn assert_untouched(p: &mut Programs, f: &Frame) {
    let (verdict, out) = p.send_from_pod(f);
    assert_eq!((verdict, out), (TC_ACT_UNSPEC, f.bytes()));
}

#[test]
fn a_full_map_refuses_by_name_and_a_removal_makes_room() {
    // Slot 0 and two backend slots each: two Services fit in eight entries.
    let mut p = small(8);
    let (a, b, c) = (
        web("a", "10.96.1.1"),
        web("b", "10.96.1.2"),
        web("c", "10.96.1.3"),
    );
    let problems =
        p.0.serve_checked(&[a.clone(), b.clone(), c.clone()])
            .unwrap();
    assert!(
        matches!(&problems[..], [Problem::MapFull { name, map: "svc4_v2", capacity: 8, .. }] if name == "c"),
        "{problems:?}"
    );
    // One client port per frontend: the frontends share their backends.
    let to = |vip: &str| {
        let port = 40000 + u16::from(vip.rsplit('.').next().unwrap().parse::<u8>().unwrap());
        Frame::tcp(CLIENT, port, vip, 80)
    };
    assert_dnat(&mut p, &to("10.96.1.1"));
    assert_dnat(&mut p, &to("10.96.1.2"));
    assert_untouched(&mut p, &to("10.96.1.3"));

    // b goes: c is programmed in the same round, a never moves.
    let a_backend = p.hashed_backend(&to("10.96.1.1"));
    let problems = p.0.serve_checked(&[a.clone(), c.clone()]).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(assert_dnat(&mut p, &to("10.96.1.1")), a_backend);
    assert_dnat(&mut p, &to("10.96.1.3"));
    assert_untouched(&mut p, &to("10.96.1.2"));
}

/// Whatever the way runs of puts are written (in batches, or one at a
/// time), a write the kernel refuses fails the same op, and everything
/// after it lands as before.
#[test]
fn a_write_the_kernel_refuses_leaves_its_frontend_whole() {
    let mut reports = Vec::new();
    for writing in [Writing::Batched, Writing::OneByOne] {
        // The agent's code believes the maps large; the kernel's hold eight slots.
        let mut p = small(8);
        p.programmed.capacity = Capacity::default();
        let (a, b) = (web("a", "10.96.1.1"), web("b", "10.96.1.2"));
        p.serve(&[a.clone(), b.clone()]);
        // b goes, c and d come: only one of them fits.
        let (c, d) = (web("c", "10.96.1.3"), web("d", "10.96.1.4"));
        let dp = &mut p.0.dp;
        let report = p.0.programmed.full(&[&a, &c, &d], dp.writes(writing));
        assert!(!report.complete());
        assert!(
            report.outcome.failures[0].reason.contains("map is full"),
            "{writing:?}: {:?}",
            report.outcome.failures
        );
        // What landed is what the agent believes: removals and all.
        assert_eq!(p.dp.read_state().unwrap(), *p.programmed.applied());
        // One client port per frontend: the frontends share their backends.
        let to = |vip: &str| {
            let port = 40000 + u16::from(vip.rsplit('.').next().unwrap().parse::<u8>().unwrap());
            Frame::tcp(CLIENT, port, vip, 80)
        };
        assert_dnat(&mut p, &to("10.96.1.1"));
        assert_untouched(&mut p, &to("10.96.1.2"));
        assert_dnat(&mut p, &to("10.96.1.3"));
        // d is not served, and nothing of it is reachable.
        assert_untouched(&mut p, &to("10.96.1.4"));
        let failed: Vec<_> = report.outcome.failures.iter().map(|f| f.op).collect();
        reports.push((
            report.outcome.written,
            failed,
            report
                .outcome
                .failed_frontends
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            p.dp.read_state().unwrap(),
        ));
    }
    assert_eq!(reports[0], reports[1], "batched against one at a time");
}

/// Services of 10 backends each, an IPv6 one and a Maglev one among them:
/// more entries of each map than one batch holds.
fn thousand_services() -> Vec<FrontendSpec> {
    let mut services: Vec<FrontendSpec> = (0..1_000u32)
        .map(|i| {
            let vip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            let backends: Vec<(String, u16)> = (0..10u32)
                .map(|b| (format!("10.244.{}.{}", i / 25, (i % 25) * 10 + b + 1), 8080))
                .collect();
            let endpoints: Vec<(&str, u16)> = backends
                .iter()
                .map(|(a, port)| (a.as_str(), *port))
                .collect();
            service(&format!("s{i}"), &vip, 80, Protocol::Tcp, &endpoints)
        })
        .collect();
    services[7].scheduler = Some(proxy_agent::frontend::Scheduler::Maglev);
    services.push(service(
        "six",
        "fd00:10:96::99",
        80,
        Protocol::Tcp,
        &[("fd00:10:244::5", 8080), ("fd00:10:244::6", 8080)],
    ));
    services
}

/// A round's puts written in batches (`BPF_MAP_UPDATE_BATCH`) fill the maps
/// as writing them one at a time does, then change them the same way.
#[test]
fn a_batched_write_of_the_maps_is_the_one_by_one_write() {
    support::require_root();
    let load =
        || Programs(harness::Programs::load_sized(1_000, 10, 0, true).expect("load the programs"));
    let (mut batched, mut one_by_one) = (load(), load());
    one_by_one.writing = Writing::OneByOne;
    let mut services = thousand_services();
    for p in [&mut batched, &mut one_by_one] {
        assert!(p.serve_checked(&services).unwrap().is_empty());
    }
    let state = batched.dp.read_state().unwrap();
    assert_eq!(state.services.len(), 1_000 * 11 + 3);
    assert!(state.maglev.len() > 100, "a Maglev table");
    assert_eq!(state, one_by_one.dp.read_state().unwrap());
    // Every Service's first backend moves: new backends, slots rewritten.
    for s in services.iter_mut().take(500) {
        s.endpoints[0].port = 9090;
    }
    for p in [&mut batched, &mut one_by_one] {
        assert!(p.serve_checked(&services).unwrap().is_empty());
    }
    assert_eq!(
        batched.dp.read_state().unwrap(),
        one_by_one.dp.read_state().unwrap()
    );
}

/// The resync's read of the maps in batches (`BPF_MAP_LOOKUP_BATCH`) finds
/// what a read one entry at a time finds, over more entries than one batch
/// holds, Maglev tables and IPv6 included.
#[test]
fn a_batched_read_of_the_maps_is_the_one_by_one_read() {
    use proxy_agent::kernel::batch::Reading;
    support::require_root();
    let mut p =
        Programs(harness::Programs::load_sized(1_000, 10, 0, true).expect("load the programs"));
    let services = thousand_services();
    p.serve(&services);
    let batched = p.dp.read_state_by(Reading::Batched).unwrap();
    let one_by_one = p.dp.read_state_by(Reading::OneByOne).unwrap();
    assert_eq!(batched.services.len(), 1_000 * 11 + 3);
    assert!(batched.maglev.len() > 100, "a Maglev table");
    assert_eq!(batched, one_by_one);
}
