//! Packet tests of the uplink programs (XDP and its tc twin) with
//! BPF_PROG_TEST_RUN: NodePort, externalIP and LoadBalancer traffic, SNAT to
//! remote backends with next-hop MACs from the FIB, the replies, fragments,
//! and ICMP errors about SNATed flows. The FIB is a network namespace of the test's
//! own, with static neighbours, so every MAC in the expected frames is known.
//! This file holds the fixture; the tests are in one module per subject.

mod fragments;
mod icmp;
mod ipv6;
mod snat;
#[path = "../support/mod.rs"]
mod support;
mod verdicts;

use std::{
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    ops::{Deref, DerefMut},
    sync::atomic::{AtomicBool, Ordering},
};

use aya::{programs::ProgramError, util::KernelVersion};
use proxy_agent::{
    desired::gc::Lifetimes,
    desired::{Ids, MapState},
    frontend::{Endpoint, Frontend, FrontendSpec, Protocol},
    harness::{self, Hook},
    kernel::Tuples,
    settings,
};
use proxy_common::{
    bench, ct_dir, ct_flags, nat_ports,
    program_names::{FROM_POD, UPLINK_XDP},
    ServiceValue,
};
use support::{
    fib::{self, CLIENT, CLIENT6, CLIENT_MAC, NODE, NODE2_MAC, NODE6, NODE_MAC},
    netns::{in_netns, Lab},
    packet::{self, Frame},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_SHOT: u32 = 2;

const FAR_CLIENT: &str = "10.250.0.200"; // no neighbour entry
const LOCAL_POD: &str = "10.244.1.3";
const REMOTE_POD: &str = "10.244.2.3";
const UNRESOLVED_POD: &str = "10.244.3.3"; // routed via a next hop without a neighbour entry
const EXTERNAL_IP: &str = "192.0.2.7";
const LB_IP: &str = "203.0.113.5";
const NAT_MIN: u16 = settings::DEFAULT_NAT_PORTS.0;
const NAT_MAX: u16 = settings::DEFAULT_NAT_PORTS.1;

const LOCAL_POD6: &str = "fd00:10:244:1::3";
const REMOTE_POD6: &str = "fd00:10:244:2::3";
const UNRESOLVED_POD6: &str = "fd00:10:244:3::3"; // routed via a next hop without a neighbour entry
const LB_IP6: &str = "2001:db8::5";
const EXTERNAL_IP6: &str = "2001:db8::7";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn ip6(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn frontend(
    name: &str,
    addr: &str,
    port: u16,
    protocol: Protocol,
    endpoints: &[(&str, u16, bool)],
) -> FrontendSpec {
    let endpoints = endpoints
        .iter()
        .map(|(a, p, local)| Endpoint {
            local: *local,
            ..Endpoint::new(ip6(a), *p)
        })
        .collect();
    FrontendSpec::new(
        name,
        Frontend {
            address: ip6(addr),
            port,
            protocol,
        },
        endpoints,
    )
}

fn services() -> Vec<FrontendSpec> {
    let mut lb = frontend("lb", LB_IP, 80, Protocol::Tcp, &[(REMOTE_POD, 8080, false)]);
    lb.source_ranges = Some(vec!["10.250.0.96/28".parse().unwrap()]);
    let mut local_only = frontend(
        "etp-local",
        NODE,
        30081,
        Protocol::Tcp,
        &[(LOCAL_POD, 8080, true)],
    );
    local_only.local_only = true;
    // Its ranges were all invalid or IPv6: it fails closed.
    let mut lb_closed = frontend(
        "lb-closed",
        LB_IP,
        81,
        Protocol::Tcp,
        &[(REMOTE_POD, 8080, false)],
    );
    lb_closed.source_ranges = Some(Vec::new());
    let mut local_none = frontend("etp-local-none", NODE, 30082, Protocol::Tcp, &[]);
    local_none.local_only = true;
    // For clients inside the cluster only: never for one from outside.
    local_none.cluster_endpoints = vec![Endpoint::new(ip(REMOTE_POD), 8080)];
    // IPv6 twins: NodePorts on the node's IPv6 address, and a LoadBalancer
    // with ranges of both families (CLIENT6 is in the IPv6 one).
    let mut lb6 = frontend(
        "lb6",
        LB_IP6,
        80,
        Protocol::Tcp,
        &[(REMOTE_POD6, 8080, false)],
    );
    lb6.source_ranges = Some(vec![
        "10.250.0.96/28".parse().unwrap(),
        "fd00:10:250::100/120".parse().unwrap(),
    ]);
    let mut local_none6 = frontend("etp-local-none6", NODE6, 30082, Protocol::Tcp, &[]);
    local_none6.local_only = true;
    let mut local_only6 = frontend(
        "etp-local6",
        NODE6,
        30081,
        Protocol::Tcp,
        &[(LOCAL_POD6, 8080, true)],
    );
    local_only6.local_only = true;
    // Its only range is IPv4 (CLIENT's), which no IPv6 client matches: it
    // fails closed.
    let mut lb_closed6 = frontend(
        "lb-closed6",
        LB_IP6,
        81,
        Protocol::Tcp,
        &[(REMOTE_POD6, 8080, false)],
    );
    lb_closed6.source_ranges = Some(vec!["10.250.0.96/28".parse().unwrap()]);
    vec![
        frontend(
            "np-local6",
            NODE6,
            30080,
            Protocol::Tcp,
            &[(LOCAL_POD6, 8080, true)],
        ),
        frontend(
            "np-remote6",
            NODE6,
            30090,
            Protocol::Tcp,
            &[(REMOTE_POD6, 8080, false)],
        ),
        frontend(
            "np-remote6-udp",
            NODE6,
            30053,
            Protocol::Udp,
            &[(REMOTE_POD6, 5353, false)],
        ),
        frontend(
            "np-unresolved6",
            NODE6,
            30099,
            Protocol::Tcp,
            &[(UNRESOLVED_POD6, 8080, false)],
        ),
        frontend("np-empty6", NODE6, 30070, Protocol::Tcp, &[]),
        frontend(
            "ext-ip6",
            EXTERNAL_IP6,
            80,
            Protocol::Tcp,
            &[(REMOTE_POD6, 8080, false)],
        ),
        lb6,
        lb_closed6,
        local_only6,
        local_none6,
        frontend(
            "np-local",
            NODE,
            30080,
            Protocol::Tcp,
            &[(LOCAL_POD, 8080, true)],
        ),
        frontend(
            "np-remote",
            NODE,
            30090,
            Protocol::Tcp,
            &[(REMOTE_POD, 8080, false)],
        ),
        frontend(
            "np-remote-udp",
            NODE,
            30053,
            Protocol::Udp,
            &[(REMOTE_POD, 5353, false)],
        ),
        frontend(
            "np-unresolved",
            NODE,
            30099,
            Protocol::Tcp,
            &[(UNRESOLVED_POD, 8080, false)],
        ),
        frontend("np-empty", NODE, 30070, Protocol::Tcp, &[]),
        frontend(
            "ext-ip",
            EXTERNAL_IP,
            80,
            Protocol::Tcp,
            &[(REMOTE_POD, 8080, false)],
        ),
        lb,
        lb_closed,
        local_only,
        local_none,
        // SCTP to a remote backend on another port: SNAT and DNAT both
        // change a port, and the CRC32c with them.
        frontend(
            "np-sctp",
            NODE,
            30132,
            Protocol::Sctp,
            &[(REMOTE_POD, 3868, false)],
        ),
    ]
}

/// The shared harness, and the FIB namespace's uplink the programs see as
/// their ingress device.
struct Programs {
    h: harness::Programs,
    ifindex: u32,
}

impl Deref for Programs {
    type Target = harness::Programs;

    fn deref(&self) -> &harness::Programs {
        &self.h
    }
}

impl DerefMut for Programs {
    fn deref_mut(&mut self) -> &mut harness::Programs {
        &mut self.h
    }
}

/// Said once per run (see [`note_limitation`]) when the XDP runs go without
/// an input context.
const XDP_CTX_LIMITATION: &str = "BPF_PROG_TEST_RUN refuses an xdp_md input context \
(ctx_in) for XDP with EINVAL before Linux 5.15 (kernel commits 47316f4a3053 and \
ec94670fcb3b), so the XDP runs here cannot name up0 as the ingress device: they run \
without ctx_in, with this namespace's loopback as ingress, and a redirect to up0 (the \
only egress of the FIB namespace) stands for the XDP_TX it is when up0 is the ingress";

/// Set once a kernel before 5.15 has refused the XDP input context.
static XDP_CTX_REFUSED: AtomicBool = AtomicBool::new(false);

/// Tells `cargo xtask vm-test` (through the file `FERRY_TEST_NOTES` names, if
/// set) that this run works around a limitation of the kernel, once per process,
/// and says it on stderr too.
fn note_limitation(note: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if SAID.swap(true, Ordering::Relaxed) {
        return;
    }
    eprintln!("known kernel limitation: {note}");
    if let Some(path) = std::env::var_os("FERRY_TEST_NOTES") {
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.to_string_lossy()));
        writeln!(file, "{note}").unwrap();
    }
}

