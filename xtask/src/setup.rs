//! `cargo xtask setup`: everything the build, the lab and the tests need on a
//! fresh machine of the project's kind (Debian 12, root). Each step checks first and
//! does nothing when its work is already done.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Result};

use crate::sys::{exec, require_root};

/// Debian packages: Debian's Rust with its library source (the eBPF target needs
/// `-Z build-std=core`), LLVM 22 for bpf-linker, bpftool, iproute2; containerd
/// and runc, which run the project's images (`cargo xtask image`).
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "curl",
    "ethtool",
    "containerd",
    "runc",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    require_root("setup installs packages and mounts bpffs: run it as root")?;
    packages()?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    // The lab's and the tests' API server, built once from Debian's source.
    crate::kube::ensure_built()?;
    eprintln!("setup: done");
    Ok(())
}

fn packages() -> Result<()> {
    if !crate::debian::install("setup", PACKAGES)? {
        eprintln!("setup: Debian packages present");
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let present = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION));
    if present {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    exec(
        Command::new(env!("CARGO"))
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )
}

/// cargo-fuzz, for the fuzz targets (`cargo xtask fuzz`).
fn cargo_fuzz() -> Result<()> {
    let version = crate::fuzz::CARGO_FUZZ_VERSION;
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(version));
    if present {
        eprintln!("setup: cargo-fuzz {version} present");
        return Ok(());
    }
    eprintln!("setup: building cargo-fuzz {version}");
    exec(
        Command::new(env!("CARGO"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["install", "cargo-fuzz", "--locked", "--version", version]),
    )
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        eprintln!("setup: bpffs mounted on /sys/fs/bpf");
        return Ok(());
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        bail!("/sys/fs/bpf does not exist: is sysfs mounted?");
    }
    eprintln!("setup: mounting bpffs on /sys/fs/bpf");
    exec(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
