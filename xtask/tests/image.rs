//! The images `cargo xtask image` writes (built by `cargo xtask test` before
//! the tests run, in `target/images/`), imported into a containerd of the
//! test's own (private root, state and socket, stopped and removed afterwards,
//! also when a step fails) and run by runc: the lab pod answers TCP and UDP in
//! a `ferry-imgtest-*` network namespace, pause exits 0 on SIGTERM, and the
//! agent starts in its otherwise empty image.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use ferry_netns as netns;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const TIMEOUT: Duration = Duration::from_secs(10);

/// An archive of `target/images/`, which must have been built.
fn archive(file: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/images")
        .join(file);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask image` first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// A containerd with its own directories, socket and namespace, and the
/// network namespace its containers join; all of it goes when dropped.
struct Containerd {
    root: PathBuf,
    state: PathBuf,
    socket: PathBuf,
    /// The containerd namespace, also the cgroup parent of its containers.
    namespace: String,
    netns: String,
    daemon: Child,
    containers: Vec<String>,
}

impl Containerd {
    fn start() -> Self {
        assert_eq!(unsafe { libc::geteuid() }, 0, "image tests need root");
        let name = format!("ferry-imgtest-{}", std::process::id());
        let root = std::env::temp_dir().join(&name);
        let state = Path::new("/run").join(&name);
        let socket = state.join("containerd.sock");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&state).unwrap();
        let config = root.join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = {:?}\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {:?}\n",
                root.join("data"),
                state.join("data"),
                socket,
                root.join("opt"),
            ),
        )
        .unwrap();
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(root.join("containerd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|err| {
                let _ = fs::remove_dir_all(&root);
                let _ = fs::remove_dir_all(&state);
                panic!("starting containerd (from `cargo xtask setup`): {err}")
            });
        let containerd = Self {
            root,
            state,
            socket,
            namespace: name.clone(),
            netns: name,
            daemon,
            containers: Vec::new(),
        };
        netns::add(&containerd.netns).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !containerd.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer: {}",
                fs::read_to_string(containerd.root.join("containerd.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
        containerd
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", &self.namespace]);
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ctr args`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr run` arguments for a container `id` that joins the test's
    /// network namespace; the caller adds detach or `--rm` and the rest.
    fn run_args(&mut self, id: &str) -> Vec<String> {
        self.containers.push(id.into());
        let state = self.state.display();
        vec![
            "run".into(),
            "--with-ns".into(),
            format!("network:/run/netns/{}", self.netns),
            // The stdio fifos and runc's state with containerd's, not in
            // /run/containerd/ (where only the shims' sockets go, by design).
            format!("--fifo-dir={state}/fifo"),
            format!("--runc-root={state}/runc"),
        ]
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in &self.containers {
            let _ = self.ctr(&["task", "kill", "--signal", "SIGKILL", id]);
            let _ = self.ctr(&["task", "delete", "--force", id]);
            let _ = self.ctr(&["container", "delete", id]);
        }
        // SAFETY: a signal to the containerd this test started.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = self.daemon.wait();
        // runc removes each container's cgroups, not their parent (named
        // after the containerd namespace), empty by now.
        if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let _ = fs::remove_dir(hierarchy.path().join(&self.namespace));
            }
        }
        for dir in [&self.root, &self.state] {
            if let Err(err) = fs::remove_dir_all(dir) {
                eprintln!("could not remove {}: {err}", dir.display());
            }
        }
        if let Err(err) = netns::delete(&self.netns) {
            eprintln!("could not delete netns {}: {err}", self.netns);
        }
    }
}

fn read_line(stream: &TcpStream) -> String {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

#[test]
fn images_import_into_containerd_and_run() {
    let mut containerd = Containerd::start();
    let (agent, lab_pod, pause) = (
        format!("ghcr.io/ferry-proxy/proxy-agent:{VERSION}"),
        format!("ferry.local/lab-pod:{VERSION}"),
        format!("ferry.local/pause:{VERSION}"),
    );
    for file in ["proxy-agent.tar", "lab-pod.tar", "pause.tar"] {
        containerd.ok(&["images", "import", archive(file).to_str().unwrap()]);
    }
    let listed = containerd.ok(&["images", "list", "--quiet"]);
    for name in [&agent, &lab_pod, &pause] {
        assert!(listed.lines().any(|l| l == name), "{name} not in {listed}");
    }

    eprintln!("== the lab pod answers TCP and UDP with its name (from POD_NAME)");
    let mut args = containerd.run_args("pod");
    args.extend(["--detach", "--env", "POD_NAME=img-pod", &lab_pod, "pod"].map(String::from));
    containerd.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let answers = netns::in_netns(&containerd.netns, || {
        let deadline = Instant::now() + TIMEOUT;
        let stream = loop {
            match TcpStream::connect((Ipv4Addr::LOCALHOST, 8080)) {
                Ok(stream) => break stream,
                Err(err) if Instant::now() > deadline => panic!("connect to the pod: {err}"),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let tcp = (stream.local_addr().unwrap(), read_line(&stream));
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        udp.set_read_timeout(Some(TIMEOUT)).unwrap();
        udp.send_to(b"?", (Ipv4Addr::LOCALHOST, 5353)).unwrap();
        let mut buf = [0u8; 128];
        let n = udp.recv(&mut buf).unwrap();
        let udp = (
            udp.local_addr().unwrap(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        );
        [tcp, udp]
    })
    .unwrap();
    for (client, answer) in answers {
        assert_eq!(answer, format!("img-pod {client}\n"));
    }

    eprintln!("== pause runs until SIGTERM and exits 0");
    let mut args = containerd.run_args("pause");
    args.extend(["--rm", &pause, "pause"].map(String::from));
    let mut run = containerd
        .command()
        .args(&args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !containerd
        .ok(&["task", "list"])
        .lines()
        .any(|l| l.starts_with("pause ") && l.contains("RUNNING"))
    {
        assert!(Instant::now() < deadline, "pause did not start");
        thread::sleep(Duration::from_millis(50));
    }
    // Running is not yet waiting: give it a moment to block its signals.
    thread::sleep(Duration::from_millis(300));
    containerd.ok(&["task", "kill", "--signal", "SIGTERM", "pause"]);
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(0), "pause after SIGTERM: {status}");

    eprintln!("== the agent starts in its image: --help, cleanup");
    for (id, command) in [("agent-help", "--help"), ("agent-cleanup", "cleanup")] {
        let mut args = containerd.run_args(id);
        args.extend(["--rm", &agent, id, "/proxy-agent", command].map(String::from));
        let out = containerd.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        eprintln!("{out}");
        if command == "--help" {
            assert!(out.contains("cleanup") && out.contains("run"), "{out}");
        }
    }
}