impl Programs {
    fn xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        if !XDP_CTX_REFUSED.load(Ordering::Relaxed) {
            match self.h.run(Hook::Xdp(Some(self.ifindex)), frame) {
                Ok(run) => return (run.verdict, run.frame),
                // Only there, and only this error: anything else is a failure.
                Err(e) => match e.downcast_ref::<ProgramError>() {
                    Some(ProgramError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::EINVAL)
                            && KernelVersion::current()
                                .is_ok_and(|v| v < KernelVersion::new(5, 15, 0)) =>
                    {
                        note_limitation(&format!(
                            "{XDP_CTX_LIMITATION} (this kernel: {}: {})",
                            e.call, e.io_error
                        ));
                        XDP_CTX_REFUSED.store(true, Ordering::Relaxed);
                    }
                    _ => panic!("XDP test run: {e:?}"),
                },
            }
        }
        let run = self
            .h
            .run(Hook::Xdp(None), frame)
            .expect("XDP test run without ctx_in");
        // The program transmits on the ingress device (XDP_TX) when the FIB's
        // egress is the ingress, else redirects there. With loopback as the
        // ingress and up0 the only device with routes, the redirect is to up0,
        // which is XDP_TX when the frame came in on up0 as these tests mean.
        let verdict = match run.verdict {
            XDP_REDIRECT => XDP_TX,
            XDP_TX => panic!("XDP_TX with loopback as the ingress device"),
            other => other,
        };
        (verdict, run.frame)
    }

    fn tc(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let run = self
            .h
            .run(Hook::UplinkTc(Some(self.ifindex)), frame)
            .expect("tc test run");
        (run.verdict, run.frame)
    }

    fn nonzero_stats(&self) -> Vec<(&'static str, u64)> {
        self.h
            .nonzero_stats()
            .unwrap()
            .into_iter()
            .map(|(n, c)| (n, c.packets))
            .collect()
    }

    fn stat(&self, name: &str) -> u64 {
        self.h.stat(name).unwrap()
    }
}

