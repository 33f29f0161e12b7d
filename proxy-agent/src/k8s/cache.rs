//! The change cache between the watches and the frontends: the stores the
//! watches fill, and the frontends per Service, recomputed only for the
//! Services whose object or slices changed since the last round.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Node;

use super::{
    frontends::{self, Frontends, HealthCheck, NoLocalEndpoints, Skip},
    nodes::{self, NodeInfo},
    services::ServiceInfo,
    slices::Slice,
    watch::Store,
};
use crate::{
    frontend::{Frontend, FrontendSpec, Scheduler},
    settings,
};

/// The API objects the desired state is computed from.
#[derive(Default)]
pub struct Stores {
    pub services: Store<Arc<ServiceInfo>>,
    pub slices: Store<Slice>,
    pub node: Store<Arc<Node>>,
}

impl Stores {
    pub fn ready(&self) -> bool {
        self.services.ready() && self.slices.ready() && self.node.ready()
    }

    pub fn node(&self, name: &str) -> NodeInfo {
        NodeInfo::from_node(name, self.node.values().next().map(AsRef::as_ref))
    }

    /// Why this node should get no new traffic from load balancers (see
    /// [`nodes::leaving`]).
    pub fn node_leaving(&self) -> Option<&'static str> {
        nodes::leaving(self.node.values().next().map(AsRef::as_ref))
    }

    /// The watched Node's IPv4 InternalIPs.
    pub fn internal_ips(&self) -> Vec<std::net::Ipv4Addr> {
        nodes::internal_ips(self.node.values().next().map(AsRef::as_ref))
    }
}

/// The desired state per Service (`namespace/name`), recomputed only for the
/// Services whose object or slices changed since the last round, so that a
/// round's cost follows what changed rather than the size of the cluster.
#[derive(Default)]
pub struct FrontendCache {
    per_service: HashMap<String, Frontends>,
    /// Services to recompute at the next round.
    dirty: HashSet<String>,
    /// What the cache was computed for; another node view recomputes everything.
    node: Option<NodeInfo>,
    /// Recompute everything (a relist replaced a store).
    pub all: bool,
    /// Which Service serves each frontend, to find a change that claims a
    /// frontend another Service has ...
    owners: HashMap<Frontend, String>,
    /// ... in which case (a misconfiguration) only full rounds, which decide
    /// between the claimants, are right, until none is left.
    contested: bool,
}

/// What changed in a [`FrontendCache::refresh`].
pub enum Changed {
    Everything,
    /// These Services (their frontends now), and frontends no longer served.
    Services(Vec<String>, Vec<Frontend>),
}

impl FrontendCache {
    pub fn touch(&mut self, service: impl Into<String>) {
        self.dirty.insert(service.into());
    }

    pub fn refresh(&mut self, stores: &Stores, node: &NodeInfo, scheduler: Scheduler) -> Changed {
        let compute = |svc: &ServiceInfo, slices: &[&Slice]| {
            let mut out = Frontends::default();
            frontends::of_service(svc, slices, node, &mut out);
            settings::fill_defaults(&mut out.frontends, scheduler);
            // Kept until the Service changes: without the room the vectors
            // grew into (a one-frontend Service held room for four).
            out.shrink_to_fit();
            out
        };
        if self.all || self.contested || self.node.as_ref() != Some(node) {
            let mut by_service: HashMap<&str, Vec<&Slice>> = HashMap::new();
            let ip_slices = stores
                .slices
                .values()
                .filter(|s| frontends::family_of(&s.address_type).is_some());
            for slice in ip_slices {
                by_service.entry(&slice.service).or_default().push(slice);
            }
            self.per_service = stores
                .services
                .values()
                .map(|svc| {
                    let key = svc.key.clone();
                    let slices = by_service.get(key.as_str()).map_or(&[][..], Vec::as_slice);
                    let desired = compute(svc, slices);
                    (key, desired)
                })
                .collect();
            self.node = Some(node.clone());
            self.all = false;
            self.dirty.clear();
            self.owners.clear();
            self.contested = false;
            for (key, desired) in &self.per_service {
                for service in &desired.frontends {
                    let owner = self
                        .owners
                        .entry(service.frontend)
                        .or_insert_with(|| key.clone());
                    self.contested |= owner != key;
                }
            }
            return Changed::Everything;
        }
        let keys: Vec<String> = self.dirty.drain().collect();
        let mut gone = Vec::new();
        for key in &keys {
            let old = match stores.services.get(key) {
                Some(svc) => {
                    // Through the store's index: a scan of every slice per
                    // changed Service made each round cost O(changed x
                    // slices), which at 100k Services left the agent behind
                    // its watch.
                    let slices: Vec<&Slice> = stores
                        .slices
                        .in_group(key)
                        .filter(|s| frontends::family_of(&s.address_type).is_some())
                        .collect();
                    self.per_service.insert(key.clone(), compute(svc, &slices))
                }
                None => self.per_service.remove(key),
            };
            for service in old.iter().flat_map(|d| &d.frontends) {
                if self.owners.get(&service.frontend) == Some(key) {
                    self.owners.remove(&service.frontend);
                    gone.push(service.frontend);
                }
            }
        }
        for key in &keys {
            for service in self.per_service.get(key).iter().flat_map(|d| &d.frontends) {
                let owner = self
                    .owners
                    .entry(service.frontend)
                    .or_insert_with(|| key.clone());
                self.contested |= owner != key;
            }
        }
        if self.contested {
            return Changed::Everything;
        }
        gone.retain(|f| !self.owners.contains_key(f));
        Changed::Services(keys, gone)
    }

