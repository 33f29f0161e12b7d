//! `cargo xtask vm-test [--kernel host|5.10|6.1|all]`: the packet tests on the
//! kernels Ferry supports, each in its own VM.
//!
//! The kernels are Debian's cloud kernels: 5.10 from bullseye, 6.1 from bookworm.
//! Each is fetched once through a private apt configuration made at run time from
//! this machine's own Debian sources with the suite changed (so no mirror is named
//! here and `/etc/apt` stays as it is), and kept in [`CACHE_DIR`]. It boots under
//! qemu (KVM when it really works here, else TCG) with an initramfs of Debian's
//! static busybox, an init script, the test binaries of both packet suites
//! ([`SUITES`]: `privileged_packets` and `privileged_uplink`), this machine's
//! iproute2 `ip` and the libraries of all of them. The init script runs the
//! tests, prints their output on the serial console and powers off; this side
//! reads the console. The running kernel ("host") runs the same binaries directly.
//!
//! Loading the programs and BPF_PROG_TEST_RUN are built into these kernels; the
//! uplink suite also makes network namespaces with veth pairs (for the FIB its
//! programs look up), and `veth` is a module there. The cache keeps, beside each
//! vmlinuz, the [`MODULES`] (with what they depend on, per the package's
//! `modules.dep`), which the init script loads with `insmod`.
//!
//! On every kernel one test runs first, alone, as a probe: every test loads all
//! programs, so a program the verifier rejects is reported once, with the
//! verifier's log, and the suite is skipped rather than failing once per test (a
//! program the verifier spends minutes on would otherwise cost minutes per test).

use std::{
    collections::HashMap,
    env,
    fmt::Write as _,
    fs::{self, File},
    io::{self, BufRead, BufReader, Read, Write as _},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{build_ebpf, exec, show, workspace_root};

/// Extracted kernels, one directory per kernel release: `vmlinuz`, `package`
/// (the .deb's name), `modules/` (the [`MODULES`] and their dependencies, and
/// `order`, the file names in load order) and, written last, `layout` (what
/// [`cache_layout`] gives). An entry with another `layout` (or none) is stale:
/// it is removed and fetched again.
const CACHE_DIR: &str = "/var/cache/ferry/kernels";
const CACHE_LOCK: &str = "/var/cache/ferry/kernels.lock";
/// What the VMs need: qemu, the busybox the init script runs on, cpio for the
/// initramfs, binutils for `strip` and `readelf`, iproute2 for the `ip` the
/// uplink tests call, xz for compressed modules.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "binutils",
    "iproute2",
    "xz-utils",
];
/// Bump when what a cache entry holds changes.
const CACHE_VERSION: u32 = 2;
/// Kernel modules the tests need (`veth`, for the uplink suite's namespace).
const MODULES: &[&str] = &["veth"];
/// Where the iproute2 `ip` goes in the initramfs; first on the init's PATH, so
/// that busybox's own `ip` applet (in /bin) does not stand in for it.
const IP_IN_VM: &str = "usr/sbin/ip";

/// A packet-test suite: a test target of `proxy-agent`, its name in the init
/// script's marks, and its column in the table.
struct Suite {
    test: &'static str,
    mark: &'static str,
    column: &'static str,
}

/// The first also gives the probe.
const SUITES: &[Suite] = &[
    Suite {
        test: "privileged_packets",
        mark: "packets",
        column: "packet tests",
    },
    Suite {
        test: "privileged_uplink",
        mark: "uplink",
        column: "uplink tests",
    },
];
/// How `Dataplane::load_with` words a failed load: the object (maps, BTF) or a
/// program (followed by its name).
const OBJECT_FAILED: &str = "loading the eBPF object";
const PROGRAM_REJECTED: &str = "the verifier rejected ";
const LOAD_FAILURES: &[&str] = &[OBJECT_FAILED, PROGRAM_REJECTED];
/// Lines the init script prints between the test output; the rest of such a
/// line says what happened.
const MARK: &str = "FERRY-VM: ";
/// A file the tests append a line to when they work around a limitation of
/// the kernel they run on (see `privileged_uplink.rs`); each line is shown
/// under the table, labelled as such.
const NOTES_ENV: &str = "FERRY_TEST_NOTES";
/// On the kernel command line: boot, say so and power off (the KVM check).
const BOOT_ONLY_ARG: &str = "ferry.boot_only";
/// A whole VM run (boot, probe, suite); overridable with FERRY_VM_TIMEOUT_SECS.
/// Under TCG a run takes 200-230 s on an idle 2-core machine, and much longer
/// on a busy one: the limit only catches a hung VM.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
const KVM_CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the verifier log shown in the summary (the rejection is at its end).
const VERIFIER_TAIL: usize = 16;

/// A Debian kernel series and the suite that has it.
struct Series {
    name: &'static str,
    suite: &'static str,
    /// Releases look like `<prefix><abi>-cloud-amd64`, e.g. `5.10.0-32-cloud-amd64`.
    prefix: &'static str,
}

const FLAVOUR: &str = "-cloud-amd64";
const METAPACKAGE: &str = "linux-image-cloud-amd64";
const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        suite: "bookworm",
        prefix: "6.1.0-",
    },
    Series {
        name: "5.10",
        suite: "bullseye",
        prefix: "5.10.0-",
    },
];

unsafe extern "C" {
    fn geteuid() -> u32;
    fn prctl(option: i32, ...) -> i32;
}

const PR_SET_PDEATHSIG: i32 = 1;
const SIGKILL: i32 = 9;

