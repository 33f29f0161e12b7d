//! `cargo xtask fuzz`: the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer, on
//! the nightly toolchain), each for a bounded time: the manifest reader from
//! any text, and programming rounds into small maps whose writes fail. The
//! corpus starts from the golden manifests and lives under target/, so a run
//! leaves the tree as it was; a crash's input is kept in target/fuzz-artifacts.

use std::{fs, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result};

use crate::{
    build_ebpf,
    sys::{exec, workspace_root},
};

/// The cargo-fuzz release `setup` installs.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
const TARGETS: [&str; 2] = ["manifests", "rounds"];

/// Runs each target for `each`.
pub fn run(each: Duration) -> Result<()> {
    build_ebpf::run()?;
    let root = workspace_root();
    let target_dir = root.join("target/fuzz");
    for target in TARGETS {
        let corpus = root.join("target/fuzz-corpus").join(target);
        fs::create_dir_all(&corpus)?;
        if target == "manifests" {
            seed_manifests(&root.join("proxy-agent/tests/golden"), &corpus)?;
        }
        let artifacts = root.join("target/fuzz-artifacts").join(target);
        fs::create_dir_all(&artifacts)?;
        eprintln!("fuzz: {target} for {} s", each.as_secs());
        exec(
            Command::new("cargo")
                .current_dir(&root)
                .env("RUSTUP_TOOLCHAIN", "nightly")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .args(["fuzz", "run", "--fuzz-dir", "fuzz", "--target-dir"])
                .arg(&target_dir)
                .arg(target)
                .arg(&corpus)
                .arg("--")
                .arg(format!("-max_total_time={}", each.as_secs()))
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                // Bounded inputs: a manifest of 64 KiB says what a larger one would.
                .arg("-max_len=65536")
                .arg("-rss_limit_mb=4096"),
        )
        .with_context(|| {
            format!(
                "fuzz target {target} (its input is in {})",
                artifacts.display()
            )
        })?;
    }
    Ok(())
}

/// The golden manifests, as the manifest target's first inputs.
fn seed_manifests(golden: &Path, corpus: &Path) -> Result<()> {
    for case in fs::read_dir(golden)? {
        let case = case?.path();
        if !case.is_dir() {
            continue;
        }
        for file in fs::read_dir(&case)? {
            let file = file?.path();
            if file.extension().is_some_and(|e| e == "yaml") {
                let name = format!(
                    "golden-{}-{}",
                    case.file_name().unwrap_or_default().to_string_lossy(),
                    file.file_name().unwrap_or_default().to_string_lossy()
                );
                fs::copy(&file, corpus.join(name))?;
            }
        }
    }
    Ok(())
}
