//! Packet tests of the uplink programs (XDP and its tc twin) with
//! BPF_PROG_TEST_RUN: NodePort, externalIP and LoadBalancer traffic, SNAT to
//! remote backends with next-hop MACs from the FIB, and the replies. The FIB is
//! a network namespace of the test's own, with static neighbours, so every MAC
//! in the expected frames is known.

mod support;

use std::{
    fs::File,
    io::Write as _,
    net::Ipv4Addr,
    ops::{Deref, DerefMut},
    sync::atomic::{AtomicBool, Ordering},
};

use aya::{programs::ProgramError, util::KernelVersion};
use proxy_agent::{
    desired::gc::Lifetimes,
    desired::{Ids, MapState},
    frontend::{Endpoint, Frontend, FrontendSpec, Protocol},
    harness::{self, Hook},
    settings,
};
use proxy_common::{
    bench, ct_dir, ct_flags, hash, nat_ports,
    program_names::{UPLINK_TC, UPLINK_XDP},
    ServiceKey4, ServiceValue,
};
use support::{
    fib::{self, CLIENT, CLIENT_MAC, NODE, NODE2_MAC, NODE_MAC},
    netns::{in_netns, Lab},
    packet::{self, Frame},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;

const FAR_CLIENT: &str = "10.250.0.200"; // no neighbour entry
const LOCAL_POD: &str = "10.244.1.3";
const REMOTE_POD: &str = "10.244.2.3";
const UNRESOLVED_POD: &str = "10.244.3.3"; // routed via a next hop without a neighbour entry
const EXTERNAL_IP: &str = "192.0.2.7";
const LB_IP: &str = "203.0.113.5";
const NAT_MIN: u16 = settings::DEFAULT_NAT_PORTS.0;
const NAT_MAX: u16 = settings::DEFAULT_NAT_PORTS.1;

fn ip(s: &str) -> Ipv4Addr {
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
            ..Endpoint::new(ip(a), *p)
        })
        .collect();
    FrontendSpec::new(
        name,
        Frontend {
            address: ip(addr),
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
    vec![
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
            .run(Hook::Tc(UPLINK_TC, Some(self.ifindex)), frame)
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
fn with_programs_numbered(ids: Ids, f: impl FnOnce(&mut Programs) + Send + 'static) {
    let mut lab = Lab::new("up");
    let (ns, ifindex) = fib::namespace(&mut lab);
    in_netns(&ns, move || {
        let mut h = harness::Programs::load().expect("load the programs");
        h.ids = ids;
        let problems = h.serve(&services()).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        h.dp.set_config(settings::node_config(Some(ip(NODE)), (NAT_MIN, NAT_MAX)))
            .unwrap();
        f(&mut Programs { h, ifindex });
    });
    lab.teardown();
}

fn from_outside(proto: u8, sport: u16, daddr: &str, dport: u16) -> Frame {
    let mut f = if proto == packet::TCP {
        Frame::tcp(CLIENT, sport, daddr, dport)
    } else {
        Frame::udp(CLIENT, sport, daddr, dport)
    };
    f.src_mac = CLIENT_MAC;
    f.dst_mac = NODE_MAC;
    f
}

/// The NAT port the first try gives a flow (no collision in these tests).
fn nat_port(f: &Frame) -> u16 {
    let h = hash::flow_hash4(
        u32::from(f.saddr).to_be(),
        u32::from(f.daddr).to_be(),
        f.sport.to_be(),
        f.dport.to_be(),
        f.proto,
    );
    NAT_MIN + (h % u32::from(NAT_MAX - NAT_MIN + 1)) as u16
}

/// What leaves towards node2 for a SNATed flow.
fn snated(f: &Frame, backend: &str, backend_port: u16) -> Frame {
    let mut out = f
        .with_dst(ip(backend), backend_port)
        .with_src(ip(NODE), nat_port(f));
    out.dst_mac = NODE2_MAC;
    out.src_mac = NODE_MAC;
    out
}

#[test]
fn nodeport_to_a_local_backend_is_dnated_and_passed_up() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40000, NODE, 30080);
        let (verdict, out) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(
            out,
            f.with_dst(ip(LOCAL_POD), 8080).bytes(),
            "client address kept, MACs untouched"
        );
        packet::assert_checksums_valid(&out);
        assert_eq!(p.stat("fwd_local"), 1);
        let ct = p.dp.conntrack().unwrap();
        assert!(
            ct.iter().any(|(k, _)| k.dir == ct_dir::REPLY),
            "the backend's reply is reverse-NATed on its veth"
        );
    });
}

