//! NodePort forwarding throughput on one core: Ferry's XDP path against
//! kube-proxy's rule sets (iptables through both backends, and nftables) on
//! the same topology, in one run. [`DESCRIPTION`] says how, for the results.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{Array, PerCpuArray, PerCpuValues},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use ferry_netns as netns;
use proxy_common::bench::{
    GenConfig, SinkCounts, FRAME_LEN4, FRAME_LEN6, FRAME_MAP, GENERATOR, GEN_MAP, SINK, SINK_MAP,
};

use super::{
    file_agent::{self, FileAgent},
    kube_proxy_rules::{self as rules, Protocol, ServicePort},
};

/// How the figures are made, written above the results.
pub const DESCRIPTION: &str = "\
Each dataplane gets three network namespaces, `ferry-bench-np<tag>-{gen,node,sink}`:

```text
 gen: g0 172.30.1.2 ── up0 172.30.1.1 (the node's address)          node
                       up1 10.244.2.1 ── s0 10.244.2.10 (the backend)  sink
```

- The generator is the dataplane object's `bench_gen`, run inside `gen` by
  BPF_PROG_TEST_RUN in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux
  5.18+, what xdp-trafficgen uses): batches of 64 UDP frames to the NodePort
  172.30.1.1:30080 from 64 source ports (64 flows, established after their
  first frame), each sent out of `g0` by XDP redirect: no system call, copy
  or socket per frame. The machine has no pktgen (no loadable modules) and
  Debian's xdp-trafficgen does not load on this kernel; AF_XDP and AF_PACKET
  senders were not tried. The ceiling row says what this generator reaches
  on its own.
- The NodePort's one endpoint is the backend behind `up1`, a remote endpoint:
  the node DNATs to it and SNATs to its own address. kube-proxy (its rule
  sets loaded with `iptables-legacy-restore`, `iptables-nft-restore` or
  `nft -f`, as in the vs-kube-proxy benchmark, with 1000 ClusterIP Services
  beside the NodePort): conntrack, the nat table's DNAT and MASQUERADE, the
  stack's forwarding. Ferry (the release agent serving the same Services from
  a file, `--uplink-iface up0 --uplink-mode native`): `uplink_xdp` on `up0`
  translates the frame and redirects it out of `up1`.
- For the kube-proxy rule sets `up0` runs a PASS-only XDP program: without an
  XDP program a veth does not take redirected frames.
- The receiver, `bench_sink` on `s0`, counts the frames that arrive
  translated (to 10.244.2.10:8080), and drops every frame. The ceiling is the
  generator alone, with the receiver on `up0` itself.
- The generator's thread is pinned to the last CPU, and a veth's receive
  work runs in a softirq on the CPU that queued it: the generator, the node
  and the receiver share one core. A sample is one generator run; its rate is
  the frames the receiver counted over the run's wall time. The dataplanes
  take turns, round after round, so that whatever else the machine does falls
  on all of them alike.
";

const PREFIX: &str = "ferry-bench-np";
/// Under the directory the other benchmarks' cleanup removes.
const PIN_DIR: &str = "/sys/fs/bpf/ferry-bench/np";

const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(172, 30, 1, 2);
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(172, 30, 1, 1);
const NODE_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const BACKEND_PORT: u16 = 8080;
const NODE_PORT: u16 = 30080;
const GEN_PORT: u16 = 40000;
const GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 2];
const UP0_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
const UP1_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 1];
const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 10];
/// Frames per generator batch: one NAPI poll's budget.
const BATCH: u32 = 64;
/// Source ports the frames spread over: flows, each established after its first frame.
const FLOWS: u32 = 64;
/// ClusterIP Services beside the NodePort, in every rule set and in Ferry's maps.
const OTHER_SERVICES: u32 = 1_000;

/// What forwards the frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No node: the receiver on `up0`. The generator's own limit.
    Ceiling,
    Ferry,
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

impl Mode {
    const ALL: [Self; 5] = [
        Self::Ceiling,
        Self::Ferry,
        Self::IptablesLegacy,
        Self::IptablesNft,
        Self::Nftables,
    ];

