//! Watching the API server: Services, EndpointSlices (v1, or v1beta1 where the
//! server has no v1) and this agent's Node, each into a store that is complete
//! only after its first full list. Desired state is computed from the stores,
//! never from single events.

use std::{collections::HashMap, fmt::Debug, sync::Arc};

use anyhow::{Context, Result};
use futures::{stream, Stream, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    api::{ApiResource, GroupVersionKind},
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use tracing::{info, warn};

use super::{
    services::{ServiceInfo, WatchedService},
    slices::{Slice, SliceObject, SliceVersion},
};
use crate::serve::latency;

/// What a store also finds its objects by, besides their key: the Service
/// an EndpointSlice belongs to. Other kinds have no group.
pub trait Grouped {
    fn group(&self) -> Option<&Arc<str>> {
        None
    }

    /// The object's own copy of its key (`namespace/name`), for the store
    /// to share rather than hold a second.
    fn key(&self) -> Option<&Arc<str>> {
        None
    }
}

impl Grouped for Slice {
    fn group(&self) -> Option<&Arc<str>> {
        Some(&self.service)
    }
}

impl Grouped for Arc<ServiceInfo> {
    fn key(&self) -> Option<&Arc<str>> {
        Some(&self.key)
    }
}

impl Grouped for Arc<Node> {}

/// Objects by `namespace/name`, replaced whole on every (re)list, and the
/// keys of each group's objects (a Vec: a Service has one slice or a few).
/// Keys and group names are shared, not copied: at 100k Services each
/// copy was some 40 bytes per object.
#[derive(Debug)]
pub struct Store<T> {
    items: HashMap<Arc<str>, T>,
    groups: HashMap<Arc<str>, Vec<Arc<str>>>,
    relisting: Option<HashMap<Arc<str>, T>>,
    ready: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            groups: HashMap::new(),
            relisting: None,
            ready: false,
        }
    }
}

impl<T: Grouped> Store<T> {
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

