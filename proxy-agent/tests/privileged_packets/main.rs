//! Packet tests: real frames through the real programs with BPF_PROG_TEST_RUN,
//! asserting the verdict and every byte of the frame that comes out. This file
//! holds the fixture; the tests are in one module per subject.

mod bench_programs;
mod conntrack;
mod fragments;
mod full_maps;
mod icmp;
mod ipv6;
mod monitor;
mod random_frames;
mod rewrite;
mod schedulers;
mod sctp;
#[path = "../support/mod.rs"]
mod support;
mod traffic;
mod verdicts;

use std::{
    net::{IpAddr, Ipv4Addr},
    ops::{Deref, DerefMut},
};

use proxy_agent::{
    desired::{Ids, MapState, ServiceKey},
    frontend::{Cidr, Endpoint, Frontend, FrontendSpec, Protocol},
    harness::{self, Hook},
    kernel::Tuples,
    settings,
};
use proxy_common::{
    bench, ct_dir, ct_flags, hash,
    program_names::{FROM_POD, TO_POD},
    proto, ServiceValue,
};
use support::packet::{self, Frame};

const TC_ACT_UNSPEC: u32 = u32::MAX; // -1: continue
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: &str = "10.244.1.2";
const VIP: &str = "10.96.0.10";
const EMPTY_VIP: &str = "10.96.0.11";
const BACKEND_A: &str = "10.244.1.3";
const BACKEND_B: &str = "10.244.2.3";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v4(addr: IpAddr) -> Ipv4Addr {
    match addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("{a}: an IPv4 test"),
    }
}

/// A frontend and its endpoints, IPv4 or IPv6 (as the addresses are written).
fn service(
    name: &str,
    vip: &str,
    port: u16,
    protocol: Protocol,
    endpoints: &[(&str, u16)],
) -> FrontendSpec {
    let addr = |a: &str| a.parse::<IpAddr>().unwrap();
    let frontend = Frontend {
        address: addr(vip),
        port,
        protocol,
    };
    FrontendSpec::new(
        name,
        frontend,
        endpoints
            .iter()
            .map(|(a, p)| Endpoint::new(addr(a), *p))
            .collect(),
    )
}

fn cluster() -> Vec<FrontendSpec> {
    vec![
        service(
            "web",
            VIP,
            80,
            Protocol::Tcp,
            &[(BACKEND_A, 8080), (BACKEND_B, 8080)],
        ),
        service(
            "dns",
            VIP,
            53,
            Protocol::Udp,
            &[(BACKEND_A, 5353), (BACKEND_B, 5353)],
        ),
        service("empty-tcp", EMPTY_VIP, 80, Protocol::Tcp, &[]),
        service("empty-udp", EMPTY_VIP, 53, Protocol::Udp, &[]),
    ]
}

/// Every packet program through this kernel's verifier. The harness loads
/// a program when a test first runs it; this test (the first listed, which
/// the kernel matrix runs as its probe) loads them all, so that a program the
/// kernel refuses is told apart from a failing test.
#[test]
fn all_programs_pass_the_verifier() {
    support::require_root();
    let mut p = harness::Programs::load().expect("load the programs");
    let counts =
        p.dp.load_packet_programs()
            .expect("the kernel's verifier takes every packet program");
    // The margin to the verifier's limit, in the kernel matrix's log.
    for (name, count) in counts {
        match count {
            Some(n) => println!("{name}: {n} instructions verified (limit 1000000)"),
            None => println!("{name}: this kernel does not report what it verified"),
        }
    }
}

/// The shared harness, with what these tests ask of it on top.
struct Programs(harness::Programs);

impl Deref for Programs {
    type Target = harness::Programs;

    fn deref(&self) -> &harness::Programs {
        &self.0
    }
}

impl DerefMut for Programs {
    fn deref_mut(&mut self) -> &mut harness::Programs {
        &mut self.0
    }
}

impl Programs {
    fn new(services: &[FrontendSpec]) -> Self {
        Self::with_ids(services, Ids::default())
    }

    /// With the ids an agent recovered from maps it found (see [`ids_taken`]).
    fn with_ids(services: &[FrontendSpec], ids: Ids) -> Self {
        support::require_root();
        let mut p = Self(harness::Programs::load().expect("load the programs"));
        p.programmed.ids = ids;
        p.serve(services);
        p
    }

    /// The frontend id the agent gave `vip:port` (TCP).
    fn frontend_id(&self, vip: &str, port: u16) -> u32 {
        self.programmed.applied().services[&slot0(vip, port)].rev_nat_id
    }

    /// Programs the maps for `services`, as the agent would, and checks they
    /// held what was written before and hold what is wanted after.
    fn serve(&mut self, services: &[FrontendSpec]) {
        let problems = self.0.serve_checked(services).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    }

