//! Running the control plane: etcd, kube-apiserver and kube-controller-manager,
//! detached inside a network namespace with their PIDs and logs in a state
//! directory; waiting until they serve; stopping them from that directory alone.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    pki::{first_host, make_pki, Kubeconfigs, Tokens},
    Binaries, ControlPlane, ControlPlaneConfig,
};
use crate::sys::{join_cgroup_on_exec, quiet, show, spawn_detached};

/// The feature gate that makes v1.20 publish terminating endpoints.
/// Serving and terminating conditions on EndpointSlices (alpha in 1.20):
/// what kube-proxy's terminating-endpoint fallback reads. Dual stack (alpha
/// in 1.20): Services with a ClusterIP of each family and IPv6 slices.
const FEATURE_GATES: &str =
    "--feature-gates=EndpointSliceTerminatingCondition=true,IPv6DualStack=true";
/// Ports are per network namespace, and the control plane has one of its own;
/// etcd's are off its defaults (2379/2380) all the same, so that they can never
/// be taken for a system etcd's.
const ETCD_CLIENT_URL: &str = "http://127.0.0.1:12379";
const ETCD_PEER_URL: &str = "http://127.0.0.1:12380";
const SECURE_PORT: u16 = 6443;
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The processes `start` runs, in the order `stop` signals them.
const PROCESSES: [&str; 4] = [
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
];

/// Starts etcd, kube-apiserver and kube-controller-manager, detached, and returns
/// once the apiserver is ready and the `default` and `kube-system` namespaces exist.
/// A control plane left in `cfg.state_dir` by an earlier run is stopped first. On
/// failure the processes are stopped and the state directory (with the logs) kept.
pub fn start(bins: &Binaries, cfg: &ControlPlaneConfig) -> Result<ControlPlane> {
    stop(&cfg.state_dir)?;
    fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    // Absolute: the processes get these paths, and `stop` recognises its
    // processes by this path in their command lines.
    let dir = cfg.state_dir.canonicalize()?;
    launch(bins, cfg, &dir).map_err(|err| {
        if let Err(stop_err) = terminate(&dir) {
            eprintln!("control plane: {stop_err:#}");
        }
        err.context(format!(
            "starting the control plane (logs in {})",
            dir.display()
        ))
    })
}

/// Stops a control plane started with `state_dir` (SIGTERM, then SIGKILL after
/// 5 s) and removes the directory. Succeeds on a missing or partial directory.
pub fn stop(state_dir: &Path) -> Result<()> {
    if !state_dir.exists() {
        return Ok(());
    }
    terminate(state_dir)?;
    fs::remove_dir_all(state_dir).with_context(|| format!("removing {}", state_dir.display()))?;
    eprintln!("control plane: stopped, {} removed", state_dir.display());
    Ok(())
}

fn launch(bins: &Binaries, cfg: &ControlPlaneConfig, dir: &Path) -> Result<ControlPlane> {
    let netns = cfg.netns.as_str();
    // etcd and the apiserver's own loopback client need 127.0.0.1.
    quiet(Command::new("ip").args(["-n", netns, "link", "set", "lo", "up"]))?;
    let pki = dir.join("pki");
    fs::create_dir_all(&pki)?;
    make_pki(&pki, cfg.listen_addr, first_host(&cfg.service_cidr)?)?;
    let tokens = Tokens::random(&cfg.nodes)?;
    let token_file = dir.join("tokens.csv");
    tokens.write_auth_file(&token_file)?;
    let server_url = format!("https://{}:{SECURE_PORT}", cfg.listen_addr);
    let kubeconfigs = Kubeconfigs::write(dir, &server_url, &pki.join("ca.crt"), &tokens)?;

    let cgroup = cfg.cgroup.as_deref();
    let mut etcd = start_etcd(bins, netns, cgroup, dir)?;
    let mut apiserver = start_apiserver(bins, cfg, dir, &pki, &token_file)?;
    eprintln!("control plane: waiting for {server_url}/readyz");
    wait_for_apiserver(
        bins,
        netns,
        dir,
        &kubeconfigs.admin,
        [&mut etcd, &mut apiserver],
    )?;

    // Started only now: v1.20's controller manager gives up if the apiserver is
    // not healthy within 10 s of its start.
    let mut controller_manager = in_netns(netns, &bins.kube_controller_manager);
    controller_manager
        .arg(arg("--kubeconfig", &kubeconfigs.controller_manager))
        .args([
            // The slices Ferry reads, and what real pods need: ServiceAccounts
            // and their token Secrets, DaemonSets (the agent's), and the
            // garbage collector that removes a deleted DaemonSet's pods.
            "--controllers=endpointslice,endpoint,serviceaccount,serviceaccount-token,daemonset,garbagecollector",
            FEATURE_GATES,
            "--leader-elect=false",
            // Runs each controller as its own ServiceAccount (kube-system/
            // endpointslice-controller, ...) through TokenRequest: the bootstrap
            // RBAC roles grant those, not system:kube-controller-manager, the right
            // to write EndpointSlices and Endpoints.
            "--use-service-account-credentials=true",
            // No HTTP(S) endpoints: nothing here reads them, and serving would want
            // certificates or write self-signed ones to /var/run/kubernetes.
            "--port=0",
            "--secure-port=0",
        ]);
    controller_manager
        .arg(arg(
            "--service-account-private-key-file",
            &pki.join("sa.key"),
        ))
        .arg(arg("--root-ca-file", &pki.join("ca.crt")));
    let mut controller_manager =
        spawn_logged(controller_manager, cgroup, dir, "kube-controller-manager")?;
    wait_for_controllers(&mut controller_manager, dir)?;

    // The DaemonSet controller leaves placing its pods to the scheduler.
    let mut scheduler = in_netns(netns, &bins.kube_scheduler);
    scheduler
        .arg(arg("--kubeconfig", &kubeconfigs.scheduler))
        .args(["--leader-elect=false", "--port=0", "--secure-port=0"]);
    spawn_logged(scheduler, cgroup, dir, "kube-scheduler")?;

    Ok(ControlPlane {
        admin_token: tokens.admin,
    })
}

