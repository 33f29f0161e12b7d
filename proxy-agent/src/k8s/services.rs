//! Services as the agent keeps them: only the fields proxying reads. A
//! `k8s_openapi` Service takes about 1.2 KB in memory even without its
//! managedFields (most of it the room for fields proxying never reads); this
//! takes about a third of that, which at 100k Services is some 80 MiB of the
//! agent's memory. Pure: `frontends.rs` reads it, the watch fills it.

use std::{borrow::Cow, sync::Arc};

use k8s_openapi::{
    api::core::v1::{Service, ServiceSpec, ServiceStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::Resource;
use serde::Deserialize;

use super::frontends::{HEADLESS_LABEL, SCHEDULER_ANNOTATION, SERVICE_PROXY_NAME_LABEL};

/// A Service as the watch receives it: spec and status as `k8s_openapi`
/// parses them, the metadata without what the agent never reads
/// ([`super::read_meta`]).
#[derive(Clone, Debug)]
pub struct WatchedService(pub Service);

impl<'de> Deserialize<'de> for WatchedService {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Read {
            #[serde(default, deserialize_with = "super::read_meta")]
            metadata: ObjectMeta,
            spec: Option<ServiceSpec>,
            status: Option<ServiceStatus>,
        }
        let read = Read::deserialize(d)?;
        Ok(Self(Service {
            metadata: read.metadata,
            spec: read.spec,
            status: read.status,
        }))
    }
}

impl Resource for WatchedService {
    type DynamicType = ();
    type Scope = <Service as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Service::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        Service::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        Service::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        Service::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

/// What the agent keeps of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `namespace/name`: what its slices' service label names.
    pub key: Arc<str>,
    /// Labelled `service.kubernetes.io/service-proxy-name` (another proxy's).
    pub other_proxy: bool,
    /// Labelled `service.kubernetes.io/headless`.
    pub headless_label: bool,
    /// The `ferry.dev/scheduler` annotation.
    pub scheduler: Option<Box<str>>,
    /// `None` for a Service without a spec.
    pub spec: Option<Spec>,
    /// `status.loadBalancer.ingress`.
    pub ingress: Vec<Ingress>,
}

/// The spec fields proxying reads, as written (checked where they are read).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// `type`.
    pub kind: Option<Box<str>>,
    /// `clusterIPs`, or `clusterIP` where that list is empty.
    pub cluster_ips: Vec<Box<str>>,
    pub external_ips: Vec<Box<str>>,
    pub external_traffic_policy: Option<Box<str>>,
    pub internal_traffic_policy: Option<Box<str>>,
    pub load_balancer_source_ranges: Option<Vec<String>>,
    pub ports: Vec<Port>,
    pub health_check_node_port: Option<i32>,
    pub session_affinity: Option<Box<str>>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Port {
    pub name: Option<Box<str>>,
    pub protocol: Option<Box<str>>,
    pub port: i32,
    pub node_port: Option<i32>,
}

/// One `status.loadBalancer.ingress` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ingress {
    pub ip: Option<Box<str>>,
    pub ip_mode: Option<Box<str>>,
}

fn boxed(s: Option<String>) -> Option<Box<str>> {
    s.map(String::into_boxed_str)
}

fn all_boxed(list: Option<Vec<String>>) -> Vec<Box<str>> {
    exact(
        list.into_iter()
            .flatten()
            .map(String::into_boxed_str)
            .collect(),
    )
}

/// A list kept without spare room. Collected from the parsed object's list,
/// a Vec reuses that list's allocation, sized for the larger parsed items
/// (a parsed port takes 120 bytes, a kept one 48): half of what the store
/// kept of each Service was such room.
fn exact<T>(mut list: Vec<T>) -> Vec<T> {
    list.shrink_to_fit();
    list
}

