//! Who is served and what is left alone: loadBalancerSourceRanges, the Local
//! traffic policy, rejects, traffic for the node itself, and the benchmarks'
//! wrapper.

use super::*;

#[test]
fn load_balancer_source_ranges_drop_other_clients() {
    with_programs(|p| {
        let mut outsider = from_outside(packet::TCP, 40004, LB_IP, 80);
        outsider.saddr = ip("10.250.0.50").into();
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
        let run =
            p.dp.run_wrapped(UPLINK_XDP, &f.bytes(), 100, Tuples::Same)
                .unwrap();
        assert_eq!((run.verdict, run.frame), (XDP_PASS, once));
        assert_eq!(p.stat("fwd_local"), 102, "each run found the NodePort");
        let run =
            p.dp.run_wrapped(bench::PASS_ONLY_XDP, &f.bytes(), 100, Tuples::Same)
                .unwrap();
        assert_eq!((run.verdict, run.frame), (XDP_PASS, f.bytes()));
    });
}

#[test]
fn a_fresh_wrapped_xdp_run_opens_a_new_flow_every_time() {
    // As the benchmark times new flows: each run's SYN from a source of its
    // own, each a new flow to a local backend (forward and reply entries).
    with_programs(|p| {
        let syn = from_outside(packet::TCP, 40021, NODE, 30080).bytes();
        let run =
            p.dp.run_wrapped(UPLINK_XDP, &syn, 100, Tuples::Fresh)
                .unwrap();
        assert_eq!(run.verdict, XDP_PASS);
        assert_eq!(p.stat("fwd_local"), 100, "each run found the NodePort");
        let ct = p.dp.conntrack().unwrap();
        let forward = ct.iter().filter(|(k, _)| k.dir == ct_dir::FORWARD);
        let sources: std::collections::HashSet<(Ipv4Addr, u16)> = forward
            .map(|(k, _)| (k.saddr.into(), u16::from_be(k.sport_be)))
            .collect();
        assert_eq!(sources.len(), 100, "a new source every run");
        assert_eq!(ct.len(), 200, "a reply entry beside each");
        // The last run's frame: the SYN's own translation (DNAT to the
        // backend, checksums updated for it alone), from the source the
        // wrapper wrote: the CPU's number, then the run's (the 100th, in the
        // address's last byte and the port). The checksums still sum the
        // SYN's own source: nothing on the path reads them.
        let (verdict, mut want) = p.xdp(&syn);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(&want[30..34], &ip(LOCAL_POD).octets());
        let cpu = run.frame[28];
        assert!(usize::from(cpu) < std::thread::available_parallelism().unwrap().get());
        want[28..30].copy_from_slice(&[cpu, 0]);
        want[34..36].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(run.frame, want);
        // IPv6 and tc have no fresh wrapper: refused, not run the same.
        assert!(p.dp.run_wrapped(FROM_POD, &syn, 1, Tuples::Fresh).is_err());
        // What the benchmark sets beside it: one new conntrack entry a run,
        // of no packet's tuple, and the frame left alone.
        p.dp.flush_conntrack().unwrap();
        let run =
            p.dp.run_wrapped(bench::CT_INSERT, &syn, 100, Tuples::Same)
                .unwrap();
        assert_eq!((run.verdict, run.frame), (XDP_PASS, syn));
        let ct = p.dp.conntrack().unwrap();
        assert_eq!(ct.len(), 100);
        assert!(ct.iter().all(|(k, _)| k.saddr.octets[0] == 100));
    });
}

#[test]
fn a_source_range_drop_in_xdp_is_reported_to_a_monitor() {
    with_programs(|p| {
        // Verified first: on a slow kernel (the matrix's emulated VMs) that
        // takes longer than the lease the monitor takes now.
        p.dp.xdp_program().unwrap();
        let mut monitor = p.dp.monitor(false).unwrap();
        let mut outsider = from_outside(packet::TCP, 40104, LB_IP, 80);
        outsider.saddr = ip("10.250.0.50").into();
        let bytes = outsider.bytes();
        let (verdict, _) = p.xdp(&bytes);
        assert_eq!(verdict, XDP_DROP);
        let got = support::monitor::reports(&mut monitor, 2, std::time::Duration::from_secs(1));
        assert_eq!(got.len(), 1, "one report of the one drop");
        let report = proxy_agent::cli::monitor::decode(&got[0]).unwrap();
        assert_eq!(report.stat, proxy_common::stats::Stat::DropSourceRange);
        assert_eq!(report.program, "uplink_xdp");
        assert_eq!(report.len as usize, bytes.len());
        let header = std::mem::size_of::<proxy_common::MonitorEvent>();
        assert_eq!(&got[0][header..header + bytes.len()], &bytes[..]);
        let flow = report.flow.unwrap();
        assert_eq!(flow.client, "10.250.0.50:40104".parse().unwrap());
        assert_eq!(flow.server, format!("{LB_IP}:80").parse().unwrap());
    });
}

#[test]
fn a_tracing_monitor_sees_xdp_translate_a_nodeport_packet() {
    with_programs(|p| {
        p.dp.xdp_program().unwrap();
        let mut monitor = p.dp.monitor(true).unwrap();
        let f = from_outside(packet::TCP, 40106, NODE, 30080);
        let (verdict, out) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_PASS);
        assert_ne!(out, f.bytes(), "DNATed to the local backend");
        let got = support::monitor::reports(&mut monitor, 2, std::time::Duration::from_secs(1));
        assert_eq!(got.len(), 1, "one report of the one translated packet");
        let report = proxy_agent::cli::monitor::decode(&got[0]).unwrap();
        assert_eq!(report.stat, proxy_common::stats::Stat::FwdLocal);
        assert_eq!(report.program, "uplink_xdp");
        let header = std::mem::size_of::<proxy_common::MonitorEvent>();
        assert_eq!(
            &got[0][header..header + out.len()],
            &out[..],
            "as XDP sent it on"
        );
    });
}

/// The programs' log (aya-log) as `diag` writes it: what a drop's verdict
/// counter cannot tell, such as what the FIB lookup answered.
#[test]
fn a_backend_the_fib_cannot_reach_is_dropped_and_the_lookups_answer_logged() {
    with_programs(|p| {
        let mut list = services();
        list.push(frontend(
            "nowhere",
            LB_IP,
            82,
            Protocol::Tcp,
            &[("10.99.0.3", 8080, false)],
        ));
        assert!(p.h.serve(&list).unwrap().is_empty());
        let bytes = from_outside(packet::TCP, 40105, LB_IP, 82).bytes();
        let (verdict, _) = p.xdp(&bytes);
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(p.stat("drop_fib"), 1);
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut logs =
            p.dp.logs(Box::new(Capture(lines.clone())))
                .expect("the programs' log");
        logs.flush();
        let lines = lines.lock().unwrap().clone();
        // No route to 10.99.0.3 here: BPF_FIB_LKUP_RET_NOT_FWDED (4).
        assert_eq!(
            lines,
            ["WARN drop_fib: the FIB lookup returned 4"],
            "one line, at warn"
        );
    });
}

/// Log records as `LEVEL text` lines.
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}", record.level(), record.args());
        self.0.lock().unwrap().push(line);
    }

    fn flush(&self) {}
}
