//! The map ABI shared by the eBPF programs and the agent.
//!
//! Every key and value is `#[repr(C)]` with explicit padding and a size assert, so
//! the kernel side, the agent and `bpftool` (through BTF) all agree on one layout.
//! Addresses and ports are stored in network byte order. Addresses are byte
//! arrays ([`Ip4`], [`Addr6`]), so that `bpftool map dump` shows their bytes;
//! other fields that hold network-order numbers end in `_be`. Any change to a layout must bump the `_vN` suffix of the map's name so
//! that a new agent never reads an old pinned map with the wrong layout, and
//! move the old layout to [`previous`], so that the agent carries the old
//! map's entries over.
#![no_std]

#[cfg(feature = "user")]
pub mod cgroup;
pub mod crc32c;
pub mod hash;
#[cfg(feature = "user")]
pub mod pinned;
pub mod previous;
pub mod stats;

/// Maglev table sizes, shared by the agent (which fills tables) and the
/// programs (which index them): primes just below powers of two. Slot 0 of a
/// Maglev frontend names its size by index into this ladder.
pub mod maglev {
    pub const SIZES: [u32; 10] = [
        251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_521, 131_071,
    ];
}

/// Names of the maps, as the kernel knows them and as they are pinned under the
/// agent's bpffs directory. The kernel keeps at most 15 characters.
pub mod map_names {
    pub const SERVICES_V4: &str = "svc4_v2";
    /// v2: an array indexed by id (see [`crate::capacity::backend_slot`])
    /// where v1 was a hash map, one hash lookup less per packet.
    pub const BACKENDS_V4: &str = "backend4_v2";
    pub const REVNAT_V4: &str = "revnat4_v2";
    /// v3: 32-bit frontend ids, and a flow's remapped client port where v2
    /// had padding.
    pub const CONNTRACK_V4: &str = "ct4_v3";
    /// v3: the NAT value has flags (a flow closing) where v2 had padding.
    pub const NAT_V4: &str = "nat4_v3";
    /// The NAT ports each remote backend's flows hold, as bitmaps.
    pub const NAT_PORTS_V4: &str = "natport4_v1";
    pub const AFFINITY_V4: &str = "affinity4_v2";
    pub const MAGLEV_V4: &str = "maglev4_v2";
    /// Its layout is unchanged since v1, but it is indexed by frontend id and
    /// v1 had room for 16-bit ids only: a reused v1 would miss every wider id.
    pub const ROUND_ROBIN: &str = "rr_v3";
    pub const SOURCE_RANGES_V4: &str = "srcrange4_v2";
    pub const CONFIG: &str = "config_v1";
    pub const STATS: &str = "stats_v1";
    /// The socket hooks' reverse translation: (socket, backend) -> frontend.
    pub const SOCK_REVNAT_V4: &str = "sockrev4_v1";
    /// The socket hooks' settings (index 0).
    pub const SOCK_CONFIG: &str = "sockcfg_v1";
    /// IPv6 twins of the IPv4 maps above. The Maglev and round-robin maps
    /// serve both families (they hold ids, no addresses): frontend and
    /// backend ids are one space over both.
    pub const SERVICES_V6: &str = "svc6_v1";
    pub const BACKENDS_V6: &str = "backend6_v1";
    pub const REVNAT_V6: &str = "revnat6_v1";
    pub const CONNTRACK_V6: &str = "ct6_v1";
    pub const AFFINITY_V6: &str = "affinity6_v1";
    pub const SOCK_REVNAT_V6: &str = "sockrev6_v1";
    pub const NAT_V6: &str = "nat6_v1";
    pub const NAT_PORTS_V6: &str = "natport6_v1";
    pub const SOURCE_RANGES_V6: &str = "srcrange6_v1";
    /// The node's IPv6 SNAT address (index 0); the NAT port range is in
    /// [`CONFIG`], for both families.
    pub const CONFIG_V6: &str = "config6_v1";
    /// Per-CPU room for what the programs' stacks have none for (no state).
    pub const SCRATCH: &str = "scratch_v1";
    /// IPv4 fragmented datagrams: the ports of each, from its first
    /// fragment, for the later ones (which carry none).
    pub const FRAGMENTS_V4: &str = "frag4_v1";
    /// The node's service CIDRs, of both families (index 0).
    pub const SERVICE_CIDRS: &str = "svccidr_v1";
    /// Per-CPU: an SCTP packet's ports as it arrived, for its checksum (no
    /// state).
    pub const SCTP_ARRIVED: &str = "sctp_v1";
    /// Per-CPU packets and bytes of each (frontend, backend) pair, both
    /// ways: what `/metrics` counts per Service and per backend.
    pub const TRAFFIC: &str = "traffic_v1";
    /// Perf buffers, one per CPU, that `proxy-agent monitor` opens: the
    /// programs report drops and rejects there while a monitor holds
    /// [`MONITOR`]'s lease.
    pub const EVENTS: &str = "events_v1";
    /// One u64: until when (CLOCK_MONOTONIC ns) a monitor is reading
    /// [`EVENTS`]; 0 or past, the programs report nothing. Bit 0 asks for
    /// traces too ([`crate::monitor::TRACE`]).
    pub const MONITOR: &str = "monitor_v1";
    /// Per CPU, the error code of the last helper that failed on a rare
    /// path, for the programs' log line (the programs' own).
    pub const DIAG: &str = "diag_v1";
    /// Every map the programs define; the agent pins each of them.
    pub const ALL: [&str; 32] = [
        SERVICES_V4,
        BACKENDS_V4,
        REVNAT_V4,
        CONNTRACK_V4,
        NAT_V4,
        NAT_PORTS_V4,
        AFFINITY_V4,
        MAGLEV_V4,
        ROUND_ROBIN,
        SOURCE_RANGES_V4,
        CONFIG,
        STATS,
        SOCK_REVNAT_V4,
        SOCK_CONFIG,
        SERVICES_V6,
        BACKENDS_V6,
        REVNAT_V6,
        CONNTRACK_V6,
        AFFINITY_V6,
        SOCK_REVNAT_V6,
        NAT_V6,
        NAT_PORTS_V6,
        SOURCE_RANGES_V6,
        CONFIG_V6,
        SCRATCH,
        FRAGMENTS_V4,
        SERVICE_CIDRS,
        SCTP_ARRIVED,
        TRAFFIC,
        EVENTS,
        MONITOR,
        DIAG,
    ];
}

