//! What the VMs boot: the test binaries (built by cargo), the programs in the
//! eBPF object, and an initramfs of busybox, those binaries, iproute2's `ip`,
//! their libraries, the kernels' modules and the init script.

use std::{
    fmt::Write as _,
    fs::{self, File},
    io::Write as _,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use super::{report::LOAD_FAILURES, BOOT_ONLY_ARG, MARK, NOTES_ENV, SUITES};
use crate::sys::{exec, show, which, workspace_root};

/// Where the iproute2 `ip` goes in the initramfs; first on the init's PATH, so
/// that busybox's own `ip` applet (in /bin) does not stand in for it.
pub(super) const IP_IN_VM: &str = "usr/sbin/ip";

/// The programs in the eBPF object, for the table: its global functions of
/// default visibility (the compiler's memcpy and the like are hidden). Empty if
/// `readelf` cannot tell.
pub(super) fn object_programs(object: &Path) -> Vec<String> {
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
pub(super) fn test_binary(name: &str) -> Result<PathBuf> {
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
pub(super) fn executable_of(messages: &str, name: &str) -> Option<String> {
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
pub(super) fn probe_test(binary: &Path) -> Result<String> {
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

/// An uncompressed newc initramfs: busybox, the stripped test binaries (one per
/// suite, in [`SUITES`] order), iproute2's `ip`, the libraries they need (per
/// ldd), each kernel's modules under `lib/modules/<release>/` (the cache
/// entry's `modules/`) and the init script.
pub(super) fn build(
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

/// Paths relative to `root` of everything under `dir`, parents first.
pub(super) fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
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
pub(super) fn libraries(ldd: &str) -> Vec<String> {
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
pub(super) fn init_script(probe: &str) -> String {
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
mount -t cgroup2 cgroup2 /sys/fs/cgroup
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
./{first} --exact '{probe}' --test-threads=1 --nocapture >/tmp/probe.log 2>&1
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
