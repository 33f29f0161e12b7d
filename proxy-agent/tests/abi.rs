//! Guards for the map ABI between the programs and the agent, unprivileged:
//! the maps the embedded object defines are the ones `map_names::ALL` names
//! (the programs write each name as a literal, since `#[btf_map(name = ..)]`
//! takes no const path), with the key and value sizes of their proxy-common
//! types; and a snapshot of every map type's size and field offsets, which
//! fails when a layout changes while its map keeps its `_vN` name.

use std::collections::BTreeMap;

use aya_obj::{maps::Map, Object};
use proxy_common::{
    bench, map_names, AffinityKey4, AffinityKey6, AffinityValue, Backend4, Backend6, Config,
    Config6, CtKey4, CtKey6, CtValue, FragKey4, FragPorts, MaglevKey, Nat4, Nat6, NatPortKey4,
    NatPortKey6, RevNat4, RevNat6, ServiceCidrs, ServiceKey4, ServiceKey6, ServiceValue,
    SockConfig, SockRevKey4, SockRevKey6, SourceRange4, SourceRange6, StatCounter, Traffic,
    TrafficKey,
};

/// The object the agent embeds (see build.rs).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry.bpf.o"));

/// A type's layout as one line: name, size, and each field's offset.
macro_rules! layout {
    ($t:ty) => {
        (stringify!($t), size_of::<$t>(), String::new())
    };
    ($t:ty { $($field:ident),* $(,)? }) => {
        (
            stringify!($t),
            size_of::<$t>(),
            [$(format!("{}@{}", stringify!($field), core::mem::offset_of!($t, $field))),*].join(" "),
        )
    };
}