/// Names of the programs inside the object.
pub mod program_names {
    /// tc ingress on a pod's host-side veth: packets leaving the pod.
    pub const FROM_POD: &str = "from_pod";
    /// tc egress on a pod's host-side veth: packets about to enter the pod.
    pub const TO_POD: &str = "to_pod";
    /// XDP on the node's uplink: traffic from outside the node.
    pub const UPLINK_XDP: &str = "uplink_xdp";
    /// tc ingress on the uplink, IPv4: alone where XDP cannot attach, else
    /// behind it for what XDP hands on.
    pub const UPLINK_TC: &str = "uplink_tc";
    /// tc ingress on the uplink, IPv6, a filter beside `UPLINK_TC` (each
    /// lets the other family's packets through untouched).
    pub const UPLINK_TC6: &str = "uplink_tc6";
    /// cgroup connect4: TCP and connected UDP sockets dialling a frontend.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    /// cgroup sendmsg4: unconnected UDP datagrams to a frontend.
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// The same two for kernels before 5.18, which lack `bpf_set_retval`: a
    /// frontend without endpoints refuses with EPERM there, not ECONNREFUSED.
    pub const SOCK_CONNECT4_COMPAT: &str = "sock_connect4_compat";
    pub const SOCK_SENDMSG4_COMPAT: &str = "sock_sendmsg4_compat";
    /// cgroup recvmsg4: a reply to an unconnected UDP socket comes from the frontend.
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup getpeername4: a translated socket's peer is the frontend.
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// The same six for IPv6 sockets.
    pub const SOCK_CONNECT6: &str = "sock_connect6";
    pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
    pub const SOCK_CONNECT6_COMPAT: &str = "sock_connect6_compat";
    pub const SOCK_SENDMSG6_COMPAT: &str = "sock_sendmsg6_compat";
    pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";
}

/// The frame-restoring wrappers the benchmarks time programs through (see
/// proxy-ebpf's `bench` module): never attached, their maps never pinned.
pub mod bench {
    /// The wrapper around an XDP program under test.
    pub const WRAPPER_XDP: &str = "bench_xdp";
    /// The wrapper around a tc program under test.
    pub const WRAPPER_TC: &str = "bench_tc";
    /// The XDP wrapper that gives each run's IPv4 frame a new source
    /// (address and port): every run a new flow.
    pub const WRAPPER_XDP_FRESH: &str = "bench_xdp_fresh";
    /// Each CPU's count of runs of the fresh wrapper and of `CT_INSERT`,
    /// whose number each new source (or key) carries.
    pub const SEQ_MAP: &str = "bench_seq";
    /// An XDP program that only inserts a new conntrack entry.
    pub const CT_INSERT: &str = "bench_ct_insert";
    /// The XDP wrapper that gives each run's IPv4 frame the tuple of one of
    /// `SpreadConfig::flows` established flows, picked in pseudo-random
    /// order (see [`spread_visit`] and [`spread_flow`]): cache and TLB
    /// misses in the maps, in the same warm loop as the other wrappers.
    pub const WRAPPER_XDP_SPREAD: &str = "bench_xdp_spread";
    /// The spread wrapper's settings (`SpreadConfig`, index 0).
    pub const SPREAD_MAP: &str = "bench_spread_cfg";
    /// An XDP program that only looks the frame's forward conntrack entry
    /// up and reads it: PASS when it is there, ABORTED when not.
    pub const CT_LOOKUP: &str = "bench_ct_lookup";
    /// The XDP floor: a program that only returns XDP_PASS.
    pub const PASS_ONLY_XDP: &str = "pass_only";
    /// The tc floor: a program that only returns TC_ACT_UNSPEC.
    pub const PASS_ONLY_TC: &str = "pass_only_tc";
    /// The map holding the frame each run starts from (index 0).
    pub const FRAME_MAP: &str = "bench_frame";
    /// The program arrays whose slot 0 the wrappers tail-call.
    pub const XDP_TARGET_MAP: &str = "bench_xdp_prog";
    pub const TC_TARGET_MAP: &str = "bench_tc_prog";
    /// The lengths of the frames a wrapper restores: Ethernet, IP and TCP
    /// headers without options or payload (a SYN or a bare ACK), over IPv4
    /// or IPv6. The frame map's value holds the longer; a wrapper restores
    /// as many bytes as the frame under test has.
    pub const FRAME_LEN4: usize = 54;
    pub const FRAME_LEN6: usize = 74;

    /// The NodePort throughput benchmark's traffic generator: an XDP program
    /// run in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`), which writes
    /// the IPv4 frame of `FRAME_MAP` (its first `FRAME_LEN4` bytes) over each
    /// frame, spreads the frames over `GenConfig::flows` source ports and
    /// sends them out of `GenConfig::ifindex`.
    pub const GENERATOR: &str = "bench_gen";
    /// The benchmark's receiver: counts each IPv4 UDP frame (`SinkCounts`)
    /// and drops every frame.
    pub const SINK: &str = "bench_sink";
    /// The generator's and the receiver's settings (`GenConfig`, index 0).
    pub const GEN_MAP: &str = "bench_gen_cfg";
    /// The receiver's counts, per CPU (`SinkCounts`, index 0).
    pub const SINK_MAP: &str = "bench_sink_cnt";

