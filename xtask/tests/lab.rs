//! Lab tests: real TCP and UDP through Ferry agents that watch a real API
//! server, in a lab of their own (`ferry-t<pid>-*`) that is removed afterwards,
//! also when a step fails.

mod support;

use std::{
    io::{ErrorKind, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use support::*;

#[test]
fn lab_services_through_real_agents() {
    let lab = Lab::up();
    let client = lab.pod_ns("client");
    lab.xtask(&["pod", "add", "client", "--node", "node1"]);
    let web1 = lab.pod_add("web-1", "node1", "web");
    let web2 = lab.pod_add("web-2", "node2", "web");
    let vip = lab.service("web", "web");
    lab.wait_endpoints("web", &[web1, web2]);

    eprintln!("== 200 TCP connections from node1 reach backends on node1 and node2");
    let answers = connect_many(&client, (vip, 80).into(), 200);
    let by_pod = count(&answers);
    eprintln!("   {by_pod:?}");
    assert_eq!(by_pod.values().sum::<usize>(), 200);
    assert_eq!(by_pod.keys().collect::<Vec<_>>(), ["web-1", "web-2"]);
    let client_addr = lab_pod_addr(&lab.xtask(&["status"]), "client");
    for answer in answers.iter().flatten() {
        let seen = answer.split_whitespace().nth(1).unwrap();
        assert!(
            seen.starts_with(&format!("{client_addr}:")),
            "a backend saw {seen}, not the client pod"
        );
    }

    eprintln!("== UDP request and reply, from the ClusterIP");
    let (from, answer) = udp_ask(&client, (vip, 53).into());
    assert_eq!(from, SocketAddr::from((vip, 53)));
    assert!(["web-1", "web-2"].contains(&pod_of(&answer)), "{answer}");

    eprintln!("== dual stack: a ClusterIP of each family, from pods on both nodes");
    lab.apply_service(
        "web-ds",
        serde_json::json!({
            "ipFamilyPolicy": "RequireDualStack",
            "ipFamilies": ["IPv4", "IPv6"],
            "selector": {"app": "web"},
            "ports": [http(), {"name": "dns", "port": 53, "targetPort": "udp", "protocol": "UDP"}],
        }),
    );
    let vips: Vec<IpAddr> = lab
        .kubectl(&[
            "get",
            "service",
            "web-ds",
            "-o",
            "jsonpath={.spec.clusterIPs[*]}",
        ])
        .split_whitespace()
        .map(|a| a.parse().unwrap())
        .collect();
    assert!(
        vips.len() == 2 && vips[0].is_ipv4() && vips[1].is_ipv6(),
        "clusterIPs {vips:?}"
    );
    let backends: Vec<IpAddr> = ["web-1", "web-2"]
        .iter()
        .flat_map(|pod| lab.pod_ips(pod))
        .collect();
    assert_eq!(
        backends.len(),
        4,
        "web-1 and web-2 with two addresses each: {backends:?}"
    );
    lab.wait_endpoints_ip("web-ds", &backends);
    lab.xtask(&["pod", "add", "client2", "--node", "node2"]);
    for (pod, ns) in [
        ("client", client.clone()),
        ("client2", lab.pod_ns("client2")),
    ] {
        let own = lab.pod_ips(pod);
        for vip in &vips {
            let answers = connect_many(&ns, (*vip, 80).into(), 50);
            let by_pod = count(&answers);
            eprintln!("   {pod} -> {vip}: {by_pod:?}");
            assert_eq!(by_pod.keys().collect::<Vec<_>>(), ["web-1", "web-2"]);
            let own = own.iter().find(|a| a.is_ipv6() == vip.is_ipv6()).unwrap();
            for answer in answers.iter().flatten() {
                let seen: SocketAddr = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
                assert_eq!(seen.ip(), *own, "a backend saw {seen}, not {pod}");
            }
        }
    }
    let (from, answer) = udp_ask(&client, (vips[1], 53).into());
    assert_eq!(
        from,
        SocketAddr::from((vips[1], 53)),
        "the UDP reply's source"
    );
    assert!(["web-1", "web-2"].contains(&pod_of(&answer)), "{answer}");
    lab.kubectl(&["delete", "service", "web-ds"]);
    lab.xtask(&["pod", "del", "client2"]);

    // The bounds below tell programming on the change (or at start) from the
    // 30 s resync; how fast it is, is the control-plane benchmark's to say.
    eprintln!("== scale up: a new pod gets new connections soon after its slice update");
    let web3 = lab.pod_add("web-3", "node2", "web");
    let seen = lab.wait_endpoints("web", &[web1, web2, web3]);
    let reached = in_netns(&client, move || {
        let target = SocketAddr::from((vip, 80));
        while seen.elapsed() < Duration::from_secs(15) {
            if let Ok(mut s) = TcpStream::connect_timeout(&target, TIMEOUT) {
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                if read_line(&mut s).is_ok_and(|a| pod_of(&a) == "web-3") {
                    return Some(seen.elapsed());
                }
            }
        }
        None
    });
    let latency = reached.expect("web-3 never answered");
    eprintln!("   web-3 answered {latency:?} after its slice listed it");
    assert!(latency < Duration::from_secs(10), "{latency:?}");

    eprintln!(
        "== delete a backend: new connections avoid it, an established one to another goes on"
    );
    let mut held = in_netns(&client, move || loop {
        let mut s = TcpStream::connect_timeout(&(vip, 80).into(), TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        if pod_of(&read_line(&mut s).unwrap()) == "web-1" {
            return s;
        }
    });
    lab.xtask(&["pod", "del", "web-2"]);
    lab.wait_endpoints("web", &[web1, web3]);
    let by_pod = count(&connect_many(&client, (vip, 80).into(), 100));
    eprintln!("   {by_pod:?}");
    assert_eq!(by_pod.keys().collect::<Vec<_>>(), ["web-1", "web-3"]);
    held.write_all(b"still there?\n").unwrap();
    assert_eq!(
        pod_of(&read_line(&mut held).unwrap()),
        "web-1",
        "the established connection broke"
    );

    eprintln!("== a Service created while node1's agent is down is served once it starts");
    lab.xtask(&["agent", "stop", "node1"]);
    // Stopped agent, programs in place: the existing service still works.
    assert_eq!(
        count(&connect_many(&client, (vip, 80).into(), 10))
            .values()
            .sum::<usize>(),
        10
    );
    let late_pod = lab.pod_add("late-1", "node2", "late");
    let late = lab.service("late", "late");
    lab.wait_endpoints("late", &[late_pod]);
    let started = Instant::now();
    lab.xtask(&["agent", "start", "node1"]);
    let served = in_netns(&client, move || {
        while started.elapsed() < Duration::from_secs(15) {
            if let Ok(mut s) =
                TcpStream::connect_timeout(&(late, 80).into(), Duration::from_millis(200))
            {
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                if read_line(&mut s).is_ok_and(|a| pod_of(&a) == "late-1") {
                    return Some(started.elapsed());
                }
            }
            thread::sleep(Duration::from_millis(5));
        }
        None
    });
    let served = served.expect("the late service was never served");
    eprintln!("   served {served:?} after the agent was started");
    assert!(served < Duration::from_secs(10), "{served:?}");
    held.write_all(b"after the restart?\n").unwrap();
    assert_eq!(
        pod_of(&read_line(&mut held).unwrap()),
        "web-1",
        "a restart broke an established connection"
    );

    eprintln!("== no endpoints: refused; Service deleted: its ClusterIP fails at once");
    lab.xtask(&["pod", "del", "late-1"]);
    lab.wait_endpoints("late", &[]);
    let refused = in_netns(&client, move || {
        TcpStream::connect_timeout(&(late, 80).into(), TIMEOUT).unwrap_err()
    });
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    lab.kubectl(&["delete", "service", "web"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let started = Instant::now();
        let result = in_netns(&client, move || {
            TcpStream::connect_timeout(&(vip, 80).into(), TIMEOUT)
        });
        match result {
            Ok(_) => assert!(
                Instant::now() < deadline,
                "{vip} still served after its Service was deleted"
            ),
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::ConnectionRefused
                            | ErrorKind::HostUnreachable
                            | ErrorKind::NetworkUnreachable
                    ),
                    "{e}"
                );
                assert!(
                    started.elapsed() < TIMEOUT / 2,
                    "failed only by timing out: {e}"
                );
                break;
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    held.write_all(b"bye\n").unwrap();

    eprintln!("== the agents are deploy/'s DaemonSet pods: Ready by their kubelet's probes, not privileged");
    let ds: serde_json::Value = serde_json::from_str(&lab.kubectl(&[
        "-n",
        "kube-system",
        "get",
        "daemonset",
        "ferry",
        "-o",
        "json",
    ]))
    .unwrap();
    // node1, node2 and the control-plane node (its taint tolerated).
    assert_eq!(ds["status"]["numberReady"], 3, "{:#}", ds["status"]);
    let agents = agent_processes(&lab.name);
    assert_eq!(agents.len(), 3, "agent processes: {agents:?}");
    for (pid, status) in &agents {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} for agent {pid}"))
                .trim()
                .to_string()
        };
        let effective = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
        let bounding = u64::from_str_radix(&field("CapBnd:"), 16).unwrap();
        // deploy/'s set (SYS_RESOURCE only where the machine has it to give).
        let wanted = deploy_capabilities() & machine_bounding_set();
        assert_eq!(effective, wanted, "agent {pid}: effective capabilities");
        assert_eq!(bounding, wanted, "agent {pid}: bounding set");
        assert_eq!(
            field("NoNewPrivs:"),
            "1",
            "agent {pid}: allowPrivilegeEscalation"
        );
    }

    eprintln!("== lab down leaves nothing");
    let name = lab.name.clone();
    drop(lab);
    let namespaces = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!namespaces.contains(&name), "namespaces left: {namespaces}");
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/{name}")).exists(),
        "pinned maps left"
    );
    assert!(
        !std::path::Path::new(&format!("/run/ferry-lab/{name}")).exists(),
        "lab state left"
    );
    for hierarchy in ["cpu", "memory", "pids", "unified"] {
        let cgroup = format!("/sys/fs/cgroup/{hierarchy}/{name}");
        assert!(!std::path::Path::new(&cgroup).exists(), "{cgroup} left");
    }
    let procs = Command::new("pgrep").args(["-f", &name]).output().unwrap();
    assert!(
        procs.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}

/// The capabilities deploy/daemonset.yaml adds, as a mask (linux/capability.h
/// numbers), read from the file itself.
fn deploy_capabilities() -> u64 {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/daemonset.yaml"
    ))
    .unwrap();
    let line = yaml
        .lines()
        .find(|l| l.trim_start().starts_with("add: ["))
        .expect("daemonset.yaml adds capabilities");
    let mut mask = 0;
    for name in line
        .split(['[', ']', ',', '"'])
        .map(str::trim)
        .filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_') && !n.is_empty())
    {
        let bit = match name {
            "NET_ADMIN" => 12,
            "SYS_RESOURCE" => 24,
            "PERFMON" => 38,
            "BPF" => 39,
            other => panic!("a capability this test does not know: {other}"),
        };
        mask |= 1u64 << bit;
    }
    mask
}

fn machine_bounding_set() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap();
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// Every `proxy-agent run` process whose pin directory is the lab's, with its
/// /proc status.
fn agent_processes(lab: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let pin_dir = format!("FERRY_PIN_DIR=/sys/fs/bpf/{lab}/");
        if exe.file_name().is_some_and(|n| n == "proxy-agent")
            && String::from_utf8_lossy(&environ).contains(&pin_dir)
        {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            found.push((pid, status));
        }
    }
    found
}
