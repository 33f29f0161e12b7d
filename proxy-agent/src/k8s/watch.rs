//! Watching the API server: Services, EndpointSlices (v1, or v1beta1 where the
//! server has no v1) and this agent's Node, each into a store that is complete
//! only after its first full list. Desired state is computed from the stores,
//! never from single events.

use std::{collections::HashMap, fmt::Debug, sync::Arc};

use anyhow::{Context, Result};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use tracing::{info, warn};

use super::{
    services::ServiceInfo,
    slices::{self, Slice, SliceVersion},
};

/// Objects by `namespace/name`, replaced whole on every (re)list.
#[derive(Debug)]
pub struct Store<T> {
    items: HashMap<String, T>,
    relisting: Option<HashMap<String, T>>,
    ready: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            relisting: None,
            ready: false,
        }
    }
}

impl<T> Store<T> {
    /// True once the first full list has arrived.
    pub fn ready(&self) -> bool {
        self.ready
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.items.values()
    }

    /// The object stored under `namespace/name` ([`key_of`]).
    pub fn get(&self, key: &str) -> Option<&T> {
        self.items.get(key)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Applies one watch event. `convert` turns an object into what is stored;
    /// `None` (an object that cannot be read) removes any older version of it.
    /// Returns whether the store's contents may have changed.
    pub fn apply<K: ResourceExt>(
        &mut self,
        event: watcher::Event<K>,
        convert: impl FnOnce(K) -> Option<T>,
    ) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                let key = key_of(&obj);
                if let (Some(list), Some(value)) = (self.relisting.as_mut(), convert(obj)) {
                    list.insert(key, value);
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some(list) = self.relisting.take() {
                    self.items = list;
                }
                self.ready = true;
                true
            }
            watcher::Event::Apply(obj) => {
                let key = key_of(&obj);
                match convert(obj) {
                    Some(value) => self.items.insert(key, value),
                    None => self.items.remove(&key),
                };
                true
            }
            watcher::Event::Delete(obj) => self.items.remove(&key_of(&obj)).is_some(),
        }
    }
}

/// The key objects are stored under: `namespace/name`.
pub fn key_of<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Which EndpointSlice version this server serves: v1 where it exists.
pub async fn slice_version(client: &Client) -> Result<SliceVersion> {
    for version in [SliceVersion::V1, SliceVersion::V1beta1] {
        let group = format!("discovery.k8s.io/{}", version.api_version());
        match client.list_api_group_resources(&group).await {
            Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => {
                info!(%group, "reading EndpointSlices");
                return Ok(version);
            }
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("discovering {group}")),
        }
    }
    anyhow::bail!("the API server serves no EndpointSlices (discovery.k8s.io v1 or v1beta1)")
}

/// What every watch lists with: from the API server's watch cache
/// (resourceVersion "0"), as client-go's informers (and so kube-proxy) do, so
/// that thousands of agents starting or relisting at once do not each make a
/// quorum read of every Service and slice from etcd. (On the lab's single
/// agent it made no measurable difference to the first sync.) The watch that
/// follows the list brings any change the cache had not seen yet.
fn config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

/// A watch stream with kube's default backoff: errors are yielded (to be logged
/// and counted) and the watch restarts by itself.
fn stream<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send
where
    K: kube::Resource + Clone + Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    watcher(api, config).default_backoff()
}

pub fn services(
    client: &Client,
) -> impl Stream<Item = watcher::Result<watcher::Event<Service>>> + Send {
    stream(Api::<Service>::all(client.clone()), config())
}

pub fn node(
    client: &Client,
    name: &str,
) -> impl Stream<Item = watcher::Result<watcher::Event<Node>>> + Send {
    stream(
        Api::<Node>::all(client.clone()),
        config().fields(&format!("metadata.name={name}")),
    )
}

pub fn slices(
    client: &Client,
    version: SliceVersion,
) -> impl Stream<Item = watcher::Result<watcher::Event<DynamicObject>>> + Send {
    let gvk = GroupVersionKind::gvk("discovery.k8s.io", version.api_version(), "EndpointSlice");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
    watcher(
        Api::<DynamicObject>::all_with(client.clone(), &resource),
        config(),
    )
    .default_backoff()
    .boxed()
}

/// Converts a watched EndpointSlice; a slice that cannot be read is logged and
/// left out (its service keeps its other slices).
pub fn convert_slice(version: SliceVersion) -> impl Fn(DynamicObject) -> Option<Slice> {
    move |mut obj| {
        let key = key_of(&obj);
        // Not copied into the JSON value below only to be dropped.
        obj.metadata.managed_fields = None;
        let value = match serde_json::to_value(&obj) {
            Ok(v) => v,
            Err(e) => {
                warn!(slice = %key, error = %e, "cannot serialize EndpointSlice");
                return None;
            }
        };
        match slices::parse_slice(version, value) {
            Ok(slice) => Some(slice),
            Err(e) => {
                warn!(slice = %key, error = %e, "EndpointSlice ignored");
                None
            }
        }
    }
}

/// What the store keeps of a Service: the fields proxying reads (a third of
/// the object's size).
pub fn keep_service(svc: Service) -> Option<Arc<ServiceInfo>> {
    Some(Arc::new(ServiceInfo::from(svc)))
}

/// Wraps objects in `Arc` for cheap snapshots, without their managedFields:
/// nothing here reads them, and they are a good part of each object's size
/// (at 10k Services, megabytes of the agent's memory).
pub fn keep<K: Resource>(mut obj: K) -> Option<Arc<K>> {
    obj.meta_mut().managed_fields = None;
    Some(Arc::new(obj))
}
