//! How many entries each map gets: the operator's `--map-*` flags, the
//! defaults (`proxy_common::capacity`), and Cilium-like dynamic sizing of
//! the flow maps from the node's memory (`--map-dynamic-size-ratio`). Pure:
//! `kernel::load_pinned` applies the sizes, `set_aside_resized` carries a
//! pinned map of another size over.

use anyhow::{bail, Context, Result};
use proxy_common::{capacity, map_names};

/// The entries of the maps an operator sizes (`Default`: the built-in sizes,
/// `proxy_common::capacity`). The other maps follow these (see
/// [`MapSizes::entries`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// The services map: one entry per frontend and one per backend slot.
    pub services: u32,
    pub backends: u32,
    /// Frontend ids: the reverse-NAT maps' entries and the round-robin
    /// counters' slots.
    pub frontends: u32,
    pub conntrack: u32,
    pub nat: u32,
    pub affinity: u32,
    /// Maglev slots over every Maglev frontend.
    pub maglev: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: capacity::SERVICES,
            backends: capacity::BACKENDS,
            frontends: capacity::REVNAT,
            conntrack: capacity::CONNTRACK,
            nat: capacity::NAT,
            affinity: capacity::AFFINITY,
            maglev: capacity::MAGLEV,
        }
    }
}

/// The smallest map the flags take, and the smallest an IPv6 flow map gets.
pub const MIN_ENTRIES: u32 = 16;
/// The largest map the flags take (and dynamic sizing gives).
pub const MAX_ENTRIES: u32 = 1 << 26;

/// Bytes of kernel memory per entry of the maps dynamic sizing sizes, as
/// 6.18 accounts them (`bpftool map show`'s `bytes_memlock` over
/// `max_entries`, preallocated LRU hash maps): what a budget is divided by.
const CONNTRACK_BYTES: u64 = 104;
const NAT_BYTES: u64 = 104;
const AFFINITY_BYTES: u64 = 88;
const CONNTRACK6_BYTES: u64 = 128;
const NAT6_BYTES: u64 = 136;
const AFFINITY6_BYTES: u64 = 104;

/// The flow maps' sizes an operator set by flag; the others come from the
/// defaults or from the memory ratio.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowFlags {
    pub conntrack: Option<u32>,
    pub nat: Option<u32>,
    pub affinity: Option<u32>,
}

impl MapSizes {
    /// The IPv6 flow maps' entries: a quarter of IPv4's.
    fn v6(entries: u32) -> u32 {
        (entries / 4).max(MIN_ENTRIES)
    }

    /// Sizes the flow maps: each one's flag if given; else, with a `ratio`
    /// above 0 (Cilium's `bpf-map-dynamic-size-ratio`), so that all of them
    /// together take `ratio` of the node's `memory` bytes, those without a
    /// flag grown or shrunk from their defaults by one factor; else the
    /// defaults.
    pub fn with_flows(mut self, flags: FlowFlags, ratio: f64, memory: u64) -> Result<Self> {
        if !(0.0..=1.0).contains(&ratio) {
            bail!("--map-dynamic-size-ratio {ratio}: a fraction of the node's memory, 0 to 1");
        }
        let d = Self::default();
        self.conntrack = flags.conntrack.unwrap_or(d.conntrack);
        self.nat = flags.nat.unwrap_or(d.nat);
        self.affinity = flags.affinity.unwrap_or(d.affinity);
        let unset = |flag: Option<u32>, default: u32| if flag.is_none() { default } else { 0 };
        let free = flow_bytes(
            unset(flags.conntrack, d.conntrack),
            unset(flags.nat, d.nat),
            unset(flags.affinity, d.affinity),
        );
        if ratio == 0.0 || free == 0 {
            return Ok(self);
        }
        let fixed = flow_bytes(
            flags.conntrack.unwrap_or(0),
            flags.nat.unwrap_or(0),
            flags.affinity.unwrap_or(0),
        );
        let budget = (memory as f64 * ratio) as u64;
        let factor = budget.saturating_sub(fixed) as f64 / free as f64;
        let scale = |default: u32| {
            ((f64::from(default) * factor) as u64)
                .clamp(u64::from(MIN_ENTRIES), u64::from(MAX_ENTRIES)) as u32
        };
        if flags.conntrack.is_none() {
            self.conntrack = scale(d.conntrack);
        }
        if flags.nat.is_none() {
            self.nat = scale(d.nat);
        }
        if flags.affinity.is_none() {
            self.affinity = scale(d.affinity);
        }
        Ok(self)
    }

    /// The bytes of kernel memory the flow maps of both families take at
    /// these sizes, by the per-entry figures above.
    pub fn flow_bytes(&self) -> u64 {
        flow_bytes(self.conntrack, self.nat, self.affinity)
    }

    /// Every map the agent sizes, with its entries: the ones the flags name
    /// and those that follow them.
    pub fn entries(&self) -> Vec<(&'static str, u32)> {
        vec![
            (map_names::SERVICES_V4, self.services),
            (map_names::SERVICES_V6, self.services),
            (map_names::TRAFFIC, self.services),
            (
                map_names::BACKENDS_V4,
                capacity::backend_slots(self.backends),
            ),
            (map_names::BACKENDS_V6, self.backends),
            (map_names::REVNAT_V4, self.frontends),
            (map_names::REVNAT_V6, self.frontends),
            (map_names::ROUND_ROBIN, self.frontends),
            (map_names::CONNTRACK_V4, self.conntrack),
            (map_names::CONNTRACK_V6, Self::v6(self.conntrack)),
            (map_names::NAT_V4, self.nat),
            (map_names::NAT_V6, Self::v6(self.nat)),
            (map_names::NAT_PORTS_V4, self.nat),
            (map_names::NAT_PORTS_V6, self.nat),
            (map_names::AFFINITY_V4, self.affinity),
            (map_names::AFFINITY_V6, Self::v6(self.affinity)),
            (map_names::MAGLEV_V4, self.maglev),
            (map_names::SOCK_REVNAT_V4, capacity::SOCK_REVNAT),
        ]
    }
}

