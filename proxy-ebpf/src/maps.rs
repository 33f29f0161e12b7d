//! The maps, each pinned by the agent under its bpffs directory. Layouts live in
//! proxy-common; capacities there too (the agent may override them at load).
//! `#[btf_map(name = ..)]` takes a string literal only, so each name is written
//! here again beside its `proxy_common::map_names` constant:
//! proxy-agent/tests/abi.rs checks that the two agree.

use crate::{family::V6, flow::Flow, lb::Chosen};
use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_F_NO_PREALLOC},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, PerfEventArray},
    macros::btf_map,
};
use proxy_common::{
    capacity, stats, AffinityKey4, AffinityKey6, AffinityValue, Backend4, Backend6, Config,
    Config6, CtKey4, CtKey6, CtValue, FragKey4, FragPorts, MaglevKey, Nat4, Nat6, NatPortKey4,
    NatPortKey6, RevNat4, RevNat6, ServiceCidrs, ServiceKey4, ServiceKey6, ServiceValue,
    SockConfig, SockRevKey4, SockRevKey6, SourceRange4, SourceRange6, StatCounter, Traffic,
    TrafficKey,
};

/// Service frontends: (address, port, protocol, scope, slot) -> slot 0 header or backend id.
#[btf_map(name = "svc4_v2")]
pub static SERVICES: HashMap<ServiceKey4, ServiceValue, { capacity::SERVICES as usize }> =
    HashMap::new();

/// Backends by the id the agent gave them: an array, at the id's low bits
/// (`capacity::backend_slot`), each value naming the id it holds. An
/// array's lookup is a bounds check and an offset, where a hash map's
/// hashes the key and walks a bucket: every established packet makes one.
#[btf_map(name = "backend4_v2")]
pub static BACKENDS: Array<Backend4, { capacity::BACKENDS as usize }> = Array::new();

/// `BACKENDS`' entries as the agent sized it (a power of two): set when it
/// loads the programs, a constant to the verifier.
#[no_mangle]
static BACKEND_SLOTS: u32 = capacity::BACKENDS;

/// The backend `BACKENDS` holds for `id`, if that slot holds that id.
#[inline(always)]
pub fn backend4(id: u32) -> Option<Backend4> {
    // SAFETY: a plain read of a global the loader may have set.
    let slots = unsafe { core::ptr::read_volatile(&BACKEND_SLOTS) };
    let backend = BACKENDS.get(capacity::backend_slot(id, slots))?;
    (id != 0 && backend.id == id).then_some(*backend)
}

/// Reverse NAT: frontend id -> the address and port the client dialled.
#[btf_map(name = "revnat4_v2")]
pub static REVNAT: HashMap<u32, RevNat4, { capacity::REVNAT as usize }> = HashMap::new();

/// Conntrack: both directions of every translated flow, least recently used evicted.
#[btf_map(name = "ct4_v3")]
pub static CONNTRACK: LruHashMap<CtKey4, CtValue, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();

/// SNAT: a remote backend's reply (to the node address and NAT port) -> the client.
#[btf_map(name = "nat4_v3")]
pub static NAT: LruHashMap<CtKey4, Nat4, { capacity::NAT as usize }> = LruHashMap::new();