type Layout = (&'static str, usize, String);

/// Every map's key and value layout, by map name.
fn layouts() -> Vec<(&'static str, Layout, Layout)> {
    // An LPM trie key: the prefix length, then the data.
    let lpm_key = (
        "lpm_trie::Key<SourceRange4>",
        4 + size_of::<SourceRange4>(),
        format!(
            "prefix_len@0 data@4 {{rev_nat_id_be@{} addr@{}}}",
            core::mem::offset_of!(SourceRange4, rev_nat_id_be),
            core::mem::offset_of!(SourceRange4, addr)
        ),
    );
    let lpm_key6 = (
        "lpm_trie::Key<SourceRange6>",
        4 + size_of::<SourceRange6>(),
        format!(
            "prefix_len@0 data@4 {{rev_nat_id_be@{} addr@{}}}",
            core::mem::offset_of!(SourceRange6, rev_nat_id_be),
            core::mem::offset_of!(SourceRange6, addr)
        ),
    );
    let ct_key6 = layout!(CtKey6 {
        saddr,
        daddr,
        sport_be,
        dport_be,
        proto,
        dir,
        _pad
    });
    let ct_key = layout!(CtKey4 {
        saddr,
        daddr,
        sport_be,
        dport_be,
        proto,
        dir,
        _pad
    });
    vec![
        (
            map_names::SERVICES_V4,
            layout!(ServiceKey4 {
                addr,
                port_be,
                proto,
                scope,
                slot,
                _pad
            }),
            layout!(ServiceValue {
                backend_id,
                rev_nat_id,
                count,
                flags,
                maglev_size,
                cluster_count
            }),
        ),
        (
            map_names::BACKENDS_V4,
            layout!(u32),
            layout!(Backend4 {
                addr,
                port_be,
                proto,
                state,
                flags,
                _pad,
                id
            }),
        ),
        (
            map_names::REVNAT_V4,
            layout!(u32),
            layout!(RevNat4 {
                addr,
                port_be,
                _pad
            }),
        ),
        (
            map_names::CONNTRACK_V4,
            ct_key.clone(),
            layout!(CtValue {
                backend_id,
                rev_nat_id,
                flags,
                nat_port_be,
                remap_port_be,
                _pad,
                last_seen_ns
            }),
        ),
        (
            map_names::NAT_V4,
            ct_key,
            layout!(Nat4 {
                client_addr,
                rev_nat_id,
                client_port_be,
                flags,
                backend_id,
                last_seen_ns
            }),
        ),
        (
            map_names::NAT_PORTS_V4,
            layout!(NatPortKey4 {
                backend_addr,
                backend_port_be,
                proto,
                _pad,
                index,
                _pad2
            }),
            layout!(u64),
        ),
        (
            map_names::AFFINITY_V4,
            layout!(AffinityKey4 {
                client_addr,
                rev_nat_id
            }),
            layout!(AffinityValue {
                backend_id,
                _pad,
                last_used_ns
            }),
        ),
        (
            map_names::MAGLEV_V4,
            layout!(MaglevKey { rev_nat_id, index }),
            layout!(u32),
        ),
        (map_names::ROUND_ROBIN, layout!(u32), layout!(u32)),
        (map_names::SOURCE_RANGES_V4, lpm_key, layout!(u8)),
        (
            map_names::CONFIG,
            layout!(u32),
            layout!(Config {
                snat_addr,
                nat_port_min,
                nat_port_max
            }),
        ),
        (
            map_names::STATS,
            layout!(u32),
            layout!(StatCounter { packets, bytes }),
        ),
        (
            map_names::SOCK_REVNAT_V4,
            layout!(SockRevKey4 {
                cookie,
                addr,
                port_be,
                _pad
            }),
            layout!(RevNat4 {
                addr,
                port_be,
                _pad
            }),
        ),
        (
            map_names::SOCK_CONFIG,
            layout!(u32),
            layout!(SockConfig {
                host_netns_cookie,
                flags,
                _pad
            }),
        ),
        (
            map_names::SERVICES_V6,
            layout!(ServiceKey6 {
                addr,
                port_be,
                proto,
                scope,
                slot,
                _pad
            }),
            layout!(ServiceValue {
                backend_id,
                rev_nat_id,
                count,
                flags,
                maglev_size,
                cluster_count
            }),
        ),
        (
            map_names::BACKENDS_V6,
            layout!(u32),
            layout!(Backend6 {
                addr,
                port_be,
                proto,
                state,
                flags,
                _pad
            }),
        ),
        (
            map_names::REVNAT_V6,
            layout!(u32),
            layout!(RevNat6 {
                addr,
                port_be,
                _pad
            }),
        ),
        (
            map_names::CONNTRACK_V6,
            layout!(CtKey6 {
                saddr,
                daddr,
                sport_be,
                dport_be,
                proto,
                dir,
                _pad
            }),
            layout!(CtValue {
                backend_id,
                rev_nat_id,
                flags,
                nat_port_be,
                remap_port_be,
                _pad,
                last_seen_ns
            }),
        ),
        (
            map_names::AFFINITY_V6,
            layout!(AffinityKey6 {
                client_addr,
                rev_nat_id
            }),
            layout!(AffinityValue {
                backend_id,
                _pad,
                last_used_ns
            }),
        ),
        (
            map_names::SOCK_REVNAT_V6,
            layout!(SockRevKey6 {
                cookie,
                addr,
                port_be,
                _pad
            }),
            layout!(RevNat6 {
                addr,
                port_be,
                _pad
            }),
        ),
        (
            map_names::NAT_V6,
            ct_key6.clone(),
            layout!(Nat6 {
                client_addr,
                rev_nat_id,
                client_port_be,
                flags,
                last_seen_ns
            }),
        ),
        (
            map_names::NAT_PORTS_V6,
            layout!(NatPortKey6 {
                backend_addr,
                backend_port_be,
                proto,
                _pad,
                index,
                _pad2
            }),
            layout!(u64),
        ),
        (map_names::SOURCE_RANGES_V6, lpm_key6, layout!(u8)),
        (
            map_names::CONFIG_V6,
            layout!(u32),
            layout!(Config6 { snat_addr }),
        ),
        // The programs' own per-CPU room (a bpf_fib_lookup, an IPv6 flow and
        // its backend): no state, never read back, no type in proxy-common,
        // so its size is the object's. Recorded all the same: a pinned map
        // of another size cannot be reused under the same name.
        (
            map_names::SCRATCH,
            layout!(u32),
            (
                "Scratch",
                object_maps()[map_names::SCRATCH].1 as usize,
                String::new(),
            ),
        ),
        (
            map_names::FRAGMENTS_V4,
            layout!(FragKey4 {
                saddr,
                daddr,
                id_be,
                proto,
                _pad
            }),
            layout!(FragPorts { sport_be, dport_be }),
        ),
        (
            map_names::SERVICE_CIDRS,
            layout!(u32),
            layout!(ServiceCidrs {
                count4,
                count6,
                v4,
                v6
            }),
        ),
        // As `SCRATCH`: the ports an SCTP packet arrived with, the
        // programs' own.
        (
            map_names::SCTP_ARRIVED,
            layout!(u32),
            (
                "Ports",
                object_maps()[map_names::SCTP_ARRIVED].1 as usize,
                String::new(),
            ),
        ),
        (
            map_names::TRAFFIC,
            layout!(TrafficKey {
                rev_nat_id,
                backend_id
            }),
            layout!(Traffic {
                to_backend_packets,
                to_backend_bytes,
                to_client_packets,
                to_client_bytes
            }),
        ),
        // Perf buffers by CPU (a buffer's file descriptor each); the
        // reports' own layout is `MonitorEvent`'s.
        (map_names::EVENTS, layout!(u32), layout!(u32)),
        (map_names::MONITOR, layout!(u32), layout!(u64)),
        (map_names::DIAG, layout!(u32), layout!(i64)),
    ]
}

/// The layouts as recorded. A layout may change only together with its
/// map's name (a `_vN` bump, with the reason beside the name in
/// proxy-common); then the old line goes and the new one is recorded here.
/// The one exception: a name no release has shipped yet (the previous
/// release has the version before it, see `proxy_common::previous`) may
/// still change, as no node holds maps of it.
const SNAPSHOT: &str = "\
svc4_v2: ServiceKey4 12 {addr@0 port_be@4 proto@6 scope@7 slot@8 _pad@10} -> ServiceValue 16 {backend_id@0 rev_nat_id@4 count@8 flags@10 maglev_size@12 cluster_count@14}
backend4_v2: u32 4 {} -> Backend4 16 {addr@0 port_be@4 proto@6 state@7 flags@8 _pad@9 id@12}
revnat4_v2: u32 4 {} -> RevNat4 8 {addr@0 port_be@4 _pad@6}
ct4_v3: CtKey4 16 {saddr@0 daddr@4 sport_be@8 dport_be@10 proto@12 dir@13 _pad@14} -> CtValue 24 {backend_id@0 rev_nat_id@4 flags@8 nat_port_be@10 remap_port_be@12 _pad@14 last_seen_ns@16}
nat4_v3: CtKey4 16 {saddr@0 daddr@4 sport_be@8 dport_be@10 proto@12 dir@13 _pad@14} -> Nat4 24 {client_addr@0 rev_nat_id@4 client_port_be@8 flags@10 backend_id@12 last_seen_ns@16}
natport4_v1: NatPortKey4 12 {backend_addr@0 backend_port_be@4 proto@6 _pad@7 index@8 _pad2@10} -> u64 8 {}
affinity4_v2: AffinityKey4 8 {client_addr@0 rev_nat_id@4} -> AffinityValue 16 {backend_id@0 _pad@4 last_used_ns@8}
maglev4_v2: MaglevKey 8 {rev_nat_id@0 index@4} -> u32 4 {}
rr_v3: u32 4 {} -> u32 4 {}
srcrange4_v2: lpm_trie::Key<SourceRange4> 12 {prefix_len@0 data@4 {rev_nat_id_be@0 addr@4}} -> u8 1 {}
config_v1: u32 4 {} -> Config 8 {snat_addr@0 nat_port_min@4 nat_port_max@6}
stats_v1: u32 4 {} -> StatCounter 16 {packets@0 bytes@8}
sockrev4_v1: SockRevKey4 16 {cookie@0 addr@8 port_be@12 _pad@14} -> RevNat4 8 {addr@0 port_be@4 _pad@6}
sockcfg_v1: u32 4 {} -> SockConfig 16 {host_netns_cookie@0 flags@8 _pad@12}
svc6_v1: ServiceKey6 24 {addr@0 port_be@16 proto@18 scope@19 slot@20 _pad@22} -> ServiceValue 16 {backend_id@0 rev_nat_id@4 count@8 flags@10 maglev_size@12 cluster_count@14}
backend6_v1: u32 4 {} -> Backend6 24 {addr@0 port_be@16 proto@18 state@19 flags@20 _pad@21}
revnat6_v1: u32 4 {} -> RevNat6 20 {addr@0 port_be@16 _pad@18}
ct6_v1: CtKey6 40 {saddr@0 daddr@16 sport_be@32 dport_be@34 proto@36 dir@37 _pad@38} -> CtValue 24 {backend_id@0 rev_nat_id@4 flags@8 nat_port_be@10 remap_port_be@12 _pad@14 last_seen_ns@16}
affinity6_v1: AffinityKey6 20 {client_addr@0 rev_nat_id@16} -> AffinityValue 16 {backend_id@0 _pad@4 last_used_ns@8}
sockrev6_v1: SockRevKey6 32 {cookie@0 addr@8 port_be@24 _pad@26} -> RevNat6 20 {addr@0 port_be@16 _pad@18}
nat6_v1: CtKey6 40 {saddr@0 daddr@16 sport_be@32 dport_be@34 proto@36 dir@37 _pad@38} -> Nat6 32 {client_addr@0 rev_nat_id@16 client_port_be@20 flags@22 last_seen_ns@24}
natport6_v1: NatPortKey6 24 {backend_addr@0 backend_port_be@16 proto@18 _pad@19 index@20 _pad2@22} -> u64 8 {}
srcrange6_v1: lpm_trie::Key<SourceRange6> 24 {prefix_len@0 data@4 {rev_nat_id_be@0 addr@4}} -> u8 1 {}
config6_v1: u32 4 {} -> Config6 16 {snat_addr@0}
scratch_v1: u32 4 {} -> Scratch 160 {}
frag4_v1: FragKey4 12 {saddr@0 daddr@4 id_be@8 proto@10 _pad@11} -> FragPorts 4 {sport_be@0 dport_be@2}
svccidr_v1: u32 4 {} -> ServiceCidrs 168 {count4@0 count6@4 v4@8 v6@40}
sctp_v1: u32 4 {} -> Ports 16 {}
traffic_v1: TrafficKey 8 {rev_nat_id@0 backend_id@4} -> Traffic 32 {to_backend_packets@0 to_backend_bytes@8 to_client_packets@16 to_client_bytes@24}
events_v1: u32 4 {} -> u32 4 {}
monitor_v1: u32 4 {} -> u64 8 {}
diag_v1: u32 4 {} -> i64 8 {}
";

fn line(name: &str, key: &Layout, value: &Layout) -> String {
    format!(
        "{name}: {} {} {{{}}} -> {} {} {{{}}}",
        key.0, key.1, key.2, value.0, value.1, value.2
    )
}

#[test]
fn layouts_change_only_with_their_map_names() {
    let recorded: BTreeMap<&str, &str> = SNAPSHOT
        .lines()
        .map(|l| (l.split(':').next().unwrap(), l))
        .collect();
    let mut problems = Vec::new();
    let layouts = layouts();
    for (name, key, value) in &layouts {
        let now = line(name, key, value);
        match recorded.get(name) {
            Some(&was) if was == now => {}
            Some(&was) => problems.push(format!(
                "the layout of map {name} changed without a new name: bump its _vN in \
                 proxy-common (saying why), then record the new layout\n  was: {was}\n  now: {now}"
            )),
            None => problems.push(format!("map {name} is new: record its layout\n  {now}")),
        }
    }
    for name in recorded.keys() {
        if !layouts.iter().any(|(n, _, _)| n == name) {
            problems.push(format!("map {name} is gone: remove its line from SNAPSHOT"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let names: Vec<&str> = layouts.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(
        names,
        map_names::ALL,
        "one layout per map, in map_names::ALL's order"
    );
}

/// The maps defined in the object with BTF (`#[btf_map]`), by name: their
/// key and value sizes. Data sections (.rodata, .bss) are not among them.
fn object_maps() -> BTreeMap<String, (u32, u32)> {
    let object = Object::parse(OBJECT).expect("parse the embedded eBPF object");
    object
        .maps
        .iter()
        .filter(|(_, map)| matches!(map, Map::Btf(_)))
        .map(|(name, map)| (name.clone(), (map.key_size(), map.value_size())))
        .collect()
}

#[test]
fn object_map_names_are_the_constants() {
    let in_object = object_maps();
    let bench_maps = [
        bench::FRAME_MAP,
        bench::XDP_TARGET_MAP,
        bench::TC_TARGET_MAP,
        bench::SEQ_MAP,
        bench::GEN_MAP,
        bench::SINK_MAP,
        bench::SPREAD_MAP,
    ];
    let mut expected: Vec<&str> = map_names::ALL.iter().chain(&bench_maps).copied().collect();
    expected.sort_unstable();
    let found: Vec<&str> = in_object.keys().map(String::as_str).collect();
    assert_eq!(
        found, expected,
        "the maps in proxy-ebpf/src/maps.rs and bench.rs must be map_names::ALL and the bench maps"
    );
}

#[test]
fn object_map_sizes_are_the_types() {
    let in_object = object_maps();
    for (name, key, value) in layouts() {
        let (key_size, value_size) = in_object[name];
        assert_eq!(
            (key_size as usize, value_size as usize),
            (key.1, value.1),
            "map {name}: key and value sizes in the object against {} and {}",
            key.0,
            value.0
        );
    }
}