#[test]
fn nodeport_to_a_remote_backend_is_snated_and_sent_back_out_with_fib_macs() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40001, NODE, 30090);
        let (verdict, out) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_TX, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&f, REMOTE_POD, 8080).bytes());
        packet::assert_checksums_valid(&out);
        let nat = p.dp.nat().unwrap();
        assert_eq!(nat.len(), 1);
        let (key, value) = nat[0];
        assert_eq!(
            (
                key.saddr_be,
                key.daddr_be,
                key.sport_be,
                key.dport_be,
                key.dir
            ),
            (
                u32::from(ip(REMOTE_POD)).to_be(),
                u32::from(ip(NODE)).to_be(),
                8080u16.to_be(),
                nat_port(&f).to_be(),
                ct_dir::NAT
            )
        );
        assert_eq!(
            (value.client_addr_be, value.client_port_be),
            (u32::from(ip(CLIENT)).to_be(), 40001u16.to_be())
        );
        // Later packets of the flow keep their NAT port.
        let mut ack = f.clone();
        ack.tcp_flags = 0x10;
        let (verdict, out) = p.xdp(&ack.bytes());
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out, snated(&ack, REMOTE_POD, 8080).bytes());
        assert_eq!(p.dp.nat().unwrap().len(), 1);
        assert_eq!(p.stat("fwd_snat"), 2);
    });
}

#[test]
fn remote_backends_reply_is_translated_back_to_the_client() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40002, NODE, 30090);
        let (_, sent) = p.xdp(&f.bytes());
        assert_eq!(sent, snated(&f, REMOTE_POD, 8080).bytes());
        let mut reply = snated(&f, REMOTE_POD, 8080).reply();
        reply.src_mac = NODE2_MAC;
        reply.dst_mac = NODE_MAC;
        let (verdict, out) = p.xdp(&reply.bytes());
        assert_eq!(verdict, XDP_TX);
        let mut expected = reply.with_dst(ip(CLIENT), 40002).with_src(ip(NODE), 30090);
        expected.dst_mac = CLIENT_MAC;
        expected.src_mac = NODE_MAC;
        assert_eq!(
            out,
            expected.bytes(),
            "from the NodePort the client dialled, to the client"
        );
        packet::assert_checksums_valid(&out);
        assert_eq!(p.stat("rev_snat"), 1);
    });
}

#[test]
fn udp_nodeport_round_trip_through_snat() {
    with_programs(|p| {
        let f = from_outside(packet::UDP, 41000, NODE, 30053);
        let (verdict, out) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out, snated(&f, REMOTE_POD, 5353).bytes());
        let mut reply = snated(&f, REMOTE_POD, 5353).reply();
        reply.src_mac = NODE2_MAC;
        reply.dst_mac = NODE_MAC;
        let (verdict, out) = p.xdp(&reply.bytes());
        assert_eq!(verdict, XDP_TX);
        let mut expected = reply.with_dst(ip(CLIENT), 41000).with_src(ip(NODE), 30053);
        expected.dst_mac = CLIENT_MAC;
        expected.src_mac = NODE_MAC;
        assert_eq!(out, expected.bytes());
        packet::assert_checksums_valid(&out);
    });
}

#[test]
fn external_ip_and_load_balancer_ip_are_served() {
    with_programs(|p| {
        for daddr in [EXTERNAL_IP, LB_IP] {
            let f = from_outside(packet::TCP, 40003, daddr, 80);
            let (verdict, out) = p.xdp(&f.bytes());
            assert_eq!(verdict, XDP_TX, "{daddr}");
            assert_eq!(out, snated(&f, REMOTE_POD, 8080).bytes(), "{daddr}");
        }
    });
}

/// The NAT entry of a client port's flow: (NAT port, flags).
fn nat_of(p: &Programs, client_port: u16) -> Option<(u16, u16)> {
    p.dp.nat()
        .unwrap()
        .into_iter()
        .find(|(_, v)| v.client_port_be == client_port.to_be())
        .map(|(k, v)| (u16::from_be(k.dport_be), v.flags))
}

/// The flags of a client port's forward conntrack entry.
fn forward_flags(p: &Programs, client_port: u16) -> u16 {
    p.dp.conntrack()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.dir == ct_dir::FORWARD && k.sport_be == client_port.to_be())
        .map(|(_, v)| v.flags)
        .expect("forward entry")
}

