//! The agent's heap per Service, stage by stage: what the watch stores keep
//! of each Service and EndpointSlice, the frontends computed from them, and
//! what a programming round keeps (the map contents and ids) and needs at
//! its peak. Bytes are counted by the allocator, so the figures repeat
//! exactly from run to run, whatever else the machine does.
//!
//! Then the first list of every slice as the API server sends it: the
//! time and the peak heap of parsing it into the watch's objects and
//! reading those into the store's slices, against parsing it into generic
//! objects (JSON trees), as the agent did before.
//!
//! Last, beside the bytes, the time of a partial round for one changed
//! Service at each scale: its refresh against the scan of every slice that
//! the round did before its store kept an index of each Service's slices,
//! and its programming against the count of every map entry by family that
//! each round did before it kept the counts.
//!
//! `cargo bench -p proxy-agent --bench agent_memory [-- --services N]...`
//!
//! The objects are those of `cargo xtask bench`'s control-plane part, as the
//! API server returns them: a Service without selector with one port, one
//! EndpointSlice of 10 ready endpoints on another node.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use kube::{api::DynamicObject, core::ObjectList, runtime::watcher::Event};
use proxy_agent::{
    desired::{Capacity, Fill, Programmed},
    frontend::Scheduler,
    k8s::{
        cache::{Changed, FrontendCache, Stores},
        nodes::NodeInfo,
        slices::{SliceObject, SliceVersion},
        watch,
    },
};
use serde_json::json;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                + (new_size - layout.size());
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ENDPOINTS_PER_SERVICE: usize = 10;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// A Service as the API server returns the control-plane bench's.
fn service(i: usize) -> k8s_openapi::api::core::v1::Service {
    let ip = format!("10.{}.{}.{}", 96 + (i >> 16), (i >> 8) & 0xff, i & 0xff);
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": format!("bench-{i:05}"), "namespace": "default",
            "uid": format!("5f1c7f8e-0a4b-4d8e-9b3a-{i:012}"),
            "resourceVersion": format!("{}", 100_000 + i),
            "creationTimestamp": "2026-12-04T10:00:00Z",
        },
        "spec": {
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
            "clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
            "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
        },
        "status": {"loadBalancer": {}},
    }))
    .unwrap()
}

/// Its EndpointSlice (v1beta1, as the bench writes them, with the
/// managedFields the API server adds).
fn slice(i: usize) -> serde_json::Value {
    let base =
        u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + (i * ENDPOINTS_PER_SERVICE) as u32;
    let endpoints: Vec<_> = (0..ENDPOINTS_PER_SERVICE)
        .map(|j| {
            json!({"addresses": [std::net::Ipv4Addr::from(base + j as u32).to_string()],
                   "conditions": {"ready": true},
                   "topology": {"kubernetes.io/hostname": "node2"}})
        })
        .collect();
    let name = format!("bench-{i:05}");
    json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "default",
            "uid": format!("7a2d9c1e-3b4f-4a6d-8e2f-{i:012}"),
            "resourceVersion": format!("{}", 200_000 + i),
            "creationTimestamp": "2026-12-04T10:00:00Z",
            "labels": {"kubernetes.io/service-name": name,
                       "endpointslice.kubernetes.io/managed-by": "bench.ferry.dev"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-04T10:00:00.123456Z"},
            "managedFields": [{
                "manager": "control-plane", "operation": "Update",
                "apiVersion": "discovery.k8s.io/v1beta1", "time": "2026-12-04T10:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:addressType": {}, "f:endpoints": {}, "f:ports": {},
                             "f:metadata": {"f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                                            "f:labels": {".": {}, "f:endpointslice.kubernetes.io/managed-by": {}, "f:kubernetes.io/service-name": {}}}},
            }],
        },
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// The first list of every slice, parsed and read, two ways: per slice,
/// the time and the peak heap above the list's body.
struct FirstList {
    body_bytes: usize,
    generic: (Duration, usize),
    watched: (Duration, usize),
}

fn time_first_list(services: usize) -> FirstList {
    let items: Vec<_> = (0..services).map(slice).collect();
    let body = serde_json::to_vec(&json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSliceList",
        "metadata": {"resourceVersion": "300000"}, "items": items,
    }))
    .unwrap();
    drop(items);
    let measure = |read: &dyn Fn(&[u8]) -> usize| {
        let before = live();
        PEAK.store(before, Ordering::Relaxed);
        let started = Instant::now();
        assert_eq!(read(&body), services);
        let took = started.elapsed();
        (
            took / services as u32,
            (PEAK.load(Ordering::Relaxed) - before) / services,
        )
    };
    // Before: kube parsed each slice into a generic object, a JSON tree.
    let generic = measure(&|body| {
        let list: ObjectList<DynamicObject> = serde_json::from_slice(body).unwrap();
        list.items.len()
    });
    // Now: the watch's objects, each read into the store's slice.
    let watched = measure(&|body| {
        let list: ObjectList<SliceObject> = serde_json::from_slice(body).unwrap();
        list.items
            .into_iter()
            .filter_map(|o| o.read(SliceVersion::V1beta1).ok())
            .count()
    });
    FirstList {
        body_bytes: body.len() / services,
        generic,
        watched,
    }
}

