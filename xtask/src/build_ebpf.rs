//! `cargo xtask build-ebpf`: builds proxy-ebpf for `bpfel-unknown-none`.
//!
//! The target has no precompiled `core`, so the build needs `-Z build-std=core`
//! and the Rust library source. Two toolchains can do that:
//! - rustup's nightly with the `rust-src` component (the usual aya setup);
//! - Debian's `rustc-web` with `rust-web-src`, with `RUSTC_BOOTSTRAP=1`.
//!
//! The first one present wins. `FERRY_EBPF_TOOLCHAIN=nightly|debian` forces one.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::sys::{exec, workspace_root};

const TARGET: &str = "bpfel-unknown-none";

/// Functions of the programs that the linker keeps global: the verifier
/// walks a global function once, on its own, instead of in every path that
/// calls it (see `ferry_find_free_port4` in proxy-ebpf). Without the export
/// the linker makes every function static.
const GLOBAL_FUNCTIONS: &[&str] = &["ferry_find_free_port4", "ferry_log_drop"];

/// Where the object lands; proxy-agent's build script embeds it from there.
pub fn object_path() -> PathBuf {
    workspace_root()
        .join("target/ebpf")
        .join(TARGET)
        .join("release/proxy-ebpf")
}

enum Toolchain {
    Nightly,
    Debian,
}

fn has_library_source(sysroot: &Path) -> bool {
    sysroot.join("lib/rustlib/src/rust/library/core").is_dir()
}

fn nightly_usable() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .is_some_and(|out| {
            has_library_source(Path::new(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

fn debian_usable() -> bool {
    Path::new("/usr/bin/rustc").exists()
        && Path::new("/usr/bin/cargo").exists()
        && has_library_source(Path::new("/usr"))
}

fn choose() -> Result<Toolchain> {
    match env::var("FERRY_EBPF_TOOLCHAIN").ok().as_deref() {
        Some("nightly") => return Ok(Toolchain::Nightly),
        Some("debian") => return Ok(Toolchain::Debian),
        Some(other) => bail!("FERRY_EBPF_TOOLCHAIN={other}: expected `nightly` or `debian`"),
        None => {}
    }
    if nightly_usable() {
        Ok(Toolchain::Nightly)
    } else if debian_usable() {
        Ok(Toolchain::Debian)
    } else {
        bail!(
            "no toolchain can build for {TARGET}: install rustup's nightly with rust-src, \
             or run `cargo xtask setup` for Debian's rustc-web and rust-web-src"
        )
    }
}

pub fn run() -> Result<PathBuf> {
    let toolchain = choose()?;
    let root = workspace_root();
    let mut cmd = match toolchain {
        Toolchain::Nightly => {
            eprintln!("build-ebpf: rustup nightly with rust-src");
            let mut cmd = Command::new("rustup");
            cmd.args(["run", "nightly", "cargo"]);
            cmd
        }
        Toolchain::Debian => {
            eprintln!("build-ebpf: Debian rustc-web with RUSTC_BOOTSTRAP=1");
            let mut cmd = Command::new("/usr/bin/cargo");
            cmd.env("RUSTC", "/usr/bin/rustc")
                .env("RUSTC_BOOTSTRAP", "1");
            cmd
        }
    };
    // What the outer cargo exported must not leak into the inner build.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(root.join("proxy-ebpf"))
        // BTF for the maps (named fields in bpftool) and for line info in
        // verifier logs; the global functions exported, so that they stay global.
        .env(
            "RUSTFLAGS",
            format!(
                "-C debuginfo=2 -C link-arg=--btf -C link-arg=--export={}",
                GLOBAL_FUNCTIONS.join(",")
            ),
        )
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"));
    exec(&mut cmd).context("building the eBPF programs")?;
    let object = object_path();
    eprintln!("build-ebpf: {}", object.display());
    Ok(object)
}
