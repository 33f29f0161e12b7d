//! Carrying over the entries of maps an older agent pinned in a layout that
//! changed since (the layouts and their conversions are
//! `proxy_common::previous`), so that an upgrade keeps established flows on
//! their backend and their NAT port, clients on their affine backend, and
//! frontends and backends on their ids.
//!
//! The old programs keep running, and writing into the old maps, until the
//! new ones replace them on every interface. So the agent:
//! 1. [`Migration::begin`], after loading the new programs and before
//!    attaching them: copies every old map into its new one. The services,
//!    backends and reverse-NAT maps carried here are what the new agent reads
//!    its ids back from (`Ids::from_state`), as after a plain restart, and
//!    what the new programs serve established flows from until the first round;
//! 2. attaches the new programs: the swap;
//!    Between 2 and 3, [`Migration::carry_flows`] copies what the old
//!    programs still write while some interfaces run them: once the pod
//!    interfaces are swapped and every second until the uplinks are;
//! 3. [`Migration::finish`]: copies again the conntrack, NAT and affinity
//!    entries the old programs made or changed between 1 and 2 (new flows, a
//!    closing flow, a reused tuple), without overwriting an entry the new
//!    programs made or changed since 1; then unpins the old maps, which the
//!    kernel frees once no program uses them.
//!
//! An old map that cannot be carried over (a version this agent does not
//! know, a layout that does not match its name, entries that do not fit) is
//! named in the log with the reason and in the [`Report`]; its new map starts
//! without those entries, and everything else goes on.

use std::collections::HashMap as StdHashMap;

use aya::maps::{Map, MapError};
use proxy_common::previous::{self, Pin};

use super::*;

/// `bpf_map_update_elem` flags (linux/bpf.h): create only, or update only.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// What a migration did, for the log and `/metrics`.
#[derive(Debug, Default)]
pub struct Report {
    /// Old maps carried over: (old name, entries copied over both passes).
    pub carried: Vec<(String, usize)>,
    /// Old maps, or some of their entries, not carried over: (old name, why).
    pub failed: Vec<(String, String)>,
}

/// A migration between its two passes (see the module's comment).
pub struct Migration {
    /// The old maps whose entries the old programs may still change before
    /// the swap: copied again by [`Migration::finish`].
    flows: Vec<(String, Box<dyn Carry>)>,
    /// Every old pin, removed by [`Migration::finish`].
    pins: Vec<PathBuf>,
    /// NAT entries were carried: the NAT-port bitmaps must follow them.
    nat_carried: bool,
    pub report: Report,
}