    fn tag(self) -> &'static str {
        match self {
            Self::Ceiling => "ceil",
            Self::Ferry => "ferry",
            Self::IptablesLegacy => "ipt",
            Self::IptablesNft => "iptnft",
            Self::Nftables => "nft",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Ceiling => "generator → XDP_DROP (ceiling)",
            Self::Ferry => "Ferry XDP",
            Self::IptablesLegacy => "kube-proxy iptables (legacy)",
            Self::IptablesNft => "kube-proxy iptables (nft backend)",
            Self::Nftables => "kube-proxy nftables",
        }
    }

    /// Where a frame arrives at the receiver when the node did its work.
    fn expected(self) -> (Ipv4Addr, u16) {
        match self {
            Self::Ceiling => (NODE_ADDR, NODE_PORT),
            _ => (BACKEND, BACKEND_PORT),
        }
    }
}

pub struct Settings {
    pub rounds: u32,
    /// Frames per sample.
    pub frames: u32,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 3,
                frames: 1_000_000,
            }
        } else {
            Self {
                rounds: 15,
                frames: 5_000_000,
            }
        }
    }
}

/// One generator run.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub sent: u64,
    /// Frames that reached the receiver translated as expected.
    pub delivered: u64,
    /// Frames that reached it otherwise.
    pub other: u64,
    pub seconds: f64,
}

impl Sample {
    /// Frames a second delivered.
    pub fn rate(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }
}

pub struct Row {
    pub mode: Mode,
    pub samples: Vec<Sample>,
}

impl Row {
    /// The median rate, in frames a second.
    pub fn median(&self) -> f64 {
        let mut rates: Vec<f64> = self.samples.iter().map(Sample::rate).collect();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    }

    fn range(&self) -> (f64, f64) {
        let rates = self.samples.iter().map(Sample::rate);
        (
            rates.clone().fold(f64::INFINITY, f64::min),
            rates.fold(0.0, f64::max),
        )
    }

    fn delivered_share(&self) -> f64 {
        let sent: u64 = self.samples.iter().map(|s| s.sent).sum();
        let delivered: u64 = self.samples.iter().map(|s| s.delivered).sum();
        delivered as f64 / sent as f64
    }
}

/// The generator's and the receiver's programs, loaded once from the
/// dataplane's object, and their maps.
struct Programs {
    ebpf: Ebpf,
}

impl Programs {
    fn load(object: &Path) -> Result<Self> {
        let bytes = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
        let mut ebpf = EbpfLoader::new()
            .load(&bytes)
            .context("loading the dataplane's object")?;
        fs::create_dir_all(PIN_DIR)?;
        for (name, pin) in [
            (GENERATOR, None),
            (SINK, Some("sink")),
            (PASS, Some("pass")),
        ] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name} in the object"))?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
            if let Some(pin) = pin {
                program.pin(Path::new(PIN_DIR).join(pin))?;
            }
        }
        let mut frame = [0u8; FRAME_LEN6];
        frame[..FRAME_LEN4].copy_from_slice(&udp_frame());
        Array::<_, [u8; FRAME_LEN6]>::try_from(ebpf.map_mut(FRAME_MAP).context("frame map")?)?
            .set(0, frame, 0)?;
        Ok(Self { ebpf })
    }

    fn configure(&mut self, config: GenConfig) -> Result<()> {
        Array::<_, GenConfig>::try_from(self.ebpf.map_mut(GEN_MAP).context("generator map")?)?
            .set(0, config, 0)?;
        Ok(())
    }

    /// The receiver's counts, summed over the CPUs.
    fn counts(&self) -> Result<SinkCounts> {
        let map = PerCpuArray::<_, SinkCounts>::try_from(
            self.ebpf.map(SINK_MAP).context("receiver map")?,
        )?;
        let values: PerCpuValues<SinkCounts> = map.get(&0, 0)?;
        Ok(values
            .iter()
            .fold(SinkCounts::default(), |a, c| SinkCounts {
                expected: a.expected + c.expected,
                other: a.other + c.other,
            }))
    }

    /// Sends `frames` frames from `topo`'s generator namespace, on `cpu`,
    /// and says what the receiver counted of them.
    fn run(&mut self, topo: &Topology, frames: u32, cpu: usize) -> Result<Sample> {
        let (daddr, dport) = topo.mode.expected();
        self.configure(GenConfig {
            ifindex: topo.gen_ifindex,
            flows: FLOWS,
            expect_daddr: daddr.octets(),
            expect_dport_be: dport.to_be(),
            _pad: 0,
        })?;
        let before = self.counts()?;
        let program: &Xdp = self
            .ebpf
            .program(GENERATOR)
            .context("the generator")?
            .try_into()?;
        let netns_file = fs::File::open(format!("/run/netns/{}", topo.namespaces[0]))?;
        let ifindex = topo.gen_ifindex;
        let seconds = thread::scope(|scope| {
            scope
                .spawn(move || -> Result<f64> {
                    // SAFETY: setns and the affinity of this thread only.
                    unsafe {
                        ensure!(
                            libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) == 0,
                            "entering the generator's namespace: {}",
                            std::io::Error::last_os_error()
                        );
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(cpu, &mut set);
                        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    }
                    let frame = udp_frame();
                    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
                    // rx_queue_index, egress_ifindex.
                    let md: [u32; 6] = [0, FRAME_LEN4 as u32, 0, ifindex, 0, 0];
                    let md_bytes: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
                    let start = Instant::now();
                    program
                        .test_run(TestRunOptions {
                            data_in: Some(&frame),
                            ctx_in: Some(&md_bytes),
                            repeat: frames,
                            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                            ..TestRunOptions::default()
                        })
                        .context("running the generator (live frames: Linux 5.18+)")?;
                    Ok(start.elapsed().as_secs_f64())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the generator's thread panicked"))?
        })?;
        // Frames a softirq left to ksoftirqd arrive a moment later.
        thread::sleep(Duration::from_millis(20));
        let after = self.counts()?;
        Ok(Sample {
            sent: u64::from(frames),
            delivered: after.expected - before.expected,
            other: after.other - before.other,
            seconds,
        })
    }
}

