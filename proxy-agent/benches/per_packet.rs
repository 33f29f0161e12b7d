//! Per-packet cost of the real programs against the number of Services, with
//! BPF_PROG_TEST_RUN, beside a program that only returns XDP_PASS (the floor).
//!
//! Each sample is one run (`repeat` 1) on a fresh copy of the frame: with
//! `repeat` N the kernel would run the program on the frame the previous run
//! rewrote, timing the not-a-Service path from the second run on. One run per
//! call costs a syscall each (not timed: the kernel times the program alone),
//! and the caches are colder than in a loop, so these are upper bounds.
//!
//! `tc translated at connect` is a pod's packet that the socket hooks
//! (`--socket-lb all`) translated at connect(): it carries a backend's
//! address, so `from_pod` finds no frontend and no reply entry, and passes it.
//!
//! The `wrapped` rows time established flows `repeat` N at a time through the
//! frame-restoring wrappers (see `proxy_common::bench`), which put the frame
//! back before each run and tail-call the program: the real path in a warm
//! loop. Each wrapper's own cost, around a PASS-only program of its hook, is
//! their floor. Every timed run's verdict and output frame are checked.
//!
//! `xdp new flow, wrapped` times new flows the same way: the fresh wrapper
//! gives each run's SYN a source of its own, and conntrack is emptied before
//! each sample. `xdp conntrack insert alone, wrapped` is one conntrack
//! insert of a new key and nothing else (`bench_ct_insert`): the step no new
//! flow can skip, beside the paths. The `both CPUs` rows time the same on
//! two CPUs at once (a pinned thread each, samples started together): the
//! established rows one flow from both, the new-flow rows each CPU's own
//! flows. A table after the rows puts each path net of its floor beside the
//! established flow, and both CPUs beside one.
//!
//! `random flow` rows visit established flows spread over every Service
//! (10 per Service, at most a million) in random order, one run each. The
//! `spread, wrapped` rows visit the XDP ones in the warm loop: the spread
//! wrapper gives each run the tuple of a flow it picks (see
//! `proxy_common::bench::spread_visit`), so they are timed as the hot
//! `wrapped` rows are, cache and TLB misses in the maps included. Beside
//! them, one conntrack lookup alone (`bench_ct_lookup`), spread and hot: what
//! a lookup's misses cost, which no design that keeps per-flow state in a
//! hash map avoids. A table after the rows puts spread beside hot.
//!
//! `... (IPv6)` rows time the pod path and the uplink's tc path (which
//! serves IPv6 from outside: XDP hands it on) for the Services' IPv6 twins
//! (each Service has a ClusterIP of each family), beside the same paths'
//! IPv4 rows, the pod path's established flow wrapped too; the table after the rows gives IPv6/IPv4 per path and
//! scale.
//!
//! With `--baseline OBJECT` (or `FERRY_BENCH_BASELINE=OBJECT`), another build
//! of the programs (an eBPF object file, e.g. one built from an older commit)
//! is timed beside the embedded one in the same run, scale by scale in the
//! order new, old, old, new (each path's median is the mean of its two), and
//! the table is the ratio new/old per path; `--ratio-out FILE` writes it.
//!
//! Usage (root): `cargo bench -p proxy-agent --bench per_packet -- [--quick]
//! [--out FILE] [--scales 10,1000,...] [--baseline OBJECT [--ratio-out FILE]]`

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use proxy_agent::{
    cli::simulate,
    frontend::{Endpoint, Frontend, FrontendSpec, Protocol, Scheduler},
    harness::{Hook, Programs},
    kernel::{remove_all, Tuples, WrappedRun},
    settings,
};
use proxy_common::{
    bench::{
        spread_flow, CT_INSERT, CT_LOOKUP, PASS_ONLY_TC, PASS_ONLY_XDP, WRAPPER_XDP_FRESH,
        WRAPPER_XDP_SPREAD,
    },
    program_names::{FROM_POD, UPLINK_XDP},
};

const BACKENDS_EACH: u32 = 10;
/// Runs per wrapped sample.
const WRAPPED_REPEAT: u32 = 10_000;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
/// A Service whose traffic stays on the node (internalTrafficPolicy Local)
/// and that has no endpoint there: a pod's packet to it is dropped.
const DROP_VIP: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 1);
const XDP_PASS: u32 = 2;
const FLOOR: &str = "xdp PASS only (floor)";

fn service(i: u32) -> FrontendSpec {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
    let endpoints = (0..BACKENDS_EACH)
        .map(|b| {
            let address =
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * BACKENDS_EACH + b);
            // Local backends: the uplink path is DNAT and pass, no FIB.
            Endpoint {
                local: true,
                ..Endpoint::new(address, 8080)
            }
        })
        .collect();
    FrontendSpec::new(
        format!("svc-{i}"),
        Frontend {
            address: vip.into(),
            port: 80,
            protocol: Protocol::Tcp,
        },
        endpoints,
    )
}

/// The IPv6 twin of [`service`]: `fd00:96::<i>`, its backends `fd00:128::<n>`.
fn service6(i: u32) -> FrontendSpec {
    let mut spec = service(i);
    let v6 = |base: u128, n: u32| Ipv6Addr::from(base + u128::from(n));
    spec.name.push_str("-v6");
    spec.frontend.address = v6(0xfd00_0096 << 96, i).into();
    for (b, endpoint) in spec.endpoints.iter_mut().enumerate() {
        endpoint.address = v6(0xfd00_0128 << 96, i * BACKENDS_EACH + b as u32).into();
    }
    spec
}

