//! `cargo xtask test`: set up, build the eBPF object, the agent and the
//! images, run every test of the workspace (unit, packet, netns, lab, image),
//! then each fuzz target for 30 s.

use std::process::Command;

use anyhow::Result;

use crate::{
    build_ebpf, image, setup,
    sys::{exec, workspace_root},
};

/// `args` go to the test binaries (after `--`).
pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    build_ebpf::run()?;
    // The lab runs these images (and builds them again if they are stale);
    // the image test imports them.
    image::build()?;
    // The upgrade test starts from the previous release's agent.
    image::build_previous()?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args(["test", "--workspace", "--no-fail-fast"]);
    if !args.is_empty() {
        cmd.arg("--").args(args);
        // A chosen subset of the tests: no fuzzing behind it.
        return exec(&mut cmd);
    }
    exec(&mut cmd)?;
    // A bounded run of each fuzz target (`cargo xtask fuzz` runs longer).
    crate::fuzz::run(std::time::Duration::from_secs(30))
}
