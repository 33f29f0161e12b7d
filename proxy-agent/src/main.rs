//! The `proxy-agent` binary: its command line (run, simulate, inspect, monitor,
//! cleanup), handed to the library's stages; every flag also an environment
//! variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
#[cfg(feature = "harness")]
use proxy_agent::cli::simulate;
use proxy_agent::{
    agent::{self, Source},
    cli::{inspect, monitor},
    frontend::{Cidr, Scheduler},
    k8s::nodes::NodePortAddresses,
    kernel::{self, MapSizes, SocketLb, UplinkMode, DEFAULT_PIN_DIR},
    settings,
    uplink::UplinkRequest,
};
use proxy_common::capacity;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

/// Ferry's node agent: an eBPF replacement for kube-proxy.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve this node: watch the API server (or read a services file), keep the
    /// maps programmed, attach the programs to pod interfaces as they appear.
    /// Programs and maps stay in place when the agent stops, so traffic goes on;
    /// the next agent adopts them.
    Run(Box<RunArgs>),
    /// Where does this packet go? Loads the real programs into private maps filled
    /// from the Service, EndpointSlice and Node manifests in DIR as NODE's agent
    /// would, runs the packet through them and prints the verdict, the rewritten
    /// addresses and the backends the packet could have gone to.
    #[cfg(feature = "harness")]
    Simulate {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long)]
        node: String,
        /// e.g. 'TCP 10.244.1.2:40000 -> 10.96.0.10:80'
        #[arg(long)]
        packet: simulate::PacketSpec,
        /// The hook the packet enters: pod (a pod's veth) or uplink (the node's uplink, tc twin).
        #[arg(long, default_value = "pod")]
        from: simulate::Hook,
        #[arg(long, env = "FERRY_SCHEDULER", default_value = "flow-hash")]
        scheduler: Scheduler,
        /// The service CIDRs, as `run --service-cidr` takes them.
        #[arg(long = "service-cidr", value_delimiter = ',')]
        service_cidrs: Vec<Cidr>,
        #[arg(long)]
        json: bool,
    },
    /// Print the pinned maps as tables.
    Inspect {
        #[arg(value_parser = inspect::KINDS)]
        what: String,
        /// One JSON array of objects (keyed by the table's columns) instead
        /// of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "FERRY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Drops and rejects as the programs make them, one line each (reason,
    /// program, interface, the client's flow), read from the perf buffers of
    /// a running agent's programs; with `--type trace`, every packet they
    /// translate too. The programs report only while a monitor reads; one
    /// monitor at a time.
    Monitor {
        /// drop, reject, trace (every packet translated, a report each:
        /// costly on a busy node) or all; comma-separated.
        #[arg(long = "type", value_parser = monitor::KINDS, value_delimiter = ',', default_value = "drop,reject")]
        kinds: Vec<String>,
        /// Only this verdict (e.g. drop_source_range, reject_no_backend).
        #[arg(long)]
        reason: Option<String>,
        /// Only flows from or to this address (a client's, a frontend's).
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// Only flows to this Service's frontends (namespace/name).
        #[arg(long)]
        service: Option<String>,
        /// The agent's metrics address, whose /frontends names the Services.
        #[arg(long, env = "FERRY_AGENT", default_value = "127.0.0.1:10249")]
        agent: SocketAddr,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
        /// Stop after this many reports.
        #[arg(long)]
        count: Option<u64>,
        #[arg(long, env = "FERRY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Remove every Ferry tc filter in this network namespace and every pinned
    /// map and link (which detaches the uplink program and the socket hooks).
    Cleanup {
        #[arg(long, env = "FERRY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Then stay until SIGTERM or SIGINT: the uninstall DaemonSet's pods
        /// (deploy/uninstall/) must not exit.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// This node's name, as in its Node object (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME", required_unless_present = "services_file")]
    node_name: Option<String>,
    /// kubeconfig to reach the API server; in-cluster config (or $KUBECONFIG) when absent.
    #[arg(long, env = "FERRY_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Serve the services in this JSON file instead of watching an API server:
    /// {"services": [{"name", "address", "port", "protocol", "endpoints": [{"address", "port"}]}],
    /// "node_addresses": [...]} (the node's addresses: flows to remote
    /// endpoints are SNATed to the first of their family).
    #[arg(long, env = "FERRY_SERVICES_FILE", conflicts_with_all = ["kubeconfig", "node_name"])]
    services_file: Option<PathBuf>,
    /// bpffs directory for the pinned maps.
    #[arg(long, env = "FERRY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Globs of host-side pod interface names to attach to (comma-separated).
    #[arg(
        long = "pod-iface-pattern",
        env = "FERRY_POD_IFACE_PATTERN",
        value_delimiter = ',',
        default_value = "veth*,cali*,lxc*"
    )]
    pod_iface_patterns: Vec<String>,
    /// Address of /healthz and /livez ("off" to disable).
    #[arg(
        long,
        env = "FERRY_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256"
    )]
    healthz_bind_address: String,
    /// Address of /metrics and /statusz ("off" to disable).
    #[arg(
        long,
        env = "FERRY_METRICS_BIND_ADDRESS",
        default_value = "0.0.0.0:10249"
    )]
    metrics_bind_address: String,
    /// Serve packets and bytes per backend too (ferry_backend_*), beside
    /// the per-Service series: one series per backend this node sends to.
    #[arg(long, env = "FERRY_METRICS_PER_BACKEND")]
    metrics_per_backend: bool,
    /// Count packets and bytes per Service (and backend) in the programs
    /// (`ferry_service_*`): on, 25 to 55 ns more per translated packet
    /// here (bench/results/per_packet_traffic.md), about 690 ns where
    /// packets visit a million pairs at random (per_packet_spread.md); off, the verifier leaves
    /// the counting out of the programs at load, and it costs nothing.
    #[arg(long, env = "FERRY_TRAFFIC_COUNTERS", default_value_t = false, action = clap::ArgAction::Set)]
    traffic_counters: bool,
    /// The most detailed level of the programs' own log lines (rare paths:
    /// the error of a helper that failed), which reach this log with
    /// target `ebpf`: off, error, warn, info, debug or trace. Fixed at
    /// load: the verifier leaves out the lines of more detailed levels.
    #[arg(long, env = "FERRY_BPF_LOG_LEVEL", default_value = "warn")]
    bpf_log_level: kernel::diag::LogLevel,
    /// The node's uplink interfaces (comma-separated): XDP for NodePort,
    /// externalIPs and LoadBalancer IPs. Unset: the interface holding the
    /// Node's InternalIP, else the default route's. `none`: no north-south
    /// traffic.
    #[arg(
        long = "uplink-iface",
        env = "FERRY_UPLINK_IFACE",
        value_delimiter = ','
    )]
    uplink_ifaces: Vec<String>,
    /// How the uplink program attaches: auto (native XDP, else generic XDP, else
    /// tc), native, generic or tc.
    #[arg(long, env = "FERRY_UPLINK_MODE", default_value = "auto", value_parser = ["auto", "native", "generic", "tc"])]
    uplink_mode: String,
    /// Node ports for SNATed flows to remote backends, `MIN-MAX`; keep them out of
    /// net.ipv4.ip_local_port_range.
    #[arg(long, env = "FERRY_NAT_PORTS", default_value = "61000-65535")]
    nat_ports: String,
    /// The scheduler of Services without a `ferry.dev/scheduler` annotation:
    /// flow-hash, maglev, source-hash or round-robin.
    #[arg(long, env = "FERRY_SCHEDULER", default_value = "flow-hash")]
    scheduler: Scheduler,
    /// How often the maps are re-read and repaired from the desired state, in seconds.
    #[arg(long, env = "FERRY_RESYNC_SECONDS", default_value_t = 30)]
    resync_seconds: u64,
    /// How long changes are gathered before they are programmed, in milliseconds.
    #[arg(long, env = "FERRY_SYNC_DELAY_MS", default_value_t = 10)]
    sync_delay_ms: u64,
    /// How often the conntrack and NAT entries of ended flows are removed,
    /// which frees their NAT ports, in seconds.
    #[arg(long, env = "FERRY_CONNTRACK_GC_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    conntrack_gc_seconds: u64,
    /// How long a TCP flow's conntrack and NAT entries stay after its FIN or
    /// RST, in seconds (at most 10, the programs' own limit).
    #[arg(long, env = "FERRY_CONNTRACK_TCP_CLOSE_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=10))]
    conntrack_tcp_close_seconds: u64,
    /// Which sockets the cgroup socket hooks translate at connect(): host (the
    /// node's network namespace: host processes, hostNetwork pods), all (pods
    /// too: their TCP skips the per-packet NAT) or off.
    #[arg(long, env = "FERRY_SOCKET_LB", default_value = "host")]
    socket_lb: SocketLb,
    /// The cgroup v2 directory the socket hooks attach to; every process under
    /// it is served. Default: the root of the cgroup v2 mount.
    #[arg(long, env = "FERRY_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// NodePorts answer on 127.0.0.1 too, for the node's own clients (off by
    /// default, as in kube-proxy's nftables mode).
    #[arg(long, env = "FERRY_NODEPORT_LOOPBACK")]
    nodeport_loopback: bool,
    /// The cluster's service CIDRs (comma-separated, up to 4 of each
    /// family; the API server's --service-cluster-ip-range). A new
    /// connection to an address in them that no Service serves (an
    /// unallocated ClusterIP, or a port its ClusterIP does not serve) is
    /// refused at once instead of leaving for the default route.
    #[arg(
        long = "service-cidr",
        env = "FERRY_SERVICE_CIDR",
        value_delimiter = ','
    )]
    service_cidrs: Vec<Cidr>,
    /// Which node addresses NodePorts answer on, as kube-proxy's flag:
    /// `primary` (the Node's first InternalIP of each family), or ranges
    /// (comma-separated): every address of the node's interfaces in one.
    /// Unset: each InternalIP and ExternalIP of the Node.
    #[arg(
        long = "nodeport-addresses",
        env = "FERRY_NODEPORT_ADDRESSES",
        value_delimiter = ','
    )]
    nodeport_addresses: Vec<String>,
    #[command(flatten)]
    map_sizes: MapSizeArgs,
}

