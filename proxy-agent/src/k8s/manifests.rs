//! Kubernetes objects from a directory of YAML or JSON manifests, and the
//! frontends a node's agent would serve for them: what `simulate` and the
//! golden tests start from, without an API server.

use std::path::Path;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Service};
use serde::Deserialize as _;

use super::{
    frontends::{self, Frontends},
    nodes::NodeInfo,
    slices::{self, Slice, SliceVersion},
};
use crate::{frontend::Scheduler, settings};

/// The Kubernetes objects of a directory of YAML or JSON manifests.
#[derive(Default)]
pub struct Manifests {
    pub services: Vec<Service>,
    pub slices: Vec<Slice>,
    pub nodes: Vec<Node>,
}

pub fn read_manifests(dir: &Path) -> Result<Manifests> {
    let mut out = Manifests::default();
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::to_value(
                serde_yaml::Value::deserialize(doc)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )?;
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            let api = value["apiVersion"].as_str().unwrap_or_default().to_string();
            let what = || format!("{kind} in {}", path.display());
            match kind.as_str() {
                "Service" => out
                    .services
                    .push(serde_json::from_value(value).with_context(what)?),
                "Node" => out
                    .nodes
                    .push(serde_json::from_value(value).with_context(what)?),
                "EndpointSlice" => {
                    let version = if api.ends_with("v1beta1") {
                        SliceVersion::V1beta1
                    } else {
                        SliceVersion::V1
                    };
                    out.slices
                        .push(slices::parse_slice(version, value).with_context(what)?);
                }
                "List" => bail!("{}: unpack List objects into documents", path.display()),
                _ => {}
            }
        }
    }
    Ok(out)
}

impl Manifests {
    /// What node `name` knows of itself from its Node object (if there is one).
    pub fn node(&self, name: &str) -> NodeInfo {
        let object = self
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name));
        NodeInfo::from_node(name, object)
    }

    /// The frontends `node`'s agent serves for these objects, the default
    /// `scheduler` filled in as the agent does.
    pub fn frontends(&self, node: &NodeInfo, scheduler: Scheduler) -> Frontends {
        let services: Vec<&Service> = self.services.iter().collect();
        let slices: Vec<&Slice> = self.slices.iter().collect();
        let mut served = frontends::of_cluster(&services, &slices, node);
        settings::fill_defaults(&mut served.frontends, scheduler);
        served
    }
}