    /// What the benchmark tells the generator and the receiver.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct GenConfig {
        /// The interface the generator's frames leave by.
        pub ifindex: u32,
        /// How many flows the frames spread over: source ports from the
        /// frame's own upwards (0 and 1: one flow).
        pub flows: u32,
        /// The destination a frame must arrive with at the receiver to count
        /// as `SinkCounts::expected` (the backend, after translation).
        pub expect_daddr: [u8; 4],
        pub expect_dport_be: u16,
        pub _pad: u16,
    }

    /// What the benchmark tells the spread wrapper.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SpreadConfig {
        /// How many flows the runs visit (at most 2^24).
        pub flows: u32,
        /// How many Services they spread over: consecutive addresses from
        /// the frame's destination upwards.
        pub services: u32,
    }

    /// The tuple of spread flow `i`, as the frame's differences from flow
    /// 0's: the last two bytes of its source address, its source port, and
    /// its Service's offset from the frame's destination address.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SpreadFlow {
        pub saddr_low: u16,
        pub sport: u16,
        pub service: u32,
    }

    /// Spread flow `i` of flows spread over `services` Services: Service
    /// `i mod services`, source port `1024 + i mod 256`, and `i / 256` in
    /// the source address. Distinct for each `i` below 2^24.
    #[inline(always)]
    pub fn spread_flow(i: u32, services: u32) -> SpreadFlow {
        SpreadFlow {
            saddr_low: (i >> 8) as u16,
            sport: 1024 + (i & 0xff) as u16,
            service: i.checked_rem(services).unwrap_or(0),
        }
    }

    /// The flow that run `run` of CPU `cpu` visits, of `flows`: a bijective
    /// mix of the two (lowbias32), reduced to the flows. Consecutive runs
    /// land far apart, and the two CPUs of a run on both visit in orders of
    /// their own.
    #[inline(always)]
    pub fn spread_visit(run: u32, cpu: u32, flows: u32) -> u32 {
        let mut x = run ^ (cpu << 28);
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^= x >> 16;
        x.checked_rem(flows).unwrap_or(0)
    }

    #[cfg(test)]
    mod tests {
        extern crate std;
        use std::{vec, vec::Vec};

        use super::*;

        #[test]
        fn spread_flows_are_distinct_and_cover_the_services() {
            let (flows, services) = (1_000_000, 100_000);
            let mut seen = std::collections::HashSet::new();
            let mut per_service = vec![0u32; services as usize];
            for i in 0..flows {
                let f = spread_flow(i, services);
                assert!(seen.insert((f.saddr_low, f.sport, f.service)), "flow {i}");
                assert!((1024..1280).contains(&f.sport));
                per_service[f.service as usize] += 1;
            }
            assert!(per_service.iter().all(|&n| n == flows / services));
            assert_eq!(spread_flow(0, services).service, 0);
            assert_eq!(spread_flow(7, 0).service, 0, "no Services: the frame's own");
        }

        #[test]
        fn spread_visits_stay_in_range_and_reach_most_flows() {
            let flows = 10_000u32;
            for cpu in [0, 1] {
                let mut seen = vec![false; flows as usize];
                for run in 0..3 * flows {
                    let i = spread_visit(run, cpu, flows);
                    seen[i as usize] = true;
                }
                // Uniform picks reach 1 - e^-3 of them, about 95%.
                let reached = seen.iter().filter(|&&s| s).count();
                assert!(reached > 9_300, "cpu {cpu}: {reached} of {flows}");
            }
            // Consecutive runs land apart, and the CPUs' orders differ.
            let order = |cpu| {
                (0..8)
                    .map(|run| spread_visit(run, cpu, flows))
                    .collect::<Vec<_>>()
            };
            assert_ne!(order(0), order(1));
            assert!(order(0).windows(2).all(|w| w[0].abs_diff(w[1]) > 1));
            assert_eq!(spread_visit(5, 0, 0), 0, "no flows: flow 0");
        }
    }

    /// The receiver's counts.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SinkCounts {
        /// IPv4 UDP frames to `GenConfig::expect_daddr` and `expect_dport_be`.
        pub expected: u64,
        /// Other IPv4 UDP frames (not ARP, not IPv6: the kernel's own).
        pub other: u64,
    }
}

/// The maps' default capacities, chosen for a typical node: about 55 MiB of
/// kernel memory for every map together, whatever the node's CPUs (the
/// per-CPU maps that are allocated whole hold a few KiB per CPU). The
/// agent sizes most of them at load time
/// (`--map-*`, and `--map-dynamic-size-ratio` for the flow maps); the
/// programs declare these.
pub mod capacity {
    /// Frontend slots and backend slots (one per frontend, one per backend
    /// of each): about 6,000 Services of 10 backends.
    pub const SERVICES: u32 = 65_536;
    /// Backend slots: the IPv4 backends array's entries, a power of two
    /// (see [`backend_slots`]), and the most backends of both families.
    pub const BACKENDS: u32 = 32_768;

    /// The slots of an IPv4 backends array asked to hold `backends`: the
    /// power of two at or above it, so that a slot is an id's low bits.
    pub const fn backend_slots(backends: u32) -> u32 {
        if backends <= 1 {
            2
        } else if backends > 1 << 31 {
            1 << 31
        } else {
            backends.next_power_of_two()
        }
    }