/// Runs the packet tests on `kernel` (`host`, `5.10`, `6.1` or `all`), prints a
/// table of the outcomes and fails if any program was rejected or any test failed.
pub fn run(kernel: &str) -> Result<()> {
    let (with_host, series): (bool, Vec<&Series>) = match kernel {
        "all" => (true, SERIES.iter().collect()),
        "host" => (true, Vec::new()),
        name => match SERIES.iter().find(|s| s.name == name) {
            Some(s) => (false, vec![s]),
            None => bail!("--kernel {name}: expected host, 5.10, 6.1 or all"),
        },
    };
    if unsafe { geteuid() } != 0 {
        bail!("vm-test installs packages, caches kernels in {CACHE_DIR} and loads BPF programs: run it as root");
    }
    let timeout = match env::var("FERRY_VM_TIMEOUT_SECS") {
        Ok(secs) => Duration::from_secs(secs.parse().context("FERRY_VM_TIMEOUT_SECS")?),
        Err(_) => RUN_TIMEOUT,
    };
    if !series.is_empty() {
        ensure_packages()?;
    }
    let programs = object_programs(&build_ebpf::run()?);
    let binaries = SUITES
        .iter()
        .map(|suite| test_binary(suite.test))
        .collect::<Result<Vec<_>>>()?;
    let probe = probe_test(&binaries[0])?;
    let logs = workspace_root().join("target/vm-test");
    fs::create_dir_all(&logs)?;

    let mut outcomes = Vec::new();
    if with_host {
        outcomes.push(run_host(
            &binaries,
            &probe,
            timeout,
            &logs.join("host.log"),
        )?);
    }
    if !series.is_empty() {
        let work = WorkDir::create()?;
        let kernels = series
            .iter()
            .map(|s| cached_kernel(s, &work.0))
            .collect::<Result<Vec<_>>>()?;
        let initramfs = build_initramfs(&work.0, &binaries, &kernels, &probe)?;
        let accel = choose_accel(&kernels[0].join("vmlinuz"), &initramfs)?;
        for (s, dir) in series.iter().zip(&kernels) {
            let log = logs.join(format!("{}.log", s.name));
            let vmlinuz = dir.join("vmlinuz");
            outcomes.push(run_vm(s.name, &vmlinuz, &initramfs, accel, timeout, &log)?);
        }
    }

    println!("\n{}", table(&outcomes, &programs));
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "vm-test failed on {} (logs in {})",
            failed.join(", "),
            logs.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Packages, kernels, the test binary, the initramfs
// ---------------------------------------------------------------------------

/// Installs what is missing from [`PACKAGES`].
fn ensure_packages() -> Result<()> {
    crate::debian::install("vm-test", PACKAGES).map(|_| ())
}

/// What a current cache entry's `layout` file says: the version and the modules.
fn cache_layout() -> String {
    format!("{CACHE_VERSION} {}\n", MODULES.join(" "))
}

/// The newest cached kernel of a series (its directory), fetching it first if
/// none is cached with the current [`cache_layout`]; stale entries of the series
/// are removed then. Cached kernels are kept: remove [`CACHE_DIR`] to fetch
/// newer ones.
fn cached_kernel(series: &Series, work: &Path) -> Result<PathBuf> {
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
fn cache_entries(series: &Series) -> Result<Vec<(u32, PathBuf, bool)>> {
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

fn newest_cached(series: &Series) -> Result<Option<PathBuf>> {
    Ok(cache_entries(series)?
        .into_iter()
        .filter(|(_, _, current)| *current)
        .max_by_key(|(abi, _, _)| *abi)
        .map(|(_, path, _)| path))
}

/// Downloads the series' kernel package with a private apt configuration and
/// keeps its vmlinuz and the [`MODULES`] in the cache; returns the entry.
fn fetch_kernel(series: &Series, work: &Path) -> Result<PathBuf> {
    let apt_dir = work.join(format!("apt-{}", series.suite));
    let parts = apt_dir.join("sources.list.d");
    let lists = apt_dir.join("lists");
    let cache = apt_dir.join("cache");
    let debs = apt_dir.join("debs");
    for dir in [
        &parts,
        &lists.join("partial"),
        &cache.join("archives/partial"),
        &debs,
    ] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let (file_name, sources) = machine_sources()?;
    let (private, name) = private_sources(&sources, series.suite).with_context(|| {
        format!("no Debian archive entry (a suite without `-`) in /etc/apt/{file_name}")
    })?;
    fs::write(parts.join(name), private)?;
    let options = [
        "Dir::Etc::SourceList=/dev/null".to_string(),
        format!("Dir::Etc::SourceParts={}", parts.display()),
        format!("Dir::State::Lists={}", lists.display()),
        format!("Dir::Cache={}", cache.display()),
        format!("Dir::Cache::archives={}", cache.join("archives").display()),
        // The work directory is root's; apt would only warn that `_apt` cannot write there.
        "APT::Sandbox::User=root".to_string(),
    ];
    let apt = |program: &str| {
        let mut cmd = Command::new(program);
        // apt's progress goes with the rest of the log; stdout keeps the table alone.
        if program == "apt-get" {
            cmd.stdout(io::stderr());
        }
        cmd.arg("-q");
        for option in &options {
            cmd.arg("-o").arg(option);
        }
        cmd
    };

    eprintln!(
        "vm-test: fetching Debian {}'s {} kernel",
        series.suite, series.name
    );
    exec(apt("apt-get").arg("update"))?;
    let mut show_meta = apt("apt-cache");
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
    exec(
        apt("apt-get")
            .current_dir(&debs)
            .arg("download")
            .arg(&package),
    )?;
    let deb = only_file(&debs, ".deb")?;
    let root = apt_dir.join("root");
    exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
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

/// Copies the [`MODULES`] and what they depend on into `to`, uncompressed and
/// named `<module>.ko`; returns the file names in load order (dependencies
/// first). `tree` is the package's `lib/modules/<release>`; a package has no
/// `modules.dep` (depmod makes it when the package is installed), so the
/// dependencies come from each module's `.modinfo` (`depends=`).
fn copy_modules(tree: &Path, to: &Path) -> Result<Vec<String>> {
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
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split_once(".ko").map_or(file, |(name, _)| name)
}

/// The kernel treats `-` and `_` in module names alike.
fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// A module file's ELF, uncompressed.
fn module_bytes(file: &Path) -> Result<Vec<u8>> {
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
type ReadModule<'a> = dyn FnMut(&str) -> Result<(Vec<u8>, Vec<String>)> + 'a;

/// `module` and everything it needs, each after what it needs, with what
/// `read` gives for each (its ELF and the names it depends on).
fn load_order(module: &str, read: &mut ReadModule) -> Result<Vec<(String, Vec<u8>)>> {
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
fn modinfo_depends(elf: &[u8]) -> Option<Vec<String>> {
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

/// This machine's Debian apt sources: a file name and its contents.
fn machine_sources() -> Result<(&'static str, String)> {
    let deb822 = Path::new("/etc/apt/sources.list.d/debian.sources");
    if deb822.is_file() {
        return Ok(("sources.list.d/debian.sources", fs::read_to_string(deb822)?));
    }
    let text = fs::read_to_string("/etc/apt/sources.list")
        .context("no /etc/apt/sources.list.d/debian.sources nor /etc/apt/sources.list")?;
    Ok(("sources.list", text))
}

/// `sources` (deb822 stanzas or one-line entries) with the Debian archive entries
/// (those naming a release suite, without `-updates` or `-security`) moved to
/// `suite`, and nothing else. The file name apt needs is the same kind as the input.
fn private_sources(sources: &str, suite: &str) -> Option<(String, &'static str)> {
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
fn depends_on(show: &str, prefix: &str) -> Option<String> {
    show.lines()
        .find_map(|l| l.strip_prefix("Depends:"))?
        .split([',', '|'])
        .map(|dep| dep.split_whitespace().next().unwrap_or_default())
        .find(|name| name.starts_with(prefix) && name.ends_with(FLAVOUR))
        .map(String::from)
}

/// The one file in `dir` whose name ends with `suffix`.
fn only_file(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one *{suffix} in {}, found {}",
            dir.display(),
            found.len()
        ),
    }
}

/// The programs in the eBPF object, for the table: its global functions of
/// default visibility (the compiler's memcpy and the like are hidden). Empty if
/// `readelf` cannot tell.
fn object_programs(object: &Path) -> Vec<String> {
    let Ok(out) = Command::new("readelf")
        .args(["--syms", "--wide"])
        .arg(object)
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [_, _, _, "FUNC", "GLOBAL", "DEFAULT", _, name] => Some(name.to_string()),
                _ => None,
            },
        )
        .collect()
}

/// Builds the test target `name` of proxy-agent (cargo reuses a fresh build)
/// and returns its binary.
fn test_binary(name: &str) -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args([
        "test",
        "-p",
        "proxy-agent",
        "--test",
        name,
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    eprintln!("+ {}", show(&cmd));
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("{} failed: {}", show(&cmd), out.status);
    }
    executable_of(&String::from_utf8_lossy(&out.stdout), name)
        .map(PathBuf::from)
        .with_context(|| format!("cargo named no executable for the {name} test"))
}

/// The `executable` of the test target `name` in cargo's JSON messages. Read
/// with plain string matching: a test path has no quotes or backslashes.
fn executable_of(messages: &str, name: &str) -> Option<String> {
    messages
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter(|l| {
            l.contains("\"kind\":[\"test\"]") && l.contains(&format!("\"name\":\"{name}\""))
        })
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let len = l[start..].find('"')?;
            Some(l[start..start + len].to_string())
        })
}

/// The first test the binary lists: the probe.
fn probe_test(binary: &Path) -> Result<String> {
    let out = Command::new(binary)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("listing the tests of {}", binary.display()))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_suffix(": test"))
        .map(String::from)
        .with_context(|| format!("{} lists no tests", binary.display()))
}