/// Map sizes, in entries. A map pinned with another size has its entries
/// carried into a new map of this size when the agent starts. The defaults
/// take about 55 MiB of kernel memory.
#[derive(Args)]
struct MapSizeArgs {
    /// Entries of the services map: one per frontend (Service IP, port and
    /// protocol) and one per backend of each.
    #[arg(long, env = "FERRY_MAP_SERVICES", default_value_t = capacity::SERVICES, value_parser = map_size())]
    map_services: u32,
    /// Backends (pod address, port and protocol) over every Service, both
    /// families together. Rounded up to a power of two: the IPv4 backends
    /// map is an array indexed by the low bits of a backend's id.
    #[arg(long, env = "FERRY_MAP_BACKENDS", default_value_t = capacity::BACKENDS, value_parser = map_size())]
    map_backends: u32,
    /// Frontends (Service IP, port and protocol): the reverse-NAT maps'
    /// entries and the round-robin counters'.
    #[arg(long, env = "FERRY_MAP_FRONTENDS", default_value_t = capacity::REVNAT, value_parser = map_size())]
    map_frontends: u32,
    /// Conntrack entries: two per flow; the least recently used go when it is
    /// full. IPv6's map has a quarter as many. [default: 131072, or from
    /// --map-dynamic-size-ratio]
    #[arg(long, env = "FERRY_MAP_CONNTRACK", value_parser = map_size())]
    map_conntrack: Option<u32>,
    /// NAT entries: two per SNATed flow. IPv6's map has a quarter as many.
    /// [default: 65536, or from --map-dynamic-size-ratio]
    #[arg(long, env = "FERRY_MAP_NAT", value_parser = map_size())]
    map_nat: Option<u32>,
    /// ClientIP affinity entries: one per client and Service. IPv6's map has
    /// a quarter as many. [default: 16384, or from --map-dynamic-size-ratio]
    #[arg(long, env = "FERRY_MAP_AFFINITY", value_parser = map_size())]
    map_affinity: Option<u32>,
    /// The share of the node's memory (0 to 1) the flow maps (conntrack,
    /// NAT, affinity, both families) take together, as Cilium's
    /// bpf-map-dynamic-size-ratio: those without a flag of their own are
    /// scaled from their defaults to fit it. 0: the defaults.
    #[arg(long, env = "FERRY_MAP_DYNAMIC_SIZE_RATIO", default_value_t = 0.0)]
    map_dynamic_size_ratio: f64,
    /// Maglev lookup slots over every Maglev Service.
    #[arg(long, env = "FERRY_MAP_MAGLEV", default_value_t = capacity::MAGLEV, value_parser = map_size())]
    map_maglev: u32,
}