/// A TCP SYN from `src:sport` to `dst:80`, checksums complete.
/// The IPv4 address of these IPv4 rows.
fn v4(addr: std::net::IpAddr) -> Ipv4Addr {
    match addr {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => panic!("{a}: the rows are IPv4"),
    }
}

fn frame(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>) -> Vec<u8> {
    simulate::frame(&simulate::PacketSpec {
        proto: proxy_common::proto::TCP,
        src: (src.into(), sport),
        dst: (dst.into(), 80),
    })
}

/// The same segment as a plain ACK, its checksum updated (RFC 1624): the
/// packets of an established flow. A SYN on a known tuple is a client opening
/// a new connection on it, which rewrites the flow's entries.
fn as_ack(syn: &[u8]) -> Vec<u8> {
    // The TCP header behind an IPv4 header without options, or an IPv6 one.
    let ip = if syn[12..14] == [0x86, 0xdd] { 40 } else { 20 };
    let (flags, checksum) = (14 + ip + 13, 14 + ip + 16);
    let mut f = syn.to_vec();
    let word = |f: &[u8]| u16::from_be_bytes([f[flags - 1], f[flags]]);
    let old = word(&f);
    f[flags] = 0x10;
    let new = word(&f);
    let sum = u16::from_be_bytes([f[checksum], f[checksum + 1]]);
    let mut acc = u32::from(!sum) + u32::from(!old) + u32::from(new);
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    f[checksum..checksum + 2].copy_from_slice(&(!(acc as u16)).to_be_bytes());
    f
}

#[derive(Clone, Copy, PartialEq)]
enum Prog {
    Tc,
    Xdp,
    /// The uplink's two tc filters, the second on what the first lets
    /// through, as the kernel runs them (in either order: same work).
    UplinkTc,
    Floor,
}

/// Flows of the random-order rows: 10 per Service, at most a million.
fn spread_flows(services: u32) -> u32 {
    services.saturating_mul(10).min(1_000_000)
}

/// The SYN that opens spread flow `i` (see `proxy_common::bench::spread_flow`)
/// of the clients `10.<210 + clients>.0.0/16`, to the first `services` of `list`.
fn spread_syn(list: &[FrontendSpec], clients: u8, i: u32) -> Vec<u8> {
    let services = list.len() as u32;
    let flow = spread_flow(i, services);
    let first = u32::from(v4(list[0].frontend.address));
    let vip = v4(list[flow.service as usize].frontend.address);
    assert_eq!(
        u32::from(vip),
        first + flow.service,
        "consecutive ClusterIPs"
    );
    let [high, low] = flow.saddr_low.to_be_bytes();
    frame(Ipv4Addr::new(10, 210 + clients, high, low), flow.sport, vip)
}

/// One run of a program on `input`; checks the verdict, returns the kernel's
/// time and the frame that came out.
fn run_once(p: &mut Programs, prog: Prog, input: &[u8], want: u32) -> (Duration, Vec<u8>) {
    let hook = match prog {
        Prog::Tc => Hook::Tc(FROM_POD, None),
        Prog::Xdp => Hook::Xdp(None),
        Prog::UplinkTc => Hook::UplinkTc(None),
        Prog::Floor => Hook::PassOnly,
    };
    let run = p.run(hook, input).expect("BPF_PROG_TEST_RUN");
    assert_eq!(run.verdict, want, "unexpected verdict");
    (run.duration, run.frame)
}

/// Samples of `WRAPPED_REPEAT` runs of the XDP PASS-only program on `input`
/// without a wrapper: it leaves the frame as it is, so plain `repeat` times it
/// truly, and beside its wrapped row this gives the wrapper's own cost.
fn pass_only_repeated(p: &mut Programs, input: &[u8], samples: usize) -> Vec<u64> {
    (0..samples)
        .map(|_| {
            let run = p
                .run_repeated(Hook::PassOnly, input, WRAPPED_REPEAT)
                .expect("BPF_PROG_TEST_RUN");
            assert_eq!((run.verdict, run.frame.as_slice()), (XDP_PASS, input));
            run.duration.as_nanos() as u64
        })
        .collect()
}

/// Samples of `WRAPPED_REPEAT` runs of `program` on `input` through its
/// wrapper, each checked for the verdict and frame of a single run; the
/// kernel's mean per run, in nanoseconds.
fn wrapped(
    p: &mut Programs,
    program: &str,
    input: &[u8],
    want: (u32, &[u8]),
    samples: usize,
) -> Vec<u64> {
    (0..samples)
        .map(|_| {
            let run =
                p.dp.run_wrapped(program, input, WRAPPED_REPEAT, Tuples::Same)
                    .expect("wrapped BPF_PROG_TEST_RUN");
            assert_eq!(run.verdict, want.0, "{program}: unexpected verdict");
            assert_eq!(run.frame, want.1, "{program}: unexpected frame");
            run.per_run.as_nanos() as u64
        })
        .collect()
}

/// Samples of `WRAPPED_REPEAT` runs of the XDP `program` on `frame`
/// through the wrapper of `tuples`. With `empty_conntrack`, each sample
/// starts from an empty conntrack (emptied before it, not timed): new
/// entries go into a table with room, as the established rows find it (a
/// full LRU table evicts at every insert). Checks the last run's verdict
/// (XDP_PASS) and its frame (`frame_ok`).
fn wrapped_xdp(
    p: &mut Programs,
    program: &str,
    frame: &[u8],
    tuples: Tuples,
    empty_conntrack: bool,
    samples: usize,
    frame_ok: impl Fn(&[u8]) -> bool,
) -> Vec<u64> {
    (0..samples)
        .map(|_| {
            if empty_conntrack {
                p.dp.flush_conntrack().expect("empty conntrack");
            }
            let run =
                p.dp.run_wrapped(program, frame, WRAPPED_REPEAT, tuples)
                    .expect("wrapped BPF_PROG_TEST_RUN");
            assert_eq!(run.verdict, XDP_PASS, "{program}: unexpected verdict");
            assert!(frame_ok(&run.frame), "{program}: unexpected frame");
            run.per_run.as_nanos() as u64
        })
        .collect()
}

