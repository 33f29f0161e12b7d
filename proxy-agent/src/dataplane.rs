//! Kernel I/O: loading the embedded programs, pinning their maps, attaching them
//! to pod interfaces, applying map writes, and removing all of it again.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, ProgramArray,
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
    bench, capacity, map_names, nat_ports, program_names, stats::Stat, AffinityKey4,
    AffinityValue4, Backend4, Config, CtKey4, CtValue4, MaglevKey4, Nat4, NatPortKey4, RevNat4,
    ServiceKey4, ServiceValue, SourceRange4, StatCounter,
};
use tracing::{debug, info, warn};

use crate::{
    gc,
    state::{MapOp, MapState},
};

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded at compile time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry.bpf.o"));

/// Where the maps are pinned unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ferry";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where Ferry's tc filters sit on a pod interface: a fixed priority and handle,
/// so a restarted agent replaces its own filters in place.
const TC_PRIORITY: u16 = 0x4652; // "FR"
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey4, ServiceValue>,
    backends: HashMap<MapData, u32, Backend4>,
    revnat: HashMap<MapData, u32, RevNat4>,
    conntrack: HashMap<MapData, CtKey4, CtValue4>,
    nat: HashMap<MapData, CtKey4, Nat4>,
    nat_ports: HashMap<MapData, NatPortKey4, u64>,
    affinity: HashMap<MapData, AffinityKey4, AffinityValue4>,
    maglev: HashMap<MapData, MaglevKey4, u32>,
    source_ranges: LpmTrie<MapData, SourceRange4, u8>,
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, StatCounter>,
    /// Where maps (and XDP links) are pinned; None for private maps.
    pin_dir: Option<PathBuf>,
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
    /// Loads the programs with their maps pinned under `pin_dir`. Maps already
    /// pinned there are reused, so a restarted agent keeps every connection.
    pub fn load_pinned(pin_dir: &Path) -> Result<Self> {
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating the pin directory {}", pin_dir.display()))?;
        let paths: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut dataplane = Self::load_with(&mut loader)?;
        dataplane.pin_dir = Some(pin_dir.to_path_buf());
        Ok(dataplane)
    }

    /// Loads the programs with private maps that vanish with this value: for
    /// packet tests and simulations that must not touch a running agent's state.
    pub fn load_private() -> Result<Self> {
        Self::load_with(&mut EbpfLoader::new())
    }

    /// Private maps with room for `frontends` frontends of `backends_each`
    /// backends: for benchmarks at scales beyond the default capacities.
    pub fn load_private_sized(frontends: u32, backends_each: u32) -> Result<Self> {
        Self::load_private_sized_object(OBJECT, frontends, backends_each)
    }

    /// `load_private_sized` with another build of the programs: `object` is
    /// the bytes of an eBPF object file. For benchmarks that time two builds
    /// side by side in one run; the agent always loads the embedded object.
    pub fn load_private_sized_object(
        object: &[u8],
        frontends: u32,
        backends_each: u32,
    ) -> Result<Self> {
        let slots = frontends
            .saturating_mul(backends_each + 1)
            .max(capacity::SERVICES);
        let backends = frontends
            .saturating_mul(backends_each)
            .max(capacity::BACKENDS);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::SERVICES_V4, slots)
            .map_max_entries(map_names::BACKENDS_V4, backends);
        Self::load_object_with(&mut loader, object)
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
    /// from `frame`, which must be `bench::FRAME_LEN` bytes, and takes the path
    /// that frame takes. Returns the last run's verdict and frame, and the
    /// kernel's mean time per run, the wrapper's own cost included.
    pub fn run_wrapped(&mut self, target: &str, frame: &[u8], repeat: u32) -> Result<WrappedRun> {
        let restored: [u8; bench::FRAME_LEN] = frame.try_into().with_context(|| {
            format!(
                "the wrappers restore {} bytes, the frame has {}",
                bench::FRAME_LEN,
                frame.len()
            )
        })?;
        let mut frames: Array<&mut MapData, [u8; bench::FRAME_LEN]> =
            Array::try_from(self.map(bench::FRAME_MAP)?)?;
        frames.set(0, restored, 0)?;
        let program = self.load_on_demand(target)?;
        let (wrapper, targets) = if matches!(program, Program::Xdp(_)) {
            (bench::WRAPPER_XDP, bench::XDP_TARGET_MAP)
        } else {
            (bench::WRAPPER_TC, bench::TC_TARGET_MAP)
        };
        let fd = program.fd()?.try_clone()?;
        ProgramArray::try_from(self.map(targets)?)?.set(0, &fd, 0)?;
        let mut out = vec![0u8; frame.len() + 64];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        };
        let result = match self.load_on_demand(wrapper)? {
            Program::Xdp(p) => p.test_run(opts),
            Program::SchedClassifier(p) => p.test_run(opts),
            _ => bail!("{wrapper} is neither XDP nor tc"),
        }
        .with_context(|| format!("test run of {target} through {wrapper}"))?;
        out.truncate(result.data_size_out as usize);
        Ok(WrappedRun {
            verdict: result.return_value,
            frame: out,
            per_run: result.duration,
        })
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

    fn load_object_with(loader: &mut EbpfLoader<'_>, object: &[u8]) -> Result<Self> {
        Self::raise_memlock_limit();
        let mut ebpf = loader.load(object).context("loading the eBPF object")?;
        for name in [
            program_names::FROM_POD,
            program_names::TO_POD,
            program_names::UPLINK_TC,
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::UPLINK_XDP)
            .context("program uplink_xdp missing from the object")?
            .try_into()?;
        xdp.load().context("the verifier rejected uplink_xdp")?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the object"))
        };
        let services = HashMap::try_from(take(map_names::SERVICES_V4)?)?;
        let backends = HashMap::try_from(take(map_names::BACKENDS_V4)?)?;
        let revnat = HashMap::try_from(take(map_names::REVNAT_V4)?)?;
        let conntrack = HashMap::try_from(take(map_names::CONNTRACK_V4)?)?;
        let nat = HashMap::try_from(take(map_names::NAT_V4)?)?;
        let nat_ports = HashMap::try_from(take(map_names::NAT_PORTS_V4)?)?;
        let affinity = HashMap::try_from(take(map_names::AFFINITY_V4)?)?;
        let maglev = HashMap::try_from(take(map_names::MAGLEV_V4)?)?;
        let source_ranges = LpmTrie::try_from(take(map_names::SOURCE_RANGES_V4)?)?;
        let config = Array::try_from(take(map_names::CONFIG)?)?;
        let stats = PerCpuArray::try_from(take(map_names::STATS)?)?;
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
            stats,
            pin_dir: None,
        })
    }

    /// The uplink XDP program.
    pub fn xdp_program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(program_names::UPLINK_XDP)
            .context("no uplink_xdp program")?
            .try_into()?)
    }

    /// Attaches the uplink programs to the node's uplink: XDP (native if the
    /// driver has it, else generic) with the tc program behind it, or the tc
    /// program alone when XDP cannot attach. `wanted` limits the choice.
    pub fn attach_uplink(&mut self, iface: &str, wanted: Option<UplinkMode>) -> Result<UplinkMode> {
        // The tc program runs in every mode: alone, or behind XDP for what XDP hands on.
        self.attach_tc(iface, program_names::UPLINK_TC, TcAttachType::Ingress)?;
        let tries: &[(UplinkMode, XdpMode)] = match wanted {
            Some(UplinkMode::Tc) => &[],
            Some(UplinkMode::Native) => &[(UplinkMode::Native, XdpMode::Driver)],
            Some(UplinkMode::Generic) => &[(UplinkMode::Generic, XdpMode::Skb)],
            None => &[
                (UplinkMode::Native, XdpMode::Driver),
                (UplinkMode::Generic, XdpMode::Skb),
            ],
        };
        // The pin's name says the mode: `xdp_<mode>_<iface>`.
        let pin_dir = self.pin_dir.clone();
        let pin = |mode: UplinkMode| {
            pin_dir
                .as_ref()
                .map(|d| d.join(format!("xdp_{}_{iface}", mode.name())))
        };
        // An XDP link an earlier agent pinned: swap our program into it in one step.
        for mode in [UplinkMode::Native, UplinkMode::Generic] {
            let Some(path) = pin(mode).filter(|p| p.exists()) else {
                continue;
            };
            if wanted.is_some_and(|w| w != mode) {
                bail!(
                    "{iface} has a {} XDP link pinned at {}; run cleanup first",
                    mode.name(),
                    path.display()
                );
            }
            let fd_link: FdLink = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening {}", path.display()))?
                .into();
            let program = self.xdp_program()?;
            let link_id = program.attach_to_link(XdpLink::try_from(fd_link)?)?;
            std::mem::forget(program.take_link(link_id)?);
            info!(
                iface,
                mode = mode.name(),
                "uplink XDP program replaced in its pinned link"
            );
            return Ok(mode);
        }
        for (mode, xdp_mode) in tries {
            let program = self.xdp_program()?;
            match program.attach(iface, *xdp_mode) {
                Ok(link_id) => {
                    let link = program.take_link(link_id)?;
                    match (FdLink::try_from(link), pin(*mode)) {
                        // A bpf_link lives while a file descriptor or a pin holds it:
                        // pinned, it outlives the agent as the tc filters do.
                        (Ok(fd_link), Some(path)) => {
                            fd_link
                                .pin(&path)
                                .with_context(|| format!("pinning {}", path.display()))?;
                        }
                        (Ok(fd_link), None) => std::mem::forget(fd_link),
                        // Kernels before 5.9 attach through netlink: that stays by itself.
                        (Err(_), _) => {}
                    }
                    info!(iface, mode = mode.name(), "uplink attached");
                    return Ok(*mode);
                }
                Err(e) => warn!(iface, mode = mode.name(), error = %e, "XDP attach failed"),
            }
        }
        if wanted.is_some_and(|w| w != UplinkMode::Tc) {
            bail!("XDP could not attach to {iface} in the requested mode");
        }
        info!(iface, mode = "tc", "uplink attached");
        Ok(UplinkMode::Tc)
    }

    /// Writes the node-wide settings.
    pub fn set_config(&mut self, config: Config) -> Result<()> {
        self.config.set(0, config, 0)?;
        Ok(())
    }

    /// Removes affinity entries that name a backend their frontend no longer
    /// sends new connections to. Returns how many went.
    pub fn prune_affinity(&mut self, state: &MapState) -> Result<usize> {
        let entries: Vec<(AffinityKey4, AffinityValue4)> =
            self.affinity.iter().filter_map(Result::ok).collect();
        if entries.is_empty() {
            // The usual case: no sessionAffinity client. Skip the set of every
            // (frontend, backend) pair, which costs a walk over all slots.
            return Ok(0);
        }
        let allowed = state.slot_pairs();
        let stale: Vec<AffinityKey4> = entries
            .into_iter()
            .filter(|(k, v)| !allowed.contains(&(k.rev_nat_id, v.backend_id)))
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            // Gone already (LRU) is fine.
            let _ = self.affinity.remove(key);
        }
        Ok(stale.len())
    }

    /// Every affinity entry.
    pub fn affinity(&self) -> Result<Vec<(AffinityKey4, AffinityValue4)>> {
        Ok(self.affinity.iter().collect::<Result<_, _>>()?)
    }

    /// Every NAT entry.
    pub fn nat(&self) -> Result<Vec<(CtKey4, Nat4)>> {
        Ok(self.nat.iter().collect::<Result<_, _>>()?)
    }

    /// Every NAT-port word (see `proxy_common::NatPortKey4`).
    pub fn nat_ports(&self) -> Result<Vec<(NatPortKey4, u64)>> {
        Ok(self.nat_ports.iter().collect::<Result<_, _>>()?)
    }

    /// One of the loaded programs, by name (see `proxy_common::program_names`).
    pub fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    /// Attaches `from_pod` to tc ingress and `to_pod` to tc egress of a pod's
    /// host-side interface. The filters stay after this process exits; `cleanup`
    /// removes them.
    pub fn attach_pod_interface(&mut self, iface: &str) -> Result<()> {
        self.attach_tc(iface, program_names::FROM_POD, TcAttachType::Ingress)?;
        self.attach_tc(iface, program_names::TO_POD, TcAttachType::Egress)?;
        info!(iface, "attached");
        Ok(())
    }

    /// Attaches one tc program. Ferry's filters sit at a fixed priority and
    /// handle, so a filter an earlier agent left there is replaced in one step,
    /// without a gap. Netlink filters, not tcx links: they work from 5.10 on and
    /// outlive the agent.
    fn attach_tc(&mut self, iface: &str, name: &str, attach_type: TcAttachType) -> Result<()> {
        match qdisc_add_clsact(iface) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("adding clsact to {iface}")),
        }
        let program = self.program(name)?;
        let options = NlOptions {
            priority: TC_PRIORITY,
            handle: TC_HANDLE,
            ..NlOptions::default()
        };
        let link_id = match program.attach_with_options(
            iface,
            attach_type,
            TcAttachOptions::Netlink(options),
        ) {
            Ok(id) => Ok(id),
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                let existing = SchedClassifierLink::attached(
                    iface,
                    attach_type,
                    TC_PRIORITY,
                    TC_HANDLE,
                    None,
                )?;
                program.attach_to_link(existing)
            }
            Err(e) => Err(e),
        }
        .with_context(|| format!("attaching {name} to {iface}"))?;
        let link = program.take_link(link_id)?;
        // Dropping the link would detach it; the filter must stay.
        std::mem::forget(link);
        Ok(())
    }

    /// What the service, backend and reverse-NAT maps hold now.
    pub fn read_state(&self) -> Result<MapState> {
        let mut state = MapState::default();
        for entry in self.services.iter() {
            let (k, v) = entry?;
            state.services.insert(k, v);
        }
        for entry in self.backends.iter() {
            let (k, v) = entry?;
            state.backends.insert(k, v);
        }
        for entry in self.revnat.iter() {
            let (k, v) = entry?;
            state.revnat.insert(k, v);
        }
        for entry in self.maglev.iter() {
            let (k, v) = entry?;
            state.maglev.insert(k, v);
        }
        for entry in self.source_ranges.iter() {
            let (k, _) = entry?;
            state.source_ranges.insert((k.prefix_len(), k.data()));
        }
        Ok(state)
    }

    /// Applies map writes in order. Stops at the first failure (a full map, say),
    /// leaving the maps consistent: every write before it was make-before-break.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<()> {
        for op in ops {
            debug!(?op, "map write");
            match *op {
                MapOp::PutBackend(id, b) => self.backends.insert(id, b, 0),
                MapOp::PutRevNat(id, r) => self.revnat.insert(id, r, 0),
                MapOp::PutService(k, v) => self.services.insert(k, v, 0),
                MapOp::PutSourceRange(prefix, data) => {
                    self.source_ranges.insert(&LpmKey::new(prefix, data), 1, 0)
                }
                MapOp::PutMaglev(key, backend_id) => self.maglev.insert(key, backend_id, 0),
                MapOp::DelMaglev(key) => self.maglev.remove(&key),
                MapOp::DelSourceRange(prefix, data) => {
                    self.source_ranges.remove(&LpmKey::new(prefix, data))
                }
                MapOp::DelService(k) => self.services.remove(&k),
                MapOp::DelRevNat(id) => self.revnat.remove(&id),
                MapOp::DelBackend(id) => self.backends.remove(&id),
            }
            .with_context(|| format!("map write {op:?}"))?;
        }
        Ok(())
    }

    /// Removes the conntrack and NAT entries whose flows ended, frees their
    /// NAT ports and takes the per-backend exhaustion counts (see [`gc`]), at
    /// `now_ns` (the programs' clock, see [`monotonic_ns`]).
    pub fn gc(&mut self, now_ns: u64, lifetimes: &gc::Lifetimes) -> Result<gc::Report> {
        let snapshot = gc::Snapshot {
            conntrack: self.conntrack.iter().filter_map(Result::ok).collect(),
            nat: self.nat.iter().filter_map(Result::ok).collect(),
            nat_ports: self.nat_ports.iter().filter_map(Result::ok).collect(),
            revnat: self.revnat.iter().filter_map(Result::ok).collect(),
            nat_range: self
                .config
                .get(&0, 0)
                .ok()
                .map(|c| (c.nat_port_min, c.nat_port_max)),
        };
        let plan = gc::plan(&snapshot, now_ns, lifetimes);
        let mut report = gc::Report {
            conntrack_entries: snapshot.conntrack.len(),
            nat_entries: snapshot.nat.len(),
            exhausted: plan.exhausted,
            held: plan.held,
            ..Default::default()
        };
        // The programs may have renewed an entry since the snapshot (a client
        // reusing the tuple): only one still expired is deleted, read again
        // just before. Deleting a renewed entry would cut its flow.
        for key in &plan.conntrack {
            let still = self.conntrack.get(key, 0);
            if still.is_ok_and(|v| {
                now_ns.saturating_sub(v.last_seen_ns) > lifetimes.nanos(key.proto, v.flags)
            }) && self.conntrack.remove(key).is_ok()
            {
                report.conntrack_removed += 1;
            }
        }
        let before: std::collections::HashMap<CtKey4, Nat4> = snapshot.nat.into_iter().collect();
        for key in &plan.nat {
            // Unchanged since the snapshot: no packet of its flow came by.
            if self.nat.get(key, 0).ok() == before.get(key).copied() && self.nat.remove(key).is_ok()
            {
                report.nat_removed += 1;
            }
        }
        // Bits the programs set since the snapshot are kept: they belong to
        // flows the snapshot did not see.
        for (key, seen, wanted) in &plan.nat_ports {
            let now = self.nat_ports.get(key, 0).unwrap_or(0);
            let since = now & !seen;
            let result = match wanted {
                None if since == 0 || key.index == nat_ports::DROPS => self.nat_ports.remove(key),
                None => self.nat_ports.insert(key, since, 0),
                Some(bits) if bits | since == now => continue,
                Some(bits) => self.nat_ports.insert(key, bits | since, 0),
            };
            // Gone already, or a full map: the next collection tries again.
            if let Err(e) = result {
                debug!(?key, error = %e, "NAT-port word");
            }
        }
        report.conntrack_entries -= report.conntrack_removed;
        report.nat_entries -= report.nat_removed;
        Ok(report)
    }

    /// Writes one conntrack entry (for tests and repairs).
    pub fn set_conntrack(&mut self, key: CtKey4, value: CtValue4) -> Result<()> {
        self.conntrack.insert(key, value, 0)?;
        Ok(())
    }

    /// Removes every conntrack entry.
    pub fn flush_conntrack(&mut self) -> Result<usize> {
        let keys: Vec<CtKey4> = self.conntrack.keys().collect::<Result<_, _>>()?;
        for key in &keys {
            let _ = self.conntrack.remove(key);
        }
        Ok(keys.len())
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Result<Vec<(CtKey4, CtValue4)>> {
        Ok(self.conntrack.iter().collect::<Result<_, _>>()?)
    }

    /// The statistics counters summed over CPUs, by name.
    pub fn stats(&self) -> Result<Vec<(&'static str, StatCounter)>> {
        let mut out = Vec::with_capacity(Stat::ALL.len());
        for stat in Stat::ALL {
            let per_cpu = self.stats.get(&stat.index(), 0)?;
            let mut total = StatCounter::default();
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
            out.push((stat.name(), total));
        }
        Ok(out)
    }
}