    /// Where backend `id` lives in an IPv4 backends array of `slots`
    /// entries (a power of two).
    #[inline(always)]
    pub const fn backend_slot(id: u32, slots: u32) -> u32 {
        id & (slots - 1)
    }
    /// Frontend (reverse-NAT) ids run from 1 to `REVNAT - 1`
    /// (`--map-frontends`): the reverse-NAT maps' entries, and the
    /// round-robin counters' (allocated as used).
    pub const REVNAT: u32 = 65_536;
    /// Two entries per flow: 65,536 flows.
    pub const CONNTRACK: u32 = 131_072;
    /// Two entries per SNATed flow.
    pub const NAT: u32 = 65_536;
    /// Words of NAT-port bitmaps (allocated as used): a remote backend with
    /// flows holds one word per 64 ports of the NAT range it touched, its
    /// summary words and its exhaustion counter. As many as the NAT map
    /// has entries.
    pub const NAT_PORTS: u32 = NAT;
    pub const AFFINITY: u32 = 16_384;
    /// Maglev slots over every Maglev frontend (allocated as used, its
    /// bucket array whole: 4 MiB): about 250 Maglev Services of 10
    /// backends (1,021 slots each).
    pub const MAGLEV: u32 = 262_144;
    pub const SOURCE_RANGES: u32 = 16_384;
    /// Sockets the socket hooks translated, each with the backend it was
    /// sent to (least recently used evicted).
    pub const SOCK_REVNAT: u32 = 32_768;
    /// The IPv6 flow maps (least recently used evicted, allocated whole):
    /// a quarter of IPv4's, sized with them. The IPv6 services, backends
    /// and reverse-NAT maps have the IPv4 ones' sizes and are allocated as
    /// used (their bucket arrays whole).
    pub const CONNTRACK_V6: u32 = CONNTRACK / 4;
    pub const AFFINITY_V6: u32 = AFFINITY / 4;
    /// Not sized by the agent.
    pub const SOCK_REVNAT_V6: u32 = 16_384;
    /// IPv6 SNATed flows (least recently used evicted, allocated whole).
    /// The IPv6 NAT-port words and source ranges take the IPv4 sizes,
    /// allocated as used.
    pub const NAT_V6: u32 = NAT / 4;
    /// IPv4 datagrams in fragments at once (least recently used evicted,
    /// allocated whole: under 1 MiB), as Cilium's default.
    pub const FRAGMENTS: u32 = 8_192;
    /// Service CIDRs of each family (kube-proxy's `--service-cluster-ip-range`
    /// takes one per family).
    pub const SERVICE_CIDRS: usize = 4;
    /// (frontend, backend) pairs with traffic counters (allocated as used,
    /// each with a value per CPU): as many as the services map has slots.
    pub const TRAFFIC: u32 = SERVICES;
}

/// IP protocol numbers used in keys.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// SCTP chunk types (RFC 9260 section 3.2): conntrack reads the first
/// chunk's, the tests' SCTP peers speak them.
pub mod sctp_chunk {
    pub const DATA: u8 = 0;
    pub const INIT: u8 = 1;
    pub const INIT_ACK: u8 = 2;
    pub const SACK: u8 = 3;
    pub const ABORT: u8 = 6;
    pub const SHUTDOWN: u8 = 7;
    pub const SHUTDOWN_ACK: u8 = 8;
    pub const COOKIE_ECHO: u8 = 10;
    pub const COOKIE_ACK: u8 = 11;
    pub const SHUTDOWN_COMPLETE: u8 = 14;
}

/// Key of the services map. Slot 0 describes the service (its [`ServiceValue`]
/// holds the backend count and flags); slots `1..=count` each name one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey4 {
    pub addr: Ip4,
    pub port_be: u16,
    pub proto: u8,
    /// 0: every client; reserved for traffic-policy views of the same frontend.
    pub scope: u8,
    pub slot: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceKey4>() == 12);

/// Bits of [`ServiceValue::flags`] (slot 0).
pub mod svc_flags {
    /// A Local traffic policy applies to this frontend (externalTrafficPolicy on
    /// a NodePort, externalIP or LoadBalancer frontend, internalTrafficPolicy on
    /// a ClusterIP): the slots hold only this node's backends, and without one
    /// the packet is dropped (not rejected), as kube-proxy does.
    pub const LOCAL_ONLY: u16 = 1 << 0;
    /// loadBalancerSourceRanges apply: the client must match the ranges map.
    pub const SOURCE_RANGES: u16 = 1 << 1;
    /// sessionAffinity ClientIP: a client's new connections go to the backend its
    /// last one went to, while that was less than the timeout ago. The timeout,
    /// in seconds, sits in slot 0's `backend_id` (slot 0 names no backend).
    pub const AFFINITY: u16 = 1 << 2;
    /// Which scheduler picks a new flow's backend (two bits).
    pub const SCHEDULER_MASK: u16 = 0b11 << 3;
    /// A hash of the flow's 5-tuple (the default).
    pub const SCHEDULER_FLOW_HASH: u16 = 0 << 3;
    /// Maglev consistent hashing over a per-frontend table (see [`super::maglev`]).
    pub const SCHEDULER_MAGLEV: u16 = 1 << 3;
    /// A hash of the client's address only.
    pub const SCHEDULER_SOURCE_HASH: u16 = 2 << 3;
    /// Round robin, with a counter per frontend and per CPU (no shared counter).
    pub const SCHEDULER_ROUND_ROBIN: u16 = 3 << 3;
}

/// Key of the Maglev map: one slot of one frontend's table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub rev_nat_id: u32,
    pub index: u32,
}
const _: () = assert!(core::mem::size_of::<MaglevKey>() == 8);

/// Key of the affinity map: a client of a frontend (by reverse-NAT id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey4 {
    pub client_addr: Ip4,
    pub rev_nat_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey4>() == 8);

/// Value of the affinity map: the backend and when a connection last used it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// Value of the services map. In slot 0, `count` and `flags` describe the
/// service and `backend_id` is 0; in slot N, `backend_id` names the backend.
/// `rev_nat_id` is the same in every slot of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub count: u16,
    pub flags: u16,
    /// Slot 0 of a Maglev frontend: its table size, as an index into
    /// [`maglev::SIZES`]; 0 elsewhere.
    pub maglev_size: u16,
    /// Slot 0 of an external frontend under externalTrafficPolicy=Local:
    /// how many slots after its `count` local ones (`count + 1 ..= count +
    /// cluster_count`) hold the Service's cluster-wide endpoints, where
    /// clients inside the cluster (this node's pods and its own processes)
    /// go past the policy, as kube-proxy sends them. 0 everywhere else.
    /// The field was padding (always 0) before, and 0 keeps its meaning, so
    /// the map kept its name.
    pub cluster_count: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

impl ServiceValue {
    /// Slot 0's count of the slots after it: the frontend's own, then those
    /// for clients inside the cluster.
    pub const fn slots(&self) -> u16 {
        self.count.saturating_add(self.cluster_count)
    }
}

/// Backend states.
pub mod backend_state {
    pub const ACTIVE: u8 = 0;
    pub const TERMINATING: u8 = 1;
}

