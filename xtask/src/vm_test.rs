//! `cargo xtask vm-test [--kernel host|5.10|6.1|all]`: the packet tests on the
//! kernels Ferry supports, each in its own VM.
//!
//! The kernels are Debian's cloud kernels: 5.10 from bullseye, 6.1 from bookworm.
//! Each is fetched once through a private apt configuration made at run time from
//! this machine's own Debian sources with the suite changed (so no mirror is named
//! here and `/etc/apt` stays as it is), and kept in [`CACHE_DIR`]. It boots under
//! qemu (KVM when it really works here, else TCG) with an initramfs of Debian's
//! static busybox, an init script and the `privileged_packets` test binary with its
//! libraries. The init script runs the tests, prints their output on the serial
//! console and powers off; this side reads the console. The running kernel
//! ("host") runs the same binary directly.
//!
//! The packet tests need no modules: loading the programs and BPF_PROG_TEST_RUN
//! are built into these kernels.
//!
//! On every kernel one test runs first, alone, as a probe: every test loads all
//! programs, so a program the verifier rejects is reported once, with the
//! verifier's log, and the suite is skipped rather than failing once per test (a
//! program the verifier spends minutes on would otherwise cost minutes per test).

use std::{
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

/// Extracted kernels, one directory per kernel release (`vmlinuz` and `package`).
const CACHE_DIR: &str = "/var/cache/ferry/kernels";
const CACHE_LOCK: &str = "/var/cache/ferry/kernels.lock";
/// What the VMs need: qemu, the busybox the init script runs on, cpio for the
/// initramfs, binutils for `strip` and `readelf`.
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "binutils"];
const TEST_NAME: &str = "privileged_packets";
/// How `Dataplane::load_with` words a failed load: the object (maps, BTF) or a
/// program (followed by its name).
const OBJECT_FAILED: &str = "loading the eBPF object";
const PROGRAM_REJECTED: &str = "the verifier rejected ";
const LOAD_FAILURES: &[&str] = &[OBJECT_FAILED, PROGRAM_REJECTED];
/// Lines the init script prints between the test output; the rest of such a
/// line says what happened.
const MARK: &str = "FERRY-VM: ";
/// On the kernel command line: boot, say so and power off (the KVM check).
const BOOT_ONLY_ARG: &str = "ferry.boot_only";
/// A whole VM run (boot, probe, suite); overridable with FERRY_VM_TIMEOUT_SECS.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);
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
    let binary = test_binary()?;
    let probe = probe_test(&binary)?;
    let logs = workspace_root().join("target/vm-test");
    fs::create_dir_all(&logs)?;

    let mut outcomes = Vec::new();
    if with_host {
        outcomes.push(run_host(&binary, &probe, timeout, &logs.join("host.log"))?);
    }
    if !series.is_empty() {
        let work = WorkDir::create()?;
        let kernels = series
            .iter()
            .map(|s| cached_kernel(s, &work.0))
            .collect::<Result<Vec<_>>>()?;
        let initramfs = build_initramfs(&work.0, &binary, &probe)?;
        let accel = choose_accel(&kernels[0], &initramfs)?;
        for (s, vmlinuz) in series.iter().zip(&kernels) {
            let log = logs.join(format!("{}.log", s.name));
            outcomes.push(run_vm(s.name, vmlinuz, &initramfs, accel, timeout, &log)?);
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

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .is_ok_and(|out| out.stdout == b"installed")
}

/// Installs what is missing from [`PACKAGES`]; `apt-get update` only then.
fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("vm-test: installing {}", missing.join(" "));
    exec(
        Command::new("apt-get")
            .stdout(io::stderr())
            .args(["update", "-q"]),
    )?;
    exec(
        Command::new("apt-get")
            .stdout(io::stderr())
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// The newest cached kernel of a series, fetching it first if none is cached.
/// Cached kernels are kept: remove [`CACHE_DIR`] to fetch newer ones.
fn cached_kernel(series: &Series, work: &Path) -> Result<PathBuf> {
    if let Some(vmlinuz) = newest_cached(series)? {
        return Ok(vmlinuz);
    }
    fs::create_dir_all(CACHE_DIR).with_context(|| format!("creating {CACHE_DIR}"))?;
    // Two runs at once: the second waits, then finds the kernel cached.
    let lock = File::create(CACHE_LOCK).with_context(|| format!("creating {CACHE_LOCK}"))?;
    lock.lock()
        .with_context(|| format!("locking {CACHE_LOCK}"))?;
    if let Some(vmlinuz) = newest_cached(series)? {
        return Ok(vmlinuz);
    }
    fetch_kernel(series, work)
}

fn newest_cached(series: &Series) -> Result<Option<PathBuf>> {
    let Ok(entries) = fs::read_dir(CACHE_DIR) else {
        return Ok(None);
    };
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let abi = name
            .strip_prefix(series.prefix)
            .and_then(|rest| rest.strip_suffix(FLAVOUR))
            .and_then(|abi| abi.parse::<u32>().ok());
        if let Some(abi) = abi {
            if path.join("vmlinuz").is_file() && best.as_ref().is_none_or(|(b, _)| abi > *b) {
                best = Some((abi, path.join("vmlinuz")));
            }
        }
    }
    Ok(best.map(|(_, path)| path))
}

/// Downloads the series' kernel package with a private apt configuration and
/// keeps its vmlinuz in the cache.
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
    // Through a temporary name: a cached vmlinuz is always whole.
    let part = target.join("vmlinuz.part");
    fs::copy(&vmlinuz, &part).with_context(|| format!("copying {}", vmlinuz.display()))?;
    fs::rename(&part, target.join("vmlinuz"))?;
    eprintln!(
        "vm-test: cached {release} ({deb_name}) in {}",
        target.display()
    );
    Ok(target.join("vmlinuz"))
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

/// Builds the packet tests (once; cargo reuses a fresh build) and returns the binary.
fn test_binary() -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args([
        "test",
        "-p",
        "proxy-agent",
        "--test",
        TEST_NAME,
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    eprintln!("+ {}", show(&cmd));
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("{} failed: {}", show(&cmd), out.status);
    }
    executable_of(&String::from_utf8_lossy(&out.stdout), TEST_NAME)
        .map(PathBuf::from)
        .with_context(|| format!("cargo named no executable for the {TEST_NAME} test"))
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

/// An uncompressed newc initramfs: busybox, the stripped test binary, the
/// libraries both need (per ldd) and the init script.
fn build_initramfs(work: &Path, binary: &Path, probe: &str) -> Result<PathBuf> {
    let root = work.join("initramfs");
    for dir in ["bin", "dev", "proc", "sys", "tmp", "ferry"] {
        fs::create_dir_all(root.join(dir))?;
    }
    let busybox = root.join("bin/busybox");
    fs::copy("/bin/busybox", &busybox).context("copying /bin/busybox (busybox-static)")?;
    let test = root.join("ferry").join(TEST_NAME);
    // Without debug info the binary is a few MB instead of over a hundred.
    exec(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&test)
            .arg(binary),
    )?;
    for program in [Path::new("/bin/busybox"), binary] {
        let out = Command::new("ldd").arg(program).output()?;
        for lib in libraries(&String::from_utf8_lossy(&out.stdout)) {
            let target = root.join(lib.trim_start_matches('/'));
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

/// The VM's init: mount what the tests need, run the probe, then the suite unless
/// the probe could not load the programs, print it all, power off.
fn init_script(probe: &str) -> String {
    let load_failed: String = LOAD_FAILURES.iter().map(|m| format!(" -e '{m}'")).collect();
    format!(
        r#"#!/bin/busybox sh
# Written by `cargo xtask vm-test`.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
echo "{MARK}kernel $(uname -r)"
if grep -q {BOOT_ONLY_ARG} /proc/cmdline; then
    echo "{MARK}booted"
    poweroff -f
fi
export RUST_BACKTRACE=0
cd /ferry
echo "{MARK}begin probe"
./{TEST_NAME} --exact '{probe}' --test-threads=1 >/tmp/probe.log 2>&1
rc=$?
cat /tmp/probe.log
echo "{MARK}end probe $rc"
if [ $rc -ne 0 ] && grep -q -F{load_failed} /tmp/probe.log; then
    echo "{MARK}suite skipped"
else
    echo "{MARK}begin suite"
    ./{TEST_NAME} 2>&1
    echo "{MARK}end suite $?"
fi
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
fn run_host(binary: &Path, probe: &str, timeout: Duration, log_path: &Path) -> Result<Outcome> {
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
    let mut step = |name: &str, args: &[&str], transcript: &mut Run| -> Result<()> {
        let mut cmd = Command::new(binary);
        cmd.args(args).env("RUST_BACKTRACE", "0");
        transcript.lines.push(format!("{MARK}begin {name}"));
        let left = timeout.saturating_sub(started.elapsed());
        let run = stream(&mut cmd, left, Some(&mut log), "host", |_| false)?;
        transcript.lines.extend(run.lines);
        transcript.timed_out |= run.timed_out;
        if let (false, Some(code)) = (run.timed_out, run.status) {
            transcript.lines.push(format!("{MARK}end {name} {code}"));
        }
        Ok(())
    };
    step(
        "probe",
        &["--exact", probe, "--test-threads=1"],
        &mut transcript,
    )?;
    let (programs, _) = read_outcome(&transcript.lines);
    if matches!(programs, Programs::Rejected { .. }) {
        transcript.lines.push(format!("{MARK}suite skipped"));
    } else if !transcript.timed_out {
        step("suite", &[], &mut transcript)?;
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
    tests: Tests,
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
        let (programs, tests) = read_outcome(lines);
        let tests = match tests {
            Tests::Unfinished(_) if run.timed_out => {
                Tests::Unfinished(format!("timed out after {} s", timeout.as_secs()))
            }
            other => other,
        };
        Self {
            kernel,
            how,
            programs,
            tests,
            seconds: run.seconds,
            log: log.to_path_buf(),
        }
    }

    fn passed(&self) -> bool {
        self.programs == Programs::Loaded
            && matches!(self.tests, Tests::Counted { passed, failed: 0, .. } if passed > 0)
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

/// Programs and tests from a transcript with the init script's marks.
fn read_outcome(lines: &[String]) -> (Programs, Tests) {
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
    let tests = if marks(lines).any(|m| m == "suite skipped") {
        Tests::Skipped
    } else {
        let suite = section(lines, "suite");
        match (ended("suite"), suite.iter().rev().find_map(|l| counts(l))) {
            (Some(_), Some((passed, failed))) => Tests::Counted {
                passed,
                failed,
                failures: failures(suite),
            },
            (Some(code), None) => Tests::Unfinished(format!("no test result (exit {code})")),
            (None, _) if marks(lines).any(|m| m.starts_with("begin suite")) => {
                Tests::Unfinished("stopped during the tests".into())
            }
            (None, _) => Tests::Unfinished("did not start".into()),
        }
    };
    (programs, tests)
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
    let rows: Vec<[String; 4]> = outcomes
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
            let tests = match &o.tests {
                Tests::Counted { passed, failed, .. } => {
                    format!("{passed} passed, {failed} failed")
                }
                Tests::Skipped => "not run".into(),
                Tests::Unfinished(why) => why.clone(),
            };
            [
                o.kernel.clone(),
                programs,
                tests,
                format!("{:.0} s ({})", o.seconds, o.how),
            ]
        })
        .collect();
    let header = ["kernel", "programs", "packet tests", "time"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header.map(String::from)).chain(rows) {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
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
        if let Tests::Counted { failures, .. } = &o.tests {
            if !failures.is_empty() {
                let _ = writeln!(out, "\n{}: failed: {}", o.kernel, failures.join(", "));
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
FERRY-VM: begin suite
running 34 tests
test result: FAILED. 33 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 30s

failures:

---- a stdout ----
assertion failed

failures:
    ipv6_is_untouched

test result: FAILED. 33 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 30.28s
FERRY-VM: end suite 101
FERRY-VM: done";

    #[test]
    fn passing_probe_and_failing_suite() {
        let (programs, tests) = read_outcome(&lines(PASSING));
        assert_eq!(programs, Programs::Loaded);
        assert_eq!(
            tests,
            Tests::Counted {
                passed: 33,
                failed: 1,
                failures: vec!["ipv6_is_untouched".into()]
            }
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
             FERRY-VM: end probe 101\nFERRY-VM: suite skipped\nFERRY-VM: done\n",
        );
        let (programs, tests) = read_outcome(&lines(&transcript));
        assert_eq!(tests, Tests::Skipped);
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
        assert_eq!(tests, Tests::Unfinished("did not start".into()));
        let (_, tests) = read_outcome(&lines(
            "FERRY-VM: begin probe\nFERRY-VM: end probe 0\nFERRY-VM: begin suite\ntest a ... ok\n",
        ));
        assert_eq!(tests, Tests::Unfinished("stopped during the tests".into()));
    }
}