impl Migration {
    /// The first pass: carries every older map pinned in `pin_dir` over into
    /// the maps of `dp` (loaded, not yet attached).
    pub fn begin(dp: &mut Dataplane, pin_dir: &Path) -> Result<Self> {
        let mut migration = Self {
            flows: Vec::new(),
            pins: Vec::new(),
            nat_carried: false,
            report: Report::default(),
        };
        let mut names: Vec<String> = fs::read_dir(pin_dir)
            .with_context(|| format!("reading {}", pin_dir.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            let (current, resized) = match previous::classify(&name) {
                Pin::Current | Pin::Other => continue,
                Pin::Previous(current) => (current, false),
                Pin::Resized(current) => (current, true),
                Pin::Unknown(current) => {
                    migration.fail(
                        &name,
                        format!(
                            "its layout is unknown to this agent, which carries {current}'s \
                             previous version over only"
                        ),
                    );
                    migration.pins.push(pin_dir.join(&name));
                    continue;
                }
            };
            let path = pin_dir.join(&name);
            migration.pins.push(path.clone());
            if [map_names::ROUND_ROBIN, map_names::STATS, map_names::TRAFFIC].contains(&current) {
                info!(map = name, "not carried over: its counters start again");
                continue;
            }
            let opened = if resized {
                open_resized(&path, current)
            } else {
                open(&path, current)
            };
            let mut carry = match opened {
                Ok(carry) => carry,
                Err(e) => {
                    migration.fail(&name, format!("{e:#}"));
                    continue;
                }
            };
            // Entries that did not fit are reported; the others are carried,
            // and the second pass tries again.
            match carry.pass(dp) {
                Ok(copied) => migration.count(&name, copied),
                Err(e) => migration.fail(&name, format!("{e:#}")),
            }
            migration.nat_carried |= current == map_names::NAT_V4;
            let flows = [
                map_names::CONNTRACK_V4,
                map_names::NAT_V4,
                map_names::AFFINITY_V4,
                map_names::CONNTRACK_V6,
                map_names::NAT_V6,
                map_names::AFFINITY_V6,
            ];
            if flows.contains(&current) {
                migration.flows.push((name, carry));
            }
        }
        Ok(migration)
    }

    /// The second pass, once the new programs are attached: what the old
    /// programs wrote meanwhile, then the old pins go. With NAT entries carried,
    /// a garbage collection (at `lifetimes`) rebuilds the NAT-port bitmaps
    /// from them before new flows need a port.
    pub fn finish(mut self, dp: &mut Dataplane, lifetimes: &gc::Lifetimes) -> Report {
        self.carry_flows(dp);
        for path in &self.pins {
            match fs::remove_file(path) {
                Ok(()) => info!(pin = %path.display(), "old map unpinned"),
                Err(e) => warn!(pin = %path.display(), error = %e, "old map left pinned"),
            }
        }
        if self.nat_carried {
            if let Err(e) = dp.gc(monotonic_ns(), lifetimes) {
                warn!(error = format!("{e:#}"), "NAT-port bitmaps not rebuilt yet");
            }
        }
        for (name, copied) in &self.report.carried {
            info!(map = name, entries = copied, "carried over");
        }
        self.report
    }

    /// A pass between the two: the conntrack, NAT and affinity entries the
    /// old programs made since the last pass. Run once the pod interfaces
    /// have the new programs, and then every second until the uplinks do:
    /// a flow an old program started must find its entries in the new maps
    /// when its reply meets a new program, or the reply leaves untranslated.
    pub fn carry_flows(&mut self, dp: &mut Dataplane) {
        let mut flows = std::mem::take(&mut self.flows);
        for (name, carry) in &mut flows {
            match carry.pass(dp) {
                Ok(copied) => self.count(name, copied),
                Err(e) => self.fail(name, format!("{e:#}")),
            }
        }
        self.flows = flows;
    }

    fn count(&mut self, name: &str, copied: usize) {
        match self.report.carried.iter_mut().find(|(n, _)| n == name) {
            Some((_, total)) => *total += copied,
            None => self.report.carried.push((name.to_string(), copied)),
        }
    }

    /// Logs every failure; reports each map once, with its latest reason.
    fn fail(&mut self, name: &str, reason: String) {
        warn!(map = name, reason, "old map not (wholly) carried over");
        match self.report.failed.iter_mut().find(|(n, _)| n == name) {
            Some((_, why)) => *why = reason,
            None => self.report.failed.push((name.to_string(), reason)),
        }
    }
}

/// One old map and how its entries go into its new one.
trait Carry {
    /// Copies the old map's entries into the new one, except where the new
    /// map holds an entry this carry did not write (or wrote, and the new
    /// programs changed since). Returns how many it wrote; fails if some
    /// entries could not be written (the new map full, say).
    fn pass(&mut self, dp: &mut Dataplane) -> Result<usize>;
}

/// A hash map's carry: the old map, the conversion, the new map, and what the
/// passes wrote.
struct HashCarry<K0, V0, K, V> {
    old: HashMap<MapData, K0, V0>,
    convert: fn(K0, V0) -> (K, V),
    new: fn(&mut Dataplane) -> &mut HashMap<MapData, K, V>,
    written: StdHashMap<K, V>,
}

impl<K0, V0, K, V> Carry for HashCarry<K0, V0, K, V>
where
    K0: aya::Pod,
    V0: aya::Pod,
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    fn pass(&mut self, dp: &mut Dataplane) -> Result<usize> {
        let new = (self.new)(dp);
        let (mut copied, mut failed, mut last_error) = (0, 0, None);
        // An entry the LRU evicted during the walk is skipped.
        for (k0, v0) in self.old.iter().filter_map(Result::ok) {
            let (key, value) = (self.convert)(k0, v0);
            let now = new.get(&key, 0).ok();
            let Some(flags) = write(now.as_ref(), self.written.get(&key), &value) else {
                continue;
            };
            match new.insert(key, value, flags) {
                Ok(()) => {
                    self.written.insert(key, value);
                    copied += 1;
                }
                // The new programs wrote or removed it meanwhile: theirs stands.
                Err(e) if raced(&e) => {}
                Err(e) => {
                    failed += 1;
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            None => Ok(copied),
            Some(e) => {
                Err(e).with_context(|| format!("{failed} entries not carried over ({copied} were)"))
            }
        }
    }
}

/// Whether, and with which update flags, a pass writes an old entry
/// (converted: `value`) where the new map holds `now` and the passes before
/// wrote `wrote`.
fn write<V: PartialEq>(now: Option<&V>, wrote: Option<&V>, value: &V) -> Option<u64> {
    match (now, wrote) {
        // Not there, and not removed since an earlier pass wrote it.
        (None, None) => Some(BPF_NOEXIST),
        // As the last pass left it, and the old programs changed it since (a
        // closing flow, a reused tuple with a new backend). The new programs
        // could change it between the read and this write: what that loses is
        // at most one packet's refresh.
        (Some(now), Some(wrote)) if now == wrote && now != value => Some(BPF_EXIST),
        // Made or changed by the new programs (or an earlier agent of this
        // version): theirs is newer. Or removed since a pass wrote it.
        _ => None,
    }
}

/// The IPv4 backends' carry, from `backend4_v1` (a hash map keyed by id) or
/// a `backend4_v2` array of another size: each backend goes to its id's slot
/// in the new array. Two ids of one slot there cannot both go: the first
/// stays, the other is reported, and the agent's first round gives its
/// endpoint a new id (its flows a new backend).
enum BackendCarry {
    Hash(HashMap<MapData, u32, previous::Backend4>),
    Array(Array<MapData, Backend4>),
}

impl Carry for BackendCarry {
    fn pass(&mut self, dp: &mut Dataplane) -> Result<usize> {
        let old: Vec<Backend4> = match self {
            Self::Hash(map) => map
                .iter()
                .filter_map(Result::ok)
                .map(|(id, b)| previous::backend(id, b))
                .collect(),
            Self::Array(map) => map.iter().filter_map(Result::ok).collect(),
        };
        let (mut copied, mut refused) = (0, Vec::new());
        for backend in old.into_iter().filter(|b| b.id != 0) {
            match dp.put_backend4_if_free(backend) {
                Ok(true) => copied += 1,
                Ok(false) => refused.push(backend.id),
                Err(e) => return Err(e).context("an IPv4 backend not carried over"),
            }
        }
        if refused.is_empty() {
            return Ok(copied);
        }
        refused.truncate(8);
        bail!(
            "backends {refused:?} (and maybe more) not carried over: their slots in the new \
             array hold other ids ({copied} were carried)"
        )
    }
}

/// The source-range trie's carry: entries missing from the new trie.
struct TrieCarry {
    old: LpmTrie<MapData, previous::SourceRange4, u8>,
}

impl Carry for TrieCarry {
    fn pass(&mut self, dp: &mut Dataplane) -> Result<usize> {
        let mut copied = 0;
        for (key, value) in self.old.iter().filter_map(Result::ok) {
            let key = LpmKey::new(key.prefix_len(), previous::source_range(key.data()));
            match dp.source_ranges.insert(&key, value, BPF_NOEXIST) {
                Ok(()) => copied += 1,
                Err(e) if raced(&e) => {}
                Err(e) => return Err(e).context("a source range not carried over"),
            }
        }
        Ok(copied)
    }
}

/// A write that failed because the entry was (or was no longer) there.
fn raced(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(e)
        if matches!(e.io_error.raw_os_error(), Some(libc::EEXIST | libc::ENOENT)))
}

fn hash<K0, V0, K, V>(
    old: Map,
    convert: fn(K0, V0) -> (K, V),
    new: fn(&mut Dataplane) -> &mut HashMap<MapData, K, V>,
) -> Result<Box<dyn Carry>>
where
    K0: aya::Pod + 'static,
    V0: aya::Pod + 'static,
    K: aya::Pod + Eq + std::hash::Hash + 'static,
    V: aya::Pod + PartialEq + 'static,
{
    Ok(Box::new(HashCarry {
        old: HashMap::try_from(old).context("its layout is not the one its name says")?,
        convert,
        new,
        written: StdHashMap::new(),
    }))
}

/// Opens today's map `current` set aside at `path` because it has another
/// size than the agent wants: its entries go over as they are.
fn open_resized(path: &Path, current: &str) -> Result<Box<dyn Carry>> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let old = Map::from_map_data(data)?;
    match current {
        map_names::SERVICES_V4 => hash(old, same::<ServiceKey4, ServiceValue>, |dp| {
            &mut dp.services
        }),
        map_names::BACKENDS_V4 => Ok(Box::new(BackendCarry::Array(
            Array::try_from(old).context("its layout is not the one its name says")?,
        ))),
        map_names::CONNTRACK_V4 => hash(old, same::<CtKey4, CtValue>, |dp| &mut dp.conntrack),
        map_names::NAT_V4 => hash(old, same::<CtKey4, Nat4>, |dp| &mut dp.nat),
        map_names::AFFINITY_V4 => hash(old, same::<AffinityKey4, AffinityValue>, |dp| {
            &mut dp.affinity
        }),
        map_names::MAGLEV_V4 => hash(old, same::<MaglevKey, u32>, |dp| &mut dp.maglev),
        map_names::SERVICES_V6 => hash(old, same::<ServiceKey6, ServiceValue>, |dp| {
            &mut dp.v6.services
        }),
        map_names::BACKENDS_V6 => hash(old, same::<u32, Backend6>, |dp| &mut dp.v6.backends),
        map_names::REVNAT_V4 => hash(old, same::<u32, RevNat4>, |dp| &mut dp.revnat),
        map_names::REVNAT_V6 => hash(old, same::<u32, RevNat6>, |dp| &mut dp.v6.revnat),
        map_names::CONNTRACK_V6 => hash(old, same::<CtKey6, CtValue>, |dp| &mut dp.v6.conntrack),
        map_names::NAT_V6 => hash(old, same::<CtKey6, Nat6>, |dp| &mut dp.v6.nat),
        map_names::AFFINITY_V6 => hash(old, same::<AffinityKey6, AffinityValue>, |dp| {
            &mut dp.v6.affinity
        }),
        map_names::NAT_PORTS_V4 => hash(old, same::<NatPortKey4, u64>, |dp| &mut dp.nat_ports),
        map_names::NAT_PORTS_V6 => hash(old, same::<NatPortKey6, u64>, |dp| &mut dp.v6.nat_ports),
        map_names::SOCK_REVNAT_V4 => {
            hash(old, same::<SockRevKey4, RevNat4>, |dp| &mut dp.sock_revnat)
        }
        other => bail!("{other} is not resized"),
    }
}

