//! EndpointSlices as the agent reads them: `discovery.k8s.io/v1` or `v1beta1`
//! (API servers before 1.21 serve only the latter), both into one [`Slice`].
//! Parsing only, the watch is in `watch.rs`; the one shared state is the
//! process-wide set of node and zone names endpoints point at ([`intern`]).

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    api::ApiResource,
    core::{DynamicResourceScope, Resource},
};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::value::RawValue;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One EndpointSlice, whichever API version it came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slice {
    /// `namespace/name` of the Service this slice belongs to.
    pub service: Arc<str>,
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

/// One endpoint, as compact as the stores can keep it (48 bytes): a
/// cluster of 100k Services holds a million of them. Node names are shared
/// ([`intern`]), not copied into every endpoint. Its zone is not kept:
/// proxying reads the zone hints, never the endpoint's own zone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first of its addresses: the one kube-proxy uses (the others are
    /// not kept).
    pub address: Option<Address>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<Name>,
    /// Topology hints, where the slice has any (boxed: most endpoints have none).
    pub hints: Option<Box<Hints>>,
}

/// `hints.forZones[].name` and `hints.forNodes[].name`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    pub zones: Box<[Name]>,
    pub nodes: Box<[Name]>,
}

/// A node or zone name, shared: one pointer wide (an `Arc<str>` is two),
/// compared and hashed as the text it holds.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<Box<str>>);

impl Name {
    /// The same copy as `other`'s.
    pub fn shares(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A name of its own, not from the shared set (tests, and names few
/// objects hold).
impl From<&str> for Name {
    fn from(name: &str) -> Self {
        Self(Arc::new(name.into()))
    }
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
    set: Option<HashSet<Name>>,
    /// How many names were left after the last pruning.
    pruned_at: usize,
}

/// The shared copy of a node or zone name. Names no endpoint holds any more
/// (nodes gone from the cluster) are dropped whenever the set has doubled
/// since the last time, so it stays within twice the names in use.
pub fn intern(name: String) -> Name {
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let Names { set, pruned_at } = &mut *names;
    let set = set.get_or_insert_with(HashSet::new);
    if let Some(shared) = set.get(name.as_str()) {
        return shared.clone();
    }
    if set.len() >= 2 * (*pruned_at).max(64) {
        set.retain(|n| Arc::strong_count(&n.0) > 1);
        *pruned_at = set.len();
    }
    let shared = Name(Arc::new(name.into()));
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

/// The parts of a `discovery.k8s.io/v1` EndpointSlice that proxying needs.
mod v1 {
    use super::*;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        pub addresses: Vec<String>,
        #[serde(default)]
        pub conditions: Conditions,
        pub node_name: Option<String>,
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
    Malformed(String),
    #[error("EndpointSlice without the {SERVICE_NAME_LABEL} label")]
    NoService,
    #[error("an FQDN EndpointSlice: names, not addresses a packet can be sent to")]
    Fqdn,
}

/// An EndpointSlice as the watch receives it: the metadata the agent reads,
/// and the fields it serves from as the JSON text they came in. Only
/// [`SliceObject::read`] parses that text, one slice at a time, so that:
/// - a slice the agent cannot read is left out alone (a field of an
///   unexpected type would otherwise fail the whole list, every slice of the
///   cluster, on every retry);
/// - no JSON tree of every slice is built on the way (a generic object costs
///   seconds and gigabytes at 100k slices; `cargo bench -p proxy-agent
///   --bench agent_memory` times both).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceObject {
    #[serde(default, deserialize_with = "super::read_meta")]
    pub metadata: ObjectMeta,
    address_type: Option<Box<RawValue>>,
    ports: Option<Box<RawValue>>,
    endpoints: Option<Box<RawValue>>,
}

impl Resource for SliceObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }
    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }
    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }
    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }
    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl SliceObject {
    /// Reads the slice as the given API version has it.
    pub fn read(self, version: SliceVersion) -> Result<Slice, SliceError> {
        /// A field parsed from its own text: an error names the field (a
        /// position would count from the start of that text).
        fn field<T: DeserializeOwned>(
            name: &str,
            raw: &Option<Box<RawValue>>,
        ) -> Result<Option<T>, SliceError> {
            let Some(raw) = raw.as_deref() else {
                return Ok(None);
            };
            serde_json::from_str(raw.get()).map_err(|e| {
                let text = e.to_string();
                let position = format!(" at line {} column {}", e.line(), e.column());
                let message = text.strip_suffix(&position).unwrap_or(&text);
                SliceError::Malformed(format!("{name}: {message}"))
            })
        }
        let address_type: String = field("addressType", &self.address_type)?
            .ok_or_else(|| SliceError::Malformed("missing field `addressType`".into()))?;
        let ports: Option<Vec<SlicePort>> = field("ports", &self.ports)?;
        let mut endpoints: Vec<SliceEndpoint> = match version {
            SliceVersion::V1 => field::<Vec<v1::Endpoint>>("endpoints", &self.endpoints)?
                .unwrap_or_default()
                .into_iter()
                .map(|e| SliceEndpoint {
                    address: first_address(e.addresses),
                    ready: e.conditions.ready,
                    serving: e.conditions.serving,
                    terminating: e.conditions.terminating,
                    node_name: e.node_name.map(intern),
                    hints: hints(e.hints),
                })
                .collect(),
            SliceVersion::V1beta1 => field::<Vec<v1beta1::Endpoint>>("endpoints", &self.endpoints)?
                .unwrap_or_default()
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
                    hints: hints(e.hints),
                })
                .collect(),
        };
        // Collected in place, the endpoints would keep the allocation of the
        // larger parsed ones (half as large again), for as long as the store
        // keeps the slice; the ports, the room a list of unknown length grew
        // into.
        endpoints.shrink_to_fit();
        let mut ports = ports.unwrap_or_default();
        ports.shrink_to_fit();
        if address_type == "FQDN" {
            return Err(SliceError::Fqdn);
        }
        let meta = self.metadata;
        let name = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .ok_or(SliceError::NoService)?;
        Ok(Slice {
            service: format!("{}/{name}", meta.namespace.as_deref().unwrap_or_default()).into(),
            address_type,
            ports,
            endpoints,
        })
    }
}