/// Heap bytes per Service, kept and at the peak, of one stage.
struct Stage {
    name: &'static str,
    kept: usize,
    peak: usize,
    /// The round's time per Service, counting allocator and all (the
    /// stores' stages would time making the objects too: not timed).
    took: Option<Duration>,
}

/// Medians over 200 changed Services, one at a time: a partial round's
/// refresh, and a scan of every slice for the Service's own; its
/// programming, and a count of every map entry.
struct PartialRound {
    refresh: Duration,
    scan: Duration,
    program: Duration,
    count: Duration,
}

fn time_partial_rounds(
    stores: &Stores,
    cache: &mut FrontendCache,
    programmed: &mut Programmed,
    node: &NodeInfo,
    services: usize,
) -> PartialRound {
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (mut refresh, mut scan, mut program, mut count) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for n in 0..200 {
        let key = format!("default/bench-{:05}", (n * 7919) % services);
        let started = Instant::now();
        let found = stores
            .slices
            .values()
            .filter(|s| *s.service == *key)
            .count();
        scan.push(started.elapsed());
        assert_eq!(found, 1);
        cache.touch(key.clone());
        let started = Instant::now();
        let changed = cache.refresh(stores, node, Scheduler::default());
        refresh.push(started.elapsed());
        let Changed::Services(frontends, gone) = changed else {
            panic!("a whole refresh for one Service");
        };
        assert_eq!(frontends.len(), 1);
        assert_eq!(frontends[0].name, key);
        let started = Instant::now();
        let frontends: Vec<_> = frontends.iter().collect();
        let report = programmed.partial(&frontends, &gone, |_: &_| Ok(()));
        program.push(started.elapsed());
        assert!(report.problems.is_empty() && report.complete());
        let started = Instant::now();
        let counted = Fill::of(programmed.applied());
        count.push(started.elapsed());
        assert_eq!(counted, programmed.fill());
    }
    PartialRound {
        refresh: median(refresh),
        scan: median(scan),
        program: median(program),
        count: median(count),
    }
}

