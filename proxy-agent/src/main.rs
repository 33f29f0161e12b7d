use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use proxy_agent::{
    dataplane::{self, Dataplane, DEFAULT_PIN_DIR},
    model::ServiceFile,
    state::{self, Ids},
};
use tracing::{info, warn};

/// Ferry's node agent: an eBPF replacement for kube-proxy.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the programs, attach them to pod interfaces and serve the services
    /// described in a file until stopped. Programs and maps stay in place after
    /// the agent exits, so traffic keeps flowing; `cleanup` removes them.
    Serve {
        /// JSON file: {"services": [{"name", "address", "port", "protocol", "endpoints": [{"address", "port"}]}]}
        #[arg(long, env = "FERRY_SERVICES")]
        services: PathBuf,
        /// Host-side pod interfaces to attach to (repeat or comma-separate).
        #[arg(long = "pod-iface", env = "FERRY_POD_IFACES", value_delimiter = ',')]
        pod_ifaces: Vec<String>,
        /// bpffs directory for the pinned maps.
        #[arg(long, env = "FERRY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Remove every Ferry tc filter in this network namespace and every pinned map.
    Cleanup {
        #[arg(long, env = "FERRY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Serve {
            services,
            pod_ifaces,
            pin_dir,
        } => serve(&services, &pod_ifaces, &pin_dir).await,
        Command::Cleanup { pin_dir } => {
            let removed = dataplane::cleanup(&pin_dir)?;
            for filter in &removed.filters {
                info!(filter, "detached");
            }
            for pin in &removed.pins {
                info!(pin = %pin.display(), "unpinned");
            }
            Ok(())
        }
    }
}

async fn serve(services: &Path, pod_ifaces: &[String], pin_dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(services)
        .with_context(|| format!("reading {}", services.display()))?;
    let file: ServiceFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", services.display()))?;
    let mut dataplane = Dataplane::load_pinned(pin_dir)?;
    let actual = dataplane.read_state()?;
    let mut ids = Ids::from_state(&actual);
    let (desired, problems) = state::desired(&file.services, &mut ids);
    for problem in &problems {
        warn!(%problem, "service skipped");
    }
    let ops = state::diff(&desired, &actual);
    dataplane.apply(&ops)?;
    info!(
        writes = ops.len(),
        frontends = desired.revnat.len(),
        backends = desired.backends.len(),
        "maps programmed"
    );
    for iface in pod_ifaces {
        dataplane.attach_pod_interface(iface)?;
    }
    info!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("stopping; programs and maps stay in place");
    Ok(())
}
