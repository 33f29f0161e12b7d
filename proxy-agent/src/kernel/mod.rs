//! Stage 3, the only one that touches the kernel: the loaded programs and their
//! maps. This file loads the embedded object and pins its maps; `attach.rs`
//! attaches the programs, `maps.rs` reads and writes the maps, `migrate.rs`
//! carries an older agent's maps over, `cleanup.rs` removes it all,
//! `sock.rs` attaches the socket hooks, `ifaces.rs` follows pod interfaces, `netinfo.rs` reads the addresses and
//! the default route the uplink choice needs.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, ProgramArray,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{
            qdisc_add_clsact, qdisc_detach_program, NlOptions, SchedClassifierLink,
            TcAttachOptions, TcError, TcHandle,
        },
        xdp::XdpLink,
        Program, ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp,
        XdpMode,
    },
    Ebpf, EbpfLoader,
};
use proxy_common::{
    bench, capacity, map_names, program_names, AffinityKey4, AffinityKey6, AffinityValue, Backend4,
    Backend6, Config, Config6, CtKey4, CtKey6, CtValue, MaglevKey, Nat4, Nat6, NatPortKey4,
    NatPortKey6, RevNat4, RevNat6, ServiceCidrs, ServiceKey4, ServiceKey6, ServiceValue,
    SockConfig, SockRevKey4, SourceRange4, SourceRange6, StatCounter, Traffic, TrafficKey,
};
use tracing::{debug, info, warn};

use crate::desired::{gc, Capacity, MapOp, MapState};

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded at compile time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry.bpf.o"));

/// Where the maps are pinned unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ferry";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where Ferry's tc filters sit on a pod interface: a fixed priority and handle,
/// so a restarted agent replaces its own filters in place.
const TC_PRIORITY: u16 = 0x4652; // "FR"
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);
/// `uplink_tc6`, beside `uplink_tc` on the uplink's ingress.
const TC_HANDLE_UPLINK6: TcHandle = TcHandle::new(0, 2);

/// A map pinned with another size than `entries` asks for is never reused as
/// it is (the kernel cannot resize a map): its pin is renamed to `name` and
/// `previous::RESIZED_SUFFIX`, the loader makes a map of the new size, and
/// [`migrate::Migration`] carries the old entries into it before the programs
/// swap. A set-aside pin already there is what an interrupted resize left:
/// its entries are the ones to carry, and the pin of the wrong size goes.
fn set_aside_resized(pin_dir: &Path, entries: &[(&'static str, u32)]) -> Result<()> {
    for &(name, wanted) in entries {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = MapData::from_pin(&path)
            .with_context(|| format!("opening {}", path.display()))?
            .info()?
            .max_entries();
        if pinned == wanted {
            continue;
        }
        let aside = pin_dir.join(format!("{name}{}", proxy_common::previous::RESIZED_SUFFIX));
        if aside.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            warn!(
                map = name,
                "an earlier resize was interrupted; carrying its entries again"
            );
        } else {
            fs::rename(&path, &aside)
                .with_context(|| format!("renaming {} to {}", path.display(), aside.display()))?;
            info!(
                map = name,
                pinned, wanted, "map pinned with another size: its entries go into a new map"
            );
        }
    }
    Ok(())
}

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey4, ServiceValue>,
    /// An array: see `Backend4` and [`Dataplane::write`].
    backends: Array<MapData, Backend4>,
    revnat: HashMap<MapData, u32, RevNat4>,
    conntrack: HashMap<MapData, CtKey4, CtValue>,
    nat: HashMap<MapData, CtKey4, Nat4>,
    nat_ports: HashMap<MapData, NatPortKey4, u64>,
    affinity: HashMap<MapData, AffinityKey4, AffinityValue>,
    maglev: HashMap<MapData, MaglevKey, u32>,
    source_ranges: LpmTrie<MapData, SourceRange4, u8>,
    config: Array<MapData, Config>,
    /// None in an object older than the map (a benchmark's baseline).
    service_cidrs: Option<Array<MapData, ServiceCidrs>>,
    stats: PerCpuArray<MapData, StatCounter>,
    /// None in an object older than the map (a benchmark's baseline).
    traffic: Option<PerCpuHashMap<MapData, TrafficKey, Traffic>>,
    sock_revnat: HashMap<MapData, SockRevKey4, RevNat4>,
    sock_config: Array<MapData, SockConfig>,
    pub v6: Maps6,
    /// The socket hooks as loaded; None where the kernel refused them.
    sock_programs: Option<sock::SockPrograms>,
    /// Socket hooks attached without a pin directory: detached on drop.
    sock_links: Vec<FdLink>,
    /// Where maps (and XDP links) are pinned; None for private maps.
    pin_dir: Option<PathBuf>,
}

