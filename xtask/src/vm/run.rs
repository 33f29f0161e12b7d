//! Running the suites: on this machine's kernel directly, and in qemu VMs
//! (KVM where it really works, else TCG), streaming and logging what they print.

use std::{
    env,
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write as _},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    report::{marks, read_outcome, Outcome, Programs},
    BOOT_ONLY_ARG, MARK, NOTES_ENV, SUITES,
};
use crate::sys::show;

/// A boot that only checks whether KVM works.
pub(super) const KVM_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Accel {
    Kvm,
    Tcg,
}

/// KVM when /dev/kvm is there and a VM really boots with it (nested
/// virtualisation can offer /dev/kvm and then fail on the first instructions),
/// else TCG. FERRY_VM_ACCEL=kvm|tcg decides without the check.
pub(super) fn choose_accel(vmlinuz: &Path, initramfs: &Path) -> Result<Accel> {
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

pub(super) fn qemu(vmlinuz: &Path, initramfs: &Path, accel: Accel, boot_only: bool) -> Command {
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

pub(super) fn run_vm(
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
pub(super) fn run_host(
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
        &["--exact", probe, "--test-threads=1", "--nocapture"],
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
pub(super) struct Run {
    pub(super) lines: Vec<String>,
    pub(super) timed_out: bool,
    /// The exit code; `None` when killed.
    pub(super) status: Option<i32>,
    pub(super) seconds: f64,
}

/// Runs `cmd`, echoing its output (prefixed with `label`) and writing it to
/// `log`, until it exits, `stop` matches a line (it is then killed), or
/// `timeout` passes (killed too). The child dies with this process.
pub(super) fn stream(
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
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", show(cmd)))?;
    let (readers, rx) = read_lines(&mut child);

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

/// Threads that read the child's stdout and stderr line by line (cleaned),
/// and the channel they send the lines on; it closes when both pipes do.
fn read_lines(child: &mut Child) -> (Vec<thread::JoinHandle<()>>, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let readers = [
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
    (readers, rx)
}

/// Waits up to `grace` for the child to exit, then kills it.
pub(super) fn finish(child: &mut Child, grace: Duration) -> Result<Option<i32>> {
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
pub(super) fn clean(raw: &[u8]) -> String {
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
