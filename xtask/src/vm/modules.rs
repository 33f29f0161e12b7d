//! The kernel modules the VMs load (`veth` and what it depends on), taken
//! from a kernel package: each module's `.modinfo` gives its dependencies (a
//! package has no `modules.dep`; depmod makes that on installation).

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use super::{initramfs::walk, kernels::MODULES};

/// Copies the [`MODULES`] and what they depend on into `to`, uncompressed and
/// named `<module>.ko`; returns the file names in load order (dependencies
/// first). `tree` is the package's `lib/modules/<release>`; a package has no
/// `modules.dep` (depmod makes it when the package is installed), so the
/// dependencies come from each module's `.modinfo` (`depends=`).
pub(super) fn copy_modules(tree: &Path, to: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    walk(tree, tree, &mut files)?;
    let by_name: HashMap<String, PathBuf> = files
        .iter()
        .filter(|f| f.contains(".ko"))
        .map(|f| (module_key(module_name(f)), tree.join(f)))
        .collect();
    let mut order = Vec::new();
    for module in MODULES {
        let names = load_order(module, &mut |name| {
            let file = by_name
                .get(&module_key(name))
                .with_context(|| format!("no module {name} in {}", tree.display()))?;
            let elf = module_bytes(file)?;
            let depends = modinfo_depends(&elf)
                .with_context(|| format!("{} has no .modinfo", file.display()))?;
            Ok((elf, depends))
        })?;
        for (name, elf) in names {
            let file = format!("{name}.ko");
            if !order.contains(&file) {
                fs::write(to.join(&file), elf)?;
                order.push(file);
            }
        }
    }
    Ok(order)
}

/// A module's name from its file's path: `kernel/drivers/net/veth.ko.xz` gives `veth`.
pub(super) fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split_once(".ko").map_or(file, |(name, _)| name)
}

/// The kernel treats `-` and `_` in module names alike.
pub(super) fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// A module file's ELF, uncompressed.
pub(super) fn module_bytes(file: &Path) -> Result<Vec<u8>> {
    let name = file.to_string_lossy();
    if name.ends_with(".ko") {
        return fs::read(file).with_context(|| format!("reading {name}"));
    }
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else {
        bail!("{name}: a module compressed in a way not handled here");
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(file)
        .output()
        .with_context(|| format!("starting {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {name} failed: {}", out.status);
    }
    Ok(out.stdout)
}

/// Gives a module's ELF and the names of the modules it depends on.
pub(super) type ReadModule<'a> = dyn FnMut(&str) -> Result<(Vec<u8>, Vec<String>)> + 'a;

/// `module` and everything it needs, each after what it needs, with what
/// `read` gives for each (its ELF and the names it depends on).
pub(super) fn load_order(module: &str, read: &mut ReadModule) -> Result<Vec<(String, Vec<u8>)>> {
    fn visit(
        name: &str,
        read: &mut ReadModule,
        out: &mut Vec<(String, Vec<u8>)>,
        seen: &mut Vec<String>,
    ) -> Result<()> {
        if seen.contains(&module_key(name)) {
            return Ok(());
        }
        seen.push(module_key(name));
        let (elf, depends) = read(name)?;
        for dep in &depends {
            visit(dep, read, out, seen)?;
        }
        out.push((name.to_string(), elf));
        Ok(())
    }
    let mut out = Vec::new();
    visit(module, read, &mut out, &mut Vec::new())?;
    Ok(out)
}

/// The `depends=` list in a module's `.modinfo` section (ELF64, little-endian).
pub(super) fn modinfo_depends(elf: &[u8]) -> Option<Vec<String>> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| {
        let v = u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = u64_at(0x28)?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let section = |i: usize| {
        let at = shoff + i * shentsize;
        let (offset, size) = (u64_at(at + 0x18)?, u64_at(at + 0x20)?);
        Some((
            u32_at(at)? as usize,
            elf.get(offset..offset.checked_add(size)?)?,
        ))
    };
    let (_, names) = section(shstrndx)?;
    let info = (0..shnum).find_map(|i| {
        let (name, data) = section(i)?;
        let rest = names.get(name..)?;
        (rest.split(|b| *b == 0).next()? == b".modinfo").then_some(data)
    })?;
    let depends = info
        .split(|b| *b == 0)
        .find_map(|entry| entry.strip_prefix(b"depends="))
        .unwrap_or_default();
    Some(
        String::from_utf8_lossy(depends)
            .split(',')
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect(),
    )
}