/// The IPv6 maps. The Maglev and round-robin maps serve both families.
pub struct Maps6 {
    pub services: HashMap<MapData, ServiceKey6, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend6>,
    pub revnat: HashMap<MapData, u32, RevNat6>,
    pub conntrack: HashMap<MapData, CtKey6, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey6, AffinityValue>,
    pub nat: HashMap<MapData, CtKey6, Nat6>,
    pub nat_ports: HashMap<MapData, NatPortKey6, u64>,
    pub source_ranges: LpmTrie<MapData, SourceRange6, u8>,
    pub config: Array<MapData, Config6>,
}

/// A timed run through a frame-restoring wrapper ([`Dataplane::run_wrapped`]).
pub struct WrappedRun {
    /// The last run's return code.
    pub verdict: u32,
    /// The frame as the last run left it.
    pub frame: Vec<u8>,
    /// The kernel's mean time per run, the wrapper included.
    pub per_run: Duration,
}

/// A wrapper set up for one program and frame ([`Dataplane::wrap`]).
pub struct Wrapped<'a> {
    wrapper: &'a Program,
    target: String,
    frame: Vec<u8>,
}

impl Wrapped<'_> {
    /// `repeat` runs, as [`Dataplane::run_wrapped`] times them.
    pub fn run(&self, repeat: u32) -> Result<WrappedRun> {
        let mut out = vec![0u8; self.frame.len() + 64];
        let opts = TestRunOptions {
            data_in: Some(&self.frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        };
        let result = match self.wrapper {
            Program::Xdp(p) => p.test_run(opts),
            Program::SchedClassifier(p) => p.test_run(opts),
            _ => bail!("the wrapper is neither XDP nor tc"),
        }
        .with_context(|| format!("test run of {} through its wrapper", self.target))?;
        out.truncate(result.data_size_out as usize);
        Ok(WrappedRun {
            verdict: result.return_value,
            frame: out,
            per_run: result.duration,
        })
    }
}

/// The flows of a wrapped run ([`Dataplane::run_wrapped`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tuples {
    /// Every run the frame as given: after the first, an established flow.
    Same,
    /// Every run a new source address and port (XDP, IPv4): a new flow each.
    Fresh,
    /// Every run the tuple of one of `flows` flows over `services` Services,
    /// in pseudo-random order (XDP, IPv4; see `proxy_common::bench::spread_flow`,
    /// whose flow 0 is the frame as given).
    Spread { flows: u32, services: u32 },
}

/// How the uplink program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkMode {
    /// XDP in the driver, with the tc program behind it for the packets XDP hands on.
    Native,
    /// XDP on the generic (skb) path, with the tc program behind it.
    Generic,
    /// The tc program alone, where XDP cannot attach.
    Tc,
}

impl UplinkMode {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Tc => "tc",
        }
    }
}