fn same<K, V>(key: K, value: V) -> (K, V) {
    (key, value)
}

/// Opens the old map pinned at `path`, the previous version of `current`.
fn open(path: &Path, current: &str) -> Result<Box<dyn Carry>> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let old = Map::from_map_data(data)?;
    match current {
        map_names::SERVICES_V4 => hash(
            old,
            |k: ServiceKey4, v| (k, previous::service(v)),
            |dp| &mut dp.services,
        ),
        map_names::REVNAT_V4 => hash(
            old,
            |k: u16, v: RevNat4| (previous::revnat_id(k), v),
            |dp| &mut dp.revnat,
        ),
        map_names::BACKENDS_V4 => Ok(Box::new(BackendCarry::Hash(
            HashMap::try_from(old).context("its layout is not the one its name says")?,
        ))),
        map_names::CONNTRACK_V4 => hash(
            old,
            |k: CtKey4, v| (k, previous::conntrack(v)),
            |dp| &mut dp.conntrack,
        ),
        map_names::NAT_V4 => hash(old, |k: CtKey4, v| (k, previous::nat(v)), |dp| &mut dp.nat),
        map_names::AFFINITY_V4 => hash(
            old,
            |k, v: AffinityValue| (previous::affinity_key(k), v),
            |dp| &mut dp.affinity,
        ),
        map_names::MAGLEV_V4 => hash(
            old,
            |k, v: u32| (previous::maglev_key(k), v),
            |dp| &mut dp.maglev,
        ),
        map_names::SOURCE_RANGES_V4 => Ok(Box::new(TrieCarry {
            old: LpmTrie::try_from(old).context("its layout is not the one its name says")?,
        })),
        other => bail!("no conversion to {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_writes_only_what_no_new_program_touched() {
        // The first pass into an empty map creates.
        assert_eq!(write(None, None, &1), Some(BPF_NOEXIST));
        // The new programs (or an earlier agent of this version) made it.
        assert_eq!(write(Some(&2), None, &1), None);
        // Unchanged since the first pass, changed by the old programs.
        assert_eq!(write(Some(&1), Some(&1), &3), Some(BPF_EXIST));
        // Unchanged on both sides: nothing to write.
        assert_eq!(write(Some(&1), Some(&1), &1), None);
        // Changed by the new programs since the first pass: theirs stands.
        assert_eq!(write(Some(&4), Some(&1), &3), None);
        // Removed since the first pass (closed and collected, or evicted).
        assert_eq!(write(None, Some(&1), &1), None);
    }
}