/// The PASS-only XDP program (the per-packet benchmark's floor).
const PASS: &str = proxy_common::bench::PASS_ONLY_XDP;

/// The generator's frame: UDP from 172.30.1.2:40000 to the NodePort, 12
/// bytes of payload, no UDP checksum (allowed over IPv4), `FRAME_LEN4` long.
pub fn udp_frame() -> [u8; FRAME_LEN4] {
    let mut f = [0u8; FRAME_LEN4];
    f[0..6].copy_from_slice(&UP0_MAC);
    f[6..12].copy_from_slice(&GEN_MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (FRAME_LEN4 - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&GEN_ADDR.octets());
    f[30..34].copy_from_slice(&NODE_ADDR.octets());
    let checksum = ip_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&checksum.to_be_bytes());
    f[34..36].copy_from_slice(&GEN_PORT.to_be_bytes());
    f[36..38].copy_from_slice(&NODE_PORT.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

/// The Internet checksum of an IPv4 header whose checksum field is zero.
fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Attaches the pinned XDP program `pin` to `dev` in `ns`, in native mode.
/// Through `nsenter --net`: `ip -n` would mount a /sys without the bpffs.
fn attach_pinned(ns: &str, dev: &str, pin: &str) -> Result<()> {
    let out = netns::enter(ns, "ip")
        .args(["link", "set", "dev", dev, "xdpdrv", "pinned", pin])
        .output()?;
    ensure!(
        out.status.success(),
        "attaching {pin} to {dev} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    netns::ip(args)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("ip {}: {e}", args.join(" ")))
}

/// One dataplane's namespaces (and, for Ferry, its agent); dropping it
/// removes them.
struct Topology {
    mode: Mode,
    /// gen, node, sink.
    namespaces: [String; 3],
    gen_ifindex: u32,
    agent: Option<FileAgent>,
    agent_pins: PathBuf,
}

impl Topology {
    fn new(mode: Mode) -> Result<Self> {
        let namespaces = ["gen", "node", "sink"].map(|r| format!("{PREFIX}{}-{r}", mode.tag()));
        let mut topo = Self {
            mode,
            namespaces: namespaces.clone(),
            gen_ifindex: 0,
            agent: None,
            agent_pins: Path::new(PIN_DIR).join(format!("agent-{}", mode.tag())),
        };
        let [gen, node, sink] = &namespaces;
        for ns in &namespaces {
            netns::add(ns)?;
        }
        ip(&[
            "link",
            "add",
            "g0",
            "address",
            &mac(GEN_MAC),
            "netns",
            gen,
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "address",
            &mac(UP0_MAC),
            "netns",
            node,
        ])?;
        ip(&[
            "link",
            "add",
            "up1",
            "address",
            &mac(UP1_MAC),
            "netns",
            node,
            "type",
            "veth",
            "peer",
            "name",
            "s0",
            "address",
            &mac(SINK_MAC),
            "netns",
            sink,
        ])?;
        for (ns, dev, addr) in [
            (gen, "g0", format!("{GEN_ADDR}/24")),
            (node, "up0", format!("{NODE_ADDR}/24")),
            (node, "up1", format!("{NODE_BACKEND_SIDE}/24")),
            (sink, "s0", format!("{BACKEND}/24")),
        ] {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        netns::sysctl(node, "net.ipv4.ip_forward=1")?;
        // The receiver drops ARP too: the node knows its neighbour already.
        ip(&[
            "-n",
            node,
            "neigh",
            "replace",
            &BACKEND.to_string(),
            "lladdr",
            &mac(SINK_MAC),
            "dev",
            "up1",
            "nud",
            "permanent",
        ])?;
        let link = netns::ip(&["-n", gen, "-o", "link", "show", "dev", "g0"])?;
        topo.gen_ifindex = link
            .split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .with_context(|| format!("the index of g0 in {link:?}"))?;
        let sink_pin = format!("{PIN_DIR}/sink");
        let pass_pin = format!("{PIN_DIR}/pass");
        match mode {
            Mode::Ceiling => attach_pinned(node, "up0", &sink_pin)?,
            Mode::Ferry => {}
            _ => attach_pinned(node, "up0", &pass_pin)?,
        }
        attach_pinned(sink, "s0", &sink_pin)?;
        Ok(topo)
    }

    fn node(&self) -> &str {
        &self.namespaces[1]
    }

    /// Loads the rule set or starts the agent, serving `services` (the
    /// NodePort among them).
    fn serve(&mut self, services: &[ServicePort], agent_bin: &Path, scratch: &Path) -> Result<()> {
        let node = self.node().to_string();
        let load = |program: &str, args: &[&str], text: String| -> Result<()> {
            super::vs_kube_proxy::run_with_input(netns::exec(&node, program).args(args), &text)
                .map(drop)
        };
        match self.mode {
            Mode::Ceiling => Ok(()),
            Mode::IptablesLegacy => load(
                "iptables-legacy-restore",
                &[],
                rules::iptables_full(services),
            ),
            Mode::IptablesNft => load("iptables-nft-restore", &[], rules::iptables_full(services)),
            Mode::Nftables => load("nft", &["-f", "-"], rules::nft_full(services, &[NODE_ADDR])),
            Mode::Ferry => self.start_agent(services, agent_bin, scratch),
        }
    }

    fn start_agent(
        &mut self,
        services: &[ServicePort],
        agent_bin: &Path,
        scratch: &Path,
    ) -> Result<()> {
        let file = scratch.join("nodeport-services.json");
        let json = file_agent::services_file(services, &[NODE_ADDR], false);
        fs::write(&file, serde_json::to_vec(&json)?)?;
        let args = [
            "--uplink-iface",
            "up0",
            "--uplink-mode",
            "native",
            "--pod-iface-pattern",
            "none-such*",
            "--socket-lb",
            "off",
        ]
        .map(Into::into);
        self.agent = Some(FileAgent::start(
            self.node(),
            agent_bin,
            &file,
            &self.agent_pins,
            &args,
        )?);
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Stopped first, its pins removed.
        self.agent.take();
        for ns in &self.namespaces {
            let _ = netns::delete(ns);
        }
    }
}

/// The Services every dataplane serves: `OTHER_SERVICES` ClusterIPs and, last,
/// the UDP NodePort whose one endpoint is the backend.
fn services() -> Vec<ServicePort> {
    let mut all = rules::services(OTHER_SERVICES, &[(BACKEND, BACKEND_PORT)]);
    all.push(ServicePort {
        name: "bench/nodeport:udp".into(),
        vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + OTHER_SERVICES),
        port: 80,
        protocol: Protocol::Udp,
        node_port: Some(NODE_PORT),
        endpoints: vec![(BACKEND, BACKEND_PORT)],
    });
    all
}

/// Runs every dataplane, round after round, and returns their samples.
pub fn measure(
    settings: &Settings,
    object: &Path,
    agent_bin: &Path,
    scratch: &Path,
) -> Result<Vec<Row>> {
    let cpu = thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let mut programs = Programs::load(object)?;
    let services = services();
    let mut topologies = Vec::new();
    for mode in Mode::ALL {
        eprintln!("bench: NodePort throughput, setting up {}", mode.label());
        let mut topo = Topology::new(mode)?;
        topo.serve(&services, agent_bin, scratch)?;
        topologies.push(topo);
    }
    // Each dataplane forwards, and every flow is established, before the
    // first sample; the agent has a minute to program its maps.
    for topo in &mut topologies {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let probe = programs.run(topo, FLOWS * 16, cpu)?;
            if probe.delivered == probe.sent {
                break;
            }
            if let Some(exit) = topo.agent.as_mut().and_then(FileAgent::exited) {
                bail!("{exit}");
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: {} of {} frames arrived translated ({} otherwise) after 60 s",
                    topo.mode.label(),
                    probe.delivered,
                    probe.sent,
                    probe.other
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
    let mut rows: Vec<Row> = Mode::ALL
        .iter()
        .map(|&mode| Row {
            mode,
            samples: Vec::new(),
        })
        .collect();
    for round in 0..settings.rounds {
        eprintln!(
            "bench: NodePort throughput, round {}/{}",
            round + 1,
            settings.rounds
        );
        for (topo, row) in topologies.iter().zip(&mut rows) {
            let sample = programs.run(topo, settings.frames, cpu)?;
            if sample.other > 0 {
                bail!(
                    "{}: {} frames reached the backend untranslated or mistranslated",
                    topo.mode.label(),
                    sample.other
                );
            }
            row.samples.push(sample);
        }
    }
    drop(topologies);
    let _ = fs::remove_dir_all(PIN_DIR);
    Ok(rows)
}

/// The table.
pub fn render(rows: &[Row], settings: &Settings) -> String {
    let rate = |mode: Mode| {
        rows.iter()
            .find(|r| r.mode == mode)
            .map_or(f64::NAN, Row::median)
    };
    let (ceiling, ferry) = (rate(Mode::Ceiling), rate(Mode::Ferry));
    // What the node adds per frame: the frame's time less the generator's
    // and receiver's own (the ceiling's).
    let node_ns = |r: f64| 1e9 / r - 1e9 / ceiling;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{} rounds; in each, every dataplane in turn forwards one generator run of {} frames\n\
         ({}-frame batches, {FLOWS} flows, 54-byte UDP frames). Rates are medians over the rounds\n\
         (min..max beside). `node ns/frame` is the frame's time on the core less the\n\
         ceiling's (the generator and the receiver alone): what the node's forwarding adds.\n",
        settings.rounds, settings.frames, BATCH
    );
    md.push_str("| dataplane | Mpps (median) | min..max | delivered | node ns/frame | Ferry's rate / this | this node ns / Ferry's |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for row in rows {
        let (min, max) = row.range();
        let median = row.median();
        let (net, ratio_ns) = if row.mode == Mode::Ceiling {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.0}", node_ns(median)),
                format!("{:.2}", node_ns(median) / node_ns(ferry)),
            )
        };
        let _ = writeln!(
            md,
            "| {} | {:.3} | {:.3}..{:.3} | {:.2}% | {net} | {:.2} | {ratio_ns} |",
            row.mode.label(),
            median / 1e6,
            min / 1e6,
            max / 1e6,
            row.delivered_share() * 100.0,
            ferry / median,
        );
    }
    md
}

/// Median rates in million frames a second, for the plot.
pub fn bars(rows: &[Row]) -> Vec<(String, f64)> {
    rows.iter()
        .map(|r| (r.mode.label().to_string(), r.median() / 1e6))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generators_frame_is_a_valid_udp_datagram_to_the_node_port() {
        let f = udp_frame();
        assert_eq!(&f[0..6], &UP0_MAC);
        assert_eq!(u16::from_be_bytes([f[12], f[13]]), 0x0800);
        // A header whose checksum is right sums to 0xffff.
        let mut header = [0u8; 20];
        header.copy_from_slice(&f[14..34]);
        assert_eq!(ip_checksum(&header), 0);
        assert_eq!(
            usize::from(u16::from_be_bytes([f[16], f[17]])),
            FRAME_LEN4 - 14
        );
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), NODE_PORT);
        assert_eq!(
            usize::from(u16::from_be_bytes([f[38], f[39]])),
            FRAME_LEN4 - 34
        );
        assert_eq!(Ipv4Addr::from([f[30], f[31], f[32], f[33]]), NODE_ADDR);
    }

    #[test]
    fn the_node_port_is_the_last_service_and_udp() {
        let all = services();
        assert_eq!(all.len() as u32, OTHER_SERVICES + 1);
        let np = all.last().unwrap();
        assert_eq!(
            (np.protocol, np.node_port),
            (Protocol::Udp, Some(NODE_PORT))
        );
        assert!(all[..all.len() - 1].iter().all(|s| s.node_port.is_none()));
    }
}