fn start_etcd(bins: &Binaries, netns: &str, cgroup: Option<&Path>, dir: &Path) -> Result<Child> {
    let mut etcd = in_netns(netns, &bins.etcd);
    etcd.args([
        "--name=ferry-lab",
        "--logger=zap",
        "--log-outputs=stderr",
        &format!("--listen-client-urls={ETCD_CLIENT_URL}"),
        &format!("--advertise-client-urls={ETCD_CLIENT_URL}"),
        &format!("--listen-peer-urls={ETCD_PEER_URL}"),
        &format!("--initial-advertise-peer-urls={ETCD_PEER_URL}"),
        &format!("--initial-cluster=ferry-lab={ETCD_PEER_URL}"),
        // A throwaway cluster: losing it on a crash is fine, and fsync on every
        // write would make the tests wait on the disk.
        "--unsafe-no-fsync",
        // The API server rewrites its whole ClusterIP bitmap (16 KiB for a /15)
        // at every Service it creates, and compacts etcd's history only every
        // 5 minutes: creating Services at full speed (about 100 a second here)
        // fills the default 2 GiB quota between two compactions. (etcd's own
        // auto-compaction by revision count cut the agents' paginated relists
        // short: "continue parameter is too old".)
        "--quota-backend-bytes=8589934592",
    ])
    .arg(arg("--data-dir", &dir.join("etcd")));
    spawn_logged(etcd, cgroup, dir, "etcd")
}

