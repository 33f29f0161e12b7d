//! Maps pinned the way an older agent left them: created with bpftool in a
//! test's own pin directory, filled through aya.

use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData};
use proxy_common::{previous, Backend4};

use super::netns::run;

/// Creates a map of `kind` (bpftool's name: hash, lru_hash, lpm_trie ...)
/// with `key`- and `value`-byte entries, pinned at `dir/name`.
pub fn create(dir: &Path, name: &str, kind: &str, key: usize, value: usize, flags: Option<&str>) {
    let path = dir.join(name);
    let (key, value) = (key.to_string(), value.to_string());
    let mut args = vec![
        "map",
        "create",
        path.to_str().unwrap(),
        "type",
        kind,
        "key",
        &key,
        "value",
        &value,
        "entries",
        "4096",
        "name",
        name,
    ];
    if let Some(flags) = flags {
        args.extend(["flags", flags]);
    }
    run("bpftool", &args);
}

/// The map pinned at `dir/name`.
pub fn open(dir: &Path, name: &str) -> Map {
    let data = MapData::from_pin(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    Map::from_map_data(data).unwrap()
}

/// The hash map pinned at `dir/name`, with keys `K` and values `V`.
pub fn hash<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> HashMap<MapData, K, V> {
    HashMap::try_from(open(dir, name)).unwrap()
}

/// The array pinned at `dir/name`, with values `V`.
pub fn array<V: aya::Pod>(dir: &Path, name: &str) -> Array<MapData, V> {
    Array::try_from(open(dir, name)).unwrap()
}

/// Pins `backends` as the agent before the IPv4 backends array left them:
/// `backend4_v1`, a hash map by id, of the previous value layout.
pub fn previous_backends(dir: &Path, backends: impl IntoIterator<Item = (u32, Backend4)>) {
    create(dir, previous::names::BACKENDS_V4, "hash", 4, 12, None);
    let mut old = hash::<u32, previous::Backend4>(dir, previous::names::BACKENDS_V4);
    for (id, b) in backends {
        let value = previous::Backend4 {
            addr_be: b.addr.raw(),
            port_be: b.port_be,
            proto: b.proto,
            state: b.state,
            flags: b.flags,
            _pad: [0; 3],
        };
        old.insert(id, value, 0).unwrap();
    }
}