impl MapSizeArgs {
    /// The sizes the flags ask for, the flow maps' from the node's memory
    /// with a ratio.
    fn sizes(&self) -> Result<MapSizes> {
        let ratio = self.map_dynamic_size_ratio;
        let memory = if ratio > 0.0 {
            kernel::sizes::node_memory()?
        } else {
            0
        };
        let sizes = MapSizes {
            services: self.map_services,
            backends: self.map_backends,
            frontends: self.map_frontends,
            maglev: self.map_maglev,
            ..MapSizes::default()
        }
        .with_flows(
            kernel::sizes::FlowFlags {
                conntrack: self.map_conntrack,
                nat: self.map_nat,
                affinity: self.map_affinity,
            },
            ratio,
            memory,
        )?;
        if ratio > 0.0 {
            info!(
                ratio,
                memory_mib = memory >> 20,
                conntrack = sizes.conntrack,
                nat = sizes.nat,
                affinity = sizes.affinity,
                flow_maps_mib = sizes.flow_bytes() >> 20,
                "flow maps sized from the node's memory"
            );
        }
        Ok(sizes)
    }
}

/// Map sizes from 16 entries to 2^26.
fn map_size() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(16..=(1 << 26))
}

/// mimalloc rather than glibc's allocator. At the first sync of 100k
/// Services (a million endpoints) in the lab, with everything else alike,
/// glibc's held 1.0-1.3 GiB five seconds after the sync and mimalloc's
/// 0.6-0.7 GiB, and the sync took 8-9 s against 11-15 s: glibc's arenas
/// keep what the watch tasks and the loop free on one another's threads.
/// (`bench/results/control_plane.md` has the figures of a whole run.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h), which the crate does
/// not name: the option just before `mi_option_use_numa_nodes`, which it
/// does (checked below, at compile time).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const _: () = assert!(MI_OPTION_PURGE_DELAY + 1 == libmimalloc_sys::mi_option_use_numa_nodes);