/// A directory for this run under the temp dir, removed when dropped; ones left
/// by runs that were killed are removed when the next run starts.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> Result<Self> {
        let tmp = env::temp_dir();
        for entry in fs::read_dir(&tmp)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("ferry-vm-test.") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        let path = tmp.join(format!("ferry-vm-test.{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.0) {
            eprintln!("vm-test: could not remove {}: {err}", self.0.display());
        }
    }
}

/// An uncompressed newc initramfs: busybox, the stripped test binaries (one per
/// suite, in [`SUITES`] order), iproute2's `ip`, the libraries they need (per
/// ldd), each kernel's modules under `lib/modules/<release>/` (the cache
/// entry's `modules/`) and the init script.
fn build_initramfs(
    work: &Path,
    binaries: &[PathBuf],
    kernels: &[PathBuf],
    probe: &str,
) -> Result<PathBuf> {
    let root = work.join("initramfs");
    for dir in [
        "bin", "dev", "proc", "sys", "tmp", "run", "ferry", "usr/sbin",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    let busybox = root.join("bin/busybox");
    fs::copy("/bin/busybox", &busybox).context("copying /bin/busybox (busybox-static)")?;
    let ip = which("ip").context("no `ip` on PATH (iproute2)")?;
    fs::copy(&ip, root.join(IP_IN_VM)).with_context(|| format!("copying {}", ip.display()))?;
    for (suite, binary) in SUITES.iter().zip(binaries) {
        // Without debug info a binary is a few MB instead of over a hundred.
        exec(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(root.join("ferry").join(suite.test))
                .arg(binary),
        )?;
    }
    for dir in kernels {
        let release = dir.file_name().context("a cache entry without a name")?;
        let target = root.join("lib/modules").join(release);
        fs::create_dir_all(&target)?;
        for entry in fs::read_dir(dir.join("modules"))? {
            let entry = entry?;
            fs::copy(entry.path(), target.join(entry.file_name()))?;
        }
    }
    let programs = [Path::new("/bin/busybox"), &ip]
        .into_iter()
        .chain(binaries.iter().map(PathBuf::as_path));
    for program in programs {
        let out = Command::new("ldd").arg(program).output()?;
        for lib in libraries(&String::from_utf8_lossy(&out.stdout)) {
            let target = root.join(lib.trim_start_matches('/'));
            if target.exists() {
                continue;
            }
            fs::create_dir_all(target.parent().unwrap_or(&root))?;
            fs::copy(&lib, &target).with_context(|| format!("copying {lib}"))?;
        }
    }
    let init = root.join("init");
    fs::write(&init, init_script(probe))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let mut entries = Vec::new();
    walk(&root, &root, &mut entries)?;
    let image = work.join("initramfs.cpio");
    let mut cpio = Command::new("cpio");
    cpio.args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(File::create(&image)?);
    let mut child = cpio.spawn().context("starting cpio")?;
    child
        .stdin
        .take()
        .context("cpio's stdin")?
        .write_all(entries.join("\n").as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed: {status}", show(&cpio));
    }
    Ok(image)
}

/// The first `name` on PATH (and in the sbin directories, which a root
/// environment may lack on PATH).
fn which(name: &str) -> Option<PathBuf> {
    let path = env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found
}

/// Paths relative to `root` of everything under `dir`, parents first.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        out.push(path.strip_prefix(root)?.to_string_lossy().into_owned());
        if path.is_dir() {
            walk(root, &path, out)?;
        }
    }
    Ok(())
}