/// Samples of `WRAPPED_REPEAT` runs of the XDP `program` on `frame`
/// through its wrapper on two CPUs at once (a thread pinned to each, the
/// samples started together): what contention on the shared maps costs.
/// With `empty_conntrack`, conntrack is emptied before each pair of samples,
/// as `wrapped_xdp` does. Both CPUs' samples together; each run
/// checked by `run_ok`. None on a machine of one CPU.
fn on_both_cpus(
    p: &mut Programs,
    program: &str,
    frame: &[u8],
    tuples: Tuples,
    empty_conntrack: bool,
    samples: usize,
    run_ok: impl Fn(&WrappedRun) -> bool + Sync,
) -> Option<Vec<u64>> {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return None;
    }
    let conntrack = std::sync::Mutex::new(p.dp.conntrack_handle().expect("conntrack"));
    let wrapped =
        p.dp.wrap(program, frame, tuples)
            .expect("set the wrapper up");
    let barrier = std::sync::Barrier::new(2);
    let per_cpu = |cpu: usize| {
        pin_to(cpu);
        (0..samples)
            .map(|_| {
                if empty_conntrack {
                    barrier.wait();
                    if cpu == 0 {
                        remove_all(&mut conntrack.lock().unwrap()).expect("empty conntrack");
                    }
                }
                barrier.wait();
                let run = wrapped.run(WRAPPED_REPEAT).expect("wrapped run");
                assert!(run_ok(&run), "{program} on CPU {cpu}: unexpected run");
                run.per_run.as_nanos() as u64
            })
            .collect::<Vec<u64>>()
    };
    Some(std::thread::scope(|s| {
        let threads = [s.spawn(|| per_cpu(0)), s.spawn(|| per_cpu(1))];
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("a CPU's thread"))
            .collect()
    }))
}

/// Pins the calling thread to `cpu`: BPF_PROG_TEST_RUN runs the program on
/// the CPU of its caller.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; the calls fill and pass it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "pin to CPU {cpu}");
    }
}

/// Median and spread (p10, p90) in nanoseconds.
fn summary(mut ns: Vec<u64>) -> (u64, u64, u64) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.1), at(0.9))
}

struct Row {
    services: u32,
    path: &'static str,
    /// The path of the row this one is compared with in "vs floor".
    floor: &'static str,
    median: u64,
    p10: u64,
    p90: u64,
}

impl Row {
    fn new(services: u32, path: &'static str, floor: &'static str, ns: Vec<u64>) -> Self {
        let (median, p10, p90) = summary(ns);
        Self {
            services,
            path,
            floor,
            median,
            p10,
            p90,
        }
    }
}