fn measure(services: usize) -> (Vec<Stage>, PartialRound) {
    let mut stages = Vec::new();
    let stage = |name, before: usize, peak: usize, started: Option<Instant>| Stage {
        name,
        kept: (live() - before) / services,
        peak: (peak - before) / services,
        took: started.map(|s| s.elapsed() / services as u32),
    };

    let mut stores = Stores::default();
    let before = live();
    PEAK.store(before, Ordering::Relaxed);
    stores
        .services
        .apply(watch::read(Event::Init, watch::keep_service));
    for i in 0..services {
        stores.services.apply(watch::read(
            Event::InitApply(service(i)),
            watch::keep_service,
        ));
    }
    stores
        .services
        .apply(watch::read(Event::InitDone, watch::keep_service));
    stages.push(stage(
        "Services (store)",
        before,
        PEAK.load(Ordering::Relaxed),
        None,
    ));

    let before = live();
    PEAK.store(before, Ordering::Relaxed);
    let convert = watch::convert_slice(SliceVersion::V1beta1);
    stores.slices.apply(watch::read(Event::Init, &convert));
    for i in 0..services {
        let object: SliceObject = serde_json::from_value(slice(i)).unwrap();
        stores
            .slices
            .apply(watch::read(Event::InitApply(object), &convert));
    }
    stores.slices.apply(watch::read(Event::InitDone, &convert));
    stages.push(stage(
        "EndpointSlices (store)",
        before,
        PEAK.load(Ordering::Relaxed),
        None,
    ));

    let node = NodeInfo::from_node("node1", None);
    let before = live();
    PEAK.store(before, Ordering::Relaxed);
    let started = Instant::now();
    let mut cache = FrontendCache::default();
    let Changed::Everything(frontends) = cache.refresh(&stores, &node, Scheduler::default()) else {
        panic!("the first refresh computes everything");
    };
    let took = started.elapsed();
    let peak = PEAK.load(Ordering::Relaxed);
    // The round's frontends are the round's alone: their bytes, from a copy.
    let with_frontends = live();
    let copy = frontends.clone();
    let round_frontends = live() - with_frontends;
    drop(copy);
    stages.push(Stage {
        name: "frontends (cache)",
        kept: (with_frontends - round_frontends - before) / services,
        peak: (peak - before) / services,
        took: Some(took / services as u32),
    });
    stages.push(Stage {
        name: "a full round's frontends (the round's only)",
        kept: 0,
        peak: round_frontends / services,
        took: None,
    });

    let capacity = Capacity {
        services: services * (1 + ENDPOINTS_PER_SERVICE) + 1024,
        backends: services * ENDPOINTS_PER_SERVICE + 1024,
        revnat: services + 1024,
        ..Capacity::default()
    };
    let before = live();
    PEAK.store(before, Ordering::Relaxed);
    let started = Instant::now();
    let mut programmed = Programmed::adopt(Default::default(), Default::default(), capacity);
    let report = programmed.full(&frontends, |_: &_| Ok(()));
    assert!(report.problems.is_empty() && report.complete());
    drop(report);
    stages.push(stage(
        "programmed (maps, ids)",
        before,
        PEAK.load(Ordering::Relaxed),
        Some(started),
    ));

    let before = live();
    PEAK.store(before, Ordering::Relaxed);
    let started = Instant::now();
    let report = programmed.full(&frontends, |_: &_| Ok(()));
    assert_eq!(report.writes, 0);
    drop(report);
    stages.push(stage(
        "a full round, nothing changed",
        before,
        PEAK.load(Ordering::Relaxed),
        Some(started),
    ));
    drop(frontends);
    let partial = time_partial_rounds(&stores, &mut cache, &mut programmed, &node, services);
    (stages, partial)
}

fn main() {
    let mut scales = vec![10_000, 100_000];
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--services") {
        scales = args[at + 1..]
            .iter()
            .map_while(|a| a.parse().ok())
            .collect();
    }
    let (mut rounds, mut lists) = (Vec::new(), Vec::new());
    for services in scales {
        let (stages, partial) = measure(services);
        rounds.push((services, partial));
        lists.push((services, time_first_list(services)));
        println!(
            "{services} Services, {ENDPOINTS_PER_SERVICE} endpoints each: heap bytes per Service"
        );
        println!("| stage | kept | peak | µs |");
        println!("|---|---:|---:|---:|");
        for s in &stages {
            let us = s
                .took
                .map_or("-".to_string(), |t| format!("{:.2}", t.as_secs_f64() * 1e6));
            println!("| {} | {} | {} | {us} |", s.name, s.kept, s.peak);
        }
        let kept: usize = stages.iter().map(|s| s.kept).sum();
        println!("| all kept | {kept} | |\n");
    }
    println!("The first list of every EndpointSlice, parsed and read (per slice: µs, and peak heap bytes above the body)");
    println!("| Services | body bytes | generic objects | peak | watch objects, read | peak | time generic / watch | peak generic / watch |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (services, l) in lists {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let ((gt, gp), (wt, wp)) = (l.generic, l.watched);
        println!(
            "| {services} | {} | {:.2} | {gp} | {:.2} | {wp} | {:.1} | {:.1} |",
            l.body_bytes,
            us(gt),
            us(wt),
            us(gt) / us(wt),
            gp as f64 / wp as f64
        );
    }
    println!();
    println!("A partial round for one changed Service (medians of 200, µs)");
    println!("| Services | refresh (index) | scan of every slice | scan / refresh | programming (counts kept) | count of every entry | count / programming |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (services, p) in rounds {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "| {services} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            us(p.refresh),
            us(p.scan),
            us(p.scan) / us(p.refresh),
            us(p.program),
            us(p.count),
            us(p.count) / us(p.program)
        );
    }
}