    /// The objects of `group` (a Service's slices), found without a scan.
    pub fn in_group<'a>(&'a self, group: &str) -> impl Iterator<Item = &'a T> + 'a {
        self.groups
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|key| self.items.get(key))
    }

    /// The key to store `value` under: its own copy where it has one.
    fn shared_key(key: String, value: &T) -> Arc<str> {
        match value.key() {
            Some(own) if **own == *key => own.clone(),
            _ => key.into(),
        }
    }

    fn insert(&mut self, key: String, value: T) {
        let key = Self::shared_key(key, &value);
        let group = value.group().cloned();
        let old = self.items.insert(key.clone(), value);
        if let Some(old) = &old {
            if old.group() == group.as_ref() {
                return;
            }
            Self::ungroup(&mut self.groups, &key, old);
        }
        if let Some(group) = group {
            self.groups.entry(group).or_default().push(key);
        }
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.items.remove(key) {
            Some(old) => {
                Self::ungroup(&mut self.groups, key, &old);
                true
            }
            None => false,
        }
    }

    fn ungroup(groups: &mut HashMap<Arc<str>, Vec<Arc<str>>>, key: &str, old: &T) {
        if let Some(group) = old.group() {
            if let Some(keys) = groups.get_mut(group) {
                keys.retain(|k| **k != *key);
                if keys.is_empty() {
                    groups.remove(group);
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Applies one watch event, its object already [`read`]: a value of
    /// `None` (an object that cannot be read) removes any older version of it.
    /// Returns whether the store's contents may have changed.
    pub fn apply(&mut self, event: Change<T>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(Read { key, value, .. }) => {
                if let (Some(list), Some(value)) = (self.relisting.as_mut(), value) {
                    list.insert(Self::shared_key(key, &value), value);
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some(list) = self.relisting.take() {
                    self.groups.clear();
                    for (key, value) in &list {
                        if let Some(group) = value.group() {
                            self.groups
                                .entry(group.clone())
                                .or_default()
                                .push(key.clone());
                        }
                    }
                    self.items = list;
                }
                self.ready = true;
                true
            }
            watcher::Event::Apply(Read { key, value, .. }) => {
                match value {
                    Some(value) => self.insert(key, value),
                    None => {
                        self.remove(&key);
                    }
                };
                true
            }
            watcher::Event::Delete(Read { key, .. }) => self.remove(&key),
        }
    }
}

/// A watch event as the loop takes it: its object already read into what
/// the store keeps.
pub type Change<T> = watcher::Event<Read<T>>;

/// One object of a watch event, read.
#[derive(Clone, Debug, PartialEq)]
pub struct Read<T> {
    /// `namespace/name` ([`key_of`]).
    pub key: String,
    /// What the store keeps of it. `None`: it cannot be read (or it was
    /// deleted, and is not read).
    pub value: Option<T>,
    /// When the change was triggered (the EndpointSlice controller's
    /// annotation), for the network programming latency.
    pub trigger: Option<Timestamp>,
}

/// Reads the object of `event` with `convert`. The watches do this in their
/// own tasks, on the other core, so the loop only files what they read (at
/// 100k EndpointSlices, reading them was about half a second of the loop's
/// first sync). A deleted object is not read: its key is all a store needs.
pub fn read<K: ResourceExt, T>(
    event: watcher::Event<K>,
    convert: impl FnOnce(K) -> Option<T>,
) -> Change<T> {
    let put = |obj: K| {
        let key = key_of(&obj);
        let trigger = latency::trigger_time(Some(obj.annotations()));
        Read {
            key,
            value: convert(obj),
            trigger,
        }
    };
    match event {
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
        watcher::Event::InitApply(obj) => watcher::Event::InitApply(put(obj)),
        watcher::Event::Apply(obj) => watcher::Event::Apply(put(obj)),
        watcher::Event::Delete(obj) => watcher::Event::Delete(Read {
            key: key_of(&obj),
            value: None,
            trigger: None,
        }),
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
/// quorum read of every Service and slice from etcd. The watch that follows
/// the list brings any change the cache had not seen yet.
///
/// Without a page size: kube leaves resourceVersion "0" out of a list that
/// has a limit (kube-core's `ListParams`), which turns it into a paged quorum
/// read, 200 requests for 100k slices. The API server answers a list from
/// its cache in one response whatever the limit, as it does client-go's.
fn config() -> watcher::Config {
    watcher::Config {
        page_size: None,
        ..watcher::Config::default().any_semantic()
    }
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

/// The Services, each read into what proxying needs of it.
pub fn services(
    client: &Client,
) -> impl Stream<Item = watcher::Result<Change<Arc<ServiceInfo>>>> + Send {
    stream(Api::<WatchedService>::all(client.clone()), config())
        .map(|event| event.map(|event| read(event, |s: WatchedService| keep_service(s.0))))
}

/// This agent's Node.
pub fn node(
    client: &Client,
    name: &str,
) -> impl Stream<Item = watcher::Result<Change<Arc<Node>>>> + Send {
    stream(
        Api::<Node>::all(client.clone()),
        config().fields(&format!("metadata.name={name}")),
    )
    .map(|event| event.map(|event| read(event, keep)))
}

/// The EndpointSlices of `version`, each read into what proxying needs of it.
pub fn slices(
    client: &Client,
    version: SliceVersion,
) -> impl Stream<Item = watcher::Result<Change<Slice>>> + Send {
    let gvk = GroupVersionKind::gvk("discovery.k8s.io", version.api_version(), "EndpointSlice");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
    let events = watcher(
        Api::<SliceObject>::all_with(client.clone(), &resource),
        config(),
    )
    .default_backoff();
    read_on_threads(events, move |obj| convert_slice(version)(obj))
}

/// Reads the objects of `events` with `convert` on threads of their own,
/// [`READING_AT_ONCE`] groups of events at once, and hands them on in order.
pub fn read_on_threads<K, T>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send,
    convert: impl Fn(K) -> Option<T> + Clone + Send + 'static,
) -> impl Stream<Item = watcher::Result<Change<T>>> + Send
where
    K: ResourceExt + Send + 'static,
    T: Send + 'static,
{
    events
        .ready_chunks(READ_TOGETHER)
        .map(move |events| {
            let convert = convert.clone();
            tokio::task::spawn_blocking(move || {
                (events.into_iter())
                    .map(|event| event.map(|event| read(event, &convert)))
                    .collect::<Vec<_>>()
            })
        })
        .buffered(READING_AT_ONCE)
        .flat_map(|read| stream::iter(read.expect("reading a watch's objects panicked")))
}

/// Events read in one go, of those the watch has ready: a first list's, or
/// the one or few of a change.
const READ_TOGETHER: usize = 256;

/// Groups of events read at once, each on a thread of its own, so that a
/// first list's slices are read on both cores of a small node (at 100k
/// Services the watch read them on one thread for 0.8 s after their list
/// was parsed, while the other core waited). Their order is kept.
const READING_AT_ONCE: usize = 2;

/// Converts a watched EndpointSlice; a slice that cannot be read is logged and
/// left out (its service keeps its other slices).
pub fn convert_slice(version: SliceVersion) -> impl Fn(SliceObject) -> Option<Slice> {
    move |obj| {
        let key = key_of(&obj);
        match obj.read(version) {
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;

    use super::*;

    #[test]
    fn the_first_lists_ask_for_the_api_servers_cache() {
        // What the watcher lists with (kube-runtime's `to_list_params`).
        let config = config();
        let mut params = kube::api::ListParams::default().match_any();
        params.limit = config.page_size;
        let request = kube::core::Request::new("/api/v1/services")
            .list(&params)
            .unwrap();
        let query = request.uri().query().unwrap_or_default().to_string();
        assert!(query.contains("resourceVersion=0"), "{query}");
        assert!(!query.contains("limit"), "{query}");
    }

    /// The object `default/<name>` of an event.
    fn event_of(name: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "default", "name": name}
        }))
        .unwrap()
    }

    /// A conversion to a slice of Service `default/<service>` (`None`: an
    /// object that cannot be read).
    fn of(service: Option<&str>) -> impl FnOnce(ConfigMap) -> Option<Slice> + '_ {
        move |_| {
            service.map(|s| Slice {
                service: format!("default/{s}").into(),
                address_type: "IPv4".into(),
                ports: Vec::new(),
                endpoints: Vec::new(),
            })
        }
    }

    fn group_sizes(store: &Store<Slice>) -> Vec<(&'static str, usize)> {
        ["a", "b", "c"]
            .into_iter()
            .map(|s| (s, store.in_group(&format!("default/{s}")).count()))
            .collect()
    }

    /// An object is read with its key and trigger time; a deleted one is
    /// not read at all.
    #[test]
    fn a_watch_reads_each_object_but_a_deleted_one() {
        let object: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "s1", "annotations": {
                (latency::TRIGGER_TIME_ANNOTATION): "2026-12-06T10:00:00Z"}}
        }))
        .unwrap();
        let read_as = |event| read(event, |obj: ConfigMap| Some(obj.metadata.name));
        let watcher::Event::Apply(read) = read_as(watcher::Event::Apply(object.clone())) else {
            panic!("an Apply stays an Apply");
        };
        assert_eq!(read.key, "ns/s1");
        assert_eq!(read.value, Some(Some("s1".to_string())));
        assert_eq!(read.trigger, "2026-12-06T10:00:00Z".parse().ok());
        let deleted = read_as(watcher::Event::Delete(object));
        let watcher::Event::Delete(read) = deleted else {
            panic!("a Delete stays a Delete");
        };
        assert_eq!(
            (read.key.as_str(), read.value, read.trigger),
            ("ns/s1", None, None)
        );
    }

    /// Read on threads, a first list's worth of events comes out whole and
    /// in order (the first group taking longest), an error where it was.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn objects_read_on_threads_come_out_in_order() {
        let names: Vec<String> = (0..3 * READ_TOGETHER + 7)
            .map(|i| format!("s{i}"))
            .collect();
        let events = names.iter().enumerate().map(|(i, name)| match i {
            100 => Err(watcher::Error::NoResourceVersion),
            _ => Ok(watcher::Event::InitApply(event_of(name))),
        });
        let read: Vec<_> = read_on_threads(
            stream::iter(events.collect::<Vec<_>>()),
            |obj: ConfigMap| {
                let name = obj.metadata.name.unwrap_or_default();
                // The first group is read last of all: its place must hold.
                if name == "s0" {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Some(name)
            },
        )
        .collect()
        .await;
        assert_eq!(read.len(), names.len());
        for (i, (event, name)) in read.into_iter().zip(&names).enumerate() {
            match event {
                Err(_) => assert_eq!(i, 100),
                Ok(watcher::Event::InitApply(read)) => {
                    assert_eq!(
                        (read.key, read.value),
                        (format!("default/{name}"), Some(name.clone()))
                    );
                }
                Ok(_) => panic!("an InitApply stays one"),
            }
        }
    }

    #[test]
    fn a_store_finds_a_services_slices_through_every_kind_of_event() {
        let mut store = Store::<Slice>::default();
        store.apply(read(watcher::Event::Init, of(None)));
        for (name, service) in [("s1", "a"), ("s2", "a"), ("s3", "b")] {
            store.apply(read(
                watcher::Event::InitApply(event_of(name)),
                of(Some(service)),
            ));
        }
        // Nothing is found before the list is done.
        assert_eq!(group_sizes(&store), [("a", 0), ("b", 0), ("c", 0)]);
        store.apply(read(watcher::Event::InitDone, of(None)));
        assert_eq!(group_sizes(&store), [("a", 2), ("b", 1), ("c", 0)]);

        // A slice that moves to another Service, one that stays.
        store.apply(read(watcher::Event::Apply(event_of("s2")), of(Some("b"))));
        store.apply(read(watcher::Event::Apply(event_of("s1")), of(Some("a"))));
        assert_eq!(group_sizes(&store), [("a", 1), ("b", 2), ("c", 0)]);

        // Deleted, and replaced by one that cannot be read.
        store.apply(read(watcher::Event::Delete(event_of("s1")), of(None)));
        store.apply(read(watcher::Event::Apply(event_of("s3")), of(None)));
        assert_eq!(group_sizes(&store), [("a", 0), ("b", 1), ("c", 0)]);
        assert!(!store.groups.contains_key("default/a"));

        // A relist replaces every group.
        store.apply(read(watcher::Event::Init, of(None)));
        store.apply(read(
            watcher::Event::InitApply(event_of("s9")),
            of(Some("c")),
        ));
        store.apply(read(watcher::Event::InitDone, of(None)));
        assert_eq!(group_sizes(&store), [("a", 0), ("b", 0), ("c", 1)]);
        assert_eq!(store.len(), 1);
    }
}
