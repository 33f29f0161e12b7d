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
///
/// A round gets the frontends it programs, whole, from [`FrontendCache::refresh`];
/// between rounds the cache keeps of each Service only what the next partial
/// round and the metrics need (its frontends' addresses, health checks, what
/// was skipped). The endpoints stay in the slices' store alone: a second copy
/// of every Service's endpoints was a fifth of the agent's heap at 100k
/// Services (`cargo bench -p proxy-agent --bench agent_memory`).
#[derive(Default)]
pub struct FrontendCache {
    per_service: HashMap<Arc<str>, Kept>,
    /// Services to recompute at the next round.
    dirty: HashSet<String>,
    /// What the cache was computed for; another node view recomputes everything.
    node: Option<NodeInfo>,
    /// Recompute everything (a relist replaced a store, or the next round
    /// is a full one).
    pub all: bool,
    /// Which Service serves each frontend, to find a change that claims a
    /// frontend another Service has ...
    owners: HashMap<Frontend, Arc<str>>,
    /// ... in which case (a misconfiguration) only full rounds, which decide
    /// between the claimants, are right, until none is left.
    contested: bool,
}

/// The slices of Service `key` (`namespace/name`) of an IP family, through
/// the store's index: a scan of every slice per changed Service made each
/// round cost O(changed x slices), which at 100k Services left the agent
/// behind its watch.
fn ip_slices<'a>(stores: &'a Stores, key: &str) -> Vec<&'a Slice> {
    (stores.slices.in_group(key))
        .filter(|s| frontends::family_of(&s.address_type).is_some())
        .collect()
}

/// What the cache keeps of one Service between rounds.
#[derive(Default)]
struct Kept {
    frontends: Box<[Frontend]>,
    health_checks: Vec<HealthCheck>,
    skipped: Vec<Skip>,
    no_local_endpoints: NoLocalEndpoints,
}

impl Kept {
    fn of(computed: &mut Frontends) -> Self {
        Self {
            frontends: computed.frontends.iter().map(|f| f.frontend).collect(),
            health_checks: std::mem::take(&mut computed.health_checks),
            skipped: std::mem::take(&mut computed.skipped),
            no_local_endpoints: computed.no_local_endpoints,
        }
    }
}

