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
