//! Stage 1: Kubernetes objects in, frontends out. The client and the watches
//! (the only API I/O), EndpointSlice and Node parsing, kube-proxy's topology
//! rules, and the cache that recomputes only the Services a change touched.

pub mod cache;
pub mod client;
pub mod frontends;
pub mod manifests;
pub mod nodes;
pub mod services;
pub mod slices;
pub mod topology;
pub mod watch;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// What the agent reads of a watched object's metadata: its key and
/// resource version (for the watch), its labels and annotations. The rest
/// (managedFields above all: at 100k Services, JSON trees parsed on one
/// thread and dropped on another, about half the time the loop spent on
/// each Service of the first list) is skipped, not parsed.
pub(crate) fn read_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Read {
        name: Option<String>,
        namespace: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        annotations: Option<BTreeMap<String, String>>,
    }
    let read = Read::deserialize(d)?;
    Ok(ObjectMeta {
        name: read.name,
        namespace: read.namespace,
        resource_version: read.resource_version,
        labels: read.labels,
        annotations: read.annotations,
        ..ObjectMeta::default()
    })
}