impl From<Service> for ServiceInfo {
    fn from(svc: Service) -> Self {
        let meta = svc.metadata;
        let label = |name: &str| meta.labels.as_ref().is_some_and(|l| l.contains_key(name));
        let spec = svc.spec.map(|spec| {
            let cluster_ips = match (spec.cluster_ips, spec.cluster_ip) {
                (Some(ips), _) if !ips.is_empty() => all_boxed(Some(ips)),
                (_, ip) => all_boxed(ip.map(|ip| vec![ip])),
            };
            Spec {
                kind: boxed(spec.type_),
                cluster_ips,
                external_ips: all_boxed(spec.external_ips),
                external_traffic_policy: boxed(spec.external_traffic_policy),
                internal_traffic_policy: boxed(spec.internal_traffic_policy),
                ports: exact(
                    spec.ports
                        .into_iter()
                        .flatten()
                        .map(|p| Port {
                            name: boxed(p.name),
                            protocol: boxed(p.protocol),
                            port: p.port,
                            node_port: p.node_port,
                        })
                        .collect(),
                ),
                load_balancer_source_ranges: spec.load_balancer_source_ranges.map(exact),
                health_check_node_port: spec.health_check_node_port,
                session_affinity: boxed(spec.session_affinity),
                affinity_timeout: spec
                    .session_affinity_config
                    .and_then(|c| c.client_ip)
                    .and_then(|c| c.timeout_seconds),
            }
        });
        let ingress = exact(
            svc.status
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .into_iter()
                .flatten()
                .map(|i| Ingress {
                    ip: boxed(i.ip),
                    ip_mode: boxed(i.ip_mode),
                })
                .collect(),
        );
        Self {
            key: format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or(""),
                meta.name.as_deref().unwrap_or("")
            )
            .into(),
            other_proxy: label(SERVICE_PROXY_NAME_LABEL),
            headless_label: label(HEADLESS_LABEL),
            scheduler: meta
                .annotations
                .and_then(|mut a| a.remove(SCHEDULER_ANNOTATION))
                .map(String::into_boxed_str),
            spec,
            ingress,
        }
    }
}

impl ServiceInfo {
    /// The namespace and name (`key` split).
    pub fn namespace_and_name(&self) -> (&str, &str) {
        self.key.split_once('/').unwrap_or(("", &self.key))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn web() -> serde_json::Value {
        json!({
            "metadata": {"namespace": "shop", "name": "web", "uid": "u-1", "resourceVersion": "7",
                         "labels": {HEADLESS_LABEL: "", "app": "web"},
                         "annotations": {SCHEDULER_ANNOTATION: "maglev", "note": "x"},
                         "managedFields": [{"manager": "kubectl", "operation": "Update",
                                            "fieldsType": "FieldsV1",
                                            "fieldsV1": {"f:spec": {"f:ports": {}}}}]},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
                     "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1", "ipMode": "Proxy"}]}}
        })
    }

    #[test]
    fn the_watch_reads_a_service_as_a_full_parse_does_without_its_managed_fields() {
        let full: Service = serde_json::from_value(web()).unwrap();
        let watched: WatchedService = serde_json::from_value(web()).unwrap();
        assert!(watched.0.metadata.managed_fields.is_none());
        assert_eq!(watched.0.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(watched.0.spec, full.spec);
        assert_eq!(watched.0.status, full.status);
        assert_eq!(ServiceInfo::from(watched.0), ServiceInfo::from(full));
    }

    #[test]
    fn keeps_the_fields_proxying_reads() {
        let svc: Service = serde_json::from_value(web()).unwrap();
        let info = ServiceInfo::from(svc);
        assert_eq!(&*info.key, "shop/web");
        assert_eq!(info.namespace_and_name(), ("shop", "web"));
        assert!(info.headless_label && !info.other_proxy);
        assert_eq!(info.scheduler.as_deref(), Some("maglev"));
        let spec = info.spec.as_ref().unwrap();
        // clusterIPs unset: the single clusterIP stands in.
        assert_eq!(spec.cluster_ips, vec![Box::from("10.96.0.10")]);
        assert_eq!(spec.ports[0].node_port, Some(30080));
        assert_eq!(spec.affinity_timeout, Some(60));
        assert_eq!(info.ingress[0].ip_mode.as_deref(), Some("Proxy"));
    }
}
