//! `cargo xtask test`: set up, build the eBPF object and the agent, and run
//! every test of the workspace (unit, packet, netns, lab).

use std::process::Command;

use anyhow::Result;

use crate::{
    agent, build_ebpf, setup,
    sys::{exec, workspace_root},
};

/// `args` go to the test binaries (after `--`).
pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    build_ebpf::run()?;
    // The lab tests run this agent binary; build it before the tests run.
    let agent = agent::build(false)?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .env("FERRY_AGENT_BIN", agent)
        .args(["test", "--workspace", "--no-fail-fast"]);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    exec(&mut cmd)
}