#[test]
fn a_fin_or_rst_either_way_closes_the_nat_entry_and_the_flow() {
    with_programs(|p| {
        // From the client: a FIN, and an RST.
        for (port, flags) in [(42000, 0x11), (42001, 0x04)] {
            let f = from_outside(packet::TCP, port, NODE, 30090);
            p.xdp(&f.bytes());
            assert_eq!(nat_of(p, port), Some((nat_port(&f), 0)), "open");
            let mut close = f.clone();
            close.tcp_flags = flags;
            let (verdict, out) = p.xdp(&close.bytes());
            assert_eq!(verdict, XDP_TX);
            assert_eq!(out, snated(&close, REMOTE_POD, 8080).bytes());
            assert_eq!(nat_of(p, port), Some((nat_port(&f), ct_flags::CLOSING)));
            assert_eq!(
                forward_flags(p, port) & ct_flags::CLOSING,
                ct_flags::CLOSING
            );
        }
        // From the backend: its FIN closes the NAT entry and the client's
        // forward entry.
        let f = from_outside(packet::TCP, 42002, NODE, 30090);
        p.xdp(&f.bytes());
        let mut fin = snated(&f, REMOTE_POD, 8080).reply();
        fin.tcp_flags = 0x11;
        fin.src_mac = NODE2_MAC;
        fin.dst_mac = NODE_MAC;
        let (verdict, out) = p.xdp(&fin.bytes());
        assert_eq!(verdict, XDP_TX);
        let mut expected = fin.with_dst(ip(CLIENT), 42002).with_src(ip(NODE), 30090);
        expected.dst_mac = CLIENT_MAC;
        expected.src_mac = NODE_MAC;
        assert_eq!(out, expected.bytes());
        assert_eq!(nat_of(p, 42002), Some((nat_port(&f), ct_flags::CLOSING)));
        assert_eq!(
            forward_flags(p, 42002) & ct_flags::CLOSING,
            ct_flags::CLOSING
        );
        // The client reuses the tuple for a new connection: open again, same port.
        p.xdp(&f.bytes());
        assert_eq!(nat_of(p, 42002), Some((nat_port(&f), 0)));

        // After the close timeout the collection removes the closed flows'
        // entries, frees their ports, and leaves the open one.
        let now = proxy_agent::kernel::monotonic_ns();
        let report =
            p.dp.gc(now + 11_000_000_000, &Lifetimes::default())
                .unwrap();
        assert_eq!(report.nat_removed, 2, "{report:?}");
        assert_eq!(nat_of(p, 42000), None);
        assert_eq!(nat_of(p, 42001), None);
        assert_eq!(nat_of(p, 42002), Some((nat_port(&f), 0)));
        let held: u32 =
            p.dp.nat_ports()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.index < nat_ports::WORDS)
                .map(|(_, w)| w.count_ones())
                .sum();
        assert_eq!(held, 1, "only the open flow's port is marked held");
    });
}

#[test]
fn a_new_flow_finds_the_last_free_port_and_exhaustion_recovers_as_flows_end() {
    with_programs(|p| {
        const RANGE: u16 = 200;
        p.dp.set_config(settings::node_config(
            Some(ip(NODE)),
            (62000, 62000 + RANGE - 1),
        ))
        .unwrap();
        let send = |p: &mut Programs, client_port: u16| {
            let f = from_outside(packet::TCP, client_port, NODE, 30090);
            let (verdict, out) = p.xdp(&f.bytes());
            (f, verdict, out)
        };
        // Every port of the range, one flow each: the last flows find the
        // last free ports, which their hashes rarely name.
        let mut ports = std::collections::BTreeSet::new();
        for i in 0..RANGE {
            let (f, verdict, out) = send(p, 43000 + i);
            assert_eq!(verdict, XDP_TX, "flow {i}: {:?}", p.nonzero_stats());
            let port = u16::from_be_bytes([out[34], out[35]]);
            let mut expected = f.with_dst(ip(REMOTE_POD), 8080).with_src(ip(NODE), port);
            expected.dst_mac = NODE2_MAC;
            expected.src_mac = NODE_MAC;
            assert_eq!(out, expected.bytes(), "flow {i}");
            packet::assert_checksums_valid(&out);
            assert!((62000..62000 + RANGE).contains(&port), "{port}");
            assert!(ports.insert(port), "port {port} given twice");
        }
        assert_eq!(p.dp.nat().unwrap().len(), usize::from(RANGE));
        // One more: none is free. Dropped, counted, named by backend.
        let (_, verdict, _) = send(p, 43500);
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(p.stat("drop_nat_ports"), 1);
        // One flow resets; once the collection removed it, its port serves
        // the next new flow.
        let mut rst = from_outside(packet::TCP, 43007, NODE, 30090);
        rst.tcp_flags = 0x04;
        assert_eq!(p.xdp(&rst.bytes()).0, XDP_TX);
        let freed = nat_of(p, 43007).unwrap().0;
        let now = proxy_agent::kernel::monotonic_ns();
        let report =
            p.dp.gc(now + 11_000_000_000, &Lifetimes::default())
                .unwrap();
        assert_eq!(report.nat_removed, 1);
        assert_eq!(report.exhausted.len(), 1);
        assert_eq!(
            report.exhausted[0].0.to_string(),
            format!("{REMOTE_POD}:8080/TCP")
        );
        assert_eq!(report.exhausted[0].1, 1);
        let (_, verdict, out) = send(p, 43501);
        assert_eq!(verdict, XDP_TX, "{:?}", p.nonzero_stats());
        assert_eq!(u16::from_be_bytes([out[34], out[35]]), freed);
        assert_eq!(p.stat("drop_nat_ports"), 1);
    });
}