/// Absolute paths of the libraries and the loader in `ldd` output.
fn libraries(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// The VM's init: mount what the tests need, load the modules and bring up
/// loopback, run the probe, then each suite unless the probe could not load the
/// programs, print it all, power off.
///
/// `ip netns add` bind-mounts each namespace on a file in /run/netns and makes
/// that directory a shared mount of its own; /run/netns is a tmpfs mount here
/// already, so tests making namespaces at once do not race to set it up.
fn init_script(probe: &str) -> String {
    let load_failed: String = LOAD_FAILURES.iter().map(|m| format!(" -e '{m}'")).collect();
    let first = SUITES[0].test;
    let mut suites = String::new();
    for suite in SUITES {
        let _ = write!(
            suites,
            r#"    echo "{MARK}begin {mark}"
    {NOTES_ENV}=/tmp/{mark}.notes ./{test} 2>&1
    rc=$?
    if [ -f /tmp/{mark}.notes ]; then
        while IFS= read -r line; do echo "{MARK}note {mark} $line"; done </tmp/{mark}.notes
    fi
    echo "{MARK}end {mark} $rc"
"#,
            mark = suite.mark,
            test = suite.test
        );
    }
    let ip_dir = Path::new(IP_IN_VM)
        .parent()
        .map(|d| format!("/{}", d.display()))
        .unwrap_or_default();
    format!(
        r#"#!/bin/busybox sh
# Written by `cargo xtask vm-test`.
export PATH={ip_dir}:/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/netns
mount -t tmpfs tmpfs /run/netns
mount --make-shared /run/netns
mount -t bpf bpf /sys/fs/bpf
echo "{MARK}kernel $(uname -r)"
if grep -q {BOOT_ONLY_ARG} /proc/cmdline; then
    echo "{MARK}booted"
    poweroff -f
fi
modules=/lib/modules/$(uname -r)
for m in $(cat $modules/order 2>/dev/null); do
    insmod $modules/$m || echo "{MARK}insmod $m failed"
done
ip link set lo up
export RUST_BACKTRACE=0
cd /ferry
echo "{MARK}begin probe"
./{first} --exact '{probe}' --test-threads=1 >/tmp/probe.log 2>&1
rc=$?
cat /tmp/probe.log
echo "{MARK}end probe $rc"
if [ $rc -ne 0 ] && grep -q -F{load_failed} /tmp/probe.log; then
    echo "{MARK}suites skipped"
else
{suites}fi
echo "{MARK}done"
poweroff -f
"#
    )
}

// ---------------------------------------------------------------------------
// Running: the host, the VMs
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Accel {
    Kvm,
    Tcg,
}

/// KVM when /dev/kvm is there and a VM really boots with it (nested
/// virtualisation can offer /dev/kvm and then fail on the first instructions),
/// else TCG. FERRY_VM_ACCEL=kvm|tcg decides without the check.
fn choose_accel(vmlinuz: &Path, initramfs: &Path) -> Result<Accel> {
    match env::var("FERRY_VM_ACCEL").ok().as_deref() {
        Some("kvm") => return Ok(Accel::Kvm),
        Some("tcg") => return Ok(Accel::Tcg),
        Some(other) => bail!("FERRY_VM_ACCEL={other}: expected kvm or tcg"),
        None => {}
    }
    if File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("vm-test: no usable /dev/kvm: software emulation (TCG)");
        return Ok(Accel::Tcg);
    }
    let mut cmd = qemu(vmlinuz, initramfs, Accel::Kvm, true);
    let run = stream(&mut cmd, KVM_CHECK_TIMEOUT, None, "kvm check", |line| {
        line.contains(&format!("{MARK}booted")) || line.contains("KVM internal error")
    })?;
    if run
        .lines
        .iter()
        .any(|l| l.contains(&format!("{MARK}booted")))
    {
        eprintln!("vm-test: KVM works here");
        Ok(Accel::Kvm)
    } else {
        eprintln!(
            "vm-test: /dev/kvm is there but a VM does not boot with it: software emulation (TCG)"
        );
        Ok(Accel::Tcg)
    }
}

