//! Maps pinned the way an older agent left them: created with bpftool in a
//! test's own pin directory, filled through aya.

use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData};

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