/// Measures every path at `services` Services with the embedded object, or
/// with `object` (the bytes of another build) when given.
fn measure(
    object: Option<&[u8]>,
    services: u32,
    samples: usize,
    wrapped_samples: usize,
    rows: &mut Vec<Row>,
) {
    // The IPv6 twins only in runs of the embedded object alone: a baseline
    // object may predate IPv6, and both sides of a comparison get the same maps.
    let alone = embedded_alone(object);
    let mut list: Vec<FrontendSpec> = (0..services).map(service).collect();
    if alone {
        list.extend((0..services).map(service6));
    }
    let mut local_only = FrontendSpec::new(
        "drop",
        Frontend {
            address: DROP_VIP.into(),
            port: 80,
            protocol: Protocol::Tcp,
        },
        Vec::new(),
    );
    local_only.local_only = true;
    list.push(local_only);
    settings::fill_defaults(&mut list, Scheduler::default());
    let frontends = list.len() as u32;
    // The random-order rows' flows (both programs'), the new-flow rows'
    // (both), and room to spare.
    let flows = 2 * spread_flows(services) + 4 * samples as u32 + 65_536;
    let mut p = match object {
        Some(object) => Programs::load_sized_object(object, frontends, BACKENDS_EACH, flows, true),
        None => Programs::load_sized(frontends, BACKENDS_EACH, flows, true),
    }
    .expect("load");
    let problems = p.serve(&list).expect("fill the maps");
    assert!(
        problems.is_empty(),
        "{:?}",
        &problems[..problems.len().min(3)]
    );
    // The Service in the middle of the address range.
    let vip = v4(list[(services / 2) as usize].frontend.address);
    let client = Ipv4Addr::new(10, 244, 1, 2);
    let opening = frame(client, 40000, vip);
    let established = as_ack(&opening);
    let mut once = Vec::new();
    let mut paths = vec![
        (Prog::Tc, "tc new flow", "tc established", TC_ACT_UNSPEC),
        (Prog::Xdp, "xdp new flow", "xdp established", XDP_PASS),
    ];
    if alone {
        // The uplink's tc path, which serves IPv6 from outside (XDP hands it
        // on): its IPv4 rows, for the IPv6 ones to be compared with. A
        // baseline object may have no second uplink filter.
        paths.push((
            Prog::UplinkTc,
            "uplink tc new flow",
            "uplink tc established",
            TC_ACT_UNSPEC,
        ));
    }
    for (prog, path_new, path_est, pass) in paths {
        // Established: one flow, opened by a SYN; what follows are its ACKs.
        run_once(&mut p, prog, &opening, pass);
        once.push(run_once(&mut p, prog, &established, pass).1);
        let est: Vec<u64> = (0..samples)
            .map(|_| run_once(&mut p, prog, &established, pass).0.as_nanos() as u64)
            .collect();
        // New: every sample a flow never seen (source address and port vary),
        // by either program: each takes its clients from a range of its own.
        let clients = match prog {
            Prog::Tc => Ipv4Addr::new(10, 200, 0, 0),
            Prog::Xdp => Ipv4Addr::new(10, 201, 0, 0),
            _ => Ipv4Addr::new(10, 202, 0, 0),
        };
        let new: Vec<u64> = (0..samples)
            .map(|i| {
                let src = Ipv4Addr::from(u32::from(clients) + (i / 60_000) as u32);
                let f = frame(src, 1024 + (i % 60_000) as u16, vip);
                run_once(&mut p, prog, &f, pass).0.as_nanos() as u64
            })
            .collect();
        rows.push(Row::new(services, path_est, FLOOR, est));
        rows.push(Row::new(services, path_new, FLOOR, new));
    }
    // Established flows spread over every Service, visited in random order:
    // cache and TLB misses in the maps, where the rows above time one flow
    // whose entries stay hot.
    for (prog, path, pass, clients) in [
        (Prog::Tc, "tc established, random flow", TC_ACT_UNSPEC, 10u8),
        (Prog::Xdp, "xdp established, random flow", XDP_PASS, 11),
    ] {
        let flows = spread_flows(services);
        let acks: Vec<Vec<u8>> = (0..flows)
            .map(|i| {
                let syn = spread_syn(&list[..services as usize], clients, i);
                run_once(&mut p, prog, &syn, pass);
                as_ack(&syn)
            })
            .collect();
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(services);
        let random: Vec<u64> = (0..samples)
            .map(|_| {
                // xorshift64: the same visits in every run.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let ack = &acks[(state % u64::from(flows)) as usize];
                run_once(&mut p, prog, ack, pass).0.as_nanos() as u64
            })
            .collect();
        rows.push(Row::new(
            services,
            path,
            if prog == Prog::Tc {
                "tc established"
            } else {
                "xdp established"
            },
            random,
        ));
    }

    if p.dp.has_program(WRAPPER_XDP_SPREAD) {
        let spread = as_ack(&spread_syn(&list[..services as usize], 11, 0));
        spread_rows(
            &mut p,
            services,
            &spread,
            &established,
            wrapped_samples,
            rows,
        );
    }

    let floor: Vec<u64> = (0..samples)
        .map(|_| {
            run_once(&mut p, Prog::Floor, &established, XDP_PASS)
                .0
                .as_nanos() as u64
        })
        .collect();
    rows.push(Row::new(services, FLOOR, FLOOR, floor));

    // A dropped packet, without a monitor and (in an object that reports
    // drops) with one reading, which drains its buffers between samples:
    // what a report costs.
    let dropping = frame(client, 40001, DROP_VIP);
    let drop = |p: &mut Programs| run_once(p, Prog::Tc, &dropping, TC_ACT_SHOT).0.as_nanos() as u64;
    let dropped: Vec<u64> = (0..samples).map(|_| drop(&mut p)).collect();
    rows.push(Row::new(services, "tc drop", FLOOR, dropped));
    if let Ok(mut monitor) = p.dp.monitor(false) {
        // Drains the buffers: how many reports they held.
        let read = |monitor: &mut proxy_agent::kernel::monitor::Monitor| -> usize {
            let mut n = 0;
            let lost = monitor
                .poll(Duration::ZERO, |_| n += 1)
                .expect("read the reports");
            assert_eq!(lost, 0, "reports lost");
            n
        };
        let mut reports = 0;
        let reported: Vec<u64> = (0..samples)
            .map(|i| {
                if i % 64 == 0 {
                    reports += read(&mut monitor);
                }
                drop(&mut p)
            })
            .collect();
        reports += read(&mut monitor);
        assert_eq!(reports, samples, "one report per drop");
        rows.push(Row::new(
            services,
            "tc drop, monitor reading",
            "tc drop",
            reported,
        ));

        // The established flow while the monitor asks for traces: a report
        // of every packet (an object without traces reports none).
        monitor.set_traces(true).expect("ask for traces");
        reports = 0;
        let traced: Vec<u64> = (0..samples)
            .map(|i| {
                if i % 64 == 0 {
                    reports += read(&mut monitor);
                }
                run_once(&mut p, Prog::Tc, &established, TC_ACT_UNSPEC)
                    .0
                    .as_nanos() as u64
            })
            .collect();
        reports += read(&mut monitor);
        if reports > 0 {
            assert_eq!(reports, samples, "one report per translated packet");
            rows.push(Row::new(
                services,
                "tc established, monitor tracing",
                "tc established",
                traced,
            ));
        }
    }

    // The same established flow through the wrappers, which must leave what
    // one run left; the PASS-only programs leave the frame as it was.
    let (tc_once, xdp_once) = (&once[0], &once[1]);
    for (program, path, want, floor_program, floor_path, floor_verdict) in [
        (
            FROM_POD,
            "tc established, wrapped",
            (TC_ACT_UNSPEC, tc_once.as_slice()),
            PASS_ONLY_TC,
            "tc PASS only, wrapped (floor)",
            TC_ACT_UNSPEC,
        ),
        (
            UPLINK_XDP,
            "xdp established, wrapped",
            (XDP_PASS, xdp_once.as_slice()),
            PASS_ONLY_XDP,
            "xdp PASS only, wrapped (floor)",
            XDP_PASS,
        ),
    ] {
        let ns = wrapped(&mut p, program, &established, want, wrapped_samples);
        rows.push(Row::new(services, path, floor_path, ns));
        let unchanged = (floor_verdict, established.as_slice());
        let ns = wrapped(
            &mut p,
            floor_program,
            &established,
            unchanged,
            wrapped_samples,
        );
        rows.push(Row::new(services, floor_path, floor_path, ns));
    }
    let ns = pass_only_repeated(&mut p, &established, wrapped_samples);
    let path = "xdp PASS only, repeated without wrapper";
    rows.push(Row::new(services, path, path, ns));

    // New flows in the same warm loop: the fresh wrapper gives each run's
    // SYN a source of its own (an object from before it has none). Beside
    // them, one conntrack insert alone: what a new flow cannot do without.
    if p.dp.has_program(WRAPPER_XDP_FRESH) {
        let first = services / 2 * BACKENDS_EACH;
        let backends = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + first;
        let to_backend = |out: &[u8]| {
            let dst = u32::from_be_bytes(out[30..34].try_into().unwrap());
            (backends..backends + BACKENDS_EACH).contains(&dst)
                && out[36..38] == 8080u16.to_be_bytes()
        };
        let ns = wrapped_xdp(
            &mut p,
            UPLINK_XDP,
            &opening,
            Tuples::Fresh,
            true,
            wrapped_samples,
            to_backend,
        );
        let fresh_floor = "xdp PASS only, fresh, wrapped (floor)";
        rows.push(Row::new(services, "xdp new flow, wrapped", fresh_floor, ns));
        let unchanged = |out: &[u8]| out.len() == opening.len() && out[..26] == opening[..26];
        let ns = wrapped_xdp(
            &mut p,
            PASS_ONLY_XDP,
            &opening,
            Tuples::Fresh,
            true,
            wrapped_samples,
            unchanged,
        );
        rows.push(Row::new(services, fresh_floor, fresh_floor, ns));
        let ns = wrapped_xdp(
            &mut p,
            CT_INSERT,
            &established,
            Tuples::Same,
            true,
            wrapped_samples,
            |out| out == established.as_slice(),
        );
        rows.push(Row::new(
            services,
            "xdp conntrack insert alone, wrapped",
            "xdp PASS only, wrapped (floor)",
            ns,
        ));

        // The same on both CPUs at once: one established flow, and new
        // flows and inserts (each CPU's its own), beside their floors.
        let pass = |frame_ok: &dyn Fn(&[u8]) -> bool, run: &WrappedRun| {
            run.verdict == XDP_PASS && frame_ok(&run.frame)
        };
        let xdp_once = once[1].clone();
        let same = |out: &[u8]| out == xdp_once.as_slice();
        let left_alone = |out: &[u8]| out == established.as_slice();
        for (program, frame, tuples, empty, path, floor_path, frame_ok) in [
            (
                UPLINK_XDP,
                &established,
                Tuples::Same,
                false,
                "xdp established, wrapped, both CPUs",
                "xdp PASS only, wrapped, both CPUs (floor)",
                &same as &(dyn Fn(&[u8]) -> bool + Sync),
            ),
            (
                PASS_ONLY_XDP,
                &established,
                Tuples::Same,
                false,
                "xdp PASS only, wrapped, both CPUs (floor)",
                "xdp PASS only, wrapped, both CPUs (floor)",
                &left_alone,
            ),
            (
                UPLINK_XDP,
                &opening,
                Tuples::Fresh,
                true,
                "xdp new flow, wrapped, both CPUs",
                "xdp PASS only, fresh, wrapped, both CPUs (floor)",
                &to_backend,
            ),
            (
                PASS_ONLY_XDP,
                &opening,
                Tuples::Fresh,
                true,
                "xdp PASS only, fresh, wrapped, both CPUs (floor)",
                "xdp PASS only, fresh, wrapped, both CPUs (floor)",
                &unchanged,
            ),
            (
                CT_INSERT,
                &established,
                Tuples::Same,
                true,
                "xdp conntrack insert alone, wrapped, both CPUs",
                "xdp PASS only, wrapped, both CPUs (floor)",
                &left_alone,
            ),
        ] {
            let ns = on_both_cpus(
                &mut p,
                program,
                frame,
                tuples,
                empty,
                wrapped_samples,
                |run| pass(frame_ok, run),
            );
            if let Some(ns) = ns {
                rows.push(Row::new(services, path, floor_path, ns));
            }
        }
    }

    // A pod's packet already translated at connect(): to the middle
    // Service's first backend, untouched by from_pod.
    let backend = v4(list[(services / 2) as usize].endpoints[0].address);
    let translated = as_ack(&frame(client, 40001, backend));
    let ns = (0..samples)
        .map(|_| {
            let (took, out) = run_once(&mut p, Prog::Tc, &translated, TC_ACT_UNSPEC);
            assert_eq!(out, translated, "a translated packet passes unchanged");
            took.as_nanos() as u64
        })
        .collect();
    rows.push(Row::new(services, "tc translated at connect", FLOOR, ns));
    let unchanged = (TC_ACT_UNSPEC, translated.as_slice());
    let ns = wrapped(&mut p, FROM_POD, &translated, unchanged, wrapped_samples);
    rows.push(Row::new(
        services,
        "tc translated at connect, wrapped",
        "tc PASS only, wrapped (floor)",
        ns,
    ));
    if alone {
        let vip6 = list[(services + services / 2) as usize].frontend.address;
        measure_ipv6(&mut p, services, vip6, samples, wrapped_samples, rows);
        let counted = p.dp.traffic().expect("read the counters").len();
        assert!(
            counted > 0,
            "the programs counted nothing with the counters on"
        );
        // Their maps go before the next programs fill theirs.
        std::mem::drop(p);
        counters_off_rows(&list, services, flows, wrapped_samples, rows);
    }
}