impl Dataplane {
    /// Loads the programs with their maps pinned under `pin_dir`, of `sizes`.
    /// Maps already pinned there are reused, so a restarted agent keeps every
    /// connection; one of another size is set aside for the migration to
    /// carry over (see `set_aside_resized`). `traffic_counters` off leaves
    /// the per-pair counting out of the programs (see `--traffic-counters`);
    /// `log_level` leaves out their log lines of more detailed levels.
    pub fn load_pinned(
        pin_dir: &Path,
        sizes: &MapSizes,
        traffic_counters: bool,
        log_level: diag::LogLevel,
    ) -> Result<Self> {
        Self::make_pin_dir(pin_dir)?;
        let entries = sizes.entries();
        // The statistics array grows when a counter is added.
        let stats = (map_names::STATS, proxy_common::stats::COUNT);
        set_aside_resized(pin_dir, &[&entries[..], &[stats]].concat())?;
        let paths: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, size) in entries {
            loader.map_max_entries(name, size);
        }
        // An object without it (older) counts nothing anyway.
        let counting = u8::from(traffic_counters);
        loader.override_global(TRAFFIC_COUNTERS, &counting, false);
        let slots = capacity::backend_slots(sizes.backends);
        size_backends(&mut loader, &slots);
        let level = log_level.value();
        loader.override_global(aya_log::LEVEL, &level, false);
        let mut dataplane = Self::load_with(&mut loader)?;
        dataplane.load_packet_programs()?;
        dataplane.pin_dir = Some(pin_dir.to_path_buf());
        Ok(dataplane)
    }

    /// Makes `pin_dir` on a bpf filesystem (mounting one at /sys/fs/bpf if
    /// there is none and the directory is below it).
    pub fn make_pin_dir(pin_dir: &Path) -> Result<()> {
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating the pin directory {}", pin_dir.display()))
    }

    /// Loads the programs with private maps that vanish with this value: for
    /// packet tests and simulations that must not touch a running agent's
    /// state. The packet programs go through the verifier when first run or
    /// attached (see [`Dataplane::program`]): a test of the pod path does not
    /// wait for the uplink's, which take the verifier twenty times as long.
    /// [`Dataplane::load_packet_programs`] loads them all at once.
    pub fn load_private() -> Result<Self> {
        Self::load_with(&mut EbpfLoader::new())
    }

    /// Private maps with room for `frontends` frontends of `backends_each`
    /// backends and `flows` flows: for benchmarks at scales beyond the
    /// default capacities. `traffic_counters` as the agent's flag of that
    /// name (the object's own default counts).
    pub fn load_private_sized(
        frontends: u32,
        backends_each: u32,
        flows: u32,
        traffic_counters: bool,
    ) -> Result<Self> {
        Self::load_private_sized_object(OBJECT, frontends, backends_each, flows, traffic_counters)
    }

    /// Private maps of `capacity`: for tests that fill them.
    pub fn load_private_with_capacity(capacity: &Capacity) -> Result<Self> {
        let entries = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let slots = capacity::backend_slots(entries(capacity.backends));
        let mut loader = EbpfLoader::new();
        size_backends(&mut loader, &slots);
        loader
            .map_max_entries(map_names::SERVICES_V4, entries(capacity.services))
            .map_max_entries(map_names::SERVICES_V6, entries(capacity.services))
            .map_max_entries(map_names::TRAFFIC, entries(capacity.services))
            .map_max_entries(map_names::BACKENDS_V6, entries(capacity.backends))
            .map_max_entries(map_names::REVNAT_V4, entries(capacity.revnat))
            .map_max_entries(map_names::REVNAT_V6, entries(capacity.revnat))
            .map_max_entries(map_names::ROUND_ROBIN, entries(capacity.revnat))
            .map_max_entries(map_names::MAGLEV_V4, entries(capacity.maglev))
            .map_max_entries(map_names::SOURCE_RANGES_V4, entries(capacity.source_ranges))
            .map_max_entries(map_names::SOURCE_RANGES_V6, entries(capacity.source_ranges));
        Self::load_with(&mut loader)
    }

    /// `load_private_sized` with another build of the programs: `object` is
    /// the bytes of an eBPF object file. For benchmarks that time two builds
    /// side by side in one run; the agent always loads the embedded object.
    pub fn load_private_sized_object(
        object: &[u8],
        frontends: u32,
        backends_each: u32,
        flows: u32,
        traffic_counters: bool,
    ) -> Result<Self> {
        let slots = frontends
            .saturating_mul(backends_each + 1)
            .max(capacity::SERVICES);
        let backends = frontends
            .saturating_mul(backends_each)
            .max(capacity::BACKENDS);
        // A frontend id each.
        let ids = frontends.saturating_add(1).max(capacity::REVNAT);
        // Two entries per flow.
        let conntrack = flows.saturating_mul(2).max(capacity::CONNTRACK);
        let backend_slots = capacity::backend_slots(backends);
        let mut loader = EbpfLoader::new();
        size_backends(&mut loader, &backend_slots);
        loader
            .map_max_entries(map_names::SERVICES_V4, slots)
            .map_max_entries(map_names::SERVICES_V6, slots)
            // As the agent sizes it: room for a pair per slot.
            .map_max_entries(map_names::TRAFFIC, slots)
            .map_max_entries(map_names::BACKENDS_V6, backends)
            .map_max_entries(map_names::REVNAT_V4, ids)
            .map_max_entries(map_names::REVNAT_V6, ids)
            .map_max_entries(map_names::ROUND_ROBIN, ids)
            .map_max_entries(map_names::CONNTRACK_V4, conntrack);
        // An object without the setting (older) counts nothing anyway.
        let counting = u8::from(traffic_counters);
        loader.override_global(TRAFFIC_COUNTERS, &counting, false);
        Self::load_object_with(&mut loader, object)
    }

    /// Whether the object has a program of that name (an older build may not).
    pub fn has_program(&self, name: &str) -> bool {
        self.ebpf.program(name).is_some()
    }

    /// The `pass_only` XDP program (loaded on first use): the benchmarks' floor.
    pub fn pass_only(&mut self) -> Result<&mut Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(bench::PASS_ONLY_XDP)
            .context("no pass_only program")?
            .try_into()?;
        if program.fd().is_err() {
            program.load()?;
        }
        Ok(program)
    }

    /// Runs the XDP or tc program `target` `repeat` times through its
    /// frame-restoring wrapper (see `proxy_common::bench`): every run starts
    /// from `frame`, which must be `bench::FRAME_LEN4` or `FRAME_LEN6`
    /// bytes (headers only, IPv4 or IPv6), and takes the path
    /// that frame takes, or with [`Tuples::Fresh`] (XDP, IPv4) the path of
    /// that frame from a source never seen. Returns the last run's verdict
    /// and frame, and the kernel's mean time per run, the wrapper's own
    /// cost included.
    pub fn run_wrapped(
        &mut self,
        target: &str,
        frame: &[u8],
        repeat: u32,
        tuples: Tuples,
    ) -> Result<WrappedRun> {
        self.wrap(target, frame, tuples)?.run(repeat)
    }

    /// Sets the wrapper up for `target`, `frame` and `tuples` (see
    /// [`Dataplane::run_wrapped`]): the result runs it, from any thread.
    pub fn wrap(&mut self, target: &str, frame: &[u8], tuples: Tuples) -> Result<Wrapped<'_>> {
        if ![bench::FRAME_LEN4, bench::FRAME_LEN6].contains(&frame.len()) {
            bail!(
                "the wrappers restore {} or {} bytes, the frame has {}",
                bench::FRAME_LEN4,
                bench::FRAME_LEN6,
                frame.len()
            );
        }
        let mut restored = [0u8; bench::FRAME_LEN6];
        restored[..frame.len()].copy_from_slice(frame);
        let mut frames: Array<&mut MapData, [u8; bench::FRAME_LEN6]> =
            Array::try_from(self.map(bench::FRAME_MAP)?)?;
        frames.set(0, restored, 0)?;
        if let Tuples::Spread { flows, services } = tuples {
            let mut config: Array<&mut MapData, bench::SpreadConfig> =
                Array::try_from(self.map(bench::SPREAD_MAP)?)?;
            config.set(0, bench::SpreadConfig { flows, services }, 0)?;
        }
        let program = self.load_on_demand(target)?;
        let xdp = matches!(program, Program::Xdp(_));
        let (wrapper, targets) = match tuples {
            Tuples::Same if xdp => (bench::WRAPPER_XDP, bench::XDP_TARGET_MAP),
            Tuples::Same => (bench::WRAPPER_TC, bench::TC_TARGET_MAP),
            Tuples::Fresh if xdp && frame.len() == bench::FRAME_LEN4 => {
                (bench::WRAPPER_XDP_FRESH, bench::XDP_TARGET_MAP)
            }
            Tuples::Spread { .. } if xdp && frame.len() == bench::FRAME_LEN4 => {
                (bench::WRAPPER_XDP_SPREAD, bench::XDP_TARGET_MAP)
            }
            Tuples::Fresh | Tuples::Spread { .. } => {
                bail!("fresh or spread tuples: XDP and IPv4 frames only")
            }
        };
        let fd = program.fd()?.try_clone()?;
        ProgramArray::try_from(self.map(targets)?)?.set(0, &fd, 0)?;
        self.load_on_demand(wrapper)?;
        let Some(wrapper) = self.ebpf.program(wrapper) else {
            bail!("no program {wrapper}");
        };
        Ok(Wrapped {
            wrapper,
            target: target.to_string(),
            frame: frame.to_vec(),
        })
    }

    /// A handle of its own on the IPv4 conntrack map, for emptying it
    /// between runs of a [`Wrapped`] (which holds the dataplane).
    pub fn conntrack_handle(&self) -> Result<aya::maps::HashMap<MapData, CtKey4, CtValue>> {
        let id = aya::maps::IterableMap::map(&self.conntrack).info()?.id();
        Ok(aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
            MapData::from_id(id)?,
        ))?)
    }

    /// The program `name`, an XDP or tc one, loaded if it was not yet.
    fn load_on_demand(&mut self, name: &str) -> Result<&mut Program> {
        let program = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?;
        if program.fd().is_err() {
            match program {
                Program::Xdp(p) => p.load()?,
                Program::SchedClassifier(p) => p.load()?,
                _ => bail!("{name} is neither XDP nor tc"),
            }
        }
        Ok(program)
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))
    }

    /// Kernels before 5.11 charge BPF map memory to RLIMIT_MEMLOCK, whose usual
    /// value (64 KiB to 8 MiB) is far below what the maps take: creating them
    /// fails with EPERM there. Best effort: going past the hard limit needs
    /// CAP_SYS_RESOURCE, and newer kernels charge the memory cgroup instead.
    fn raise_memlock_limit() {
        use aya::util::KernelVersion;
        if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 11, 0)) {
            // Charged to the memory cgroup: the limit does not apply.
            return;
        }
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut old) } != 0 {
            warn!(error = %io::Error::last_os_error(), "cannot read RLIMIT_MEMLOCK");
            return;
        }
        if old.rlim_cur == libc::RLIM_INFINITY {
            return;
        }
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
            info!(
                previous = old.rlim_cur,
                "raised RLIMIT_MEMLOCK to unlimited for the BPF maps"
            );
            return;
        }
        let error = io::Error::last_os_error();
        let to_hard = libc::rlimit {
            rlim_cur: old.rlim_max,
            rlim_max: old.rlim_max,
        };
        // SAFETY: as above.
        let raised = old.rlim_max > old.rlim_cur
            && unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &to_hard) } == 0;
        warn!(
            %error,
            limit = if raised { old.rlim_max } else { old.rlim_cur },
            "could not lift RLIMIT_MEMLOCK: on kernels before 5.11 creating the maps may fail \
             with EPERM (give the agent CAP_SYS_RESOURCE)"
        );
    }

    fn load_with(loader: &mut EbpfLoader<'_>) -> Result<Self> {
        Self::load_object_with(loader, OBJECT)
    }

    /// Loads every packet program (the agent does at start, so that a
    /// verifier's refusal stops it there, not at the first interface).
    /// Returns the instructions the verifier walked for each, as the kernel
    /// reports them (from 5.16; None before), against its limit of a
    /// million: how close a program is to being refused.
    pub fn load_packet_programs(&mut self) -> Result<Vec<(&'static str, Option<u32>)>> {
        let mut counts = Vec::new();
        for name in [
            program_names::FROM_POD,
            program_names::TO_POD,
            program_names::UPLINK_TC,
            program_names::UPLINK_TC6,
        ] {
            let info = self.program(name)?.info()?;
            counts.push((name, info.verified_instruction_count()));
        }
        let info = self.xdp_program()?.info()?;
        counts.push((program_names::UPLINK_XDP, info.verified_instruction_count()));
        Ok(counts)
    }

    fn load_object_with(loader: &mut EbpfLoader<'_>, object: &[u8]) -> Result<Self> {
        Self::raise_memlock_limit();
        // An object without it (older) reads the precise clock.
        static ON: u8 = 1;
        static OFF: u8 = 0;
        let coarse = if coarse_clock() { &ON } else { &OFF };
        loader.override_global(COARSE_CLOCK, coarse, false);
        let mut ebpf = loader.load(object).context("loading the eBPF object")?;
        // A kernel without them still gets every packet path.
        let sock_programs = match Self::load_sock_programs(&mut ebpf) {
            Ok(loaded) => Some(loaded),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "the socket hooks did not load: the node's own connections to Services are not served");
                None
            }
        };
        let service_cidrs = match ebpf.take_map(map_names::SERVICE_CIDRS) {
            Some(map) => Some(Array::try_from(map)?),
            None => None,
        };
        let traffic = match ebpf.take_map(map_names::TRAFFIC) {
            Some(map) => Some(PerCpuHashMap::try_from(map)?),
            None => None,
        };
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the object"))
        };
        let services = HashMap::try_from(take(map_names::SERVICES_V4)?)?;
        let backends = Array::try_from(take(map_names::BACKENDS_V4)?)?;
        let revnat = HashMap::try_from(take(map_names::REVNAT_V4)?)?;
        let conntrack = HashMap::try_from(take(map_names::CONNTRACK_V4)?)?;
        let nat = HashMap::try_from(take(map_names::NAT_V4)?)?;
        let nat_ports = HashMap::try_from(take(map_names::NAT_PORTS_V4)?)?;
        let affinity = HashMap::try_from(take(map_names::AFFINITY_V4)?)?;
        let maglev = HashMap::try_from(take(map_names::MAGLEV_V4)?)?;
        let source_ranges = LpmTrie::try_from(take(map_names::SOURCE_RANGES_V4)?)?;
        let config = Array::try_from(take(map_names::CONFIG)?)?;
        let stats = PerCpuArray::try_from(take(map_names::STATS)?)?;
        let sock_revnat = HashMap::try_from(take(map_names::SOCK_REVNAT_V4)?)?;
        let sock_config = Array::try_from(take(map_names::SOCK_CONFIG)?)?;
        let v6 = Maps6 {
            services: HashMap::try_from(take(map_names::SERVICES_V6)?)?,
            backends: HashMap::try_from(take(map_names::BACKENDS_V6)?)?,
            revnat: HashMap::try_from(take(map_names::REVNAT_V6)?)?,
            conntrack: HashMap::try_from(take(map_names::CONNTRACK_V6)?)?,
            affinity: HashMap::try_from(take(map_names::AFFINITY_V6)?)?,
            nat: HashMap::try_from(take(map_names::NAT_V6)?)?,
            nat_ports: HashMap::try_from(take(map_names::NAT_PORTS_V6)?)?,
            source_ranges: LpmTrie::try_from(take(map_names::SOURCE_RANGES_V6)?)?,
            config: Array::try_from(take(map_names::CONFIG_V6)?)?,
        };
        Ok(Self {
            ebpf,
            services,
            backends,
            revnat,
            conntrack,
            nat,
            nat_ports,
            affinity,
            maglev,
            source_ranges,
            config,
            service_cidrs,
            stats,
            traffic,
            sock_revnat,
            sock_config,
            v6,
            sock_programs,
            sock_links: Vec::new(),
            pin_dir: None,
        })
    }
}

