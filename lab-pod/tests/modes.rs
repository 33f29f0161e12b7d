//! The binary itself: `pause` exits 0 on the signals a kubelet sends, and bad
//! arguments are refused with the usage.

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-lab-pod");

fn pause_exits_cleanly_on(signal: libc::c_int) {
    let mut child = Command::new(BIN).arg("pause").spawn().unwrap();
    // Give it time to block the signals; a signal before that would kill it.
    thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "pause exited by itself"
    );
    // SAFETY: a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "pause ignored signal {signal}");
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "pause after signal {signal}: {status}"
    );
}

#[test]
fn pause_exits_0_on_sigterm() {
    pause_exits_cleanly_on(libc::SIGTERM);
}

#[test]
fn pause_exits_0_on_sigint() {
    pause_exits_cleanly_on(libc::SIGINT);
}

#[test]
fn bad_arguments_exit_2_with_the_usage() {
    let out = Command::new(BIN)
        .arg("bogus")
        .env_remove("POD_NAME")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: ferry-lab-pod serve"));
}

/// `unshare` running `ferry-lab-pod pause` as PID 1 of a new PID namespace;
/// both are killed when dropped.
struct PidNamespace {
    unshare: std::process::Child,
    pause: i32,
}

impl Drop for PidNamespace {
    fn drop(&mut self) {
        // SAFETY: signals to processes this test started.
        unsafe { libc::kill(self.pause, libc::SIGKILL) };
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// The children of `pid`, by the kernel's list.
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// As a pod's PID 1, pause inherits the pod's orphans and must reap them, or
/// they stay zombies for the pod's lifetime.
#[test]
fn privileged_pause_reaps_orphans_as_pid_1() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "a PID namespace needs root");
    let unshare = Command::new("unshare")
        .args(["--pid", "--fork", BIN, "pause"])
        .spawn()
        .unwrap();
    let mut ns = PidNamespace { pause: 0, unshare };
    let deadline = Instant::now() + Duration::from_secs(5);
    while ns.pause == 0 {
        ns.pause = children(ns.unshare.id() as i32)
            .first()
            .copied()
            .unwrap_or(0);
        assert!(Instant::now() < deadline, "pause did not start");
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(300));
    // A shell in the namespace leaves a child behind: it becomes pause's.
    let status = Command::new("nsenter")
        .args(["-t", &ns.pause.to_string(), "-p", "sh", "-c", "sleep 0.3 &"])
        .status()
        .unwrap();
    assert!(status.success());
    let orphans = children(ns.pause);
    assert_eq!(orphans.len(), 1, "the orphan was not re-parented to pause");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{}", orphans[0])).exists() {
        assert!(
            Instant::now() < deadline,
            "the orphan was not reaped: {}",
            std::fs::read_to_string(format!("/proc/{}/stat", orphans[0])).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a signal to the pause this test started.
    assert_eq!(unsafe { libc::kill(ns.pause, libc::SIGTERM) }, 0);
    let status = ns.unshare.wait().unwrap();
    assert_eq!(status.code(), Some(0), "pause after SIGTERM: {status}");
}