/// Whether a packet DNATed by the XDP uplink went to one of the first
/// `services` Services' backends, on the backends' port.
fn to_any_backend(services: u32, out: &[u8]) -> bool {
    let backends = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    let dst = u32::from_be_bytes(out[30..34].try_into().unwrap());
    (backends..backends + services * BACKENDS_EACH).contains(&dst)
        && out[36..38] == 8080u16.to_be_bytes()
}

/// The hot and spread established XDP rows again, with the traffic counters
/// off: the agent's default (`--traffic-counters`), where the rows above run
/// the object's own, which counts. Programs of their own, loaded with the
/// counters off, their maps filled as the others' (`list`, `flows`) and the
/// same flows opened; the floors are the rows above's (a PASS-only program
/// counts nothing). Checks that the counters' map stays empty.
fn counters_off_rows(
    list: &[FrontendSpec],
    services: u32,
    flows: u32,
    samples: usize,
    rows: &mut Vec<Row>,
) {
    let mut p = Programs::load_sized(list.len() as u32, BACKENDS_EACH, flows, false)
        .expect("load without counters");
    let problems = p.serve(list).expect("fill the maps");
    assert!(
        problems.is_empty(),
        "{:?}",
        &problems[..problems.len().min(3)]
    );
    let vip = v4(list[(services / 2) as usize].frontend.address);
    let opening = frame(Ipv4Addr::new(10, 244, 1, 2), 40000, vip);
    let established = as_ack(&opening);
    run_once(&mut p, Prog::Xdp, &opening, XDP_PASS);
    let once = run_once(&mut p, Prog::Xdp, &established, XDP_PASS).1;
    let ns = wrapped(&mut p, UPLINK_XDP, &established, (XDP_PASS, &once), samples);
    rows.push(Row::new(
        services,
        "xdp established, wrapped, counters off",
        "xdp PASS only, wrapped (floor)",
        ns,
    ));
    let served = &list[..services as usize];
    let spread_flows = spread_flows(services);
    for i in 0..spread_flows {
        run_once(&mut p, Prog::Xdp, &spread_syn(served, 11, i), XDP_PASS);
    }
    let spread = as_ack(&spread_syn(served, 11, 0));
    let tuples = Tuples::Spread {
        flows: spread_flows,
        services,
    };
    let ns = wrapped_xdp(&mut p, UPLINK_XDP, &spread, tuples, false, samples, |out| {
        to_any_backend(services, out)
    });
    rows.push(Row::new(
        services,
        "xdp established, spread, wrapped, counters off",
        "xdp PASS only, spread, wrapped (floor)",
        ns,
    ));
    let counted = p.dp.traffic().expect("read the counters").len();
    assert_eq!(counted, 0, "the programs counted with the counters off");
}

