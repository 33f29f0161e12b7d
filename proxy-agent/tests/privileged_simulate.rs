//! `proxy-agent simulate` against kube-proxy's packet-flow cases: the table in
//! tests/simulate/cases.txt over the cluster in tests/simulate/cluster.yaml, run
//! through the real CLI. `cargo test --test privileged_simulate` is the script.

mod support;

use std::{path::Path, process::Command};

#[test]
fn simulate_answers_kube_proxys_packet_flow_cases() {
    support::require_root();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/simulate");
    let cases = std::fs::read_to_string(dir.join("cases.txt")).unwrap();
    let mut failures = Vec::new();
    let mut ran = 0;
    for line in cases
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let [name, hook, packet, verdict, out, backends, next_hop] = cols[..] else {
            panic!("bad case line: {line}")
        };
        let output = Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
            .args(["simulate", "--manifests"])
            .arg(&dir)
            .args([
                "--node",
                "node1",
                "--from",
                hook,
                "--packet",
                packet,
                "--service-cidr",
                "172.30.0.0/16,fd00:30::/112",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        ran += 1;
        let mut problems = Vec::new();
        let got_verdict = got["verdict"].as_str().unwrap();
        let got_backends: Vec<&str> = got["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let want_backends: Vec<&str> = if backends == "-" {
            Vec::new()
        } else {
            backends.split(',').collect()
        };
        if !got_verdict.starts_with(verdict) {
            problems.push(format!("verdict {got_verdict}, want {verdict}"));
        }
        if got_backends != want_backends {
            problems.push(format!("backends {got_backends:?}, want {want_backends:?}"));
        }
        let got_dst = got["dst"].as_str().unwrap();
        let got_src = got["src"].as_str().unwrap();
        // `SRC -> DST`: the source too, its port `*` where a NAT port is
        // chosen.
        let out_dst = match out.split_once(" -> ") {
            Some((src, dst)) => {
                let matches = match src.strip_suffix(":*") {
                    Some(addr) => got_src
                        .rsplit_once(':')
                        .is_some_and(|(a, port)| a == addr && port != "1000"),
                    None => got_src == src,
                };
                if !matches {
                    problems.push(format!("sent from {got_src}, want {src}"));
                }
                dst
            }
            None => out,
        };
        let got_hop = got["next_hop"].as_str().unwrap_or("-");
        if !got_hop.starts_with(next_hop) {
            problems.push(format!("next hop {got_hop}, want {next_hop}"));
        }
        if out_dst == "*" {
            // Any of the backends, by the flow hash.
            if !want_backends.contains(&got_dst) {
                problems.push(format!("sent to {got_dst}, not one of {want_backends:?}"));
            }
        } else if out_dst != "-" && got_dst != out_dst {
            problems.push(format!("sent to {got_dst}, want {out_dst}"));
        }
        eprintln!("{name:<36} {got_verdict:<34} {got_src} -> {got_dst} {got_hop}");
        if !problems.is_empty() {
            failures.push(format!("{name}: {}", problems.join("; ")));
        }
    }
    assert!(ran >= 27, "only {ran} cases ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