/// Bits of [`Backend4::flags`].
pub mod backend_flags {
    /// The backend runs on this node: reached by DNAT alone, never by SNAT.
    pub const LOCAL: u8 = 1 << 0;
}

/// A backend, by the `u32` id the agent allocates (never 0). The IPv4
/// backends map is an array: backend `id` is at [`capacity::backend_slot`],
/// and the value names the id it holds, so that an id whose slot holds
/// another backend now finds none (an empty slot holds id 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend4 {
    pub addr: Ip4,
    pub port_be: u16,
    pub proto: u8,
    /// One of [`backend_state`].
    pub state: u8,
    /// Bits of [`backend_flags`].
    pub flags: u8,
    pub _pad: [u8; 3],
    /// The backend's id (the IPv6 map, a hash, has it as its key and 0 here).
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<Backend4>() == 16);

/// Value of the reverse-NAT map, keyed by a `u32` id the agent allocates per
/// frontend (never 0, below [`capacity::REVNAT`]): the address and port a
/// client dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat4 {
    pub addr: Ip4,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<RevNat4>() == 8);

/// Direction of a conntrack entry.
pub mod ct_dir {
    /// Client -> service frontend, as the client sent it.
    pub const FORWARD: u8 = 0;
    /// Backend -> client, as the backend sends its reply.
    pub const REPLY: u8 = 1;
    /// Remote backend -> node address and NAT port: a reply to a SNATed flow.
    pub const NAT: u8 = 2;
}

/// Bits of [`CtValue::flags`].
pub mod ct_flags {
    /// A pod reached itself through a frontend: the flow was SNATed to
    /// [`super::HAIRPIN_ADDR`] so its replies come back through the programs.
    pub const HAIRPIN: u16 = 1 << 0;
    /// The TCP connection is closing (a FIN or RST went by).
    pub const CLOSING: u16 = 1 << 1;
}

/// The client ports a new flow may be given when its own is taken at its
/// backend by another frontend's flow (see [`CtValue::remap_port_be`]):
/// above the kernel's default ephemeral range (32768-60999), where a client's
/// own connections to the backend seldom are.
pub mod remap_ports {
    pub const MIN: u32 = 61_000;
    pub const COUNT: u32 = 65_536 - MIN;
    /// How many of them a new flow tries.
    pub const TRIES: u32 = 8;

    /// The `i`-th port a flow with hash `hash` tries (host order).
    #[inline(always)]
    pub const fn nth(hash: u32, i: u32) -> u16 {
        (MIN + hash.wrapping_add(i) % COUNT) as u16
    }
}

/// How long a conntrack (or NAT) entry lives without a packet, by protocol and
/// state. The programs treat an older entry as gone; the agent deletes it.
pub mod ct_lifetime {
    pub const TCP_SECS: u64 = 21_600;
    pub const TCP_CLOSING_SECS: u64 = 10;
    pub const UDP_SECS: u64 = 60;
    /// An SCTP association: netfilter's lifetime for an established one.
    /// Its endpoints send heartbeats every 30 s by default, so an idle
    /// association stays.
    pub const SCTP_SECS: u64 = 210;

    /// The lifetime, in nanoseconds, of an entry of `proto` with conntrack
    /// `flags`. An SCTP association closing (ABORT, SHUTDOWN COMPLETE) gets
    /// TCP's closing lifetime.
    #[inline(always)]
    pub const fn nanos(proto: u8, flags: u16) -> u64 {
        let connected = proto == super::proto::TCP || proto == super::proto::SCTP;
        let secs = if !connected {
            UDP_SECS
        } else if flags & super::ct_flags::CLOSING != 0 {
            TCP_CLOSING_SECS
        } else if proto == super::proto::SCTP {
            SCTP_SECS
        } else {
            TCP_SECS
        };
        secs * 1_000_000_000
    }
}

/// The source a hairpinned flow (a pod that reached itself through a frontend)
/// gets, so that the pod's replies leave it and can be translated back:
/// 169.254.42.1, link-local, never a real peer. Network byte order as loaded.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];

/// Key of the conntrack map: the full 5-tuple as seen on the wire plus direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey4 {
    pub saddr: Ip4,
    pub daddr: Ip4,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// One of [`ct_dir`].
    pub dir: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<CtKey4>() == 16);

/// Value of the conntrack map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub flags: u16,
    /// For a flow SNATed to the node's address: the node port it got (else 0).
    pub nat_port_be: u16,
    /// For a flow whose client port was remapped, because at its backend its
    /// reply tuple was another frontend's flow's (one client port dialling two
    /// frontends served by one backend): on the forward entry, the port the
    /// backend sees instead of the client's; on the reply entry, the client's
    /// own port, which replies get back. 0: the port is kept.
    pub remap_port_be: u16,
    pub _pad: u16,
    /// `bpf_ktime_get_ns` of the last packet that refreshed the entry.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 24);

/// Value of the NAT map, keyed by the [`CtKey4`] of a remote backend's reply as
/// it arrives (backend -> node address : NAT port, direction `ct_dir::NAT`):
/// the client the reply goes back to. The entry owns its NAT port for that
/// backend until the agent's garbage collection removes it (idle past
/// [`ct_lifetime`], or closed, or its conntrack entry gone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nat4 {
    pub client_addr: Ip4,
    /// The frontend the client dialled (reverse-NAT id).
    pub rev_nat_id: u32,
    pub client_port_be: u16,
    /// Bits of [`ct_flags`]: `CLOSING` once a FIN or RST went by either way.
    pub flags: u16,
    /// The backend the flow goes to, for the traffic counters of its
    /// replies (0 in entries an agent before it wrote).
    pub backend_id: u32,
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Nat4>() == 24);