    fn run(&mut self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let run = self.0.run(Hook::Tc(program, None), frame).unwrap();
        (run.verdict, run.frame)
    }

    fn send_from_pod(&mut self, frame: &Frame) -> (u32, Vec<u8>) {
        self.run(FROM_POD, &frame.bytes())
    }

    fn send_to_pod(&mut self, frame: &Frame) -> (u32, Vec<u8>) {
        self.run(TO_POD, &frame.bytes())
    }

    /// The backend the agent's own view says this flow hashes to.
    fn hashed_backend(&self, f: &Frame) -> (Ipv4Addr, u16) {
        let (addr, port) = self.hashed(f);
        (v4(addr), port)
    }

    /// The same for a flow of either family.
    fn hashed(&self, f: &Frame) -> (IpAddr, u16) {
        let key = |slot| ServiceKey::new(f.daddr, f.dport, f.proto, slot);
        let count = self.programmed.applied().services[&key(0)].count;
        let h = f.flow_hash();
        let id = self.programmed.applied().services[&key(hash::slot_for(h, count))].backend_id;
        let b = self.programmed.applied().backends[&id];
        (b.addr, b.port)
    }

    fn stat(&self, name: &str) -> u64 {
        self.0.stat(name).unwrap()
    }

    fn conntrack_len(&self) -> usize {
        self.dp.conntrack().unwrap().len()
    }
}

/// Sends `f` from the pod and asserts it comes out DNATed to its hashed backend,
/// byte for byte. Returns the backend. Either family.
fn assert_dnat_ip(p: &mut Programs, f: &Frame) -> (IpAddr, u16) {
    let backend = p.hashed(f);
    let (verdict, out) = p.send_from_pod(f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(
        out,
        f.with_dst(backend.0, backend.1).bytes(),
        "DNAT to {backend:?}"
    );
    packet::assert_checksums_valid(&out);
    backend
}

/// Sends the backend's reply to `f` towards the pod and asserts the source is
/// the frontend again, byte for byte. Either family.
fn assert_reverse_nat_ip(p: &mut Programs, f: &Frame, backend: (IpAddr, u16)) {
    let reply = f.with_dst(backend.0, backend.1).reply();
    let (verdict, out) = p.send_to_pod(&reply);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(
        out,
        reply.with_src(f.daddr, f.dport).bytes(),
        "reverse NAT to {}:{}",
        f.daddr,
        f.dport
    );
    packet::assert_checksums_valid(&out);
}

/// [`assert_dnat_ip`] for an IPv4 flow.
fn assert_dnat(p: &mut Programs, f: &Frame) -> (Ipv4Addr, u16) {
    let (addr, port) = assert_dnat_ip(p, f);
    (v4(addr), port)
}

/// [`assert_reverse_nat_ip`] for an IPv4 flow.
fn assert_reverse_nat(p: &mut Programs, f: &Frame, backend: (Ipv4Addr, u16)) {
    assert_reverse_nat_ip(p, f, (backend.0.into(), backend.1));
}

/// The conntrack key of `f`'s direction of its flow, as the client sent it.
fn forward_key(f: &Frame) -> proxy_common::CtKey4 {
    proxy_common::CtKey4 {
        saddr: proxy_common::Ip4::new(f.saddr4()),
        daddr: proxy_common::Ip4::new(f.daddr4()),
        sport_be: f.sport.to_be(),
        dport_be: f.dport.to_be(),
        proto: f.proto,
        dir: ct_dir::FORWARD,
        _pad: 0,
    }
}

/// The slot-0 key of the TCP frontend `vip:port`.
fn slot0(vip: &str, port: u16) -> ServiceKey {
    ServiceKey::new(ip(vip), port, proto::TCP, 0)
}

/// Ids as an agent recovers them from maps in which the TCP frontends `taken`
/// hold the given frontend ids: those keep them (while they stay), and new
/// frontends are numbered on from the highest.
fn ids_taken(taken: &[(&str, u16, u32)]) -> Ids {
    let mut found = MapState::default();
    for &(vip, port, rev_nat_id) in taken {
        let slot0_value = ServiceValue {
            rev_nat_id,
            ..ServiceValue::default()
        };
        found.services.insert(slot0(vip, port), slot0_value);
    }
    Ids::from_state(&found)
}

fn assert_untouched(p: &mut Programs, program: &str, frame: &[u8], verdict: u32) {
    let (got, out) = p.run(program, frame);
    assert_eq!(got, verdict);
    assert_eq!(out, frame, "frame must not change");
}

/// Sends `f` and returns the backend it was DNATed to, whichever.
fn assert_dnat_any(p: &mut Programs, f: &Frame) -> Ipv4Addr {
    let (verdict, out) = p.send_from_pod(f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    assert_eq!(out, f.with_dst(backend, 8080).bytes());
    backend
}