/// Pages mimalloc frees go back to the kernel at once, not a second later
/// and only when the thread that owns them allocates again: the watch
/// tasks' threads go quiet after a first list and kept what it freed. At
/// 100k Services in the lab, alternating runs of one build held 379-380 MiB
/// after the sync this way, 403-408 MiB with the default, and synced as fast.
fn return_freed_pages_at_once() {
    // SAFETY: sets one of mimalloc's options; no pointer is involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

#[tokio::main]
async fn main() -> Result<()> {
    return_freed_pages_at_once();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Run(args) => {
            let source = match (args.services_file, args.node_name) {
                (Some(path), _) => Source::File(path),
                (None, Some(node_name)) => Source::Api {
                    kubeconfig: args.kubeconfig,
                    node_name,
                },
                (None, None) => unreachable!("clap requires one of them"),
            };
            let bind = |flag: &str, value: &str| -> Result<Option<SocketAddr>> {
                match value {
                    "off" => Ok(None),
                    addr => addr
                        .parse()
                        .map(Some)
                        .with_context(|| format!("--{flag} {addr:?}: not an address:port or off")),
                }
            };
            let healthz_addr = bind("healthz-bind-address", &args.healthz_bind_address)?;
            let metrics_addr = bind("metrics-bind-address", &args.metrics_bind_address)?;
            let nat_ports = settings::parse_nat_ports(&args.nat_ports)?;
            let service_cidrs = settings::service_cidrs(&args.service_cidrs)?;
            let node_port_addresses = NodePortAddresses::parse(&args.nodeport_addresses)?;
            let uplink_mode = match args.uplink_mode.as_str() {
                "native" => Some(UplinkMode::Native),
                "generic" => Some(UplinkMode::Generic),
                "tc" => Some(UplinkMode::Tc),
                _ => None,
            };
            agent::run(agent::Config {
                uplink: UplinkRequest::from_flag(&args.uplink_ifaces)?,
                uplink_mode,
                nat_ports,
                service_cidrs,
                scheduler: args.scheduler,
                source,
                pin_dir: args.pin_dir,
                pod_iface_patterns: args.pod_iface_patterns,
                healthz_addr,
                metrics_addr,
                metrics_per_backend: args.metrics_per_backend,
                traffic_counters: args.traffic_counters,
                bpf_log_level: args.bpf_log_level,
                resync_period: Duration::from_secs(args.resync_seconds.max(1)),
                sync_delay: Duration::from_millis(args.sync_delay_ms),
                gc_period: Duration::from_secs(args.conntrack_gc_seconds),
                lifetimes: proxy_agent::desired::gc::Lifetimes {
                    tcp_closing: Duration::from_secs(args.conntrack_tcp_close_seconds),
                },
                socket_lb: args.socket_lb,
                cgroup_root: args.cgroup_root,
                node_port_loopback: args.nodeport_loopback,
                node_port_addresses,
                map_sizes: args.map_sizes.sizes()?,
            })
            .await
        }
        #[cfg(feature = "harness")]
        Command::Simulate {
            manifests,
            node,
            packet,
            from,
            scheduler,
            service_cidrs,
            json,
        } => {
            let objects = simulate::read_manifests(&manifests)?;
            for ignored in &objects.ignored {
                eprintln!("left out: {ignored}");
            }
            let cidrs = settings::service_cidrs(&service_cidrs)?;
            let outcome = simulate::simulate(&objects, &node, &packet, from, scheduler, cidrs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else {
                print!("{}", outcome.render());
            }
            Ok(())
        }
        Command::Inspect {
            what,
            json,
            pin_dir,
        } => {
            let table = inspect::table(&what, &pin_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&table.json())?);
            } else {
                print!("{}", table.text());
            }
            Ok(())
        }
        Command::Monitor {
            kinds,
            reason,
            address,
            service,
            agent,
            seconds,
            count,
            pin_dir,
        } => {
            let filter = monitor::Filter {
                kinds,
                reason,
                address,
                service,
            };
            tokio::task::spawn_blocking(move || {
                monitor::run(&pin_dir, agent, &filter, seconds, count)
            })
            .await?
        }
        Command::Cleanup { pin_dir, wait } => {
            let removed = kernel::cleanup(&pin_dir)?;
            for filter in &removed.filters {
                info!(filter, "detached");
            }
            for pin in &removed.pins {
                info!(pin = %pin.display(), "unpinned");
            }
            for iface in &removed.qdiscs {
                info!(iface, "clsact qdisc removed: no filter left on it");
            }
            info!(
                filters = removed.filters.len(),
                pins = removed.pins.len(),
                "this node is clean of Ferry"
            );
            if wait {
                let mut term = signal(SignalKind::terminate())?;
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Ok(())
        }
    }
}
