//! Typed reads of the maps an agent pinned, without loading anything: what
//! the agent's `inspect` prints and tools outside the agent (the xtask
//! benches) read. One place opens a pinned map by name and decodes its
//! entries; here, beside the layouts, so that every reader can use it.

extern crate std;

use std::{
    format,
    path::{Path, PathBuf},
    vec::Vec,
};

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::LpmTrie, Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};

use crate::{
    capacity, map_names, stats::Stat, AffinityKey4, AffinityKey6, AffinityValue, Backend4,
    Backend6, CtKey4, CtKey6, CtValue, Nat4, RevNat4, RevNat6, ServiceKey4, ServiceKey6,
    ServiceValue, SourceRange4, SourceRange6, StatCounter, Traffic, TrafficKey,
};

/// The maps pinned under one directory.
#[derive(Clone, Debug)]
pub struct Pinned {
    dir: PathBuf,
}

impl Pinned {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn open(&self, name: &str) -> Result<Map> {
        let path = self.dir.join(name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening {} (is an agent running here?)", path.display()))?;
        Ok(Map::from_map_data(data)?)
    }

    /// The pinned hash map `name`, for reads of single entries as the
    /// programs see them while the agent writes.
    pub fn hash_map<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> Result<HashMap<MapData, K, V>> {
        Ok(HashMap::try_from(self.open(name)?)?)
    }

    /// Every entry of the pinned hash map `name`.
    pub fn hash<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> Result<Vec<(K, V)>> {
        Ok(self
            .hash_map::<K, V>(name)?
            .iter()
            .collect::<Result<_, _>>()?)
    }

    /// The services map itself (see [`Pinned::hash_map`]).
    pub fn services_map(&self) -> Result<HashMap<MapData, ServiceKey4, ServiceValue>> {
        self.hash_map(map_names::SERVICES_V4)
    }

    /// The IPv4 backends array itself, for reads of single backends as
    /// the programs see them while the agent writes (see [`backend`]).
    pub fn backends_map(&self) -> Result<Array<MapData, Backend4>> {
        Ok(Array::try_from(self.open(map_names::BACKENDS_V4)?)?)
    }

    pub fn services(&self) -> Result<Vec<(ServiceKey4, ServiceValue)>> {
        self.hash(map_names::SERVICES_V4)
    }

    /// Every IPv4 backend, by id: the array's slots that hold one.
    pub fn backends(&self) -> Result<Vec<(u32, Backend4)>> {
        Ok(self
            .backends_map()?
            .iter()
            .filter_map(|b| b.map(|b| (b.id != 0).then_some((b.id, b))).transpose())
            .collect::<Result<_, _>>()?)
    }

    pub fn revnat(&self) -> Result<Vec<(u32, RevNat4)>> {
        self.hash(map_names::REVNAT_V4)
    }

    pub fn conntrack(&self) -> Result<Vec<(CtKey4, CtValue)>> {
        self.hash(map_names::CONNTRACK_V4)
    }

    pub fn nat(&self) -> Result<Vec<(CtKey4, Nat4)>> {
        self.hash(map_names::NAT_V4)
    }

    pub fn affinity(&self) -> Result<Vec<(AffinityKey4, AffinityValue)>> {
        self.hash(map_names::AFFINITY_V4)
    }

    pub fn services6(&self) -> Result<Vec<(ServiceKey6, ServiceValue)>> {
        self.hash(map_names::SERVICES_V6)
    }

    pub fn backends6(&self) -> Result<Vec<(u32, Backend6)>> {
        self.hash(map_names::BACKENDS_V6)
    }

    pub fn revnat6(&self) -> Result<Vec<(u32, RevNat6)>> {
        self.hash(map_names::REVNAT_V6)
    }

    pub fn conntrack6(&self) -> Result<Vec<(CtKey6, CtValue)>> {
        self.hash(map_names::CONNTRACK_V6)
    }

    pub fn affinity6(&self) -> Result<Vec<(AffinityKey6, AffinityValue)>> {
        self.hash(map_names::AFFINITY_V6)
    }

    /// Every statistics counter, summed over the CPUs, by name.
    pub fn stats(&self) -> Result<Vec<(&'static str, StatCounter)>> {
        let map: PerCpuArray<MapData, StatCounter> =
            PerCpuArray::try_from(self.open(map_names::STATS)?)?;
        sum_stats(&map)
    }
}

impl Pinned {
    /// loadBalancerSourceRanges entries: each range's prefix length and key.
    pub fn source_ranges(&self) -> Result<Vec<(u32, SourceRange4)>> {
        let trie: LpmTrie<MapData, SourceRange4, u8> =
            LpmTrie::try_from(self.open(map_names::SOURCE_RANGES_V4)?)?;
        Ok(trie
            .iter()
            .filter_map(Result::ok)
            .map(|(k, _)| (k.prefix_len(), k.data()))
            .collect())
    }

    pub fn source_ranges6(&self) -> Result<Vec<(u32, SourceRange6)>> {
        let trie: LpmTrie<MapData, SourceRange6, u8> =
            LpmTrie::try_from(self.open(map_names::SOURCE_RANGES_V6)?)?;
        Ok(trie
            .iter()
            .filter_map(Result::ok)
            .map(|(k, _)| (k.prefix_len(), k.data()))
            .collect())
    }

    /// Every (frontend, backend) pair's traffic, summed over the CPUs.
    pub fn traffic(&self) -> Result<Vec<(TrafficKey, Traffic)>> {
        let map: PerCpuHashMap<MapData, TrafficKey, Traffic> =
            PerCpuHashMap::try_from(self.open(map_names::TRAFFIC)?)?;
        sum_traffic(&map)
    }
}

/// The traffic counters of `map`, summed over the CPUs. An entry removed
/// while it is read is left out.
pub fn sum_traffic(
    map: &PerCpuHashMap<MapData, TrafficKey, Traffic>,
) -> Result<Vec<(TrafficKey, Traffic)>> {
    Ok(map
        .iter()
        .filter_map(Result::ok)
        .map(|(key, per_cpu)| {
            let mut sum = Traffic::default();
            for t in per_cpu.iter() {
                sum.to_backend_packets += t.to_backend_packets;
                sum.to_backend_bytes += t.to_backend_bytes;
                sum.to_client_packets += t.to_client_packets;
                sum.to_client_bytes += t.to_client_bytes;
            }
            (key, sum)
        })
        .collect())
}

/// The statistics counters of `map`, summed over the CPUs, by name.
pub fn sum_stats(
    map: &PerCpuArray<MapData, StatCounter>,
) -> Result<Vec<(&'static str, StatCounter)>> {
    let mut out = Vec::with_capacity(Stat::ALL.len());
    for stat in Stat::ALL {
        let per_cpu = map.get(&stat.index(), 0)?;
        let mut total = StatCounter::default();
        for c in per_cpu.iter() {
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
        out.push((stat.name(), total));
    }
    Ok(out)
}

/// Backend `id` in the IPv4 backends array `map`, as the programs find it:
/// at the id's slot, if that slot holds that id.
pub fn backend(map: &Array<MapData, Backend4>, id: u32) -> Option<Backend4> {
    let slot = capacity::backend_slot(id, map.len());
    map.get(&slot, 0).ok().filter(|b| id != 0 && b.id == id)
}
