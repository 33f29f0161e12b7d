//! Project tasks: `cargo xtask setup | build-ebpf | test`.

mod build_ebpf;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
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
    /// Set up, build the eBPF object, and run every test (unit, packet, netns).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf::run().map(|_| ()),
        Task::Test { args } => {
            setup::run()?;
            build_ebpf::run()?;
            let mut cmd = Command::new(env!("CARGO"));
            cmd.current_dir(workspace_root())
                .args(["test", "--workspace", "--no-fail-fast"]);
            if !args.is_empty() {
                cmd.arg("--").args(args);
            }
            exec(&mut cmd)
        }
    }
}

/// The repository root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command, echoing it, and fails with its exit status.
pub fn exec(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}
