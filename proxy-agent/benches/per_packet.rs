//! Per-packet cost of the real programs against the number of Services, with
//! BPF_PROG_TEST_RUN, beside a program that only returns XDP_PASS (the floor).
//!
//! Each sample is one run (`repeat` 1) on a fresh copy of the frame: with
//! `repeat` N the kernel would run the program on the frame the previous run
//! rewrote, timing the not-a-Service path from the second run on. One run per
//! call costs a syscall each (not timed: the kernel times the program alone),
//! and the caches are colder than in a loop, so these are upper bounds.
//!
//! Usage (root): `cargo bench -p proxy-agent --bench per_packet -- [--quick] [--out FILE]`

use std::{net::Ipv4Addr, time::Duration};

use aya::programs::{TestRun, TestRunOptions};
use proxy_agent::{
    dataplane::Dataplane,
    model::{Endpoint, Frontend, Protocol, Service},
    simulate,
    state::{self, Ids, MapState},
};
use proxy_common::program_names::FROM_POD;

const BACKENDS_EACH: u32 = 10;

fn service(i: u32) -> Service {
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
    Service::new(
        format!("svc-{i}"),
        Frontend {
            address: vip,
            port: 80,
            protocol: Protocol::Tcp,
        },
        endpoints,
    )
}

/// A TCP SYN from `src:sport` to `dst:80`, checksums complete.
fn frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr) -> Vec<u8> {
    simulate::frame(&simulate::PacketSpec {
        proto: proxy_common::proto::TCP,
        src: (src, sport),
        dst: (dst, 80),
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Prog {
    Tc,
    Xdp,
    Floor,
}

/// One run of a program on `input`; checks the verdict, returns the kernel's time.
fn run_once(dp: &mut Dataplane, prog: Prog, input: &[u8], want: u32) -> Duration {
    let mut out = vec![0u8; input.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let result = match prog {
        Prog::Tc => dp.program(FROM_POD).unwrap().test_run(opts),
        Prog::Xdp => dp.xdp_program().unwrap().test_run(opts),
        Prog::Floor => dp.pass_only().unwrap().test_run(opts),
    }
    .expect("BPF_PROG_TEST_RUN");
    assert_eq!(result.return_value, want, "unexpected verdict");
    result.duration
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
    median: u64,
    p10: u64,
    p90: u64,
}

fn measure(services: u32, samples: usize, rows: &mut Vec<Row>) {
    let list: Vec<Service> = (0..services).map(service).collect();
    let (desired, problems) = state::desired(&list, &mut Ids::default());
    assert!(
        problems.is_empty(),
        "{:?}",
        &problems[..problems.len().min(3)]
    );
    let mut dp = Dataplane::load_private_sized(services, BACKENDS_EACH).expect("load");
    dp.apply(&state::diff(&desired, &MapState::default()))
        .expect("fill the maps");
    // The Service in the middle of the address range.
    let vip = list[(services / 2) as usize].frontend.address;
    let client = Ipv4Addr::new(10, 244, 1, 2);
    for (prog, path_new, path_est, pass) in [
        (Prog::Tc, "tc new flow", "tc established", u32::MAX),
        (Prog::Xdp, "xdp new flow", "xdp established", 2),
    ] {
        // Established: one flow, its conntrack entry made by the first run.
        let established = frame(client, 40000, vip);
        run_once(&mut dp, prog, &established, pass);
        let est: Vec<u64> = (0..samples)
            .map(|_| run_once(&mut dp, prog, &established, pass).as_nanos() as u64)
            .collect();
        // New: every sample a flow never seen (source address and port vary).
        let new: Vec<u64> = (0..samples)
            .map(|i| {
                let src =
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + (i / 60_000) as u32);
                let f = frame(src, 1024 + (i % 60_000) as u16, vip);
                run_once(&mut dp, prog, &f, pass).as_nanos() as u64
            })
            .collect();
        for (path, ns) in [(path_est, est), (path_new, new)] {
            let (median, p10, p90) = summary(ns);
            rows.push(Row {
                services,
                path,
                median,
                p10,
                p90,
            });
        }
    }
    let floor_frame = frame(client, 40000, vip);
    let floor: Vec<u64> = (0..samples)
        .map(|_| run_once(&mut dp, Prog::Floor, &floor_frame, 2).as_nanos() as u64)
        .collect();
    let (median, p10, p90) = summary(floor);
    rows.push(Row {
        services,
        path: "xdp PASS only (floor)",
        median,
        p10,
        p90,
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned();
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root");
    let scales: &[u32] = &[10, 1_000, 10_000, 100_000];
    let samples = if quick { 3_000 } else { 20_000 };
    let mut rows = Vec::new();
    for &n in scales {
        eprintln!(
            "per_packet: {n} Services of {BACKENDS_EACH} backends, {samples} samples per path"
        );
        measure(n, samples, &mut rows);
    }
    let base = |path: &str| {
        rows.iter()
            .find(|r| r.services == scales[0] && r.path == path)
            .map(|r| r.median)
            .unwrap_or(1)
    };
    let floor = |n: u32| {
        rows.iter()
            .find(|r| r.services == n && r.path.starts_with("xdp PASS"))
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
            r.median as f64 / floor(r.services) as f64,
        ));
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
