//! `cargo xtask vm-test [--kernel host|5.10|6.1|all]`: the packet tests on the
//! kernels Ferry supports, each in its own VM. This file holds what the steps
//! share (the suites, the kernel series, the init script's marks) and the
//! task itself; `kernels` fetches and caches the kernels (`modules` their
//! modules), `initramfs` builds what the VMs boot, `run` runs the suites (on
//! this kernel and under qemu) and `report` reads their output into a table.
//!
//! The kernels are Debian's cloud kernels: 5.10 from bullseye, 6.1 from bookworm.
//! Each is fetched once through a private apt configuration made at run time from
//! this machine's own Debian sources with the suite changed (so no mirror is named
//! here and `/etc/apt` stays as it is), and kept in `/var/cache/ferry/kernels`. It boots under
//! qemu (KVM when it really works here, else TCG) with an initramfs of Debian's
//! static busybox, an init script, the test binaries of the suites
//! ([`SUITES`]: `privileged_packets`, `privileged_uplink` and the socket
//! hooks' `privileged_sock`, which dial real sockets in a cgroup), this machine's
//! iproute2 `ip` and the libraries of all of them. The init script runs the
//! tests, prints their output on the serial console and powers off; this side
//! reads the console. The running kernel ("host") runs the same binaries directly.
//!
//! Loading the programs and BPF_PROG_TEST_RUN are built into these kernels; the
//! uplink suite also makes network namespaces with veth pairs (for the FIB its
//! programs look up), and `veth` is a module there. The cache keeps, beside each
//! vmlinuz, the modules it needs (with what they depend on, per the package's
//! `modules.dep`), which the init script loads with `insmod`.
//!
//! On every kernel one test runs first, alone, as a probe: every test loads all
//! programs, so a program the verifier rejects is reported once, with the
//! verifier's log, and the suite is skipped rather than failing once per test (a
//! program the verifier spends minutes on would otherwise cost minutes per test).

mod initramfs;
mod kernels;
mod modules;
mod report;
mod run;
#[cfg(test)]
mod tests;

use std::{env, fs, time::Duration};

use anyhow::{bail, Context, Result};

use crate::{
    build_ebpf,
    sys::{require_root, workspace_root, TempDir},
};

/// What the VMs need: qemu, the busybox the init script runs on, cpio for the
/// initramfs, binutils for `strip` and `readelf`, iproute2 for the `ip` the
/// uplink tests call, xz for compressed modules.
pub(super) const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "binutils",
    "iproute2",
    "xz-utils",
];

/// A packet-test suite: a test target of `proxy-agent`, its name in the init
/// script's marks, and its column in the table.
pub(super) struct Suite {
    pub(super) test: &'static str,
    pub(super) mark: &'static str,
    pub(super) column: &'static str,
}

/// The first also gives the probe.
pub(super) const SUITES: &[Suite] = &[
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
    Suite {
        test: "privileged_sock",
        mark: "sock",
        column: "socket tests",
    },
];
/// Lines the init script prints between the test output; the rest of such a
/// line says what happened.
pub(super) const MARK: &str = "FERRY-VM: ";
/// A file the tests append a line to when they work around a limitation of
/// the kernel they run on (see `privileged_uplink/main.rs`); each line is shown
/// under the table, labelled as such.
pub(super) const NOTES_ENV: &str = "FERRY_TEST_NOTES";
/// On the kernel command line: boot, say so and power off (the KVM check).
pub(super) const BOOT_ONLY_ARG: &str = "ferry.boot_only";
/// A whole VM run (boot, probe, suites); overridable with FERRY_VM_TIMEOUT_SECS.
/// Under TCG the probe and the three suites took about 600 s on 5.10 on an
/// idle 2-core machine (packets 301 s, uplink 241 s), and machines of this
/// kind differ by 2x: the limit only catches a hung VM.
pub(super) const RUN_TIMEOUT: Duration = Duration::from_secs(1200);

/// A Debian kernel series and the suite that has it.
pub(super) struct Series {
    pub(super) name: &'static str,
    pub(super) suite: &'static str,
    /// Releases look like `<prefix><abi>-cloud-amd64`, e.g. `5.10.0-32-cloud-amd64`.
    pub(super) prefix: &'static str,
}

pub(super) const SERIES: &[Series] = &[
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
    require_root(&format!(
        "vm-test installs packages, caches kernels in {} and loads BPF programs: run it as root",
        kernels::CACHE_DIR
    ))?;
    let timeout = match env::var("FERRY_VM_TIMEOUT_SECS") {
        Ok(secs) => Duration::from_secs(secs.parse().context("FERRY_VM_TIMEOUT_SECS")?),
        Err(_) => RUN_TIMEOUT,
    };
    if !series.is_empty() {
        ensure_packages()?;
    }
    let programs = initramfs::object_programs(&build_ebpf::run()?);
    let binaries = SUITES
        .iter()
        .map(|suite| initramfs::test_binary(suite.test))
        .collect::<Result<Vec<_>>>()?;
    let probe = initramfs::probe_test(&binaries[0])?;
    let logs = workspace_root().join("target/vm-test");
    fs::create_dir_all(&logs)?;

    let mut outcomes = Vec::new();
    if with_host {
        outcomes.push(run::run_host(
            &binaries,
            &probe,
            timeout,
            &logs.join("host.log"),
        )?);
    }
    if !series.is_empty() {
        let work = TempDir::per_process("ferry-vm-test", "vm-test")?;
        let kernels = series
            .iter()
            .map(|s| kernels::cached_kernel(s, work.path()))
            .collect::<Result<Vec<_>>>()?;
        let initramfs = initramfs::build(work.path(), &binaries, &kernels, &probe)?;
        let accel = run::choose_accel(&kernels[0].join("vmlinuz"), &initramfs)?;
        for (s, dir) in series.iter().zip(&kernels) {
            let log = logs.join(format!("{}.log", s.name));
            let vmlinuz = dir.join("vmlinuz");
            outcomes.push(run::run_vm(
                s.name, &vmlinuz, &initramfs, accel, timeout, &log,
            )?);
        }
    }

    println!("\n{}", report::table(&outcomes, &programs));
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

/// Installs what is missing from [`PACKAGES`].
pub(super) fn ensure_packages() -> Result<()> {
    crate::debian::install("vm-test", PACKAGES).map(|_| ())
}