    /// The frontends of some Services.
    pub fn frontends_of(&self, keys: &[String]) -> Vec<&FrontendSpec> {
        keys.iter()
            .filter_map(|k| self.per_service.get(k))
            .flat_map(|d| &d.frontends)
            .collect()
    }

    /// Every Service's frontends.
    pub fn frontends(&self) -> impl Iterator<Item = &FrontendSpec> {
        self.per_service.values().flat_map(|d| &d.frontends)
    }

    pub fn skipped(&self) -> impl Iterator<Item = &Skip> {
        self.per_service.values().flat_map(|d| &d.skipped)
    }

    /// Service ports with a Local traffic policy and no local endpoint.
    pub fn no_local_endpoints(&self) -> NoLocalEndpoints {
        self.per_service
            .values()
            .fold(NoLocalEndpoints::default(), |sum, d| NoLocalEndpoints {
                internal: sum.internal + d.no_local_endpoints.internal,
                external: sum.external + d.no_local_endpoints.external,
            })
    }

    pub fn health_checks(&self) -> Vec<HealthCheck> {
        self.per_service
            .values()
            .flat_map(|d| d.health_checks.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use k8s_openapi::api::core::v1::Service;
    use kube::runtime::watcher;

    use super::*;
    use crate::k8s::watch;

    fn service(name: &str, ip: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]}
        }))
        .unwrap()
    }

    fn stores(services: &[Service]) -> Stores {
        let mut stores = Stores::default();
        stores
            .services
            .apply(watcher::Event::Init, watch::keep_service);
        for svc in services {
            stores
                .services
                .apply(watcher::Event::InitApply(svc.clone()), watch::keep_service);
        }
        stores
            .services
            .apply(watcher::Event::InitDone, watch::keep_service);
        stores
    }

    fn frontend(ip: &str) -> Frontend {
        Frontend {
            address: ip.parse().unwrap(),
            port: 80,
            protocol: crate::frontend::Protocol::Tcp,
        }
    }

    #[test]
    fn cache_recomputes_only_touched_services_and_names_what_went() {
        let node = NodeInfo::default();
        let mut cache = FrontendCache::default();
        let mut s = stores(&[service("a", "10.96.0.1"), service("b", "10.96.0.2")]);
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Everything
        ));
        assert_eq!(cache.frontends().count(), 2);

        // b moves to another cluster IP; a is untouched.
        s.services.apply(
            watcher::Event::Apply(service("b", "10.96.0.3")),
            watch::keep_service,
        );
        cache.touch("default/b");
        let Changed::Services(keys, gone) = cache.refresh(&s, &node, Scheduler::FlowHash) else {
            panic!("a partial change");
        };
        assert_eq!(keys, vec!["default/b".to_string()]);
        assert_eq!(gone, vec![frontend("10.96.0.2")]);
        assert_eq!(cache.frontends_of(&keys)[0].frontend, frontend("10.96.0.3"));

        // A Service going takes its frontends with it.
        s.services.apply(
            watcher::Event::Delete(service("a", "10.96.0.1")),
            watch::keep_service,
        );
        cache.touch("default/a");
        let Changed::Services(_, gone) = cache.refresh(&s, &node, Scheduler::FlowHash) else {
            panic!("a partial change");
        };
        assert_eq!(gone, vec![frontend("10.96.0.1")]);
        assert_eq!(cache.frontends().count(), 1);
    }

    #[test]
    fn a_frontend_claimed_twice_needs_full_rounds() {
        let node = NodeInfo::default();
        let mut cache = FrontendCache::default();
        let mut s = stores(&[service("a", "10.96.0.1"), service("b", "10.96.0.2")]);
        cache.refresh(&s, &node, Scheduler::FlowHash);
        s.services.apply(
            watcher::Event::Apply(service("b", "10.96.0.1")),
            watch::keep_service,
        );
        cache.touch("default/b");
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Everything
        ));
        // Resolved: one more full round finds no claimant left, then partial again.
        s.services.apply(
            watcher::Event::Apply(service("b", "10.96.0.2")),
            watch::keep_service,
        );
        cache.touch("default/b");
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Everything
        ));
        cache.touch("default/b");
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Services(..)
        ));
    }
}