/// Key of the NAT-port map: one 64-bit word about one remote backend's NAT
/// ports. Words `0..nat_ports::WORDS` are its bitmap (bit `b` of word `w`:
/// port `nat_port_min + 64 * w + b` is held by one of its flows); words from
/// [`nat_ports::SUMMARY`] summarise them (bit `b` of summary word `s`: bitmap
/// word `64 * s + b` is full); [`nat_ports::DROPS`] counts the new flows to it
/// dropped because every port was held. The bitmap is a hint that makes
/// allocation O(1); the NAT map stays the truth (a port is taken by inserting
/// its entry, which fails if another flow holds it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatPortKey4 {
    pub backend_addr: Ip4,
    pub backend_port_be: u16,
    pub proto: u8,
    pub _pad: u8,
    pub index: u16,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<NatPortKey4>() == 12);

/// The layout of a backend's NAT-port words (see [`NatPortKey4`]).
pub mod nat_ports {
    /// Bitmap words: 64 ports each, for a range of up to 65536 ports.
    pub const WORDS: u16 = 1024;
    /// The index of the first summary word.
    pub const SUMMARY: u16 = WORDS;
    /// Summary words: one bit per bitmap word.
    pub const SUMMARY_WORDS: u16 = WORDS / 64;
    /// The index of the exhaustion counter.
    pub const DROPS: u16 = u16::MAX;

    /// The bits of bitmap word `word` that stand for ports of a range of
    /// `range` ports (all 64, except in the last word).
    #[inline(always)]
    pub const fn word_mask(range: u32, word: u32) -> u64 {
        let first = word * 64;
        if range >= first + 64 {
            u64::MAX
        } else if range <= first {
            0
        } else {
            (1u64 << (range - first)) - 1
        }
    }

    /// How many bitmap words a range of `range` ports takes.
    #[inline(always)]
    pub const fn words(range: u32) -> u32 {
        range.div_ceil(64)
    }

    /// The index of the lowest set bit of `x` (64 when `x` is 0): the count
    /// of the bits below it, summed in parallel. Straight-line arithmetic,
    /// no branch: in the port search's loop every branch would multiply the
    /// paths the verifier walks (a halving search cost uplink_tc most of
    /// its million instructions on 5.10).
    #[inline(always)]
    pub const fn lowest_bit(x: u64) -> u32 {
        // The bits below the lowest set one; all 64 when there is none.
        let v = (x & x.wrapping_neg()).wrapping_sub(1);
        let v = v - ((v >> 1) & 0x5555_5555_5555_5555);
        let v = (v & 0x3333_3333_3333_3333) + ((v >> 2) & 0x3333_3333_3333_3333);
        let v = (v + (v >> 4)) & 0x0F0F_0F0F_0F0F_0F0F;
        (v.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn lowest_bit_finds_every_bit() {
            assert_eq!(lowest_bit(0), 64);
            for b in 0..64 {
                assert_eq!(lowest_bit(1 << b), b);
                assert_eq!(lowest_bit(u64::MAX << b), b);
                assert_eq!(lowest_bit((1 << b) | (1 << 63)), b);
            }
        }

        #[test]
        fn word_masks_cover_exactly_the_range() {
            assert_eq!(words(1), 1);
            assert_eq!(words(64), 1);
            assert_eq!(words(65), 2);
            assert_eq!(words(65_536), u32::from(WORDS));
            assert_eq!(word_mask(64, 0), u64::MAX);
            assert_eq!(word_mask(200, 3), 0xFF);
            assert_eq!(word_mask(200, 4), 0);
            for range in [1, 63, 64, 65, 200, 4_536, 65_535, 65_536] {
                let bits: u32 = (0..words(range))
                    .map(|w| word_mask(range, w).count_ones())
                    .sum();
                assert_eq!(bits, range, "range {range}");
            }
        }
    }
}

/// Data of a source-ranges LPM trie key: a frontend (by reverse-NAT id, big
/// endian so it is matched bit by bit) and a client address. An entry's prefix
/// length is [`SourceRange4::ID_BITS`] (the whole id must match) plus the
/// address prefix; a lookup uses [`SourceRange4::LOOKUP_PREFIX_LEN`] and the
/// client's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRange4 {
    pub rev_nat_id_be: u32,
    pub addr: Ip4,
}
const _: () = assert!(core::mem::size_of::<SourceRange4>() == 8);

impl SourceRange4 {
    /// The bits of the key that name the frontend: all of `rev_nat_id_be`.
    pub const ID_BITS: u32 = 8 * core::mem::size_of::<u32>() as u32;
    /// A lookup matches the whole key: the id and every bit of the client address.
    pub const LOOKUP_PREFIX_LEN: u32 = 8 * core::mem::size_of::<Self>() as u32;

    /// The prefix length of an entry for an address prefix of `addr_prefix` bits.
    pub const fn prefix_len(addr_prefix: u8) -> u32 {
        Self::ID_BITS + addr_prefix as u32
    }
}

/// An IPv6 address as the maps hold it: its 16 bytes in network order.
pub type Addr6 = [u8; 16];

/// An IPv4 address as the maps hold it: its four bytes in network order. A
/// byte array rather than a `u32`, so that BTF (and `bpftool map dump` with
/// it) shows the four bytes; aligned as a `u32`, so that the programs still
/// load, store and compare it in one instruction ([`Ip4::raw`] and
/// [`Ip4::from_raw`] convert for free).
#[repr(C, align(4))]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ip4 {
    pub octets: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<Ip4>() == 4 && core::mem::align_of::<Ip4>() == 4);

impl Ip4 {
    /// The address whose four bytes, read as a native `u32`, are `raw`
    /// (what a packet's address field reads as).
    #[inline(always)]
    pub const fn from_raw(raw: u32) -> Self {
        Self {
            octets: raw.to_ne_bytes(),
        }
    }

    /// The four bytes read as a native `u32` (the inverse of [`Ip4::from_raw`]).
    #[inline(always)]
    pub const fn raw(self) -> u32 {
        u32::from_ne_bytes(self.octets)
    }
}

impl core::fmt::Debug for Ip4 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.octets;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// Key of the IPv6 services map: [`ServiceKey4`] with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    pub addr: Addr6,
    pub port_be: u16,
    pub proto: u8,
    pub scope: u8,
    pub slot: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 24);