/// The programs' load-time switch of the traffic counters.
const TRAFFIC_COUNTERS: &str = "TRAFFIC_COUNTERS";

/// The programs' load-time size of the IPv4 backends array.
const BACKEND_SLOTS: &str = "BACKEND_SLOTS";

/// Sizes the IPv4 backends array to `slots` (a power of two, see
/// `capacity::backend_slots`), and tells the programs, which find an id's
/// slot by it.
fn size_backends<'a>(loader: &mut EbpfLoader<'a>, slots: &'a u32) {
    loader.map_max_entries(map_names::BACKENDS_V4, *slots);
    loader.override_global(BACKEND_SLOTS, slots, false);
}

/// The programs' load-time choice of clock (see [`coarse_clock`]).
const COARSE_CLOCK: &str = "COARSE_CLOCK";

/// Whether the programs stamp flows with the coarse clock
/// (`bpf_ktime_get_coarse_ns`, Linux 5.11), which reads the time of the
/// last tick, where the precise one (`bpf_ktime_get_ns`) reads the clock
/// source: a third of an established packet's cost on these machines.
/// Both are CLOCK_MONOTONIC; the coarse one is at most a tick behind, which
/// lifetimes of seconds do not notice. Probed once, by loading a program
/// that calls it, for each program type that stamps flows.
pub fn coarse_clock() -> bool {
    use aya::{
        programs::ProgramType,
        sys::{is_helper_supported, BpfHelper},
    };
    static COARSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *COARSE.get_or_init(|| {
        let probe = |program| {
            is_helper_supported(program, BpfHelper::BPF_FUNC_ktime_get_coarse_ns)
                .unwrap_or_else(|e| {
                    warn!(error = %e, "probing for the coarse clock failed: the programs read the precise one");
                    false
                })
        };
        let coarse = probe(ProgramType::Xdp) && probe(ProgramType::SchedClassifier);
        if coarse {
            debug!("the programs stamp flows with the coarse clock");
        } else {
            info!("the kernel has no bpf_ktime_get_coarse_ns (5.11): the programs stamp flows with the precise clock");
        }
        coarse
    })
}

/// The clock the programs stamp entries with, as precise as the agent can
/// read it: CLOCK_MONOTONIC (the programs' coarse reading of it is at most a
/// tick behind, see [`coarse_clock`]).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Makes sure `dir` will live on a bpffs. Inside `ip netns exec` the machine's
/// bpffs is not visible; there a private one is mounted on /sys/fs/bpf.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe
            .parent()
            .context("pin directory has no existing ancestor")?;
    }
    if fs_magic(probe)? == BPF_FS_MAGIC {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) || probe != root {
        bail!(
            "{} is not on a bpf filesystem: mount one (mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        );
    }
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error()).context("mounting bpffs on /sys/fs/bpf");
    }
    info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

fn fs_magic(path: &Path) -> Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type)
}

pub mod batch;
pub mod diag;
pub mod fib_model;
pub mod sizes;
pub use sizes::MapSizes;
pub mod ifaces;
pub mod lock;
pub mod migrate;
pub mod monitor;
pub mod netinfo;
pub mod rtnl;
pub mod sock;

mod attach;
mod cleanup;
mod clsact;
mod maps;
pub use maps::remove_all;

pub use cleanup::{cleanup, Removed};
pub use sock::SocketLb;
