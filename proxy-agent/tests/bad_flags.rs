//! Bad flag values and `--packet` strings: each gives a clear error that
//! names the flag or the input, at once, with no panic, and before anything of
//! the node is touched (no pin directory is made).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Runs the agent with `args`; returns its exit status's success and stderr.
fn agent(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
        .args(args)
        // Were a case to go further than its flags, it still attaches nothing.
        .env("FERRY_SOCKET_LB", "off")
        .env("FERRY_UPLINK_IFACE", "none")
        .env("FERRY_POD_IFACE_PATTERN", "ferry-none-such*")
        .env_remove("RUST_BACKTRACE")
        .env_remove("KUBECONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("proxy-agent {} did not exit", args.join(" "));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flag_values_are_refused_by_name_before_anything_is_touched() {
    let pins = PathBuf::from(format!("/sys/fs/bpf/ferry-t{}-flags", std::process::id()));
    let pin_dir = pins.to_str().unwrap();
    let run = |extra: &[&'static str]| -> Vec<&str> {
        let mut args = vec!["run", "--node-name", "n1", "--pin-dir", pin_dir];
        args.extend_from_slice(extra);
        args
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (run(&["--nat-ports", "70000-1"]), "--nat-ports 70000-1"),
        (run(&["--nat-ports", "5000"]), "--nat-ports 5000"),
        (
            run(&["--nat-ports", "65000-61000"]),
            "--nat-ports 65000-61000",
        ),
        (run(&["--uplink-mode", "warp"]), "'--uplink-mode"),
        (run(&["--scheduler", "none"]), "unknown scheduler \"none\""),
        (
            run(&["--socket-lb", "bogus"]),
            "unknown socket-lb mode \"bogus\"",
        ),
        (
            run(&["--healthz-bind-address", "nonsense"]),
            "--healthz-bind-address \"nonsense\": not an address:port or off",
        ),
        (
            run(&["--metrics-bind-address", "10249"]),
            "--metrics-bind-address \"10249\": not an address:port or off",
        ),
        (
            run(&["--conntrack-tcp-close-seconds", "100"]),
            "100 is not in 0..=10",
        ),
        (run(&["--resync-seconds", "soon"]), "'--resync-seconds"),
        (run(&["--map-services", "0"]), "0 is not in 16..=67108864"),
        (
            run(&["--map-conntrack", "100000000"]),
            "100000000 is not in 16..=67108864",
        ),
        (run(&["--map-nat", "lots"]), "'--map-nat"),
        (
            run(&["--kubeconfig", "/nonexistent/kubeconfig"]),
            "reading /nonexistent/kubeconfig",
        ),
        (vec!["inspect", "bogus"], "invalid value 'bogus'"),
    ];
    let packet = |p: &'static str| -> Vec<&'static str> {
        vec![
            "simulate",
            "--manifests",
            "/nonexistent",
            "--node",
            "n1",
            "--packet",
            p,
        ]
    };
    let packets = [
        "",
        "ICMP 10.0.0.2:1 -> 10.96.0.1:80",
        "TCP 10.0.0.2:99999 -> 10.96.0.1:80",
        "TCP a:b -> c:d",
        "TCP 10.0.0.2:1 10.96.0.1:80",
        "TCP 10.0.0.2:1 -> 10.96.0.1:80 and more",
        "TCP 10.0.0.2 -> 10.96.0.1:80",
    ];
    let mut failures = Vec::new();
    for (args, expected) in cases
        .into_iter()
        .chain(packets.iter().map(|p| (packet(p), "'--packet <PACKET>'")))
    {
        let (ok, stderr) = agent(&args);
        if ok || !stderr.contains(expected) || stderr.contains("panicked") {
            failures.push(format!(
                "{}: exit ok {ok}, expected {expected:?} in:\n{stderr}",
                args.join(" ")
            ));
        }
    }
    assert!(!pins.exists(), "{} was made", pins.display());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