/// Value of the IPv6 backends map: [`Backend4`] with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend6 {
    pub addr: Addr6,
    pub port_be: u16,
    pub proto: u8,
    pub state: u8,
    pub flags: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Backend6>() == 24);

/// Value of the IPv6 reverse-NAT map: [`RevNat4`] with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat6 {
    pub addr: Addr6,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<RevNat6>() == 20);

/// Key of the IPv6 conntrack map: [`CtKey4`] with IPv6 addresses. Its
/// value is [`CtValue`], as for IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<CtKey6>() == 40);

/// Key of the IPv6 affinity map: [`AffinityKey4`] with an IPv6 client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey6 {
    pub client_addr: Addr6,
    pub rev_nat_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey6>() == 20);

/// The IPv6 hairpin source (see [`HAIRPIN_ADDR`]): 100::a9fe:2a01, in the
/// discard-only prefix 100::/64 (RFC 6666), never a real peer, reached
/// through a pod's default route like the IPv4 one.
pub const HAIRPIN_ADDR6: Addr6 = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 169, 254, 42, 1];

/// Value of the IPv6 NAT map ([`Nat4`] with an IPv6 client), keyed by the
/// [`CtKey6`] of a remote backend's reply as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nat6 {
    pub client_addr: Addr6,
    pub rev_nat_id: u32,
    pub client_port_be: u16,
    pub flags: u16,
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Nat6>() == 32);

/// Key of the IPv6 NAT-port map: [`NatPortKey4`] with an IPv6 backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatPortKey6 {
    pub backend_addr: Addr6,
    pub backend_port_be: u16,
    pub proto: u8,
    pub _pad: u8,
    pub index: u16,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<NatPortKey6>() == 24);

/// Data of an IPv6 source-ranges LPM trie key: [`SourceRange4`] with an
/// IPv6 client address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRange6 {
    pub rev_nat_id_be: u32,
    pub addr: Addr6,
}
const _: () = assert!(core::mem::size_of::<SourceRange6>() == 20);

impl SourceRange6 {
    pub const ID_BITS: u32 = SourceRange4::ID_BITS;
    pub const LOOKUP_PREFIX_LEN: u32 = 8 * core::mem::size_of::<Self>() as u32;

    pub const fn prefix_len(addr_prefix: u8) -> u32 {
        Self::ID_BITS + addr_prefix as u32
    }
}

/// The IPv6 node settings (index 0 of their array): the source of SNATed
/// IPv6 packets, all zero while the node has no IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config6 {
    pub snat_addr: Addr6,
}
const _: () = assert!(core::mem::size_of::<Config6>() == 16);

/// The node-wide settings the agent writes into the config array (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The node's address: the source of SNATed packets to remote backends.
    pub snat_addr: Ip4,
    /// Ports handed to SNATed flows: `nat_port_min..=nat_port_max` (host order).
    pub nat_port_min: u16,
    pub nat_port_max: u16,
}
const _: () = assert!(core::mem::size_of::<Config>() == 8);

/// An IPv4 network: the address and the mask (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Net4 {
    pub addr: Ip4,
    pub mask: Ip4,
}

/// An IPv6 network: the address and the mask.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Net6 {
    pub addr: Addr6,
    pub mask: Addr6,
}

/// The node's service CIDRs (index 0 of their array): the ranges ClusterIPs
/// are allocated from. A new flow to an address in one of them that no
/// frontend serves (an unallocated ClusterIP, or a port a ClusterIP does
/// not serve) is refused at once, as kube-proxy's nftables mode refuses
/// the ports. None configured: such flows pass as any other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCidrs {
    /// How many of `v4` and of `v6` are in use.
    pub count4: u32,
    pub count6: u32,
    pub v4: [Net4; capacity::SERVICE_CIDRS],
    pub v6: [Net6; capacity::SERVICE_CIDRS],
}
const _: () = assert!(core::mem::size_of::<ServiceCidrs>() == 168);

/// Key of the IPv4 fragments map: one datagram, as RFC 791 identifies it
/// (source, destination, protocol and identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey4 {
    pub saddr: Ip4,
    pub daddr: Ip4,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey4>() == 12);

/// A fragmented datagram's ports, from its first fragment (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
}
const _: () = assert!(core::mem::size_of::<FragPorts>() == 4);

/// Key of the socket reverse-translation map: a socket (its cookie) and the
/// backend the socket hooks sent it to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey4 {
    pub cookie: u64,
    pub addr: Ip4,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevKey4>() == 16);

/// [`SockRevKey4`] for IPv6 sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey6 {
    pub cookie: u64,
    pub addr: Addr6,
    pub port_be: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<SockRevKey6>() == 32);

/// Settings of the socket hooks (index 0 of their config map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConfig {
    /// The network namespace whose sockets are the node's own (its cookie);
    /// 0: the initial namespace.
    pub host_netns_cookie: u64,
    /// [`sock_flags`].
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockConfig>() == 16);

/// Bits of [`SockConfig::flags`].
pub mod sock_flags {
    /// Translate every socket under the cgroup, pods' too, not only the
    /// node's own namespace's.
    pub const ALL_NAMESPACES: u32 = 1 << 0;
}

/// One per-CPU statistics counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatCounter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<StatCounter>() == 16);

/// Key of the traffic counters: a frontend (reverse-NAT id) and a backend
/// id. A remote backend's replies to an IPv6 flow the uplink SNATed come
/// with backend id 0 (its NAT entry has no room for the id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficKey {
    pub rev_nat_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<TrafficKey>() == 8);

/// One CPU's packets and bytes of a (frontend, backend) pair: to the
/// backend (the client's packets, after DNAT) and back to the client (the
/// backend's, after reverse NAT). Bytes as the packet arrived at the hook,
/// Ethernet header included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub to_backend_packets: u64,
    pub to_backend_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Traffic>() == 32);

