//! Debian's cloud kernels for the VMs: fetched once per series through a
//! private apt configuration (this machine's own sources with the suite
//! changed), kept in a cache with the modules the tests need, and found there.

use std::{
    fmt::Write as _,
    fs::{self, File},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use super::{modules::copy_modules, Series};
use crate::{
    debian::{self, PrivateApt},
    sys::{exec, show},
};

/// Extracted kernels, one directory per kernel release: `vmlinuz`, `package`
/// (the .deb's name), `modules/` (the [`MODULES`] and their dependencies, and
/// `order`, the file names in load order) and, written last, `layout` (what
/// [`cache_layout`] gives). An entry with another `layout` (or none) is stale:
/// it is removed and fetched again.
pub(super) const CACHE_DIR: &str = "/var/cache/ferry/kernels";
pub(super) const CACHE_LOCK: &str = "/var/cache/ferry/kernels.lock";
/// Bump when what a cache entry holds changes.
pub(super) const CACHE_VERSION: u32 = 2;
/// Kernel modules the tests need (`veth`, for the uplink suite's namespace).
pub(super) const MODULES: &[&str] = &["veth"];
pub(super) const FLAVOUR: &str = "-cloud-amd64";
pub(super) const METAPACKAGE: &str = "linux-image-cloud-amd64";

/// What a current cache entry's `layout` file says: the version and the modules.
pub(super) fn cache_layout() -> String {
    format!("{CACHE_VERSION} {}\n", MODULES.join(" "))
}

/// The newest cached kernel of a series (its directory), fetching it first if
/// none is cached with the current [`cache_layout`]; stale entries of the series
/// are removed then. Cached kernels are kept: remove [`CACHE_DIR`] to fetch
/// newer ones.
pub(super) fn cached_kernel(series: &Series, work: &Path) -> Result<PathBuf> {
    if let Some(dir) = newest_cached(series)? {
        return Ok(dir);
    }
    fs::create_dir_all(CACHE_DIR).with_context(|| format!("creating {CACHE_DIR}"))?;
    // Two runs at once: the second waits, then finds the kernel cached.
    let lock = File::create(CACHE_LOCK).with_context(|| format!("creating {CACHE_LOCK}"))?;
    lock.lock()
        .with_context(|| format!("locking {CACHE_LOCK}"))?;
    if let Some(dir) = newest_cached(series)? {
        return Ok(dir);
    }
    for (_, stale, _) in cache_entries(series)? {
        eprintln!(
            "vm-test: removing {} (cached with another layout)",
            stale.display()
        );
        fs::remove_dir_all(&stale).with_context(|| format!("removing {}", stale.display()))?;
    }
    fetch_kernel(series, work)
}

/// The series' entries in the cache: ABI number, directory, and whether it is
/// complete with the current layout.
pub(super) fn cache_entries(series: &Series) -> Result<Vec<(u32, PathBuf, bool)>> {
    let Ok(entries) = fs::read_dir(CACHE_DIR) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let abi = name
            .strip_prefix(series.prefix)
            .and_then(|rest| rest.strip_suffix(FLAVOUR))
            .and_then(|abi| abi.parse::<u32>().ok());
        if let Some(abi) = abi {
            let current = path.join("vmlinuz").is_file()
                && fs::read_to_string(path.join("layout")).is_ok_and(|l| l == cache_layout());
            out.push((abi, path, current));
        }
    }
    Ok(out)
}

pub(super) fn newest_cached(series: &Series) -> Result<Option<PathBuf>> {
    Ok(cache_entries(series)?
        .into_iter()
        .filter(|(_, _, current)| *current)
        .max_by_key(|(abi, _, _)| *abi)
        .map(|(_, path, _)| path))
}