#[test]
fn load_balancer_source_ranges_drop_other_clients() {
    with_programs(|p| {
        let mut outsider = from_outside(packet::TCP, 40004, LB_IP, 80);
        outsider.saddr = ip("10.250.0.50");
        let bytes = outsider.bytes();
        let (verdict, out) = p.xdp(&bytes);
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(out, bytes);
        assert_eq!(p.stat("drop_source_range"), 1);
        assert!(p.dp.nat().unwrap().is_empty());
    });
}

#[test]
fn load_balancer_source_ranges_with_no_valid_range_drop_every_client() {
    with_programs(|p| {
        // CLIENT is inside the other LoadBalancer's ranges; here nobody is.
        let bytes = from_outside(packet::TCP, 40014, LB_IP, 81).bytes();
        let (verdict, out) = p.xdp(&bytes);
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(out, bytes);
        assert_eq!(p.stat("drop_source_range"), 1);
        assert!(p.dp.nat().unwrap().is_empty());
    });
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_or_drops() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40005, NODE, 30081);
        let (verdict, out) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, f.with_dst(ip(LOCAL_POD), 8080).bytes());
        let none = from_outside(packet::TCP, 40005, NODE, 30082).bytes();
        let (verdict, out) = p.xdp(&none);
        assert_eq!(
            verdict, XDP_DROP,
            "no local endpoint: dropped, as kube-proxy does"
        );
        assert_eq!(out, none);
        assert_eq!(p.stat("drop_no_local_backend"), 1);
    });
}

#[test]
fn unresolved_next_hop_goes_to_the_tc_program_which_lets_the_kernel_resolve_it() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40006, NODE, 30099);
        let bytes = f.bytes();
        let (verdict, out) = p.xdp(&bytes);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, bytes, "XDP hands it on untouched");
        assert_eq!(p.stat("pass_no_neigh"), 1);
        let (verdict, out) = p.tc(&bytes);
        assert_eq!(verdict, TC_ACT_REDIRECT, "bpf_redirect_neigh");
        let mut expected = f
            .with_dst(ip(UNRESOLVED_POD), 8080)
            .with_src(ip(NODE), nat_port(&f));
        expected.src_mac = f.src_mac;
        expected.dst_mac = f.dst_mac;
        assert_eq!(
            out,
            expected.bytes(),
            "translated; the kernel fills in the MACs"
        );
        assert_eq!(p.dp.nat().unwrap().len(), 1, "tc reused the entry XDP made");
    });
}

#[test]
fn reply_to_a_client_without_neighbour_entry_goes_to_tc() {
    with_programs(|p| {
        let mut f = from_outside(packet::TCP, 40007, NODE, 30090);
        f.saddr = ip(FAR_CLIENT);
        p.xdp(&f.bytes());
        let mut reply = snated(&f, REMOTE_POD, 8080).reply();
        reply.src_mac = NODE2_MAC;
        reply.dst_mac = NODE_MAC;
        let bytes = reply.bytes();
        let (verdict, out) = p.xdp(&bytes);
        assert_eq!((verdict, out), (XDP_PASS, bytes.clone()));
        let (verdict, out) = p.tc(&bytes);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(
            out,
            reply
                .with_dst(ip(FAR_CLIENT), 40007)
                .with_src(ip(NODE), 30090)
                .bytes()
        );
    });
}