/// The flow maps' bytes at these IPv4 entries (0: that map and its IPv6
/// twin left out).
fn flow_bytes(conntrack: u32, nat: u32, affinity: u32) -> u64 {
    let v6 = |n: u32| if n == 0 { 0 } else { MapSizes::v6(n) };
    u64::from(conntrack) * CONNTRACK_BYTES
        + u64::from(nat) * NAT_BYTES
        + u64::from(affinity) * AFFINITY_BYTES
        + u64::from(v6(conntrack)) * CONNTRACK6_BYTES
        + u64::from(v6(nat)) * NAT6_BYTES
        + u64::from(v6(affinity)) * AFFINITY6_BYTES
}

/// The node's memory, bytes (`MemTotal` of /proc/meminfo).
pub fn node_memory() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    parse_mem_total(&meminfo).context("no MemTotal in /proc/meminfo")
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn without_a_ratio_the_flags_or_the_defaults() {
        let d = MapSizes::default();
        let sized = d.with_flows(FlowFlags::default(), 0.0, 16 * GIB).unwrap();
        assert_eq!(sized, d);
        let flags = FlowFlags {
            conntrack: Some(1024),
            ..FlowFlags::default()
        };
        let sized = d.with_flows(flags, 0.0, 16 * GIB).unwrap();
        assert_eq!((sized.conntrack, sized.nat), (1024, d.nat));
    }

    #[test]
    fn a_ratio_sizes_the_flow_maps_to_its_share_of_memory() {
        let d = MapSizes::default();
        // Cilium's default ratio on a 16 GiB node: about 41 MiB.
        let sized = d
            .with_flows(FlowFlags::default(), 0.0025, 16 * GIB)
            .unwrap();
        let budget = (16 * GIB) as f64 * 0.0025;
        let used = sized.flow_bytes() as f64;
        assert!((used - budget).abs() / budget < 0.01, "{used} of {budget}");
        // One factor for all: their proportions stay the defaults'.
        let factor = f64::from(sized.conntrack) / f64::from(d.conntrack);
        assert!(factor > 1.0, "16 GiB at 0.25% is more than the defaults");
        for (got, default) in [(sized.nat, d.nat), (sized.affinity, d.affinity)] {
            let f = f64::from(got) / f64::from(default);
            assert!((f - factor).abs() < 0.001, "{f} against {factor}");
        }
        // Other maps are not the ratio's.
        assert_eq!((sized.services, sized.maglev), (d.services, d.maglev));
    }

    #[test]
    fn a_flag_wins_over_the_ratio_and_takes_its_bytes_off_the_budget() {
        let d = MapSizes::default();
        let flags = FlowFlags {
            conntrack: Some(1 << 20),
            ..FlowFlags::default()
        };
        let sized = d.with_flows(flags, 0.0025, 16 * GIB).unwrap();
        assert_eq!(sized.conntrack, 1 << 20);
        let budget = (16 * GIB) as f64 * 0.0025;
        let used = sized.flow_bytes() as f64;
        assert!(
            (used - budget).abs() / budget < 0.01 || sized.nat == MIN_ENTRIES,
            "{used} of {budget}"
        );
        // A budget the flags already spend: the others get the least.
        let flags = FlowFlags {
            conntrack: Some(MAX_ENTRIES),
            ..FlowFlags::default()
        };
        let sized = d.with_flows(flags, 0.0025, 16 * GIB).unwrap();
        assert_eq!((sized.nat, sized.affinity), (MIN_ENTRIES, MIN_ENTRIES));
        // All three set: the ratio has nothing to size.
        let all = FlowFlags {
            conntrack: Some(100),
            nat: Some(200),
            affinity: Some(300),
        };
        let sized = d.with_flows(all, 0.5, 16 * GIB).unwrap();
        assert_eq!(
            (sized.conntrack, sized.nat, sized.affinity),
            (100, 200, 300)
        );
    }

    #[test]
    fn a_ratio_outside_0_to_1_is_refused() {
        let d = MapSizes::default();
        assert!(d.with_flows(FlowFlags::default(), 1.5, GIB).is_err());
        assert!(d.with_flows(FlowFlags::default(), -0.1, GIB).is_err());
    }

    #[test]
    fn ipv6_flow_maps_follow_ipv4s() {
        let sizes = MapSizes {
            conntrack: 4096,
            nat: 40,
            ..MapSizes::default()
        };
        let entries: std::collections::HashMap<_, _> = sizes.entries().into_iter().collect();
        assert_eq!(entries[map_names::CONNTRACK_V6], 1024);
        assert_eq!(
            entries[map_names::NAT_V6],
            MIN_ENTRIES,
            "never below the least"
        );
        assert_eq!(entries[map_names::ROUND_ROBIN], sizes.frontends);
        let names: std::collections::HashSet<_> = sizes.entries().iter().map(|e| e.0).collect();
        assert_eq!(names.len(), sizes.entries().len(), "each map once");
    }

    #[test]
    fn mem_total_is_read_in_kib() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:  1000 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(24_576_000 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB"), None);
    }
}
