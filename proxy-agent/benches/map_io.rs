//! What the agent's map I/O costs, batched against one entry at a time,
//! side by side in one run, alternating, at each scale:
//! - the resync's read of the maps (`Dataplane::read_state`, every
//!   `--resync-seconds`): the services, backends, reverse-NAT and Maglev
//!   maps of both families read in batches (`BPF_MAP_LOOKUP_BATCH`) against
//!   aya's iterator (two system calls per entry);
//! - the first round (every Service into empty maps, as at the agent's
//!   start): its runs of puts written in batches (`BPF_MAP_UPDATE_BATCH`)
//!   against one system call per entry. The round's own work (desired
//!   state, ids, diff) is in both.
//!
//! Services have 10 backends each, an IPv4 and an IPv6 ClusterIP.
//!
//! Usage (root): `cargo bench -p proxy-agent --bench map_io -- [--quick]
//! [--out FILE]`

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use proxy_agent::{
    frontend::{Endpoint, Frontend, FrontendSpec, Protocol, Scheduler},
    harness::Programs,
    kernel::batch::{Reading, Writing},
    settings,
};

const BACKENDS_EACH: u32 = 10;

fn service(i: u32, ipv6: bool) -> FrontendSpec {
    let address = |base: u32, n: u32| -> std::net::IpAddr {
        if ipv6 {
            Ipv6Addr::from(
                0xfd00_0000_0000_0000_0000_0000_0000_0000u128
                    | u128::from(base) << 32
                    | u128::from(n),
            )
            .into()
        } else {
            Ipv4Addr::from(base + n).into()
        }
    };
    let endpoints = (0..BACKENDS_EACH)
        .map(|b| {
            Endpoint::new(
                address(
                    u32::from(Ipv4Addr::new(10, 128, 0, 0)),
                    i * BACKENDS_EACH + b,
                ),
                8080,
            )
        })
        .collect();
    FrontendSpec::new(
        format!("svc-{i}{}", if ipv6 { "-6" } else { "" }),
        Frontend {
            address: address(u32::from(Ipv4Addr::new(10, 96, 0, 0)), i),
            port: 80,
            protocol: Protocol::Tcp,
        },
        endpoints,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The first round into empty maps, both ways, alternating which goes
/// first; medians, ms. Each round loads its own maps (not timed), and both
/// ways must leave the same entries.
fn first_rounds(list: &[FrontendSpec], frontends: u32, rounds: usize) -> (f64, f64) {
    let (mut one, mut batched) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Writing::OneByOne, Writing::Batched]
        } else {
            [Writing::Batched, Writing::OneByOne]
        };
        let mut states = Vec::new();
        for writing in order {
            let mut p = Programs::load_sized(frontends, BACKENDS_EACH, 0, true).expect("load");
            p.writing = writing;
            let start = Instant::now();
            let problems = p.serve(list).expect("fill the maps");
            let ms = start.elapsed().as_secs_f64() * 1e3;
            assert!(
                problems.is_empty(),
                "{:?}",
                &problems[..problems.len().min(3)]
            );
            match writing {
                Writing::OneByOne => one.push(ms),
                Writing::Batched => batched.push(ms),
            }
            states.push(p.dp.read_state().expect("read the maps"));
        }
        assert_eq!(states[0], states[1], "both ways write the same entries");
    }
    (median(one), median(batched))
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
    let (scales, rounds): (&[u32], usize) = if quick {
        (&[1_000], 3)
    } else {
        (&[1_000, 10_000, 100_000], 7)
    };
    let mut table = String::from(
        "| Services | entries (services, backends, reverse NAT) | read one by one ms | read batched ms | batched / one by one | first round one by one ms | first round batched ms | batched / one by one |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for &n in scales {
        let mut list: Vec<FrontendSpec> = (0..n)
            .flat_map(|i| [service(i, false), service(i, true)])
            .collect();
        settings::fill_defaults(&mut list, Scheduler::default());
        let frontends = list.len() as u32;
        let mut p = Programs::load_sized(frontends, BACKENDS_EACH, 0, true).expect("load");
        let problems = p.serve(&list).expect("fill the maps");
        assert!(
            problems.is_empty(),
            "{:?}",
            &problems[..problems.len().min(3)]
        );
        let (mut one, mut batched) = (Vec::new(), Vec::new());
        let mut entries = 0;
        let mut time = |reading: Reading| {
            let start = Instant::now();
            let state = p.dp.read_state_by(reading).expect("read the maps");
            let ms = start.elapsed().as_secs_f64() * 1e3;
            entries = state.services.len() + state.backends.len() + state.revnat.len();
            (ms, state)
        };
        for round in 0..rounds {
            // Alternating which goes first.
            let order = if round % 2 == 0 {
                [Reading::OneByOne, Reading::Batched]
            } else {
                [Reading::Batched, Reading::OneByOne]
            };
            let mut states = Vec::new();
            for reading in order {
                let (ms, state) = time(reading);
                match reading {
                    Reading::OneByOne => one.push(ms),
                    Reading::Batched => batched.push(ms),
                }
                states.push(state);
            }
            assert_eq!(states[0], states[1], "both reads find the same state");
        }
        let (one, batched) = (median(one), median(batched));
        eprintln!("map_io: read {n} Services: one by one {one:.1} ms, batched {batched:.1} ms");
        drop(p);
        let (write_one, write_batched) = first_rounds(&list, frontends, rounds);
        eprintln!(
            "map_io: first round {n} Services: one by one {write_one:.1} ms, batched {write_batched:.1} ms"
        );
        table.push_str(&format!(
            "| {n} | {entries} | {one:.1} | {batched:.1} | {:.3} | {write_one:.1} | {write_batched:.1} | {:.3} |\n",
            batched / one,
            write_batched / write_one
        ));
    }
    print!("{table}");
    if let Some(out) = out {
        std::fs::write(out, &table).expect("write the table");
    }
}