#[test]
fn frontend_without_backends_is_rejected_by_the_tc_program() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40008, NODE, 30070);
        let bytes = f.bytes();
        let (verdict, out) = p.xdp(&bytes);
        assert_eq!(
            (verdict, out),
            (XDP_PASS, bytes.clone()),
            "XDP leaves the reject to tc"
        );
        let (verdict, out) = p.tc(&bytes);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, packet::port_unreachable(&f));
        packet::assert_checksums_valid(&out);
    });
}

#[test]
fn traffic_for_the_node_itself_is_untouched() {
    with_programs(|p| {
        for f in [
            from_outside(packet::TCP, 40009, NODE, 22),
            from_outside(packet::UDP, 40009, NODE, 61000),
        ] {
            let bytes = f.bytes();
            assert_eq!(p.xdp(&bytes), (XDP_PASS, bytes.clone()));
            assert_eq!(p.tc(&bytes), (TC_ACT_UNSPEC, bytes));
        }
        assert!(p.dp.conntrack().unwrap().is_empty());
    });
}

#[test]
fn frontend_ids_past_16_bits_reach_the_nat_and_source_range_maps() {
    // Recovered from maps where a frontend holds 65535: every frontend of
    // these tests gets an id past 16 bits.
    let mut taken = MapState::default();
    let slot0 = ServiceKey4::new(ip("10.96.0.1"), 80, proxy_common::proto::TCP, 0);
    let value = ServiceValue {
        rev_nat_id: 65_535,
        ..ServiceValue::default()
    };
    taken.services.insert(slot0, value);
    with_programs_numbered(Ids::from_state(&taken), |p| {
        // The SNATed flow's NAT entry names its frontend by the wide id, and
        // the reply finds the NodePort by it.
        let f = from_outside(packet::TCP, 40010, NODE, 30090);
        let (verdict, out) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_TX, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&f, REMOTE_POD, 8080).bytes());
        let nat = p.dp.nat().unwrap();
        assert!(nat[0].1.rev_nat_id > u32::from(u16::MAX), "{:?}", nat[0].1);
        let mut reply = snated(&f, REMOTE_POD, 8080).reply();
        reply.src_mac = NODE2_MAC;
        reply.dst_mac = NODE_MAC;
        let (verdict, out) = p.xdp(&reply.bytes());
        assert_eq!(verdict, XDP_TX);
        let mut expected = reply.with_dst(ip(CLIENT), 40010).with_src(ip(NODE), 30090);
        expected.dst_mac = CLIENT_MAC;
        expected.src_mac = NODE_MAC;
        assert_eq!(out, expected.bytes());
        // The LoadBalancer IP's source ranges, keyed by its wide id: an allowed
        // client is served, another dropped.
        let allowed = from_outside(packet::TCP, 40011, LB_IP, 80);
        let (verdict, out) = p.xdp(&allowed.bytes());
        assert_eq!(verdict, XDP_TX, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&allowed, REMOTE_POD, 8080).bytes());
        let mut outsider = from_outside(packet::TCP, 40012, LB_IP, 80);
        outsider.saddr = ip("10.250.0.50");
        let bytes = outsider.bytes();
        assert_eq!(p.xdp(&bytes), (XDP_DROP, bytes));
        assert_eq!(p.stat("drop_source_range"), 1);
    });
}

#[test]
fn a_wrapped_xdp_run_takes_the_real_path_every_time() {
    // As the benchmark times the uplink: N runs through the frame-restoring
    // wrapper, each of them the local-backend DNAT.
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40020, NODE, 30080);
        assert_eq!(p.xdp(&f.bytes()).0, XDP_PASS);
        // The flow's packets after its SYN, as the benchmark times them.
        let mut f = f;
        f.tcp_flags = 0x10;
        let (verdict, once) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_PASS);
        let run = p.dp.run_wrapped(UPLINK_XDP, &f.bytes(), 100).unwrap();
        assert_eq!((run.verdict, run.frame), (XDP_PASS, once));
        assert_eq!(p.stat("fwd_local"), 102, "each run found the NodePort");
        let run =
            p.dp.run_wrapped(bench::PASS_ONLY_XDP, &f.bytes(), 100)
                .unwrap();
        assert_eq!((run.verdict, run.frame), (XDP_PASS, f.bytes()));
    });
}