fn qemu(vmlinuz: &Path, initramfs: &Path, accel: Accel, boot_only: bool) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    // In the work directory, so that whatever qemu leaves (a core dump when KVM
    // fails an assertion) goes with it.
    if let Some(work) = initramfs.parent() {
        cmd.current_dir(work);
    }
    match accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => cmd.args(["-accel", "tcg"]),
    };
    let mut append = "console=ttyS0 panic=-1 quiet".to_string();
    if boot_only {
        append.push(' ');
        append.push_str(BOOT_ONLY_ARG);
    }
    cmd.args([
        "-m",
        "1G",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(append);
    cmd
}

fn run_vm(
    name: &str,
    vmlinuz: &Path,
    initramfs: &Path,
    accel: Accel,
    timeout: Duration,
    log: &Path,
) -> Result<Outcome> {
    eprintln!("vm-test: booting {} ({accel:?})", vmlinuz.display());
    let mut log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = qemu(vmlinuz, initramfs, accel, false);
    let run = stream(&mut cmd, timeout, Some(&mut log_file), name, |l| {
        l.contains(&format!("{MARK}done"))
    })?;
    // What the VM says it runs, else the cache's name for it.
    let kernel = marks(&run.lines)
        .find_map(|m| m.strip_prefix("kernel ").map(str::to_string))
        .or_else(|| {
            Some(
                vmlinuz
                    .parent()?
                    .file_name()?
                    .to_string_lossy()
                    .into_owned(),
            )
        })
        .unwrap_or_else(|| name.to_string());
    let how = match accel {
        Accel::Kvm => "KVM",
        Accel::Tcg => "TCG",
    };
    Ok(Outcome::from_run(kernel, how, &run, timeout, log))
}

/// The same steps as the init script, on the running kernel.
fn run_host(
    binaries: &[PathBuf],
    probe: &str,
    timeout: Duration,
    log_path: &Path,
) -> Result<Outcome> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    eprintln!("vm-test: running the packet tests on this machine's kernel {release}");
    let mut log =
        File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let started = Instant::now();
    let mut transcript = Run {
        lines: vec![format!("{MARK}kernel {release}")],
        timed_out: false,
        status: None,
        seconds: 0.0,
    };
    let notes_dir = log_path.parent().unwrap_or(Path::new("."));
    let mut step = |name: &str, binary: &Path, args: &[&str], transcript: &mut Run| -> Result<()> {
        let notes = notes_dir.join(format!("host-{name}.notes"));
        let _ = fs::remove_file(&notes);
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env("RUST_BACKTRACE", "0")
            .env(NOTES_ENV, &notes);
        transcript.lines.push(format!("{MARK}begin {name}"));
        let left = timeout.saturating_sub(started.elapsed());
        let run = stream(&mut cmd, left, Some(&mut log), "host", |_| false)?;
        transcript.lines.extend(run.lines);
        if let Ok(text) = fs::read_to_string(&notes) {
            for line in text.lines() {
                transcript.lines.push(format!("{MARK}note {name} {line}"));
            }
            let _ = fs::remove_file(&notes);
        }
        transcript.timed_out |= run.timed_out;
        if let (false, Some(code)) = (run.timed_out, run.status) {
            transcript.lines.push(format!("{MARK}end {name} {code}"));
        }
        Ok(())
    };
    step(
        "probe",
        &binaries[0],
        &["--exact", probe, "--test-threads=1"],
        &mut transcript,
    )?;
    let (programs, _) = read_outcome(&transcript.lines);
    if matches!(programs, Programs::Rejected { .. }) {
        transcript.lines.push(format!("{MARK}suites skipped"));
    } else {
        for (suite, binary) in SUITES.iter().zip(binaries) {
            if transcript.timed_out {
                break;
            }
            step(suite.mark, binary, &[], &mut transcript)?;
        }
    }
    transcript.seconds = started.elapsed().as_secs_f64();
    Ok(Outcome::from_run(
        format!("{release} (host)"),
        "host",
        &transcript,
        timeout,
        log_path,
    ))
}

/// What a command printed (stdout and stderr, line by line), how it ended and
/// how long it took.
struct Run {
    lines: Vec<String>,
    timed_out: bool,
    /// The exit code; `None` when killed.
    status: Option<i32>,
    seconds: f64,
}

