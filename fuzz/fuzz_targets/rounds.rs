//! Programming rounds, whole or partial, over frontends that come, change and
//! go, into maps of a small capacity whose writes may fail: after every write
//! every frontend is whole, after every round the agent's view is exactly what
//! the maps hold (and its entry counts by family are what counting them again
//! finds), and a full round in room enough with no failure leaves nothing to
//! write.

#![no_main]

use std::net::Ipv4Addr;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use proxy_agent::{
    desired::{
        apply::{check_whole, overflows},
        Capacity, Fill, Ids, MapOp, MapState, Programmed,
    },
    frontend::{Cidr, Endpoint, Frontend, FrontendSpec, Protocol, Scheduler},
};

#[derive(Arbitrary, Debug)]
struct Service {
    /// One Service per id: its name and address.
    id: u8,
    udp: bool,
    endpoints: Vec<(u8, bool)>,
    reachable: Vec<u8>,
    scheduler: u8,
    affinity: Option<u16>,
    ranges: Option<Vec<(u8, u8)>>,
}

#[derive(Arbitrary, Debug)]
struct Round {
    services: Vec<Service>,
    /// Only the Services whose id is listed change (the rest as they were).
    partial: bool,
    /// Writes that fail: every n-th write, if set.
    fail_every: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    capacity: (u8, u8, u8),
    rounds: Vec<Round>,
}

fn spec(s: &Service) -> FrontendSpec {
    let frontend = Frontend {
        address: Ipv4Addr::new(10, 96, 0, s.id).into(),
        port: 80,
        protocol: if s.udp { Protocol::Udp } else { Protocol::Tcp },
    };
    let endpoint = |i: u8, terminating: bool| Endpoint {
        address: Ipv4Addr::new(10, 244, 0, i % 16).into(),
        port: 8080,
        // Where a pod runs is the same in every Service.
        local: (i % 16) % 3 == 0,
        terminating,
    };
    let mut spec = FrontendSpec::new(
        format!("s{}", s.id),
        frontend,
        s.endpoints.iter().map(|(i, t)| endpoint(*i, *t)).collect(),
    );
    spec.reachable = s
        .reachable
        .iter()
        .map(|i| endpoint(*i, i % 2 == 0))
        .collect();
    spec.scheduler = Some(match s.scheduler % 4 {
        0 => Scheduler::FlowHash,
        1 => Scheduler::Maglev,
        2 => Scheduler::SourceHash,
        _ => Scheduler::RoundRobin,
    });
    spec.affinity_timeout = s.affinity.map(u32::from);
    spec.source_ranges = s.ranges.as_ref().map(|r| {
        r.iter()
            .filter_map(|(a, p)| Cidr::new(Ipv4Addr::new(192, 0, 2, *a).into(), p % 33))
            .collect()
    });
    spec
}

/// Maps with a kernel's limits and failures.
struct Kernel {
    maps: MapState,
    capacity: Capacity,
    writes: usize,
    fail_every: Option<u8>,
}

impl Kernel {
    fn write(&mut self, op: &MapOp) -> anyhow::Result<()> {
        self.writes += 1;
        if let Some(n) = self.fail_every.filter(|n| *n > 0) {
            if self.writes % usize::from(n) == 0 {
                anyhow::bail!("injected failure");
            }
        }
        if overflows(op, &self.maps, &self.capacity) {
            anyhow::bail!("the map is full");
        }
        self.maps.apply(op);
        if let Err(hole) = check_whole(&self.maps) {
            panic!("after {op:?}: {hole}");
        }
        Ok(())
    }
}

fuzz_target!(|input: Input| {
    let capacity = Capacity {
        services: usize::from(input.capacity.0) + 1,
        backends: usize::from(input.capacity.1) + 1,
        revnat: 64,
        maglev: usize::from(input.capacity.2) * 64,
        source_ranges: 32,
    };
    // The agent may be told the maps are larger than they are: then the
    // kernel refuses writes, as when a map fills behind its back.
    let told = if input.capacity.0 % 2 == 0 {
        capacity
    } else {
        Capacity::default()
    };
    let mut programmed = Programmed::adopt(MapState::default(), Ids::default(), told);
    let mut kernel = Kernel {
        maps: MapState::default(),
        capacity,
        writes: 0,
        fail_every: None,
    };
    let mut current: std::collections::BTreeMap<u8, FrontendSpec> = Default::default();
    for (index, round) in input.rounds.iter().take(16).enumerate() {
        kernel.fail_every = round.fail_every;
        let mut wanted = current.clone();
        for s in round.services.iter().take(32) {
            wanted.insert(s.id, spec(s));
        }
        if !round.partial {
            wanted.retain(|id, _| round.services.iter().any(|s| s.id == *id));
        }
        // As the agent: a partial round only after a full one, with the
        // frontends a changed Service no longer has as gone.
        let report = if round.partial && index > 0 {
            let changed: Vec<&FrontendSpec> = round
                .services
                .iter()
                .filter_map(|s| wanted.get(&s.id))
                .collect();
            let gone: Vec<Frontend> = round
                .services
                .iter()
                .filter_map(|s| current.get(&s.id))
                .map(|old| old.frontend)
                .filter(|f| !changed.iter().any(|c| c.frontend == *f))
                .collect();
            programmed.partial(&changed, &gone, |op: &_| kernel.write(op))
        } else {
            let all: Vec<&FrontendSpec> = wanted.values().collect();
            programmed.full(&all, |op: &_| kernel.write(op))
        };
        assert_eq!(kernel.maps, *programmed.applied(), "{report:?}");
        // The counts a partial round corrects are what counting again finds.
        assert_eq!(programmed.fill(), Fill::of(programmed.applied()));
        current = wanted;
    }
    // Room and no failure: one full round, then nothing left to write.
    // Room for ids too: the agent was told maps of the default sizes, as
    // one restarted on larger maps would be (its backend ids each need a
    // slot of the IPv4 array). Told a small array, the ids run out: a
    // round then programs what it can, and the ids its removals free are
    // handed out by the next round, which writes again.
    kernel.capacity = Capacity::default();
    kernel.fail_every = None;
    let applied = programmed.applied().clone();
    programmed = Programmed::adopt(
        applied,
        std::mem::take(&mut programmed.ids),
        Capacity::default(),
    );
    let all: Vec<&FrontendSpec> = current.values().collect();
    let mut first = Vec::new();
    let report = programmed.full(&all, |op: &_| {
        first.push(*op);
        kernel.write(op)
    });
    if std::env::var_os("FERRY_FUZZ_DEBUG").is_some() {
        eprintln!("final round: {first:?}\nspecs: {all:#?}");
    }
    assert!(report.complete(), "{report:?}");
    let mut rewritten = Vec::new();
    let again = programmed.full(&all, |op: &_| {
        rewritten.push(*op);
        kernel.write(op)
    });
    assert_eq!(again.writes, 0, "{again:?}: {rewritten:?}");
    assert_eq!(kernel.maps, *programmed.applied());
});