fn start_apiserver(
    bins: &Binaries,
    cfg: &ControlPlaneConfig,
    dir: &Path,
    pki: &Path,
    token_file: &Path,
) -> Result<Child> {
    let mut apiserver = in_netns(&cfg.netns, &bins.kube_apiserver);
    apiserver
        .args([
            &format!("--advertise-address={}", cfg.listen_addr),
            &format!("--bind-address={}", cfg.listen_addr),
            &format!("--secure-port={SECURE_PORT}"),
            // No unauthenticated HTTP port. v1.20 already serves none and accepts
            // only 0 here (with a deprecation notice); explicit all the same.
            "--insecure-port=0",
            &format!("--etcd-servers={ETCD_CLIENT_URL}"),
            // Node: each kubelet may read and write what its own pods need.
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            &format!(
                "--service-cluster-ip-range={}",
                [Some(&cfg.service_cidr), cfg.service_cidr6.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            &format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            FEATURE_GATES,
            "--profiling=false",
        ])
        .arg(arg("--token-auth-file", token_file))
        .arg(arg("--tls-cert-file", &pki.join("apiserver.crt")))
        .arg(arg("--tls-private-key-file", &pki.join("apiserver.key")))
        .arg(arg("--service-account-key-file", &pki.join("sa.pub")))
        .arg(arg(
            "--service-account-signing-key-file",
            &pki.join("sa.key"),
        ))
        // Never /var/run/kubernetes, even for files we did not ask for.
        .arg(arg("--cert-dir", pki));
    spawn_logged(apiserver, cfg.cgroup.as_deref(), dir, "kube-apiserver")
}

/// Waits until the apiserver is ready and the `default` and `kube-system`
/// namespaces exist; fails early when etcd or the apiserver (`children`, in
/// that order) exits.
fn wait_for_apiserver(
    bins: &Binaries,
    netns: &str,
    dir: &Path,
    admin_kubeconfig: &Path,
    children: [&mut Child; 2],
) -> Result<()> {
    let kubectl = |path: &str| {
        let mut cmd = in_netns(netns, &bins.kubectl);
        cmd.arg(arg("--kubeconfig", admin_kubeconfig))
            .arg(arg("--cache-dir", &dir.join("kubectl-cache")))
            .args(["--request-timeout=5s", "get", "--raw", path]);
        cmd
    };
    let started = Instant::now();
    let [etcd, apiserver] = children;
    loop {
        for (name, child) in [("etcd", &mut *etcd), ("kube-apiserver", &mut *apiserver)] {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited ({status}):\n{}", log_tail(dir, name));
            }
        }
        // The bootstrap controller creates the system namespaces soon after
        // /readyz; clients expect both to exist.
        let ready = [
            "/readyz",
            "/api/v1/namespaces/default",
            "/api/v1/namespaces/kube-system",
        ]
        .iter()
        .try_for_each(|path| quiet(&mut kubectl(path)).map(drop));
        let Err(last) = ready else { break };
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "kube-apiserver not ready after {} s; last check: {last:#}\n{}",
                READY_TIMEOUT.as_secs(),
                log_tail(dir, "kube-apiserver")
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "control plane: kube-apiserver ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits until the controller manager says its EndpointSlice controller has synced
/// its caches: from then on, Pods show up in slices.
fn wait_for_controllers(child: &mut Child, dir: &Path) -> Result<()> {
    const NAME: &str = "kube-controller-manager";
    const SYNCED: &str = "Caches are synced for endpoint_slice";
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{NAME} exited ({status}):\n{}", log_tail(dir, NAME));
        }
        let log = fs::read_to_string(dir.join(format!("{NAME}.log"))).unwrap_or_default();
        if log.contains(SYNCED) {
            eprintln!(
                "control plane: {NAME} ready in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "{NAME} has not synced its EndpointSlice controller after {} s\n{}",
                READY_TIMEOUT.as_secs(),
                log_tail(dir, NAME)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn arg(flag: &str, path: &Path) -> String {
    format!("{flag}={}", path.display())
}

/// `program` inside `netns`. `ip netns exec` execs the program (no fork), so the
/// PID we get is the program's own.
fn in_netns(netns: &str, program: &Path) -> Command {
    ferry_netns::exec(netns, program)
}

/// Starts `cmd` detached (see [`spawn_detached`]) in `cgroup` if given, output
/// to `<dir>/<name>.log` and its PID in `<dir>/<name>.pid`.
fn spawn_logged(mut cmd: Command, cgroup: Option<&Path>, dir: &Path, name: &str) -> Result<Child> {
    if let Some(cgroup) = cgroup {
        join_cgroup_on_exec(&mut cmd, cgroup)?;
    }
    let log = dir.join(format!("{name}.log"));
    eprintln!("+ {} > {}", show(&cmd), log.display());
    spawn_detached(&mut cmd, &log, &dir.join(format!("{name}.pid")))
        .with_context(|| format!("starting {name}"))
}

fn log_tail(dir: &Path, name: &str) -> String {
    let path = dir.join(format!("{name}.log"));
    let text = fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(25)..].join("\n");
    format!("--- last lines of {} ---\n{tail}", path.display())
}

/// Ends the processes whose PID files are in `dir`: SIGTERM to each one's process
/// group, SIGKILL to what is left after 5 s.
fn terminate(dir: &Path) -> Result<()> {
    let dir = dir.canonicalize()?;
    let pids: Vec<(&str, i32)> = PROCESSES
        .iter()
        .filter_map(|name| {
            let pid = fs::read_to_string(dir.join(format!("{name}.pid"))).ok()?;
            let pid: i32 = pid.trim().parse().ok().filter(|pid| *pid > 1)?;
            (running(pid) && started_for(pid, &dir)).then_some((*name, pid))
        })
        .collect();
    for (name, pid) in &pids {
        eprintln!("control plane: stopping {name} (pid {pid})");
        signal_group(*pid, libc::SIGTERM);
    }
    let wait = |timeout: Duration| {
        let deadline = Instant::now() + timeout;
        while pids.iter().any(|(_, pid)| running(*pid)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
    };
    wait(STOP_TIMEOUT);
    for (name, pid) in pids.iter().filter(|(_, pid)| running(*pid)) {
        eprintln!(
            "control plane: {name} (pid {pid}) still running after {} s: SIGKILL",
            STOP_TIMEOUT.as_secs()
        );
        signal_group(*pid, libc::SIGKILL);
    }
    wait(Duration::from_secs(2));
    if let Some((name, pid)) = pids.iter().find(|(_, pid)| running(*pid)) {
        bail!("{name} (pid {pid}) survived SIGKILL");
    }
    for name in PROCESSES {
        let _ = fs::remove_file(dir.join(format!("{name}.pid")));
    }
    Ok(())
}

/// Signals the process group `pid` leads (each process is a session leader), or
/// the process alone if the group is gone.
fn signal_group(pid: i32, sig: i32) {
    // SAFETY: signals to processes this module started (see `started_for`).
    unsafe {
        if libc::kill(-pid, sig) != 0 {
            libc::kill(pid, sig);
        }
    }
}

/// Whether `pid` exists and has not exited. A zombie (an exited child of the
/// process that called `start`, not yet reaped) counts as gone.
fn running(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

/// Whether `pid` is one of ours and not a reused PID: each process's command line
/// names the state directory.
fn started_for(pid: i32, dir: &Path) -> bool {
    let needle = dir.as_os_str().as_encoded_bytes();
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| cmdline.windows(needle.len()).any(|w| w == needle))
}

/// One control-plane process stopped by [`halt`], with what starts it again
/// as it was.
pub struct Halted {
    name: String,
    netns: String,
    argv: Vec<String>,
    cgroup: Option<PathBuf>,
    dir: PathBuf,
}

/// Stops `name` (one of the control plane's processes; SIGTERM, SIGKILL
/// after 5 s) of the control plane in `state_dir`, running in `netns` and
/// `cgroup`, for a fault test; [`Halted::resume`] starts it again.
pub fn halt(state_dir: &Path, name: &str, netns: &str, cgroup: Option<&Path>) -> Result<Halted> {
    let dir = state_dir.canonicalize()?;
    let pid: i32 = fs::read_to_string(dir.join(format!("{name}.pid")))
        .with_context(|| format!("no PID file of {name}"))?
        .trim()
        .parse()?;
    if !(running(pid) && started_for(pid, &dir)) {
        bail!("{name} (pid {pid}) is not running");
    }
    let argv: Vec<String> = fs::read(format!("/proc/{pid}/cmdline"))?
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    signal_group(pid, libc::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while running(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    if running(pid) {
        signal_group(pid, libc::SIGKILL);
    }
    eprintln!("control plane: {name} (pid {pid}) stopped");
    Ok(Halted {
        name: name.to_string(),
        netns: netns.to_string(),
        argv,
        cgroup: cgroup.map(Path::to_path_buf),
        dir,
    })
}

impl Halted {
    /// Keeps what starts the process again in the state directory, for a
    /// later command ([`Halted::load`]).
    pub fn save(&self) -> Result<()> {
        let saved = serde_json::json!({
            "name": self.name,
            "netns": self.netns,
            "argv": self.argv,
            "cgroup": self.cgroup,
        });
        fs::write(
            self.dir.join(format!("{}.halted", self.name)),
            saved.to_string(),
        )?;
        Ok(())
    }

    /// What [`Halted::save`] kept of `name` in `state_dir`; removed, so
    /// that the process is started once.
    pub fn load(state_dir: &Path, name: &str) -> Result<Self> {
        let dir = state_dir.canonicalize()?;
        let path = dir.join(format!("{name}.halted"));
        let saved: serde_json::Value = serde_json::from_slice(
            &fs::read(&path)
                .with_context(|| format!("{name} was not stopped by `control-plane stop`"))?,
        )?;
        fs::remove_file(&path)?;
        let text = |key: &str| saved[key].as_str().map(str::to_string);
        Ok(Self {
            name: name.to_string(),
            netns: text("netns").context("no netns")?,
            argv: serde_json::from_value(saved["argv"].clone())?,
            cgroup: text("cgroup").map(PathBuf::from),
            dir,
        })
    }

    /// Starts the process again with the command line it had.
    pub fn resume(self) -> Result<()> {
        let (program, args) = self.argv.split_first().context("empty command line")?;
        let mut cmd = in_netns(&self.netns, Path::new(program));
        cmd.args(args);
        spawn_logged(cmd, self.cgroup.as_deref(), &self.dir, &self.name)?;
        Ok(())
    }
}