/// The established flows the XDP random-order rows opened, visited in
/// pseudo-random order in the warm loop of the spread wrapper (`spread`: the
/// ACK of spread flow 0), beside one conntrack lookup alone, spread and on
/// the one flow of `established` (whose entries stay hot), and the spread
/// wrapper's floor. Checks every sample's last run, and that the visits
/// opened no flow (conntrack holds as many entries after them as before).
fn spread_rows(
    p: &mut Programs,
    services: u32,
    spread: &[u8],
    established: &[u8],
    samples: usize,
    rows: &mut Vec<Row>,
) {
    let tuples = Tuples::Spread {
        flows: spread_flows(services),
        services,
    };
    let to_backend = |out: &[u8]| to_any_backend(services, out);
    let unchanged_ports = |out: &[u8]| out.len() == spread.len() && out[36..38] == spread[36..38];
    let entries = |p: &Programs| p.dp.conntrack_handle().expect("conntrack").keys().count();
    let before = entries(p);
    let floor = "xdp PASS only, spread, wrapped (floor)";
    for (program, frame, tuples, path, floor, frame_ok) in [
        (
            UPLINK_XDP,
            spread,
            tuples,
            "xdp established, spread, wrapped",
            floor,
            &to_backend as &(dyn Fn(&[u8]) -> bool + Sync),
        ),
        (
            PASS_ONLY_XDP,
            spread,
            tuples,
            floor,
            floor,
            &unchanged_ports,
        ),
        (
            CT_LOOKUP,
            spread,
            tuples,
            "xdp conntrack lookup alone, spread, wrapped",
            floor,
            &unchanged_ports,
        ),
        (
            CT_LOOKUP,
            established,
            Tuples::Same,
            "xdp conntrack lookup alone, wrapped",
            "xdp PASS only, wrapped (floor)",
            &|out: &[u8]| out == established,
        ),
    ] {
        let ns = wrapped_xdp(p, program, frame, tuples, false, samples, frame_ok);
        rows.push(Row::new(services, path, floor, ns));
    }
    // Both CPUs at once, each in an order of its own over the same flows.
    let both_floor = "xdp PASS only, spread, wrapped, both CPUs (floor)";
    for (program, path, frame_ok) in [
        (
            UPLINK_XDP,
            "xdp established, spread, wrapped, both CPUs",
            &to_backend as &(dyn Fn(&[u8]) -> bool + Sync),
        ),
        (PASS_ONLY_XDP, both_floor, &unchanged_ports),
    ] {
        let ok = |run: &WrappedRun| run.verdict == XDP_PASS && frame_ok(&run.frame);
        if let Some(ns) = on_both_cpus(p, program, spread, tuples, false, samples, ok) {
            rows.push(Row::new(services, path, both_floor, ns));
        }
    }
    assert_eq!(entries(p), before, "the spread visits opened flows");
}

