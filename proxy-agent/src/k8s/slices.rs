//! EndpointSlices as the agent reads them: `discovery.k8s.io/v1` or `v1beta1`
//! (API servers before 1.21 serve only the latter), both into one [`Slice`].
//! Pure: parsing only, the watch is in `watch.rs`.

use std::collections::BTreeMap;

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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub hint_zones: Vec<String>,
    pub hint_nodes: Vec<String>,
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

fn hint_names(hints: Option<&Vec<v1::ForZone>>) -> Vec<String> {
    hints
        .into_iter()
        .flatten()
        .map(|h| h.name.clone())
        .collect()
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
    let (meta, address_type, ports, endpoints) = match version {
        SliceVersion::V1 => {
            let s: v1::EndpointSlice = serde_json::from_value(object)?;
            let endpoints = s
                .endpoints
                .into_iter()
                .map(|e| SliceEndpoint {
                    addresses: e.addresses,
                    ready: e.conditions.ready,
                    serving: e.conditions.serving,
                    terminating: e.conditions.terminating,
                    node_name: e.node_name,
                    zone: e.zone,
                    hint_zones: hint_names(e.hints.as_ref().map(|h| &h.for_zones)),
                    hint_nodes: hint_names(e.hints.as_ref().map(|h| &h.for_nodes)),
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
                    addresses: e.addresses,
                    ready: e.conditions.ready,
                    serving: e.conditions.serving,
                    terminating: e.conditions.terminating,
                    node_name: e
                        .node_name
                        .or_else(|| e.topology.remove("kubernetes.io/hostname")),
                    zone: e.topology.remove("topology.kubernetes.io/zone"),
                    hint_zones: hint_names(e.hints.as_ref().map(|h| &h.for_zones)),
                    hint_nodes: hint_names(e.hints.as_ref().map(|h| &h.for_nodes)),
                })
                .collect();
            (s.metadata, s.address_type, s.ports, endpoints)
        }
    };
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
