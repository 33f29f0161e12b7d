//! EndpointSlices as the agent reads them: `discovery.k8s.io/v1` or `v1beta1`
//! (API servers before 1.21 serve only the latter), both into one [`Slice`].
//! Parsing only, the watch is in `watch.rs`; the one shared state is the
//! process-wide set of node and zone names endpoints point at ([`intern`]).

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use serde::Deserialize;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One EndpointSlice, whichever API version it came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slice {
    /// `namespace/name` of the Service this slice belongs to.
    pub service: String,
    pub address_type: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

/// One endpoint, as compact as the stores can keep it: a cluster of 100k
/// Services holds a million of them. Node and zone names are shared
/// ([`intern`]), not copied into every endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first of its addresses: the one kube-proxy uses (the others are
    /// not kept).
    pub address: Option<Address>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// Topology hints, where the slice has any (boxed: most endpoints have none).
    pub hints: Option<Box<Hints>>,
}

/// `hints.forZones[].name` and `hints.forNodes[].name`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    pub zones: Box<[Arc<str>]>,
    pub nodes: Box<[Arc<str>]>,
}

/// An endpoint's address: an IP address, or what was written where one
/// should be (kept to say what was skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Ip(IpAddr),
    Invalid(Box<str>),
}

impl Address {
    fn parse(written: String) -> Self {
        written
            .parse()
            .map_or_else(|_| Self::Invalid(written.into()), Self::Ip)
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Self::Ip(ip) => Some(*ip),
            Self::Invalid(_) => None,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => ip.fmt(f),
            Self::Invalid(written) => f.write_str(written),
        }
    }
}

/// The node and zone names the endpoints hold, each once: a few per node
/// of the cluster, where each endpoint would otherwise copy them.
static NAMES: Mutex<Names> = Mutex::new(Names {
    set: None,
    pruned_at: 0,
});

struct Names {
    set: Option<HashSet<Arc<str>>>,
    /// How many names were left after the last pruning.
    pruned_at: usize,
}

/// The shared copy of a node or zone name. Names no endpoint holds any more
/// (nodes gone from the cluster) are dropped whenever the set has doubled
/// since the last time, so it stays within twice the names in use.
pub fn intern(name: String) -> Arc<str> {
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let Names { set, pruned_at } = &mut *names;
    let set = set.get_or_insert_with(HashSet::new);
    if let Some(shared) = set.get(name.as_str()) {
        return shared.clone();
    }
    if set.len() >= 2 * (*pruned_at).max(64) {
        set.retain(|n| Arc::strong_count(n) > 1);
        *pruned_at = set.len();
    }
    let shared: Arc<str> = name.into();
    set.insert(shared.clone());
    shared
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Conditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize, Default)]
struct ObjectMeta {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The parts of a `discovery.k8s.io/v1` EndpointSlice that proxying needs.
mod v1 {
    use super::*;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointSlice {
        #[serde(default)]
        pub metadata: ObjectMeta,
        pub address_type: String,
        #[serde(default)]
        pub ports: Option<Vec<SlicePort>>,
        #[serde(default)]
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        pub addresses: Vec<String>,
        #[serde(default)]
        pub conditions: Conditions,
        pub node_name: Option<String>,
        pub zone: Option<String>,
        pub hints: Option<Hints>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Hints {
        #[serde(default)]
        pub for_zones: Vec<ForZone>,
        #[serde(default)]
        pub for_nodes: Vec<ForZone>,
    }

    #[derive(Deserialize)]
    pub struct ForZone {
        pub name: String,
    }
}

/// The parts of a `discovery.k8s.io/v1beta1` EndpointSlice that proxying needs:
/// node and zone live in `topology`; `nodeName` exists from 1.20.
mod v1beta1 {
    use super::*;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointSlice {
        #[serde(default)]
        pub metadata: ObjectMeta,
        pub address_type: String,
        #[serde(default)]
        pub ports: Option<Vec<SlicePort>>,
        #[serde(default)]
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        pub addresses: Vec<String>,
        #[serde(default)]
        pub conditions: Conditions,
        #[serde(default)]
        pub topology: BTreeMap<String, String>,
        pub node_name: Option<String>,
        pub hints: Option<super::v1::Hints>,
    }
}

fn hints(hints: Option<v1::Hints>) -> Option<Box<Hints>> {
    let names = |list: Vec<v1::ForZone>| list.into_iter().map(|h| intern(h.name)).collect();
    hints
        .map(|h| Hints {
            zones: names(h.for_zones),
            nodes: names(h.for_nodes),
        })
        .filter(|h| !h.zones.is_empty() || !h.nodes.is_empty())
        .map(Box::new)
}

fn first_address(addresses: Vec<String>) -> Option<Address> {
    addresses.into_iter().next().map(Address::parse)
}

/// EndpointSlice API versions the agent can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceVersion {
    V1,
    V1beta1,
}

impl SliceVersion {
    pub const fn api_version(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V1beta1 => "v1beta1",
        }
    }
}

/// Why an EndpointSlice could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    #[error("malformed EndpointSlice: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("EndpointSlice without the {SERVICE_NAME_LABEL} label")]
    NoService,
    #[error("an FQDN EndpointSlice: names, not addresses a packet can be sent to")]
    Fqdn,
}

/// Reads an EndpointSlice (the whole object as JSON) of the given version.
pub fn parse_slice(version: SliceVersion, object: serde_json::Value) -> Result<Slice, SliceError> {
    let (meta, address_type, ports, mut endpoints): (_, _, _, Vec<SliceEndpoint>) = match version {
        SliceVersion::V1 => {
            let s: v1::EndpointSlice = serde_json::from_value(object)?;
            let endpoints = s
                .endpoints
                .into_iter()
                .map(|e| SliceEndpoint {
                    address: first_address(e.addresses),
                    ready: e.conditions.ready,
                    serving: e.conditions.serving,
                    terminating: e.conditions.terminating,
                    node_name: e.node_name.map(intern),
                    zone: e.zone.map(intern),
                    hints: hints(e.hints),
                })
                .collect();
            (s.metadata, s.address_type, s.ports, endpoints)
        }
        SliceVersion::V1beta1 => {
            let s: v1beta1::EndpointSlice = serde_json::from_value(object)?;
            let endpoints = s
                .endpoints
                .into_iter()
                .map(|mut e| SliceEndpoint {
                    address: first_address(e.addresses),
                    ready: e.conditions.ready,
                    serving: e.conditions.serving,
                    terminating: e.conditions.terminating,
                    node_name: e
                        .node_name
                        .or_else(|| e.topology.remove("kubernetes.io/hostname"))
                        .map(intern),
                    zone: e.topology.remove("topology.kubernetes.io/zone").map(intern),
                    hints: hints(e.hints),
                })
                .collect();
            (s.metadata, s.address_type, s.ports, endpoints)
        }
    };
    // Collected in place, the endpoints would keep the allocation of the
    // larger parsed ones (half as large again), for as long as the store
    // keeps the slice.
    endpoints.shrink_to_fit();
    if address_type == "FQDN" {
        return Err(SliceError::Fqdn);
    }
    let name = meta
        .labels
        .get(SERVICE_NAME_LABEL)
        .ok_or(SliceError::NoService)?;
    Ok(Slice {
        service: format!("{}/{name}", meta.namespace.unwrap_or_default()),
        address_type,
        ports: ports.unwrap_or_default(),
        endpoints,
    })
}
