//! The proxy-agent binaries the lab, the demo, the tests and the benches run:
//! built here with cargo (after the eBPF object they embed), or the one
//! `FERRY_AGENT_BIN` names.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{
    build_ebpf,
    sys::{exec, workspace_root},
};

/// Builds proxy-agent (a release build when `release`) and returns its binary.
/// The eBPF object must be built first (proxy-agent's build script embeds it).
pub fn build(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).arg("build");
    if release {
        cmd.arg("--release");
    }
    exec(cmd.args(["-p", "proxy-agent"]))?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace_root()
        .join("target")
        .join(profile)
        .join("proxy-agent"))
}

/// The agent binary the lab runs: $FERRY_AGENT_BIN, else a fresh debug build.
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FERRY_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    build_ebpf::run()?;
    build(false)
}