/// Runs `cmd`, echoing its output (prefixed with `label`) and writing it to
/// `log`, until it exits, `stop` matches a line (it is then killed), or
/// `timeout` passes (killed too). The child dies with this process.
fn stream(
    cmd: &mut Command,
    timeout: Duration,
    mut log: Option<&mut File>,
    label: &str,
    stop: impl Fn(&str) -> bool,
) -> Result<Run> {
    eprintln!("+ {}", show(cmd));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", show(cmd)))?;
    let (tx, rx) = mpsc::channel();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|pipe| {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                if tx.send(clean(&line)).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);

    let mut lines = Vec::new();
    let mut timed_out = false;
    let mut stopped = false;
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                eprintln!("[{label}] {line}");
                if let Some(log) = log.as_mut() {
                    writeln!(log, "{line}")?;
                }
                let done = stop(&line);
                lines.push(line);
                if done {
                    stopped = true;
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let note = format!("{MARK}timed out after {} s", timeout.as_secs());
                eprintln!("[{label}] {note}");
                if let Some(log) = log.as_mut() {
                    writeln!(log, "{note}")?;
                }
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = if stopped || timed_out {
        // Once the marker is out the VM is powering off; give it a moment, then
        // make sure. A timed-out run is killed at once.
        finish(
            &mut child,
            if stopped {
                Duration::from_secs(5)
            } else {
                Duration::ZERO
            },
        )?
    } else {
        child.wait()?.code()
    };
    // The pipes close with the child; the readers end with them.
    for reader in readers {
        let _ = reader.join();
    }
    for line in rx.try_iter() {
        if let Some(log) = log.as_mut() {
            writeln!(log, "{line}")?;
        }
        lines.push(line);
    }
    Ok(Run {
        lines,
        timed_out,
        status,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Waits up to `grace` for the child to exit, then kills it.
fn finish(child: &mut Child, grace: Duration) -> Result<Option<i32>> {
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.code());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Ok(child.wait()?.code());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A console line without carriage returns and terminal escape sequences (the
/// firmware clears the screen; echoed, that would clear the terminal too).
fn clean(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters, then one final letter.
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Reading the outcome
// ---------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
enum Programs {
    Loaded,
    /// `program` is `None` when the object itself failed (a map, BTF).
    Rejected {
        program: Option<String>,
        message: String,
    },
    /// No probe result: why.
    Unknown(String),
}

#[derive(Debug, PartialEq)]
enum Tests {
    Counted {
        passed: u32,
        failed: u32,
        failures: Vec<String>,
    },
    Skipped,
    Unfinished(String),
}

struct Outcome {
    kernel: String,
    /// `host`, `KVM` or `TCG`.
    how: &'static str,
    programs: Programs,
    /// One per suite, in [`SUITES`] order.
    suites: Vec<Tests>,
    /// What each suite said it worked around (its [`NOTES_ENV`] lines).
    notes: Vec<Vec<String>>,
    seconds: f64,
    log: PathBuf,
}

impl Outcome {
    fn from_run(
        kernel: String,
        how: &'static str,
        run: &Run,
        timeout: Duration,
        log: &Path,
    ) -> Self {
        let lines = &run.lines;
        let (programs, suites) = read_outcome(lines);
        let suites = suites
            .into_iter()
            .map(|tests| match tests {
                Tests::Unfinished(why) if run.timed_out && why != "did not start" => {
                    Tests::Unfinished(format!("timed out after {} s", timeout.as_secs()))
                }
                other => other,
            })
            .collect();
        let notes = SUITES.iter().map(|s| suite_notes(lines, s.mark)).collect();
        Self {
            kernel,
            how,
            programs,
            suites,
            notes,
            seconds: run.seconds,
            log: log.to_path_buf(),
        }
    }

    fn passed(&self) -> bool {
        self.programs == Programs::Loaded
            && self.suites.iter().all(
                |tests| matches!(tests, Tests::Counted { passed, failed: 0, .. } if *passed > 0),
            )
    }
}

/// The text after [`MARK`] on each marked line.
fn marks(lines: &[String]) -> impl Iterator<Item = &str> {
    lines
        .iter()
        .filter_map(|l| l.find(MARK).map(|i| &l[i + MARK.len()..]))
}

/// The lines between `begin <name>` and `end <name> ...`.
fn section<'a>(lines: &'a [String], name: &str) -> &'a [String] {
    let begin = format!("{MARK}begin {name}");
    let end = format!("{MARK}end {name}");
    let Some(start) = lines.iter().position(|l| l.contains(&begin)) else {
        return &[];
    };
    let rest = &lines[start + 1..];
    let len = rest
        .iter()
        .position(|l| l.contains(&end))
        .unwrap_or(rest.len());
    &rest[..len]
}

fn is_load_failure(line: &str) -> bool {
    LOAD_FAILURES.iter().any(|m| line.contains(m))
}

/// Programs and each suite's tests (in [`SUITES`] order) from a transcript with
/// the init script's marks.
fn read_outcome(lines: &[String]) -> (Programs, Vec<Tests>) {
    let ended = |name: &str| {
        marks(lines)
            .filter_map(|m| m.strip_prefix(&format!("end {name} ")))
            .find_map(|code| code.trim().parse::<i32>().ok())
    };
    let probe = section(lines, "probe");
    let programs = match ended("probe") {
        None if marks(lines).any(|m| m == "begin probe") => {
            Programs::Unknown("probe unfinished".into())
        }
        None => Programs::Unknown("did not start".into()),
        Some(code) => match probe.iter().position(|l| is_load_failure(l)) {
            Some(at) if code != 0 => Programs::Rejected {
                program: probe[at].find(PROGRAM_REJECTED).and_then(|i| {
                    let name = probe[at][i + PROGRAM_REJECTED.len()..]
                        .split_whitespace()
                        .next()?;
                    Some(name.trim_end_matches(':').to_string())
                }),
                message: load_error(&probe[at..]),
            },
            _ => Programs::Loaded,
        },
    };
    let skipped = marks(lines).any(|m| m == "suites skipped");
    let tests = SUITES
        .iter()
        .map(|s| {
            if skipped {
                return Tests::Skipped;
            }
            let suite = section(lines, s.mark);
            match (ended(s.mark), suite.iter().rev().find_map(|l| counts(l))) {
                (Some(_), Some((passed, failed))) => Tests::Counted {
                    passed,
                    failed,
                    failures: failures(suite),
                },
                (Some(code), None) => Tests::Unfinished(format!("no test result (exit {code})")),
                (None, _) if marks(lines).any(|m| m == format!("begin {}", s.mark)) => {
                    Tests::Unfinished("stopped during the tests".into())
                }
                (None, _) => Tests::Unfinished("did not start".into()),
            }
        })
        .collect();
    (programs, tests)
}

/// The notes a suite left (`note <mark> <text>` marks), each once.
fn suite_notes(lines: &[String], mark: &str) -> Vec<String> {
    let prefix = format!("note {mark} ");
    let mut out: Vec<String> = Vec::new();
    for note in marks(lines).filter_map(|m| m.strip_prefix(&prefix)) {
        if !out.iter().any(|n| n == note) {
            out.push(note.to_string());
        }
    }
    out
}

/// `N passed; M failed` from libtest's `test result:` line.
fn counts(line: &str) -> Option<(u32, u32)> {
    let summary = &line[line.find("test result:")?..];
    let number_before = |word: &str| -> Option<u32> {
        let end = summary.find(word)?;
        summary[..end].split_whitespace().last()?.parse().ok()
    };
    Some((number_before(" passed")?, number_before(" failed")?))
}

/// The names libtest lists under its last `failures:` heading.
fn failures(suite: &[String]) -> Vec<String> {
    let Some(start) = suite.iter().rposition(|l| l.trim_end() == "failures:") else {
        return Vec::new();
    };
    suite[start + 1..]
        .iter()
        .take_while(|l| !l.contains("test result:"))
        .filter_map(|l| l.strip_prefix("    "))
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The load error from the probe's output, starting at the line that names it:
/// the error chain, with only the end of the verifier log (where the verifier
/// says why); the whole log is in the run's log file.
fn load_error(from: &[String]) -> String {
    let end = from
        .iter()
        .position(|l| {
            l.starts_with("note: ")
                || l.starts_with("stack backtrace:")
                || l.starts_with("failures:")
                || l.starts_with("---- ")
        })
        .unwrap_or(from.len());
    let block = &from[..end];
    let mut out = String::new();
    let mut i = 0;
    while i < block.len() {
        let line = &block[i];
        if let Some(at) = line.find("Verifier output:") {
            let _ = writeln!(out, "{}", &line[..at + "Verifier output:".len()]);
            // The log runs on, indented, until the next cause or the end.
            let mut log = vec![line[at + "Verifier output:".len()..].trim().to_string()];
            i += 1;
            while i < block.len() && !is_cause(&block[i]) {
                log.push(block[i].trim().to_string());
                i += 1;
            }
            while log.last().is_some_and(String::is_empty) {
                log.pop();
            }
            if log.len() > VERIFIER_TAIL {
                let _ = writeln!(
                    out,
                    "       ... ({} lines of the log before these)",
                    log.len() - VERIFIER_TAIL
                );
            }
            for l in &log[log.len().saturating_sub(VERIFIER_TAIL)..] {
                let _ = writeln!(out, "       {l}");
            }
            continue;
        }
        if !line.trim().is_empty() {
            let _ = writeln!(out, "{line}");
        }
        i += 1;
    }
    out.trim_end().to_string()
}

/// anyhow's `Caused by:` entries: `    1: ...`.
fn is_cause(line: &str) -> bool {
    let t = line.trim_start();
    line.len() - t.len() == 4
        && t.split_once(": ")
            .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
}

fn table(outcomes: &[Outcome], programs: &[String]) -> String {
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            let programs = match &o.programs {
                Programs::Loaded if programs.is_empty() => "all loaded".into(),
                Programs::Loaded => format!("{} ok", programs.join(", ")),
                Programs::Rejected {
                    program: Some(p), ..
                } => format!("{p} REJECTED"),
                Programs::Rejected { program: None, .. } => "object not loaded".into(),
                Programs::Unknown(why) => why.clone(),
            };
            let tests = o.suites.iter().zip(&o.notes).map(|(tests, notes)| {
                let mut cell = match tests {
                    Tests::Counted { passed, failed, .. } => {
                        format!("{passed} passed, {failed} failed")
                    }
                    Tests::Skipped => "not run".into(),
                    Tests::Unfinished(why) => why.clone(),
                };
                if !notes.is_empty() {
                    cell.push_str(" (kernel limitation, see below)");
                }
                cell
            });
            [o.kernel.clone(), programs]
                .into_iter()
                .chain(tests)
                .chain([format!("{:.0} s ({})", o.seconds, o.how)])
                .collect()
        })
        .collect();
    let header: Vec<String> = ["kernel", "programs"]
        .into_iter()
        .chain(SUITES.iter().map(|s| s.column))
        .chain(["time"])
        .map(String::from)
        .collect();
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let last = row.len() - 1;
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    for o in outcomes {
        if let Programs::Rejected { message, .. } = &o.programs {
            let _ = write!(
                out,
                "\n{}: the programs did not load:\n{message}\n",
                o.kernel
            );
        }
        if o.programs == Programs::Unknown("probe unfinished".into()) {
            let _ = writeln!(
                out,
                "\n{}: the first test did not finish. A program the verifier works on for \
                 minutes (a loop it cannot bound, say) looks like this; the run on this \
                 machine's kernel shows the verifier's log sooner.",
                o.kernel
            );
        }
        for (suite, notes) in SUITES.iter().zip(&o.notes) {
            for note in notes {
                let _ = writeln!(
                    out,
                    "\n{}: {}: known kernel limitation, worked around: {note}",
                    o.kernel, suite.column
                );
            }
        }
        for (suite, tests) in SUITES.iter().zip(&o.suites) {
            if let Tests::Counted { failures, .. } = tests {
                if !failures.is_empty() {
                    let _ = writeln!(
                        out,
                        "\n{}: {} failed: {}",
                        o.kernel,
                        suite.column,
                        failures.join(", ")
                    );
                }
            }
        }
        if !o.passed() {
            let _ = writeln!(out, "{}: full output in {}", o.kernel, o.log.display());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(String::from).collect()
    }

    #[test]
    fn deb822_release_stanza_moves_to_the_suite() {
        let machine = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                       Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                       Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\
                       Components: main\n";
        let (out, name) = private_sources(machine, "bullseye").unwrap();
        assert_eq!(name, "ferry-vm-test.sources");
        assert_eq!(
            out,
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bullseye\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        );
    }

    #[test]
    fn one_line_release_entries_move_to_the_suite() {
        let machine = "deb [arch=amd64] http://mirror.example/debian bookworm main\n\
                       deb http://mirror.example/debian-security bookworm-security main\n\
                       # deb http://other bookworm main\n";
        let (out, name) = private_sources(machine, "bullseye").unwrap();
        assert_eq!(name, "ferry-vm-test.list");
        assert_eq!(
            out,
            "deb [arch=amd64] http://mirror.example/debian bullseye main\n"
        );
        assert!(private_sources("deb http://x bookworm-security main\n", "bullseye").is_none());
    }

    #[test]
    fn metapackage_names_the_kernel() {
        let show = "Package: linux-image-cloud-amd64\nDepends: linux-image-5.10.0-32-cloud-amd64 (= 5.10.223-1)\n";
        assert_eq!(
            depends_on(show, "linux-image-5.10.0-").as_deref(),
            Some("linux-image-5.10.0-32-cloud-amd64")
        );
        assert_eq!(depends_on(show, "linux-image-6.1.0-"), None);
    }

    #[test]
    fn cargo_message_names_the_test_executable() {
        let messages = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"proxy-agent"},"executable":"/t/debug/proxy-agent"}
{"reason":"compiler-artifact","target":{"kind":["test"],"crate_types":["bin"],"name":"privileged_packets"},"executable":"/t/debug/deps/privileged_packets-0123"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_of(messages, "privileged_packets").as_deref(),
            Some("/t/debug/deps/privileged_packets-0123")
        );
    }

    /// A minimal ELF64 with a `.modinfo` section holding `info`.
    fn module_elf(info: &[u8]) -> Vec<u8> {
        let names = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let info_at = elf.len();
        elf.extend_from_slice(info);
        let names_at = elf.len();
        elf.extend_from_slice(names);
        let shoff = elf.len();
        let header = |name: u32, offset: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        elf.extend(header(0, 0, 0));
        elf.extend(header(1, info_at, info.len()));
        elf.extend(header(10, names_at, names.len()));
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn modinfo_gives_the_dependencies() {
        let elf = module_elf(b"license=GPL\0depends=a_b,c\0intree=Y\0");
        assert_eq!(modinfo_depends(&elf).unwrap(), ["a_b", "c"]);
        let none = module_elf(b"depends=\0name=veth\0");
        assert_eq!(modinfo_depends(&none).unwrap(), Vec::<String>::new());
        assert!(modinfo_depends(b"not an elf").is_none());
        assert_eq!(module_name("kernel/net/a/b-c.ko.xz"), "b-c");
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let deps: HashMap<&str, Vec<String>> = [
            ("veth", vec!["a-b".to_string(), "c".to_string()]),
            ("a_b", vec!["c".to_string()]),
            ("c", vec![]),
        ]
        .into_iter()
        .collect();
        let order = load_order("veth", &mut |name| {
            let needs = deps.get(module_key(name).as_str()).context("none")?;
            Ok((name.as_bytes().to_vec(), needs.clone()))
        })
        .unwrap();
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["c", "a-b", "veth"]);
        assert_eq!(order[2].1, b"veth");
    }

    #[test]
    fn table_has_a_column_per_suite() {
        let outcome = Outcome {
            kernel: "6.1.0-50-cloud-amd64".into(),
            how: "KVM",
            programs: Programs::Loaded,
            suites: vec![
                Tests::Counted {
                    passed: 35,
                    failed: 0,
                    failures: Vec::new(),
                },
                Tests::Counted {
                    passed: 10,
                    failed: 1,
                    failures: vec!["t".into()],
                },
            ],
            notes: vec![Vec::new(), Vec::new()],
            seconds: 12.0,
            log: PathBuf::from("/l"),
        };
        assert!(!outcome.passed());
        let text = table(&[outcome], &[]);
        let mut rows = text.lines();
        assert_eq!(
            rows.next().unwrap(),
            "kernel                programs    packet tests         uplink tests         time"
        );
        assert_eq!(
            rows.next().unwrap(),
            "6.1.0-50-cloud-amd64  all loaded  35 passed, 0 failed  10 passed, 1 failed  12 s (KVM)"
        );
        assert!(text.contains("uplink tests failed: t"), "{text}");
    }

    #[test]
    fn ldd_output_gives_libraries_and_loader() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            libraries(ldd),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(libraries("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn console_noise_is_removed() {
        assert_eq!(
            clean(b"\x1bc\x1b[?7l\x1b[2JFERRY-VM: done\r"),
            "FERRY-VM: done"
        );
    }

    const PASSING: &str = "\
FERRY-VM: kernel 5.10.0-32-cloud-amd64
FERRY-VM: begin probe

running 1 test
test arp_is_untouched ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 33 filtered out; finished in 0.5s
FERRY-VM: end probe 0
FERRY-VM: begin packets
running 34 tests
test result: FAILED. 33 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 30s

failures:

---- a stdout ----
assertion failed

failures:
    ipv6_is_untouched

test result: FAILED. 33 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 30.28s
FERRY-VM: end packets 101
FERRY-VM: begin uplink

running 11 tests
known kernel limitation: no ctx
test result: ok. 11 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.1s
FERRY-VM: note uplink no ctx
FERRY-VM: end uplink 0
FERRY-VM: done";

    #[test]
    fn passing_probe_and_failing_suite() {
        let (programs, tests) = read_outcome(&lines(PASSING));
        assert_eq!(programs, Programs::Loaded);
        assert_eq!(
            tests,
            [
                Tests::Counted {
                    passed: 33,
                    failed: 1,
                    failures: vec!["ipv6_is_untouched".into()]
                },
                Tests::Counted {
                    passed: 11,
                    failed: 0,
                    failures: Vec::new()
                }
            ]
        );
        let run = Run {
            lines: lines(PASSING),
            timed_out: false,
            status: Some(0),
            seconds: 1.0,
        };
        let outcome = Outcome::from_run("k".into(), "TCG", &run, RUN_TIMEOUT, Path::new("/l"));
        assert_eq!(outcome.notes, [Vec::<String>::new(), vec!["no ctx".into()]]);
        let text = table(&[outcome], &[]);
        assert!(
            text.contains("11 passed, 0 failed (kernel limitation, see below)"),
            "{text}"
        );
        assert!(
            text.contains("k: uplink tests: known kernel limitation, worked around: no ctx"),
            "{text}"
        );
    }

    #[test]
    fn rejected_program_keeps_the_verifier_message() {
        let mut transcript = String::from(
            "FERRY-VM: kernel 5.10.0-32-cloud-amd64\nFERRY-VM: begin probe\nrunning 1 test\n\
             test arp_is_untouched ... FAILED\n\nfailures:\n\n---- arp_is_untouched stdout ----\n\n\
             thread 'arp_is_untouched' panicked at proxy-agent/tests/privileged_packets.rs:89:44:\n\
             load the programs: the verifier rejected from_pod\n\nCaused by:\n    \
             0: the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). Verifier output: 0: (61) r9 = *(u32 *)(r1 +0)\n",
        );
        for i in 1..40 {
            let _ = writeln!(transcript, "       {i}: (bf) r1 = r6");
        }
        transcript.push_str(
            "       infinite loop detected at insn 314\n       processed 493 insns (limit 1000000)\n       \n    \
             1: Invalid argument (os error 22)\nnote: run with `RUST_BACKTRACE=1`\n\nfailures:\n    arp_is_untouched\n\n\
             test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 33 filtered out\n\
             FERRY-VM: end probe 101\nFERRY-VM: suites skipped\nFERRY-VM: done\n",
        );
        let (programs, tests) = read_outcome(&lines(&transcript));
        assert_eq!(tests, [Tests::Skipped, Tests::Skipped]);
        let Programs::Rejected { program, message } = programs else {
            panic!("{programs:?}");
        };
        assert_eq!(program.as_deref(), Some("from_pod"));
        assert!(
            message.starts_with("load the programs: the verifier rejected from_pod\nCaused by:\n"),
            "{message}"
        );
        assert!(
            message.contains("infinite loop detected at insn 314"),
            "{message}"
        );
        assert!(
            message.contains("lines of the log before these"),
            "{message}"
        );
        assert!(
            message.ends_with("    1: Invalid argument (os error 22)"),
            "{message}"
        );
        assert!(
            !message.contains(" 5: (bf)"),
            "only the end of the log: {message}"
        );
    }

    #[test]
    fn a_run_that_stops_early_is_unfinished() {
        let (programs, tests) = read_outcome(&lines(
            "FERRY-VM: kernel 6.1.0-1-cloud-amd64\nFERRY-VM: begin probe\n",
        ));
        assert_eq!(programs, Programs::Unknown("probe unfinished".into()));
        let not_started = || Tests::Unfinished("did not start".into());
        assert_eq!(tests, [not_started(), not_started()]);
        let (_, tests) = read_outcome(&lines(
            "FERRY-VM: begin probe\nFERRY-VM: end probe 0\nFERRY-VM: begin packets\ntest a ... ok\n",
        ));
        assert_eq!(
            tests,
            [
                Tests::Unfinished("stopped during the tests".into()),
                not_started()
            ]
        );
    }
}