/// Downloads the series' kernel package with a private apt configuration and
/// keeps its vmlinuz and the [`MODULES`] in the cache; returns the entry.
pub(super) fn fetch_kernel(series: &Series, work: &Path) -> Result<PathBuf> {
    let apt_dir = work.join(format!("apt-{}", series.suite));
    let (file_name, sources) = debian::machine_sources()?;
    let (private, name) = private_sources(&sources, series.suite).with_context(|| {
        format!("no Debian archive entry (a suite without `-`) in /etc/apt/{file_name}")
    })?;
    let apt = PrivateApt::create(&apt_dir, name, &private)?;
    eprintln!(
        "vm-test: fetching Debian {}'s {} kernel",
        series.suite, series.name
    );
    exec(apt.command("apt-get").arg("update"))?;
    let mut show_meta = apt.command("apt-cache");
    show_meta.args(["show", "--no-all-versions", METAPACKAGE]);
    let out = show_meta
        .output()
        .with_context(|| format!("starting {}", show(&show_meta)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            show(&show_meta),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wanted = format!("linux-image-{}", series.prefix);
    let package =
        depends_on(&String::from_utf8_lossy(&out.stdout), &wanted).with_context(|| {
            format!(
                "{METAPACKAGE} in {} does not depend on a {wanted}*{FLAVOUR} package",
                series.suite
            )
        })?;
    let debs = apt_dir.join("debs");
    fs::create_dir_all(&debs)?;
    exec(
        apt.command("apt-get")
            .current_dir(&debs)
            .arg("download")
            .arg(&package),
    )?;
    let deb = debian::find_file(&debs, "", ".deb")?;
    let root = apt_dir.join("root");
    debian::extract(&deb, &root)?;
    install_entry(&deb, &root)
}

/// Keeps the vmlinuz and the [`MODULES`] of an unpacked kernel package (`deb`,
/// unpacked in `root`) in the cache; returns the entry.
fn install_entry(deb: &Path, root: &Path) -> Result<PathBuf> {
    let boot = root.join("boot");
    let release = fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/", deb.display()))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(String::from)
        })
        .next()
        .with_context(|| format!("{} has no boot/vmlinuz-*", deb.display()))?;
    let vmlinuz = boot.join(format!("vmlinuz-{release}"));
    let target = Path::new(CACHE_DIR).join(&release);
    fs::create_dir_all(&target)?;
    let deb_name = deb
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    fs::write(target.join("package"), format!("{deb_name}\n"))?;
    fs::copy(&vmlinuz, target.join("vmlinuz"))
        .with_context(|| format!("copying {}", vmlinuz.display()))?;
    let modules = target.join("modules");
    if modules.exists() {
        fs::remove_dir_all(&modules)?;
    }
    fs::create_dir_all(&modules)?;
    let order = copy_modules(&root.join("lib/modules").join(&release), &modules)?;
    fs::write(modules.join("order"), order.join("\n") + "\n")?;
    // Last: only a whole entry has it.
    fs::write(target.join("layout"), cache_layout())?;
    eprintln!(
        "vm-test: cached {release} ({deb_name}; modules {}) in {}",
        order.join(" "),
        target.display()
    );
    Ok(target)
}

/// `sources` (deb822 stanzas or one-line entries) with the Debian archive entries
/// (those naming a release suite, without `-updates` or `-security`) moved to
/// `suite`, and nothing else. The file name apt needs is the same kind as the input.
pub(super) fn private_sources(sources: &str, suite: &str) -> Option<(String, &'static str)> {
    let is_release = |s: &str| !s.contains('-') && !s.contains('/');
    let mut out = String::new();
    if sources
        .lines()
        .any(|l| l.trim_start().starts_with("Suites:"))
    {
        for stanza in sources.split("\n\n") {
            let suites = stanza
                .lines()
                .find_map(|l| l.trim_start().strip_prefix("Suites:"))
                .unwrap_or_default();
            let enabled = !stanza.lines().any(|l| {
                l.trim_start()
                    .strip_prefix("Enabled:")
                    .is_some_and(|v| v.trim() == "no")
            });
            if !enabled || !suites.split_whitespace().any(is_release) {
                continue;
            }
            for line in stanza.lines() {
                let trimmed = line.trim_start();
                if trimmed.starts_with("Suites:") {
                    let _ = writeln!(out, "Suites: {suite}");
                } else if trimmed.starts_with("Types:") {
                    out.push_str("Types: deb\n");
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            out.push('\n');
        }
        return (!out.is_empty()).then_some((out, "ferry-vm-test.sources"));
    }
    for line in sources.lines() {
        let mut words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"deb") {
            continue;
        }
        // deb [options] URI SUITE COMPONENT...
        let uri = if words.get(1).is_some_and(|w| w.starts_with('[')) {
            words
                .iter()
                .position(|w| w.ends_with(']'))
                .map_or(words.len(), |i| i + 1)
        } else {
            1
        };
        if words.get(uri + 1).is_some_and(|s| is_release(s)) {
            words[uri + 1] = suite;
            out.push_str(&words.join(" "));
            out.push('\n');
        }
    }
    (!out.is_empty()).then_some((out, "ferry-vm-test.list"))
}

/// The package in `apt-cache show`'s Depends line that starts with `prefix`.
pub(super) fn depends_on(show: &str, prefix: &str) -> Option<String> {
    show.lines()
        .find_map(|l| l.strip_prefix("Depends:"))?
        .split([',', '|'])
        .map(|dep| dep.split_whitespace().next().unwrap_or_default())
        .find(|name| name.starts_with(prefix) && name.ends_with(FLAVOUR))
        .map(String::from)
}