/// What the programs report of a packet they dropped or rejected while a
/// monitor reads (see [`map_names::EVENTS`]): this header, then the first
/// `captured` bytes of the packet as it was when the verdict fell (a tc
/// reject: the ICMP error it became, which quotes the packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    /// The verdict's [`stats::Stat`] index.
    pub stat: u32,
    /// The interface the packet arrived on.
    pub ifindex: u32,
    /// The packet's length.
    pub len: u32,
    /// Which program: an index into [`monitor::PROGRAMS`].
    pub program: u32,
}
const _: () = assert!(core::mem::size_of::<MonitorEvent>() == 16);

/// The monitor's event stream.
pub mod monitor {
    /// Packet bytes reported with an event, at most: Ethernet, IPv6 with
    /// room for extension headers, and the L4 ports (of an ICMP error's
    /// quoted packet too).
    pub const CAPTURE: u32 = 128;
    /// Bit 0 of the lease in [`super::map_names::MONITOR`]: the monitor
    /// also asks for traces, a report of every packet the programs
    /// translate ([`super::stats::Stat::is_translation`]). The rest of the
    /// lease is its deadline.
    pub const TRACE: u64 = 1;
    /// [`super::MonitorEvent::program`]'s values: indexes into [`PROGRAMS`].
    pub const FROM_POD: u32 = 0;
    pub const TO_POD: u32 = 1;
    pub const UPLINK_XDP: u32 = 2;
    pub const UPLINK_TC: u32 = 3;
    pub const UPLINK_TC6: u32 = 4;
    /// The programs' names, by their index in events.
    pub const PROGRAMS: [&str; 5] = [
        super::program_names::FROM_POD,
        super::program_names::TO_POD,
        super::program_names::UPLINK_XDP,
        super::program_names::UPLINK_TC,
        super::program_names::UPLINK_TC6,
    ];
}

/// Constructors and decoders for userspace: the byte-order conversions written
/// once, so callers never build a key field by field.
#[cfg(feature = "user")]
mod user {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    impl Ip4 {
        pub const fn new(addr: Ipv4Addr) -> Self {
            Self {
                octets: addr.octets(),
            }
        }

        pub const fn addr(self) -> Ipv4Addr {
            Ipv4Addr::from_octets(self.octets)
        }
    }

    impl From<Ipv4Addr> for Ip4 {
        fn from(addr: Ipv4Addr) -> Self {
            Self::new(addr)
        }
    }

    impl From<Ip4> for Ipv4Addr {
        fn from(addr: Ip4) -> Self {
            addr.addr()
        }
    }

    impl ServiceKey4 {
        /// Slot `slot` of the frontend `addr:port` (protocol number `proto`),
        /// for every client (scope 0).
        pub const fn new(addr: Ipv4Addr, port: u16, proto: u8, slot: u16) -> Self {
            Self {
                addr: Ip4::new(addr),
                port_be: port.to_be(),
                proto,
                scope: 0,
                slot,
                _pad: 0,
            }
        }

        /// The same frontend's slot `slot`.
        #[must_use]
        pub const fn with_slot(self, slot: u16) -> Self {
            Self { slot, ..self }
        }

        pub const fn addr(&self) -> Ipv4Addr {
            self.addr.addr()
        }

        pub const fn port(&self) -> u16 {
            u16::from_be(self.port_be)
        }
    }

    impl ServiceKey6 {
        /// Slot `slot` of the frontend `addr:port` (protocol number `proto`),
        /// for every client (scope 0).
        pub const fn new(addr: Ipv6Addr, port: u16, proto: u8, slot: u16) -> Self {
            Self {
                addr: addr.octets(),
                port_be: port.to_be(),
                proto,
                scope: 0,
                slot,
                _pad: 0,
            }
        }

        /// The same frontend's slot `slot`.
        #[must_use]
        pub const fn with_slot(self, slot: u16) -> Self {
            Self { slot, ..self }
        }

        pub const fn addr(&self) -> Ipv6Addr {
            Ipv6Addr::from_octets(self.addr)
        }

        pub const fn port(&self) -> u16 {
            u16::from_be(self.port_be)
        }
    }

    impl Backend6 {
        pub const fn addr(&self) -> Ipv6Addr {
            Ipv6Addr::from_octets(self.addr)
        }

        pub const fn port(&self) -> u16 {
            u16::from_be(self.port_be)
        }
    }

    impl RevNat6 {
        pub const fn addr(&self) -> Ipv6Addr {
            Ipv6Addr::from_octets(self.addr)
        }

        pub const fn port(&self) -> u16 {
            u16::from_be(self.port_be)
        }
    }

    impl Backend4 {
        pub const fn addr(&self) -> Ipv4Addr {
            self.addr.addr()
        }

        pub const fn port(&self) -> u16 {
            u16::from_be(self.port_be)
        }
    }

    impl RevNat4 {
        pub const fn addr(&self) -> Ipv4Addr {
            self.addr.addr()
        }

        pub const fn port(&self) -> u16 {
            u16::from_be(self.port_be)
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is repr(C), has explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for ServiceKey4 {}
    unsafe impl aya::Pod for bench::GenConfig {}
    unsafe impl aya::Pod for bench::SpreadConfig {}
    unsafe impl aya::Pod for bench::SinkCounts {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for RevNat4 {}
    unsafe impl aya::Pod for CtKey4 {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for StatCounter {}
    unsafe impl aya::Pod for Nat4 {}
    unsafe impl aya::Pod for NatPortKey4 {}
    unsafe impl aya::Pod for AffinityKey4 {}
    unsafe impl aya::Pod for SockRevKey4 {}
    unsafe impl aya::Pod for FragKey4 {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for SockConfig {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SourceRange4 {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for RevNat6 {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for AffinityKey6 {}
    unsafe impl aya::Pod for SockRevKey6 {}
    unsafe impl aya::Pod for Nat6 {}
    unsafe impl aya::Pod for NatPortKey6 {}
    unsafe impl aya::Pod for SourceRange6 {}
    unsafe impl aya::Pod for Config6 {}
    unsafe impl aya::Pod for ServiceCidrs {}
    unsafe impl aya::Pod for TrafficKey {}
    unsafe impl aya::Pod for Traffic {}
}