/// The clock the programs stamp entries with (bpf_ktime_get_ns: CLOCK_MONOTONIC).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Detaches every filter named `name` from one hook of `iface`; none is fine.
fn detach(iface: &str, attach_type: TcAttachType, name: &str) -> Result<bool> {
    match qdisc_detach_program(iface, attach_type, name) {
        Ok(()) => Ok(true),
        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        // No clsact qdisc on this interface: nothing of ours can be there.
        Err(TcError::NetlinkError(e))
            if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) =>
        {
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("detaching {name} from {iface}")),
    }
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

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub filters: Vec<String>,
    pub pins: Vec<PathBuf>,
}

/// Removes every Ferry filter from every interface of this network namespace,
/// and every map pinned under `pin_dir` (then the directory itself).
pub fn cleanup(pin_dir: &Path) -> Result<Removed> {
    let mut removed = Removed::default();
    for (_, iface) in crate::ifaces::current()? {
        for (name, attach_type) in [
            (program_names::FROM_POD, TcAttachType::Ingress),
            (program_names::TO_POD, TcAttachType::Egress),
            (program_names::UPLINK_TC, TcAttachType::Ingress),
        ] {
            if detach(&iface, attach_type, name)? {
                removed
                    .filters
                    .push(format!("{iface} {attach_type:?} {name}"));
            }
        }
    }
    if pin_dir.exists() {
        for entry in fs::read_dir(pin_dir)? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.pins.push(path);
        }
        fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    Ok(removed)
}