/// The median of `path`'s row at `services` less its floor row's.
fn net_of_floor(rows: &[Row], services: u32, path: &str) -> Option<f64> {
    let at = |path: &str| {
        rows.iter()
            .find(|r| r.services == services && r.path == path)
    };
    let row = at(path)?;
    Some(row.median as f64 - at(row.floor)?.median as f64)
}

/// Whether a run times the IPv6 rows and the counters-off rows too: the
/// embedded object alone.
fn embedded_alone(object: Option<&[u8]>) -> bool {
    object.is_none() && std::env::var_os("FERRY_BENCH_COMPARING").is_none()
}

/// The rows for an IPv6 ClusterIP (`vip6`), from a pod and from outside
/// through the uplink's tc filters: an established flow, and new flows.
fn measure_ipv6(
    p: &mut Programs,
    services: u32,
    vip6: IpAddr,
    samples: usize,
    wrapped_samples: usize,
    rows: &mut Vec<Row>,
) {
    for (prog, client, clients, path_est, path_new) in [
        (
            Prog::Tc,
            "fd00:10:244:1::2",
            "fd00:10:200::",
            "tc established (IPv6)",
            "tc new flow (IPv6)",
        ),
        (
            Prog::UplinkTc,
            "fd00:10:250::100",
            "fd00:10:202::",
            "uplink tc established (IPv6)",
            "uplink tc new flow (IPv6)",
        ),
    ] {
        let client: Ipv6Addr = client.parse().unwrap();
        let opening = frame(client, 40000, vip6);
        let established = as_ack(&opening);
        run_once(p, prog, &opening, TC_ACT_UNSPEC);
        let (_, once) = run_once(p, prog, &established, TC_ACT_UNSPEC);
        let est: Vec<u64> = (0..samples)
            .map(|_| run_once(p, prog, &established, TC_ACT_UNSPEC).0.as_nanos() as u64)
            .collect();
        if prog == Prog::Tc {
            let want = (TC_ACT_UNSPEC, once.as_slice());
            let ns = wrapped(p, FROM_POD, &established, want, wrapped_samples);
            rows.push(Row::new(
                services,
                "tc established, wrapped (IPv6)",
                "tc PASS only, wrapped (floor)",
                ns,
            ));
        }
        let clients = u128::from(clients.parse::<Ipv6Addr>().unwrap());
        let new: Vec<u64> = (0..samples)
            .map(|i| {
                let src = Ipv6Addr::from(clients + (i / 60_000) as u128);
                let f = frame(src, 1024 + (i % 60_000) as u16, vip6);
                run_once(p, prog, &f, TC_ACT_UNSPEC).0.as_nanos() as u64
            })
            .collect();
        rows.push(Row::new(services, path_est, FLOOR, est));
        rows.push(Row::new(services, path_new, FLOOR, new));
    }
}

