//! Project tasks: `cargo xtask setup | build-ebpf | image | test | lab | demo |
//! bench | vm-test`. This file only parses the command line and hands each task to its
//! module.

mod agent;
mod bench;
mod build_ebpf;
mod debian;
mod demo;
mod faults;
mod fuzz;
mod image;
mod kube;
mod lab;
mod setup;
mod sys;
mod vm;
mod workspace_tests;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (Debian packages, bpf-linker,
    /// a bpffs mount). Idempotent: a second run changes nothing.
    Setup,
    /// Build the eBPF object with whichever toolchain this machine has.
    BuildEbpf,
    /// Build the container images (the agent, the lab's pod and pause) as OCI
    /// archives under target/images/ and print them.
    Image {
        /// Also import them into the containerd listening on this socket.
        #[arg(long, value_name = "SOCKET")]
        load: Option<std::path::PathBuf>,
        /// The containerd namespace to import into (the kubelet's by default).
        #[arg(long, default_value = image::KUBERNETES_NAMESPACE)]
        namespace: String,
        /// Instead: the agent of the previous release, for upgrade tests.
        #[arg(long)]
        previous: bool,
    },
    /// Set up, build the eBPF object, and run every test (unit, packet, netns, lab).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The lab: a two-node cluster in network namespaces with a real API server.
    Lab {
        /// Name of the lab; every namespace it makes starts with it.
        #[arg(long, env = "FERRY_LAB", default_value = "ferry", global = true)]
        lab: String,
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Set up if needed, bring the lab up, serve a Service from pods on both
    /// nodes and show where 30 requests went.
    Demo,
    /// Benchmarks; results and plots under bench/results/ (not part of the tests).
    Bench {
        /// A smaller run (a few minutes), its results under target/bench-quick/.
        #[arg(long)]
        quick: bool,
        /// Run one part only: per-packet, control-plane (with memory) or vs-kube-proxy.
        #[arg(long)]
        only: Option<String>,
    },
    /// The fault suite: a lab of its own, a load through it, faults one after
    /// another; results in bench/results/faults.md (not part of the tests).
    Faults {
        /// How long the API server stays down.
        #[arg(long, default_value_t = 60)]
        outage_seconds: u64,
        /// Only the faults whose name holds this (repeatable); the table then
        /// goes to target/faults-selected.md, not bench/results.
        #[arg(long)]
        only: Vec<String>,
        /// Runs each chosen fault this many times (the table goes to
        /// target/faults-selected.md unless it is 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
        repeat: u64,
    },
    /// The fuzz targets (fuzz/, cargo-fuzz on nightly), each for a bounded time.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The packet tests on Debian's 5.10 and 6.1 kernels in VMs, and on this one.
    VmTest {
        /// `5.10`, `6.1`, `host` (the running kernel) or `all`.
        #[arg(long, default_value = "all")]
        kernel: String,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Network, API server, nodes, one agent per node.
    Up,
    /// Remove everything the lab made.
    Down,
    /// What is running.
    Status,
    /// kubectl against the lab's API server.
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Pods: a namespace with a TCP/UDP server on 8080/5353, registered as a Pod.
    Pod {
        #[command(subcommand)]
        command: PodCommand,
    },
    /// Stop or start one node's agent (its programs and maps stay while it is
    /// stopped); flags after `--` go to the agent, e.g.
    /// `agent start node1 -- --nat-ports 62000-62199`.
    Agent {
        #[arg(value_parser = ["start", "stop"])]
        action: String,
        node: String,
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// Stop or start one control-plane process (kube-apiserver, etcd), as
    /// an outage would: `control-plane stop kube-apiserver`.
    ControlPlane {
        #[arg(value_parser = ["start", "stop"])]
        action: String,
        #[arg(value_parser = ["kube-apiserver", "etcd"])]
        process: String,
    },
    /// Import an image archive into every node's containerd.
    LoadImage { archive: std::path::PathBuf },
    /// Give a LoadBalancer Service an ingress IP (status subresource), like a cloud would.
    LbIp {
        service: String,
        ip: std::net::Ipv4Addr,
    },
    /// Run a command inside a pod's network namespace, or on a node (node1,
    /// node2) as one of its own processes: its namespaces and cgroup.
    Exec {
        pod: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PodCommand {
    /// Create a pod on a node, e.g. `pod add web-1 --node node1 --label app=web`.
    Add {
        name: String,
        #[arg(long, default_value = "node1")]
        node: String,
        /// Labels as key=value (repeat).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Delete a pod.
    Del { name: String },
    /// Start a pod's graceful deletion and keep it serving (Terminating).
    Terminate { name: String },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s}: expected key=value"))
}

fn lab_command(lab: &lab::Lab, command: LabCommand) -> Result<()> {
    match command {
        LabCommand::Up => lab.up(&sys::workspace_root().join("deploy")),
        LabCommand::Down => lab.down(),
        LabCommand::Status => lab.status(),
        LabCommand::Kubectl { args } => lab.kubectl_interactive(&args),
        LabCommand::Pod {
            command: PodCommand::Add { name, node, labels },
        } => {
            let pod = lab.pod_add(&name, &node, &labels)?;
            println!("pod {} on {} at {}", pod.name, pod.node, pod.addr);
            Ok(())
        }
        LabCommand::Pod {
            command: PodCommand::Del { name },
        } => lab.pod_del(&name),
        LabCommand::Pod {
            command: PodCommand::Terminate { name },
        } => lab.pod_terminate(&name),
        LabCommand::Agent {
            action,
            node,
            agent_args,
        } => match action.as_str() {
            "stop" => lab.stop_agent(&node),
            _ => lab.start_agent(&node, &agent_args),
        },
        LabCommand::ControlPlane { action, process } => match action.as_str() {
            "stop" => lab.halt_saved(&process),
            _ => lab.resume_saved(&process),
        },
        LabCommand::LoadImage { archive } => lab.load_image(&archive),
        LabCommand::LbIp { service, ip } => lab.set_load_balancer_ip(&service, ip),
        LabCommand::Exec { pod, command } => lab.exec(&pod, &command),
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf::run().map(|_| ()),
        Task::Image {
            load,
            namespace,
            previous,
        } => image::run(load.as_deref(), &namespace, previous),
        Task::Test { args } => workspace_tests::run(&args),
        Task::Lab { lab, command } => lab_command(&lab::Lab::new(&lab)?, command),
        Task::Demo => demo::run(),
        Task::Bench { quick, only } => bench::run(quick, only.as_deref()),
        Task::VmTest { kernel } => vm::run(&kernel),
        Task::Fuzz { seconds } => fuzz::run(std::time::Duration::from_secs(seconds)),
        Task::Faults {
            outage_seconds,
            only,
            repeat,
        } => faults::run(
            std::time::Duration::from_secs(outage_seconds),
            &faults::Selection {
                only,
                repeat: repeat as usize,
            },
        ),
    }
}
