//! The maps, each pinned by the agent under its bpffs directory. Layouts live in
//! proxy-common; capacities there too (the agent may override them at load).

use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    capacity, stats, Backend4, CtKey4, CtValue4, RevNat4, ServiceKey4, ServiceValue, StatCounter,
};

/// Service frontends: (address, port, protocol, scope, slot) -> slot 0 header or backend id.
#[btf_map(name = "svc4_v1")]
pub static SERVICES: HashMap<ServiceKey4, ServiceValue, { capacity::SERVICES as usize }> =
    HashMap::new();

/// Backends by the id the agent gave them.
#[btf_map(name = "backend4_v1")]
pub static BACKENDS: HashMap<u32, Backend4, { capacity::BACKENDS as usize }> = HashMap::new();

/// Reverse NAT: frontend id -> the address and port the client dialled.
#[btf_map(name = "revnat4_v1")]
pub static REVNAT: HashMap<u16, RevNat4, { capacity::REVNAT as usize }> = HashMap::new();

/// Conntrack: both directions of every translated flow, least recently used evicted.
#[btf_map(name = "ct4_v1")]
pub static CONNTRACK: LruHashMap<CtKey4, CtValue4, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();

/// Per-CPU counters by verdict and drop reason (indexes in proxy_common::stats).
#[btf_map(name = "stats_v1")]
pub static STATS: PerCpuArray<StatCounter, { stats::COUNT as usize }> = PerCpuArray::new();