/// Times the embedded object against `baseline` (another build's bytes) at
/// each scale, in the order new, old, old, new so that drift in the machine's
/// load weighs on both alike; returns the ratio table (new/old per path).
fn compare(baseline: &[u8], scales: &[u32], samples: usize, wrapped_samples: usize) -> String {
    let mut table = String::from(
        "| Services | path | old median ns | new median ns | new/old |\n|---:|---|---:|---:|---:|\n",
    );
    for &n in scales {
        eprintln!("per_packet: {n} Services, new and old object, {samples} samples per path");
        let (mut new, mut old) = (Vec::new(), Vec::new());
        measure(None, n, samples, wrapped_samples, &mut new);
        measure(Some(baseline), n, samples, wrapped_samples, &mut old);
        measure(Some(baseline), n, samples, wrapped_samples, &mut old);
        measure(None, n, samples, wrapped_samples, &mut new);
        let mean = |rows: &[Row], path: &str| {
            let medians: Vec<u64> = rows
                .iter()
                .filter(|r| r.path == path)
                .map(|r| r.median)
                .collect();
            medians.iter().sum::<u64>() as f64 / medians.len() as f64
        };
        let half = new.len() / 2;
        for r in &new[..half] {
            let (o, m) = (mean(&old, r.path), mean(&new, r.path));
            if o.is_nan() {
                // A path the old object does not have.
                table.push_str(&format!("| {n} | {} | - | {m:.0} | - |\n", r.path));
                continue;
            }
            table.push_str(&format!(
                "| {n} | {} | {o:.0} | {m:.0} | {:.3} |\n",
                r.path,
                m / o
            ));
        }
    }
    table
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let out = value("--out");
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root");
    let scales: Vec<u32> = value("--scales").map_or_else(
        || vec![10, 1_000, 10_000, 100_000],
        |list| {
            list.split(',')
                .map(|n| n.parse().expect("--scales: numbers, comma-separated"))
                .collect()
        },
    );
    let (samples, wrapped_samples) = if quick { (3_000, 30) } else { (20_000, 200) };
    let baseline = value("--baseline").or_else(|| std::env::var("FERRY_BENCH_BASELINE").ok());
    if let Some(path) = baseline {
        // SAFETY: set before any thread starts.
        unsafe { std::env::set_var("FERRY_BENCH_COMPARING", "1") };
        let object = std::fs::read(&path).unwrap_or_else(|e| panic!("--baseline {path}: {e}"));
        let table = compare(&object, &scales, samples, wrapped_samples);
        print!("{table}");
        if let Some(ratio_out) = value("--ratio-out") {
            std::fs::write(&ratio_out, &table).expect("write the ratio table");
        }
        return;
    }
    let mut rows = Vec::new();
    for &n in &scales {
        eprintln!(
            "per_packet: {n} Services of {BACKENDS_EACH} backends, {samples} samples per path, \
             {wrapped_samples} of {WRAPPED_REPEAT} runs per wrapped path"
        );
        measure(None, n, samples, wrapped_samples, &mut rows);
    }
    let base = |path: &str| {
        rows.iter()
            .find(|r| r.services == scales[0] && r.path == path)
            .map(|r| r.median)
            .unwrap_or(1)
    };
    let floor = |n: u32, path: &str| {
        rows.iter()
            .find(|r| r.services == n && r.path == path)
            .map(|r| r.median)
            .unwrap_or(1)
    };
    let mut table = String::from("| Services | path | median ns | p10..p90 ns | vs 10 Services | vs floor |\n|---:|---|---:|---:|---:|---:|\n");
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {}..{} | {:.2} | {:.2} |\n",
            r.services,
            r.path,
            r.median,
            r.p10,
            r.p90,
            r.median as f64 / base(r.path) as f64,
            r.median as f64 / floor(r.services, r.floor) as f64,
        ));
    }
    table.push_str(
        "\n| Services | path | IPv6 median ns | IPv4 median ns | IPv6/IPv4 |\n|---:|---|---:|---:|---:|\n",
    );
    for r in rows.iter().filter(|r| r.path.ends_with(" (IPv6)")) {
        let v4_path = r.path.trim_end_matches(" (IPv6)");
        let v4 = floor(r.services, v4_path);
        table.push_str(&format!(
            "| {} | {v4_path} | {} | {v4} | {:.2} |\n",
            r.services,
            r.median,
            r.median as f64 / v4 as f64
        ));
    }
    table.push_str(
        "\n| Services | xdp new flow, net ns | xdp established, net ns | new/established | one conntrack insert, net ns | insert/established |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for &n in &scales {
        let net = |path: &str| net_of_floor(&rows, n, path);
        let (Some(new), Some(est), Some(insert)) = (
            net("xdp new flow, wrapped"),
            net("xdp established, wrapped"),
            net("xdp conntrack insert alone, wrapped"),
        ) else {
            continue;
        };
        table.push_str(&format!(
            "| {n} | {new:.0} | {est:.0} | {:.2} | {insert:.0} | {:.2} |\n",
            new / est,
            insert / est
        ));
    }
    table.push_str(
        "\n| Services | flows | established, hot, net ns | established, spread, net ns | spread/hot | lookup alone, hot, net ns | lookup alone, spread, net ns | one lookup's misses, ns | hot path for 1.5x, ns |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for &n in &scales {
        let net = |path: &str| net_of_floor(&rows, n, path);
        let (Some(hot), Some(spread), Some(lookup_hot), Some(lookup_spread)) = (
            net("xdp established, wrapped"),
            net("xdp established, spread, wrapped"),
            net("xdp conntrack lookup alone, wrapped"),
            net("xdp conntrack lookup alone, spread, wrapped"),
        ) else {
            continue;
        };
        // A path whose spread visits cost at least `misses` more than its hot
        // ones is within 1.5x only if its hot cost is at least twice that.
        let misses = lookup_spread - lookup_hot;
        table.push_str(&format!(
            "| {n} | {} | {hot:.0} | {spread:.0} | {:.2} | {lookup_hot:.0} | {lookup_spread:.0} | {misses:.0} | {:.0} |\n",
            spread_flows(n),
            spread / hot,
            2.0 * misses
        ));
    }
    table.push_str(
        "\n| Services | flows | counters off: hot, net ns | counters off: spread, net ns | spread/hot | counters on/off, hot | counters on/off, spread |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for &n in &scales {
        let net = |path: &str| net_of_floor(&rows, n, path);
        let (Some(hot), Some(spread), Some(hot_on), Some(spread_on)) = (
            net("xdp established, wrapped, counters off"),
            net("xdp established, spread, wrapped, counters off"),
            net("xdp established, wrapped"),
            net("xdp established, spread, wrapped"),
        ) else {
            continue;
        };
        table.push_str(&format!(
            "| {n} | {} | {hot:.0} | {spread:.0} | {:.2} | {:.2} | {:.2} |\n",
            spread_flows(n),
            spread / hot,
            hot_on / hot,
            spread_on / spread
        ));
    }
    table.push_str(
        "\n| Services | path, wrapped | one CPU, net ns | both CPUs at once, net ns | both/one |\n|---:|---|---:|---:|---:|\n",
    );
    for &n in &scales {
        let net = |path: &str| net_of_floor(&rows, n, path);
        for path in [
            "xdp established",
            "xdp new flow",
            "xdp conntrack insert alone",
            "xdp established, spread",
        ] {
            let (Some(one), Some(both)) = (
                net(&format!("{path}, wrapped")),
                net(&format!("{path}, wrapped, both CPUs")),
            ) else {
                continue;
            };
            table.push_str(&format!(
                "| {n} | {path} | {one:.0} | {both:.0} | {:.2} |\n",
                both / one
            ));
        }
    }
    let data: String = rows
        .iter()
        .map(|r| {
            format!(
                "{} \"{}\" {} {} {}\n",
                r.services, r.path, r.median, r.p10, r.p90
            )
        })
        .collect();
    print!("{table}");
    if let Some(out) = out {
        std::fs::write(&out, &table).expect("write the table");
        std::fs::write(format!("{out}.dat"), data).expect("write the data");
    }
}
