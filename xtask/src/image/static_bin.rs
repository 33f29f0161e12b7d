//! Static builds of the binaries the images hold: an image has no libraries
//! and no loader, so each binary must need none. Built for the host's target
//! named explicitly, so that `+crt-static` reaches the binaries but not the
//! build scripts and proc macros, which stay dynamic host programs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::sys::{exec, workspace_root};

/// The images are for x86-64 Linux (the config and index say `amd64`).
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// `cargo build --release` of `package` linked statically; returns its binary
/// `bin`, checked to need no program interpreter.
pub fn build(package: &str, bin: &str) -> Result<PathBuf> {
    build_in(&workspace_root(), package, bin)
}

/// [`build`] in the workspace at `root` (another checkout of the project).
pub fn build_in(root: &Path, package: &str, bin: &str) -> Result<PathBuf> {
    exec(
        Command::new(env!("CARGO"))
            .current_dir(root)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["build", "--release", "--target", TARGET, "-p", package]),
    )?;
    let path = root.join("target").join(TARGET).join("release").join(bin);
    let elf = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if needs_interpreter(&elf)? {
        bail!(
            "{} is dynamically linked (it names a program interpreter): an image has no \
             libraries for it",
            path.display()
        );
    }
    Ok(path)
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program header,
/// that is whether it needs a dynamic loader (static-pie binaries have none).
pub fn needs_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = elf
            .get(at..at + 4)
            .context("program header past the end of the file")?;
        if u32::from_le_bytes(p_type.try_into()?) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 header with program headers of the given types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut bytes = vec![0u8; 64];
        bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bytes[32..40].copy_from_slice(&64u64.to_le_bytes());
        bytes[54..56].copy_from_slice(&56u16.to_le_bytes());
        bytes[56..58].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut header = vec![0u8; 56];
            header[..4].copy_from_slice(&t.to_le_bytes());
            bytes.extend(header);
        }
        bytes
    }

    #[test]
    fn a_program_interpreter_header_means_dynamic() {
        // PT_PHDR, PT_INTERP, PT_LOAD, PT_DYNAMIC: a dynamically linked program.
        assert!(needs_interpreter(&elf(&[6, 3, 1, 2])).unwrap());
    }

    #[test]
    fn static_pie_has_dynamic_but_no_interpreter() {
        // PT_PHDR, PT_LOAD, PT_DYNAMIC, PT_TLS: what `+crt-static` gives.
        assert!(!needs_interpreter(&elf(&[6, 1, 2, 7])).unwrap());
    }

    #[test]
    fn truncated_or_foreign_files_are_errors() {
        assert!(needs_interpreter(b"#!/bin/sh\n").is_err());
        let mut cut = elf(&[6, 3]);
        cut.truncate(64 + 56);
        assert!(needs_interpreter(&cut).is_err());
    }
}
