//! Backend choice for new flows: session affinity, Maglev, source hash and
//! round robin.

use super::*;

/// A service with three backends whose clients stick to their backend.
fn sticky(timeout: u32) -> Vec<FrontendSpec> {
    let mut s = service(
        "sticky",
        "10.96.0.60",
        80,
        Protocol::Tcp,
        &[(BACKEND_A, 8080), (BACKEND_B, 8080), ("10.244.3.3", 8080)],
    );
    s.affinity_timeout = Some(timeout);
    vec![s]
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend_across_source_ports() {
    let mut p = Programs::new(&sticky(10_800));
    let first = Frame::tcp(CLIENT, 43000, "10.96.0.60", 80);
    let backend = assert_dnat(&mut p, &first);
    let mut by_hash = std::collections::BTreeSet::new();
    for port in 43001..43101 {
        let f = Frame::tcp(CLIENT, port, "10.96.0.60", 80);
        by_hash.insert(p.hashed_backend(&f));
        let (verdict, out) = p.send_from_pod(&f);
        assert_eq!(verdict, TC_ACT_UNSPEC);
        assert_eq!(
            out,
            f.with_dst(backend.0, backend.1).bytes(),
            "source port {port} left its backend"
        );
    }
    assert!(
        by_hash.len() > 1,
        "without affinity these flows would have spread"
    );
    // Another client has its own.
    let other = Frame::tcp("10.244.1.77", 43000, "10.96.0.60", 80);
    assert_eq!(assert_dnat(&mut p, &other), p.hashed_backend(&other));
    let entries = p.dp.affinity().unwrap();
    assert_eq!(entries.len(), 2);
}

#[test]
fn session_affinity_expires_after_its_timeout() {
    let mut p = Programs::new(&sticky(1));
    let first = Frame::tcp(CLIENT, 44000, "10.96.0.60", 80);
    let backend = assert_dnat(&mut p, &first);
    // A flow the hash sends elsewhere: within the timeout it still sticks.
    let elsewhere = (44001..44200)
        .map(|port| Frame::tcp(CLIENT, port, "10.96.0.60", 80))
        .find(|f| p.hashed_backend(f) != backend)
        .unwrap();
    let (_, out) = p.send_from_pod(&elsewhere);
    assert_eq!(out, elsewhere.with_dst(backend.0, backend.1).bytes());
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let later = (44200..44400)
        .map(|port| Frame::tcp(CLIENT, port, "10.96.0.60", 80))
        .find(|f| p.hashed_backend(f) != backend)
        .unwrap();
    assert_dnat(&mut p, &later);
}

#[test]
fn affinity_to_a_departed_backend_is_dropped() {
    let mut p = Programs::new(&sticky(10_800));
    let first = Frame::tcp(CLIENT, 45000, "10.96.0.60", 80);
    let backend = assert_dnat(&mut p, &first);
    let mut remaining = sticky(10_800);
    remaining[0]
        .endpoints
        .retain(|e| (e.address, e.port) != (backend.0.into(), backend.1));
    p.serve(&remaining);
    let state = p.dp.read_state().unwrap();
    assert_eq!(p.dp.prune_affinity(&state).unwrap(), 1);
    let next = Frame::tcp(CLIENT, 45001, "10.96.0.60", 80);
    let moved = assert_dnat(&mut p, &next);
    assert_ne!(moved, backend);
}

fn scheduled(scheduler: proxy_agent::frontend::Scheduler) -> Vec<FrontendSpec> {
    let backends: Vec<(String, u16)> = (1..=5).map(|i| (format!("10.244.5.{i}"), 8080)).collect();
    let refs: Vec<(&str, u16)> = backends.iter().map(|(a, p)| (a.as_str(), *p)).collect();
    let mut s = service("sched", "10.96.0.70", 80, Protocol::Tcp, &refs);
    s.scheduler = Some(scheduler);
    vec![s]
}

/// The backend a new flow got, with its conntrack entry removed afterwards so
/// that the next packet of the same flow is scheduled afresh.
fn schedule_once(p: &mut Programs, f: &Frame) -> Ipv4Addr {
    let (verdict, out) = p.send_from_pod(f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    assert_eq!(out, f.with_dst(backend, 8080).bytes());
    p.dp.flush_conntrack().unwrap();
    backend
}

#[test]
fn maglev_picks_the_table_slot_of_the_flow_hash_and_is_stable_per_flow() {
    use proxy_agent::frontend::Scheduler;
    let mut p = Programs::new(&scheduled(Scheduler::Maglev));
    assert!(!p.programmed.applied().maglev.is_empty());
    let size = p.programmed.applied().maglev.len() as u32;
    for port in 46000..46040 {
        let f = Frame::tcp(CLIENT, port, "10.96.0.70", 80);
        let h = f.flow_hash();
        let rev_nat_id = p
            .programmed
            .applied()
            .maglev
            .keys()
            .next()
            .unwrap()
            .rev_nat_id;
        let key = proxy_common::MaglevKey {
            rev_nat_id,
            index: h % size,
        };
        let id = p.programmed.applied().maglev[&key];
        let want = p.programmed.applied().backends[&id].addr;
        assert_eq!(schedule_once(&mut p, &f), want, "port {port}");
        assert_eq!(
            schedule_once(&mut p, &f),
            want,
            "port {port}: same flow, same backend"
        );
    }
}

#[test]
fn source_hash_sends_every_flow_of_a_client_to_one_backend() {
    use proxy_agent::frontend::Scheduler;
    let mut p = Programs::new(&scheduled(Scheduler::SourceHash));
    let first = schedule_once(&mut p, &Frame::tcp(CLIENT, 47000, "10.96.0.70", 80));
    for port in 47001..47050 {
        assert_eq!(
            schedule_once(&mut p, &Frame::tcp(CLIENT, port, "10.96.0.70", 80)),
            first
        );
    }
    let others: std::collections::BTreeSet<Ipv4Addr> = (1..=40)
        .map(|i| {
            schedule_once(
                &mut p,
                &Frame::tcp(&format!("10.244.9.{i}"), 47000, "10.96.0.70", 80),
            )
        })
        .collect();
    assert!(others.len() > 1, "different clients spread: {others:?}");
}

/// Keeps this thread on CPU 0: round-robin counters, and the throughput
/// generator's runs, are numbered per CPU.
pub(super) fn pin_to_cpu0() {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

#[test]
fn round_robin_takes_the_backends_in_turn() {
    use proxy_agent::frontend::Scheduler;
    pin_to_cpu0();
    let mut p = Programs::new(&scheduled(Scheduler::RoundRobin));
    let picks: Vec<Ipv4Addr> = (0..10)
        .map(|i| schedule_once(&mut p, &Frame::tcp(CLIENT, 48000 + i, "10.96.0.70", 80)))
        .collect();
    // Ten new flows over five backends: each twice, in the same order both rounds.
    assert_eq!(picks[..5], picks[5..], "{picks:?}");
    let distinct: std::collections::BTreeSet<_> = picks.iter().collect();
    assert_eq!(distinct.len(), 5, "{picks:?}");
    // Established flows keep their backend whatever the counter says.
    let f = Frame::tcp(CLIENT, 48100, "10.96.0.70", 80);
    let first = assert_dnat_any(&mut p, &f);
    for _ in 0..3 {
        assert_eq!(assert_dnat_any(&mut p, &f), first);
    }
}

#[test]
fn round_robin_counts_for_the_highest_frontend_id_too() {
    use proxy_agent::{desired::MAX_FRONTEND_ID, frontend::Scheduler};
    pin_to_cpu0();
    // Its counter is keyed by the highest id the agent hands out.
    let ids = ids_taken(&[("10.96.0.99", 80, MAX_FRONTEND_ID - 1)]);
    let mut p = Programs::with_ids(&scheduled(Scheduler::RoundRobin), ids);
    assert_eq!(p.frontend_id("10.96.0.70", 80), MAX_FRONTEND_ID);
    let picks: Vec<Ipv4Addr> = (0..10)
        .map(|i| schedule_once(&mut p, &Frame::tcp(CLIENT, 48200 + i, "10.96.0.70", 80)))
        .collect();
    assert_eq!(picks[..5], picks[5..], "{picks:?}");
    let distinct: std::collections::BTreeSet<_> = picks.iter().collect();
    assert_eq!(distinct.len(), 5, "{picks:?}");
}