/// Reads an EndpointSlice (the whole object as JSON) of the given version.
pub fn parse_slice(version: SliceVersion, object: serde_json::Value) -> Result<Slice, SliceError> {
    SliceObject::deserialize(object)
        .map_err(|e| SliceError::Malformed(e.to_string()))?
        .read(version)
}

#[cfg(test)]
mod tests {
    use kube::core::{ObjectList, WatchEvent};

    use super::*;

    /// A v1 slice of `web` with `endpoints`, as the API server writes it.
    fn slice(name: &str, endpoints: &str) -> String {
        format!(
            r#"{{"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                "metadata": {{"name": "{name}", "namespace": "default", "resourceVersion": "7",
                  "labels": {{"kubernetes.io/service-name": "web"}},
                  "annotations": {{"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-05T10:00:00Z"}},
                  "managedFields": [{{"manager": "kcm", "fieldsType": "FieldsV1", "fieldsV1": {{"f:endpoints": {{}}}}}}]}},
                "addressType": "IPv4", "ports": [{{"port": 8080, "protocol": "TCP"}}],
                "endpoints": {endpoints}}}"#
        )
    }

    #[test]
    fn a_slice_that_cannot_be_read_is_left_out_alone_not_its_list() {
        let good = slice(
            "web-a",
            r#"[{"addresses": ["10.0.0.1"], "nodeName": "n1"}]"#,
        );
        let bad = slice("web-b", r#"[{"addresses": "10.0.0.2"}]"#);
        let list =
            format!(r#"{{"metadata": {{"resourceVersion": "9"}}, "items": [{good}, {bad}]}}"#);
        let list: ObjectList<SliceObject> = serde_json::from_str(&list).unwrap();
        let [a, b] = <[SliceObject; 2]>::try_from(list.items).unwrap();
        let a = a.read(SliceVersion::V1).unwrap();
        assert_eq!(&*a.service, "default/web");
        assert_eq!(a.endpoints.len(), 1);
        assert_eq!(a.endpoints[0].node_name.as_deref(), Some("n1"));
        assert!(matches!(
            b.read(SliceVersion::V1),
            Err(SliceError::Malformed(e)) if e.to_string().contains("expected a sequence")
        ));
        // So does a watch event's.
        let event = format!(r#"{{"type": "MODIFIED", "object": {bad}}}"#);
        let event: WatchEvent<SliceObject> = serde_json::from_str(&event).unwrap();
        let WatchEvent::Modified(object) = event else {
            panic!("a MODIFIED event");
        };
        assert!(object.read(SliceVersion::V1).is_err());
    }

    #[test]
    fn a_watched_slice_keeps_the_metadata_the_agent_reads_and_no_more() {
        let object: SliceObject = serde_json::from_str(&slice("web-a", "[]")).unwrap();
        let meta = &object.metadata;
        assert_eq!(meta.name.as_deref(), Some("web-a"));
        assert_eq!(meta.namespace.as_deref(), Some("default"));
        assert_eq!(meta.resource_version.as_deref(), Some("7"));
        assert_eq!(meta.labels.as_ref().unwrap()[SERVICE_NAME_LABEL], "web");
        assert!(
            meta.annotations.as_ref().unwrap()[crate::serve::latency::TRIGGER_TIME_ANNOTATION]
                .starts_with("2026-12-05")
        );
        assert_eq!(meta.managed_fields, None);
        let slice = object.read(SliceVersion::V1).unwrap();
        assert!(slice.endpoints.is_empty());
        assert_eq!(slice.ports.len(), 1);
    }
}