/// NAT-port bitmaps: (remote backend, word) -> which NAT ports its flows hold,
/// with summary words and an exhaustion counter (see `NatPortKey4`).
#[btf_map(name = "natport4_v1")]
pub static NAT_PORTS: HashMap<
    NatPortKey4,
    u64,
    { capacity::NAT_PORTS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// sessionAffinity ClientIP: (client, frontend) -> backend and last use.
#[btf_map(name = "affinity4_v2")]
pub static AFFINITY: LruHashMap<AffinityKey4, AffinityValue, { capacity::AFFINITY as usize }> =
    LruHashMap::new();

/// Maglev tables: (frontend, slot) -> backend id, allocated as used.
#[btf_map(name = "maglev4_v2")]
pub static MAGLEV: HashMap<
    MaglevKey,
    u32,
    { capacity::MAGLEV as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Round robin: a counter per frontend (reverse-NAT id) and per CPU, so no two
/// CPUs ever race on one counter. Allocated as used: only round-robin
/// frontends have counters (a per-CPU array would hold every id's on every
/// CPU: 0.5 MiB per CPU at the default size).
#[btf_map(name = "rr_v3")]
pub static ROUND_ROBIN: PerCpuHashMap<
    u32,
    u32,
    { capacity::REVNAT as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// loadBalancerSourceRanges: (frontend, client prefix) -> allowed.
#[btf_map(name = "srcrange4_v2")]
pub static SOURCE_RANGES: LpmTrie<
    SourceRange4,
    u8,
    { capacity::SOURCE_RANGES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = LpmTrie::new();

/// The node's service CIDRs, both families (index 0), written by the agent.
#[btf_map(name = "svccidr_v1")]
pub static SERVICE_CIDRS: Array<ServiceCidrs, 1> = Array::new();

/// IPv4 fragmented datagrams: (source, destination, id, protocol) -> the
/// ports from the first fragment, for the later ones. Least recently used
/// evicted.
#[btf_map(name = "frag4_v1")]
pub static FRAGMENTS: LruHashMap<FragKey4, FragPorts, { capacity::FRAGMENTS as usize }> =
    LruHashMap::new();

/// Node-wide settings (index 0), written by the agent.
#[btf_map(name = "config_v1")]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Per-CPU counters by verdict and drop reason (indexed by proxy_common::stats::Stat).
#[btf_map(name = "stats_v1")]
pub static STATS: PerCpuArray<StatCounter, { stats::COUNT as usize }> = PerCpuArray::new();

/// Packets and bytes of each (frontend, backend) pair, per CPU, allocated
/// as used (see `traffic`).
#[btf_map(name = "traffic_v1")]
pub static TRAFFIC: PerCpuHashMap<
    TrafficKey,
    Traffic,
    { capacity::TRAFFIC as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// The error code of the last helper that failed on a rare path, per CPU,
/// for the log line the programs' exit writes (see `diag`).
#[btf_map(name = "diag_v1")]
pub static DIAG: PerCpuArray<i64, 1> = PerCpuArray::new();

/// Perf buffers of `proxy-agent monitor`, one per CPU (see `monitor`).
#[btf_map(name = "events_v1")]
pub static EVENTS: PerfEventArray = PerfEventArray::new();

/// Until when (CLOCK_MONOTONIC ns) a monitor reads `EVENTS` (see `monitor`).
#[btf_map(name = "monitor_v1")]
pub static MONITOR: Array<u64, 1> = Array::new();

/// The socket hooks' reverse translation: (socket cookie, backend) -> the
/// frontend the socket dialled, for getpeername and replies to unconnected
/// UDP. Least recently used evicted.
#[btf_map(name = "sockrev4_v1")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey4, RevNat4, { capacity::SOCK_REVNAT as usize }> =
    LruHashMap::new();

/// The socket hooks' settings (index 0), written by the agent.
#[btf_map(name = "sockcfg_v1")]
pub static SOCK_CONFIG: Array<SockConfig, 1> = Array::new();

/// IPv6 service frontends, as `SERVICES`, of as many entries (the agent
/// counts the entries of both families against one size). Allocated as
/// used, so a node without IPv6 Services pays nothing for them; the same
/// for the IPv6 backends and reverse NAT.
#[btf_map(name = "svc6_v1")]
pub static SERVICES6: HashMap<
    ServiceKey6,
    ServiceValue,
    { capacity::SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// IPv6 backends by id (ids are one space with the IPv4 ones).
#[btf_map(name = "backend6_v1")]
pub static BACKENDS6: HashMap<
    u32,
    Backend6,
    { capacity::BACKENDS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// IPv6 reverse NAT: frontend id -> the address and port the client dialled.
#[btf_map(name = "revnat6_v1")]
pub static REVNAT6: HashMap<
    u32,
    RevNat6,
    { capacity::REVNAT as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// IPv6 conntrack, as `CONNTRACK`.
#[btf_map(name = "ct6_v1")]
pub static CONNTRACK6: LruHashMap<CtKey6, CtValue, { capacity::CONNTRACK_V6 as usize }> =
    LruHashMap::new();

/// IPv6 sessionAffinity ClientIP, as `AFFINITY`.
#[btf_map(name = "affinity6_v1")]
pub static AFFINITY6: LruHashMap<AffinityKey6, AffinityValue, { capacity::AFFINITY_V6 as usize }> =
    LruHashMap::new();

/// The socket hooks' reverse translation for IPv6 sockets, as `SOCK_REVNAT`.
#[btf_map(name = "sockrev6_v1")]
pub static SOCK_REVNAT6: LruHashMap<SockRevKey6, RevNat6, { capacity::SOCK_REVNAT_V6 as usize }> =
    LruHashMap::new();

/// IPv6 SNAT, as `NAT`.
#[btf_map(name = "nat6_v1")]
pub static NAT6: LruHashMap<CtKey6, Nat6, { capacity::NAT_V6 as usize }> = LruHashMap::new();

/// IPv6 NAT-port bitmaps, as `NAT_PORTS`.
#[btf_map(name = "natport6_v1")]
pub static NAT_PORTS6: HashMap<
    NatPortKey6,
    u64,
    { capacity::NAT_PORTS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// IPv6 loadBalancerSourceRanges, as `SOURCE_RANGES`.
#[btf_map(name = "srcrange6_v1")]
pub static SOURCE_RANGES6: LpmTrie<
    SourceRange6,
    u8,
    { capacity::SOURCE_RANGES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = LpmTrie::new();

/// The node's IPv6 settings (index 0), written by the agent.
#[btf_map(name = "config6_v1")]
pub static CONFIG6: Array<Config6, 1> = Array::new();

/// Per-CPU room for what the IPv6 uplink path's stack has none for (5.10
/// allows a call chain 512 bytes). A program's run is not interrupted on
/// its CPU by another that uses it; nothing in it outlives the run.
pub struct Scratch {
    /// One FIB lookup's parameters.
    pub fib: bpf_fib_lookup,
    /// The IPv6 flow `uplink` serves, and its backend.
    pub flow6: Flow<V6>,
    pub chosen6: Chosen<V6>,
}

#[btf_map(name = "scratch_v1")]
pub static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// Per-CPU: the ports of the SCTP packet a program is running for, as it
/// arrived (see `sctp`). Nothing in it outlives the run.
#[btf_map(name = "sctp_v1")]
pub static ARRIVED: PerCpuArray<crate::sctp::Ports, 1> = PerCpuArray::new();
