//! Debian packages, installed only where missing.

use std::process::{Command, Stdio};

use anyhow::Result;

use crate::exec;

/// The packages of `packages` not installed. One `dpkg-query` for all: it prints
/// the packages it knows and complains on stderr about the others.
pub fn missing_packages<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    let installed = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${db:Status-Status}\n")
        .args(packages)
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    packages
        .iter()
        .copied()
        .filter(|p| {
            !installed
                .lines()
                .any(|line| line == format!("{p} installed"))
        })
        .collect()
}

/// Installs what is missing of `packages` (`apt-get update` first, only then),
/// saying so with `who` as the prefix. Returns whether anything was missing.
pub fn install(who: &str, packages: &[&str]) -> Result<bool> {
    let missing = missing_packages(packages);
    if missing.is_empty() {
        return Ok(false);
    }
    eprintln!("{who}: installing {}", missing.join(" "));
    exec(
        Command::new("apt-get")
            .stdout(std::io::stderr())
            .args(["update", "-q"]),
    )?;
    exec(
        Command::new("apt-get")
            .stdout(std::io::stderr())
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )?;
    Ok(true)
}
