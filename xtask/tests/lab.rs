//! Lab tests: real TCP and UDP through Ferry agents that watch a real API
//! server, in a lab of their own (`ferry-t<pid>-*`) that is removed afterwards,
//! also when a step fails.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    thread,
    time::{Duration, Instant},
};

const TIMEOUT: Duration = Duration::from_secs(3);

struct Lab {
    name: String,
}

impl Lab {
    fn up() -> Self {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "lab tests need root (as `cargo xtask test` and CI run them)"
        );
        let lab = Self {
            name: format!("ferry-t{}", std::process::id()),
        };
        lab.xtask(&["up"]);
        lab
    }

    fn xtask(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["lab", "--lab", &self.name])
            .args(args)
            .output()
            .expect("run xtask");
        assert!(
            out.status.success(),
            "xtask lab {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["kubectl"];
        all.extend_from_slice(args);
        self.xtask(&all)
    }

    fn apply(&self, manifest: &str) {
        let path = std::env::temp_dir().join(format!("{}-manifest.json", self.name));
        std::fs::write(&path, manifest).unwrap();
        self.kubectl(&["apply", "-f", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(path);
    }

    fn pod_add(&self, name: &str, node: &str, app: &str) -> Ipv4Addr {
        let out = self.xtask(&[
            "pod",
            "add",
            name,
            "--node",
            node,
            "--label",
            &format!("app={app}"),
        ]);
        out.split_whitespace().last().unwrap().parse().unwrap()
    }

    fn pod_ns(&self, pod: &str) -> String {
        format!("{}-pod-{pod}", self.name)
    }

    fn service(&self, name: &str, app: &str) -> Ipv4Addr {
        self.apply(&format!(
            r#"{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "{name}", "namespace": "default"}},
                "spec": {{"selector": {{"app": "{app}"}}, "ports": [
                  {{"name": "http", "port": 80, "targetPort": "tcp", "protocol": "TCP"}},
                  {{"name": "dns", "port": 53, "targetPort": "udp", "protocol": "UDP"}}]}}}}"#
        ));
        self.kubectl(&["get", "service", name, "-o", "jsonpath={.spec.clusterIP}"])
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until the service's slices list exactly `addrs` as ready; returns when it saw that.
    fn wait_endpoints(&self, service: &str, addrs: &[Ipv4Addr]) -> Instant {
        let mut want = addrs.to_vec();
        want.sort();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let json = self.kubectl(&[
                "get",
                "endpointslices",
                "-l",
                &format!("kubernetes.io/service-name={service}"),
                "-o",
                "json",
            ]);
            let list: serde_json::Value = serde_json::from_str(&json).unwrap();
            let mut have: Vec<Ipv4Addr> = Vec::new();
            for slice in list["items"].as_array().into_iter().flatten() {
                for ep in slice["endpoints"].as_array().into_iter().flatten() {
                    if ep["conditions"]["ready"] == serde_json::Value::Bool(true) {
                        have.push(ep["addresses"][0].as_str().unwrap().parse().unwrap());
                    }
                }
            }
            have.sort();
            if have == want {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{service}: slices list {have:?}, want {want:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["lab", "--lab", &self.name, "down"])
            .status();
    }
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("{ns}: {e}"));
    thread::spawn(move || {
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .unwrap()
}

/// Reads one line (a pod's answer: `<pod name> <client address>`).
fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// `n` TCP connections from `ns` to `target`: the pod name that answered each.
fn connect_many(ns: &str, target: SocketAddr, n: usize) -> Vec<std::io::Result<String>> {
    in_netns(ns, move || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&target, TIMEOUT)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                read_line(&mut s)
            })
            .collect()
    })
}

fn pod_of(answer: &str) -> &str {
    answer.split_whitespace().next().unwrap_or("")
}

fn count(answers: &[std::io::Result<String>]) -> BTreeMap<String, usize> {
    let mut by_pod = BTreeMap::new();
    for (i, a) in answers.iter().enumerate() {
        let a = a
            .as_ref()
            .unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        *by_pod.entry(pod_of(a).to_string()).or_insert(0) += 1;
    }
    by_pod
}

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
    let (from, answer) = in_netns(&client, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.send_to(b"who?", (vip, 53)).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = sock.recv_from(&mut buf).expect("UDP reply");
        (from, String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    assert_eq!(from, SocketAddr::from((vip, 53)));
    assert!(["web-1", "web-2"].contains(&pod_of(&answer)), "{answer}");

    eprintln!("== scale up: a new pod gets new connections within 1 s of its slice update");
    let web3 = lab.pod_add("web-3", "node2", "web");
    let seen = lab.wait_endpoints("web", &[web1, web2, web3]);
    let reached = in_netns(&client, move || {
        let target = SocketAddr::from((vip, 80));
        while seen.elapsed() < Duration::from_secs(3) {
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
    assert!(latency < Duration::from_secs(1), "{latency:?}");

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

    eprintln!("== a Service created while node1's agent is down is served within 1 s of its start");
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
        while started.elapsed() < Duration::from_secs(5) {
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
    assert!(served < Duration::from_secs(1), "{served:?}");
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

    eprintln!("== deploy/ passes server-side validation");
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let out = lab.kubectl(&["apply", "--dry-run=server", "-f", deploy]);
    assert!(
        out.contains("daemonset.apps/ferry") && out.contains("clusterrole"),
        "{out}"
    );

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
    let procs = Command::new("pgrep").args(["-f", &name]).output().unwrap();
    assert!(
        procs.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}

/// The address `lab status` lists for a pod.
fn lab_pod_addr(status: &str, pod: &str) -> Ipv4Addr {
    let line = status
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("pod {pod} ")))
        .unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}
