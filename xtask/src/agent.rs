//! The proxy-agent binaries the benches run, built here with cargo (the eBPF
//! object they embed must be built first). The lab runs the agent's image.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::sys::{exec, workspace_root};

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