/// Runs `f` with loaded programs, inside the FIB namespace, maps programmed.
fn with_programs(f: impl FnOnce(&mut Programs) + Send + 'static) {
    with_programs_numbered(Ids::default(), f);
}

/// The same, with frontend ids handed out by `ids`.
fn with_programs_numbered(mut ids: Ids, f: impl FnOnce(&mut Programs) + Send + 'static) {
    let mut lab = Lab::new("up");
    let (ns, ifindex) = fib::namespace(&mut lab);
    in_netns(&ns, move || {
        // Room for frontend ids past 16 bits, as with --map-frontends 262144.
        let capacity = proxy_agent::desired::Capacity {
            revnat: 1 << 18,
            ..Default::default()
        };
        let mut h = harness::Programs::load_with_capacity(&capacity).expect("load the programs");
        ids.limit_frontend_ids((1 << 18) - 1);
        h.programmed.ids = ids;
        let problems = h.serve(&services()).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        h.dp.set_config(&settings::node_config(
            Some(ip(NODE)),
            NODE6.parse().ok(),
            (NAT_MIN, NAT_MAX),
            Default::default(),
        ))
        .unwrap();
        f(&mut Programs { h, ifindex });
    });
    lab.teardown();
}

fn from_outside(proto: u8, sport: u16, daddr: &str, dport: u16) -> Frame {
    let client = if daddr.contains(':') { CLIENT6 } else { CLIENT };
    let mut f = match proto {
        packet::TCP => Frame::tcp(client, sport, daddr, dport),
        packet::SCTP => Frame::sctp(client, sport, daddr, dport),
        _ => Frame::udp(client, sport, daddr, dport),
    };
    f.src_mac = CLIENT_MAC;
    f.dst_mac = NODE_MAC;
    f
}

/// The NAT port the first try gives a flow (no collision in these tests).
fn nat_port(f: &Frame) -> u16 {
    let h = f.flow_hash();
    NAT_MIN + (h % u32::from(NAT_MAX - NAT_MIN + 1)) as u16
}

/// What leaves towards node2 for a SNATed flow (from the node's address of
/// the flow's family).
fn snated(f: &Frame, backend: &str, backend_port: u16) -> Frame {
    let node = if f.v6() { NODE6 } else { NODE };
    let mut out = f
        .with_dst(ip6(backend), backend_port)
        .with_src(ip6(node), nat_port(f));
    out.dst_mac = NODE2_MAC;
    out.src_mac = NODE_MAC;
    out
}
