//! IPv6 backend choice for new flows: Maglev, source hash, session affinity
//! (kept, expired, and dropped with its backend) and round robin: the twins
//! of `schedulers.rs`.

use proxy_agent::frontend::Scheduler;

use super::*;

/// An IPv6 ClusterIP of five backends, new flows by `scheduler`, clients
/// sticking to their backend for `affinity` seconds if given.
fn sched6(scheduler: Scheduler, affinity: Option<u32>) -> FrontendSpec {
    let backends: Vec<(String, u16)> = (1..=5)
        .map(|i| (format!("fd00:10:244:5::{i}"), 8080))
        .collect();
    let refs: Vec<(&str, u16)> = backends.iter().map(|(a, p)| (a.as_str(), *p)).collect();
    let mut s = service("sched6", SCHED6, 80, Protocol::Tcp, &refs);
    s.scheduler = Some(scheduler);
    s.affinity_timeout = affinity;
    s
}

const SCHED6: &str = "fd00:10:96::70";

fn scheduled6(scheduler: Scheduler, affinity: Option<u32>) -> Programs {
    Programs::new(&[sched6(scheduler, affinity)])
}

/// The backend a new IPv6 flow to `fd00:10:96::70` got, its conntrack
/// entries removed afterwards so that the same flow is scheduled afresh.
fn schedule6_once(p: &mut Programs, client: &str, sport: u16) -> IpAddr {
    let f = Frame::tcp(client, sport, SCHED6, 80);
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let dst: [u8; 16] = out[14 + 24..14 + 40].try_into().unwrap();
    let backend = IpAddr::from(dst);
    assert_eq!(out, f.with_dst(backend, 8080).bytes());
    p.dp.flush_conntrack().unwrap();
    backend
}

#[test]
fn ipv6_maglev_picks_the_table_slot_of_the_flow_hash() {
    let mut p = scheduled6(Scheduler::Maglev, None);
    let maglev = p.programmed.applied().maglev.clone();
    let size = maglev.len() as u32;
    let rev_nat_id = maglev.keys().next().unwrap().rev_nat_id;
    for port in 46000..46040 {
        let f = Frame::tcp(CLIENT6, port, SCHED6, 80);
        let index = f.flow_hash() % size;
        let id = maglev[&proxy_common::MaglevKey { rev_nat_id, index }];
        let want = p.programmed.applied().backends[&id].addr;
        assert_eq!(schedule6_once(&mut p, CLIENT6, port), want, "port {port}");
        assert_eq!(schedule6_once(&mut p, CLIENT6, port), want, "same flow");
    }
}

#[test]
fn ipv6_source_hash_sends_every_flow_of_a_client_to_one_backend() {
    let mut p = scheduled6(Scheduler::SourceHash, None);
    let first = schedule6_once(&mut p, CLIENT6, 47000);
    for port in 47001..47050 {
        assert_eq!(schedule6_once(&mut p, CLIENT6, port), first);
    }
    let others: std::collections::BTreeSet<_> = (1..=40)
        .map(|i| schedule6_once(&mut p, &format!("fd00:10:244:9::{i}"), 47000))
        .collect();
    assert!(others.len() > 1, "different clients spread: {others:?}");
}

#[test]
fn ipv6_session_affinity_keeps_a_client_on_one_backend_across_source_ports() {
    let mut p = scheduled6(Scheduler::FlowHash, Some(10_800));
    let first = schedule6_once(&mut p, CLIENT6, 43000);
    let mut by_hash = std::collections::BTreeSet::new();
    for port in 43001..43101 {
        let f = Frame::tcp(CLIENT6, port, SCHED6, 80);
        by_hash.insert(p.hashed(&f));
        assert_eq!(schedule6_once(&mut p, CLIENT6, port), first, "port {port}");
    }
    assert!(
        by_hash.len() > 1,
        "without affinity these flows would have spread"
    );
    assert_eq!(p.dp.v6.affinity.iter().count(), 1, "one client, one entry");
}

/// The first of `ports` from which the hash sends a new flow of `client`
/// to another backend than `not`.
fn port_hashed_away(p: &Programs, client: &str, ports: std::ops::Range<u16>, not: IpAddr) -> u16 {
    ports
        .into_iter()
        .find(|port| p.hashed(&Frame::tcp(client, *port, SCHED6, 80)).0 != not)
        .unwrap()
}

#[test]
fn ipv6_session_affinity_expires_after_its_timeout() {
    let mut p = scheduled6(Scheduler::FlowHash, Some(1));
    let first = schedule6_once(&mut p, CLIENT6, 44000);
    // A flow the hash sends elsewhere: within the timeout it still sticks.
    let elsewhere = port_hashed_away(&p, CLIENT6, 44001..44200, first);
    assert_eq!(schedule6_once(&mut p, CLIENT6, elsewhere), first);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let later = port_hashed_away(&p, CLIENT6, 44200..44400, first);
    let hashed = p.hashed(&Frame::tcp(CLIENT6, later, SCHED6, 80)).0;
    assert_eq!(schedule6_once(&mut p, CLIENT6, later), hashed, "expired");
}

#[test]
fn ipv6_affinity_to_a_departed_backend_is_dropped() {
    let mut p = scheduled6(Scheduler::FlowHash, Some(10_800));
    let first = schedule6_once(&mut p, CLIENT6, 45000);
    let mut remaining = sched6(Scheduler::FlowHash, Some(10_800));
    remaining.endpoints.retain(|e| e.address != first);
    p.serve(&[remaining]);
    let state = p.dp.read_state().unwrap();
    assert_eq!(p.dp.prune_affinity(&state).unwrap(), 1);
    assert_eq!(p.dp.v6.affinity.iter().count(), 0);
    let moved = schedule6_once(&mut p, CLIENT6, 45001);
    assert_ne!(moved, first);
    assert_eq!(
        p.dp.v6.affinity.iter().count(),
        1,
        "the client's new backend"
    );
}

#[test]
fn ipv6_round_robin_takes_the_backends_in_turn() {
    crate::schedulers::pin_to_cpu0();
    let mut p = scheduled6(Scheduler::RoundRobin, None);
    let picks: Vec<IpAddr> = (0..10)
        .map(|i| schedule6_once(&mut p, CLIENT6, 48000 + i))
        .collect();
    // Ten new flows over five backends: each twice, in the same order both rounds.
    assert_eq!(picks[..5], picks[5..], "{picks:?}");
    let distinct: std::collections::BTreeSet<_> = picks.iter().collect();
    assert_eq!(distinct.len(), 5, "{picks:?}");
    // Established flows keep their backend whatever the counter says.
    let f = Frame::tcp(CLIENT6, 48100, SCHED6, 80);
    let backend_of =
        |out: &[u8]| IpAddr::from(<[u8; 16]>::try_from(&out[14 + 24..14 + 40]).unwrap());
    let first = backend_of(&p.send_from_pod(&f).1);
    for _ in 0..3 {
        let (verdict, out) = p.send_from_pod(&f);
        assert_eq!(verdict, TC_ACT_UNSPEC);
        assert_eq!(out, f.with_dst(first, 8080).bytes());
    }
}