/// What changed in a [`FrontendCache::refresh`], with the frontends the
/// round programs.
pub enum Changed {
    /// Every Service's frontends.
    Everything(Vec<FrontendSpec>),
    /// The frontends of the Services that changed, and frontends no longer
    /// served.
    Services(Vec<FrontendSpec>, Vec<Frontend>),
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
            out
        };
        if self.all || self.contested || self.node.as_ref() != Some(node) {
            let of = |services: &[&Arc<ServiceInfo>]| {
                let mut all = Vec::with_capacity(services.len());
                let kept: Vec<(Arc<str>, Kept)> = (services.iter())
                    .map(|svc| {
                        let mut computed = compute(svc, &ip_slices(stores, &svc.key));
                        let kept = Kept::of(&mut computed);
                        all.append(&mut computed.frontends);
                        (svc.key.clone(), kept)
                    })
                    .collect();
                (kept, all)
            };
            // Half the Services on another thread: a full round's refresh
            // is on the way of the first sync, while the other core idles
            // (at 100k Services, 0.4 s on one thread).
            let services: Vec<&Arc<ServiceInfo>> = stores.services.values().collect();
            let (first, second) = services.split_at(services.len() / 2);
            let ((kept, mut all), (kept_second, all_second)) = std::thread::scope(|scope| {
                let second = scope.spawn(|| of(second));
                let first = of(first);
                let second = second
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e));
                (first, second)
            });
            all.extend(all_second);
            self.per_service = kept.into_iter().chain(kept_second).collect();
            self.node = Some(node.clone());
            self.all = false;
            self.dirty.clear();
            self.owners.clear();
            self.contested = false;
            for (key, kept) in &self.per_service {
                for frontend in &kept.frontends {
                    let owner = self.owners.entry(*frontend).or_insert_with(|| key.clone());
                    self.contested |= owner != key;
                }
            }
            return Changed::Everything(all);
        }
        let keys: Vec<String> = self.dirty.drain().collect();
        let mut gone = Vec::new();
        let mut changed = Vec::new();
        for key in &keys {
            let old = match stores.services.get(key) {
                Some(svc) => {
                    let mut computed = compute(svc, &ip_slices(stores, key));
                    let kept = Kept::of(&mut computed);
                    changed.append(&mut computed.frontends);
                    self.per_service.insert(svc.key.clone(), kept)
                }
                None => self.per_service.remove(key.as_str()),
            };
            for frontend in old.iter().flat_map(|k| &k.frontends) {
                if self.owners.get(frontend).is_some_and(|o| **o == **key) {
                    self.owners.remove(frontend);
                    gone.push(*frontend);
                }
            }
        }
        for key in &keys {
            let Some((key, kept)) = self.per_service.get_key_value(key.as_str()) else {
                continue;
            };
            for frontend in &kept.frontends {
                let owner = self.owners.entry(*frontend).or_insert_with(|| key.clone());
                self.contested |= owner != key;
            }
        }
        if self.contested {
            // Recomputed whole: the round decides between the claimants.
            return self.refresh(stores, node, scheduler);
        }
        gone.retain(|f| !self.owners.contains_key(f));
        Changed::Services(changed, gone)
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
            .apply(watch::read(watcher::Event::Init, watch::keep_service));
        for svc in services {
            stores.services.apply(watch::read(
                watcher::Event::InitApply(svc.clone()),
                watch::keep_service,
            ));
        }
        stores
            .services
            .apply(watch::read(watcher::Event::InitDone, watch::keep_service));
        stores
    }

    fn frontend(ip: &str) -> Frontend {
        Frontend {
            address: ip.parse().unwrap(),
            port: 80,
            protocol: crate::frontend::Protocol::Tcp,
        }
    }

    fn kept_frontends(cache: &FrontendCache) -> usize {
        cache.per_service.values().map(|k| k.frontends.len()).sum()
    }

    #[test]
    fn cache_recomputes_only_touched_services_and_names_what_went() {
        let node = NodeInfo::default();
        let mut cache = FrontendCache::default();
        let mut s = stores(&[service("a", "10.96.0.1"), service("b", "10.96.0.2")]);
        let Changed::Everything(all) = cache.refresh(&s, &node, Scheduler::FlowHash) else {
            panic!("the first refresh computes everything");
        };
        assert_eq!(all.len(), 2);
        assert_eq!(kept_frontends(&cache), 2);

        // b moves to another cluster IP; a is untouched.
        s.services.apply(watch::read(
            watcher::Event::Apply(service("b", "10.96.0.3")),
            watch::keep_service,
        ));
        cache.touch("default/b");
        let Changed::Services(changed, gone) = cache.refresh(&s, &node, Scheduler::FlowHash) else {
            panic!("a partial change");
        };
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].frontend, frontend("10.96.0.3"));
        assert_eq!(changed[0].name, "default/b");
        assert_eq!(gone, vec![frontend("10.96.0.2")]);

        // A Service going takes its frontends with it.
        s.services.apply(watch::read(
            watcher::Event::Delete(service("a", "10.96.0.1")),
            watch::keep_service,
        ));
        cache.touch("default/a");
        let Changed::Services(changed, gone) = cache.refresh(&s, &node, Scheduler::FlowHash) else {
            panic!("a partial change");
        };
        assert!(changed.is_empty());
        assert_eq!(gone, vec![frontend("10.96.0.1")]);
        assert_eq!(kept_frontends(&cache), 1);

        // Asked for everything (a full round), it recomputes every Service.
        cache.all = true;
        let Changed::Everything(all) = cache.refresh(&s, &node, Scheduler::FlowHash) else {
            panic!("a full refresh");
        };
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].frontend, frontend("10.96.0.3"));
    }

    #[test]
    fn a_frontend_claimed_twice_needs_full_rounds() {
        let node = NodeInfo::default();
        let mut cache = FrontendCache::default();
        let mut s = stores(&[service("a", "10.96.0.1"), service("b", "10.96.0.2")]);
        cache.refresh(&s, &node, Scheduler::FlowHash);
        s.services.apply(watch::read(
            watcher::Event::Apply(service("b", "10.96.0.1")),
            watch::keep_service,
        ));
        cache.touch("default/b");
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Everything(_)
        ));
        // Resolved: one more full round finds no claimant left, then partial again.
        s.services.apply(watch::read(
            watcher::Event::Apply(service("b", "10.96.0.2")),
            watch::keep_service,
        ));
        cache.touch("default/b");
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Everything(_)
        ));
        cache.touch("default/b");
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Services(..)
        ));
    }
}
