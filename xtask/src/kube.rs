//! A real Kubernetes control plane for the lab and the tests.
//!
//! No package registry ships a current kube-apiserver, but Debian bookworm's
//! `kubernetes` source package is the full upstream v1.20.2 tree. [`ensure_built`]
//! builds kube-apiserver and kube-controller-manager from it once, with one API
//! field of v1.21 backported (`Service.spec.internalTrafficPolicy`, see
//! [`backport_internal_traffic_policy`]), and keeps only those two binaries (and
//! kubectl 1.20 from Debian's `kubernetes-client`) in a cache outside the
//! repository, so fresh clones on the same machine reuse them.
//!
//! [`start`] runs Debian's etcd, the apiserver and the controller manager (only
//! the EndpointSlice and Endpoints controllers), optionally inside a network
//! namespace. The processes are detached and their PIDs kept in the state
//! directory, so the control plane outlives the xtask process that started it and
//! [`stop`] needs nothing but that directory.
//!
//! v1.20 shapes what a client sees: EndpointSlices are served only as
//! `discovery.k8s.io/v1beta1`, and streaming lists are refused.

// The lab and the tests call into this module; until every entry point is used,
// the binary crate would flag the rest as dead.
#![allow(dead_code, reason = "an API for the lab and the tests")]

use std::{
    env,
    fmt::Write as _,
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    net::Ipv4Addr,
    os::unix::{fs::OpenOptionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{exec, show};

/// The feature gate that makes v1.20 publish terminating endpoints.
const TERMINATING_CONDITION: &str = "--feature-gates=EndpointSliceTerminatingCondition=true";

/// The upstream version the binaries are built from.
pub const VERSION: &str = "v1.20.2";
/// Bookworm's version of that source. Pinned because newer `kubernetes` source
/// packages hold only kubectl.
const DEBIAN_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// The cache, its lock and the scratch directories are named after the patched
/// build ("itp": internalTrafficPolicy), apart from a plain v1.20.2 build: a
/// machine that has binaries without the backport never takes them for these.
/// A change to the patches needs a new name.
const CACHE_DIR: &str = "/var/cache/ferry/kubernetes-1.20.2-itp";
const CACHE_LOCK: &str = "/var/cache/ferry/kubernetes-1.20.2-itp.lock";
/// The build tree (about 1.8 GB). Removed after the build, failed or not, and
/// before one, in case an earlier build was killed half way.
const BUILD_DIR: &str = "/var/tmp/ferry-kubernetes-1.20.2-itp-build";
const KUBECTL_DIR: &str = "/var/tmp/ferry-kubectl-1.20.2-itp-deb";
/// See [`backport_internal_traffic_policy`].
const INTERNAL_TRAFFIC_POLICY_PATCH: &str =
    include_str!("../patches/kubernetes-1.20.2-internal-traffic-policy.patch");
const GO_BIN: &str = "/usr/lib/go-1.19/bin";
/// What `start` needs on every run.
const RUNTIME_PACKAGES: &[&str] = &["etcd-server", "openssl", "iproute2"];
/// What the build needs, checked only when the cache is empty.
const BUILD_PACKAGES: &[&str] = &[
    "golang-1.19-go",
    "rsync",
    "make",
    "dpkg-dev",
    "xz-utils",
    "patch",
];

/// Ports are per network namespace; etcd's are off its defaults (2379/2380) so a
/// control plane in the current namespace does not collide with a system etcd.
const ETCD_CLIENT_URL: &str = "http://127.0.0.1:12379";
const ETCD_PEER_URL: &str = "http://127.0.0.1:12380";
const SECURE_PORT: u16 = 6443;
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The processes `start` runs, in the order `stop` signals them.
const PROCESSES: [&str; 3] = ["kube-controller-manager", "kube-apiserver", "etcd"];

pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kubectl: PathBuf,
    pub etcd: PathBuf,
}

pub struct ControlPlaneConfig {
    /// The network namespace to run in (`ip netns exec`); `None` for the current one.
    pub netns: Option<String>,
    /// Where kube-apiserver listens (port 6443); also its advertised address.
    pub listen_addr: Ipv4Addr,
    /// Keys, certificates, kubeconfigs, etcd data, logs and PIDs. `start` replaces
    /// whatever is there; `stop` removes it.
    pub state_dir: PathBuf,
    /// The Service ClusterIP range, e.g. `10.96.0.0/16`.
    pub service_cidr: String,
}

pub struct ControlPlane {
    /// `system:masters` (user `ferry-admin`).
    pub admin_kubeconfig: PathBuf,
    /// User `system:serviceaccount:kube-system:ferry`, with that ServiceAccount's
    /// groups: what RBAC grants that ServiceAccount, and nothing more.
    pub agent_kubeconfig: PathBuf,
    /// `https://<listen_addr>:6443`.
    pub server_url: String,
    /// The CA that signed the serving certificate (also embedded in the kubeconfigs).
    pub ca_cert: PathBuf,
    /// The admin bearer token, for callers that speak HTTP themselves (a lab
    /// "kubelet" patching Pod status).
    pub admin_token: String,
}

unsafe extern "C" {
    fn geteuid() -> u32;
    fn setsid() -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
}

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

// ---------------------------------------------------------------------------
// Building the binaries
// ---------------------------------------------------------------------------

/// Makes sure the binaries exist, building them on first use (about 5 minutes on
/// 2 cores) and returning in milliseconds afterwards.
pub fn ensure_built() -> Result<Binaries> {
    if unsafe { geteuid() } != 0 {
        bail!("the Kubernetes control plane needs root (apt, {CACHE_DIR}, network namespaces)");
    }
    let cache = Path::new(CACHE_DIR);
    let mut apt = Apt::default();
    apt.install_missing(RUNTIME_PACKAGES)?;
    let mut bins = Binaries {
        kube_apiserver: cache.join("kube-apiserver"),
        kube_controller_manager: cache.join("kube-controller-manager"),
        kubectl: cache.join("kubectl"),
        etcd: PathBuf::from("/usr/bin/etcd"),
    };
    let servers_cached =
        |b: &Binaries| b.kube_apiserver.is_file() && b.kube_controller_manager.is_file();
    if servers_cached(&bins) && bins.kubectl.is_file() {
        eprintln!("setup: Kubernetes {VERSION} cached in {CACHE_DIR}");
        return Ok(bins);
    }

    fs::create_dir_all(cache).with_context(|| format!("creating {CACHE_DIR}"))?;
    // Two runs at once (two terminals, two test binaries) must not share a build
    // tree; the second waits here and then finds the binaries cached.
    let lock = File::create(CACHE_LOCK).with_context(|| format!("creating {CACHE_LOCK}"))?;
    lock.lock()
        .with_context(|| format!("locking {CACHE_LOCK}"))?;

    if !bins.kubectl.is_file() {
        bins.kubectl = fetch_kubectl(&mut apt, cache)?;
    }
    if !servers_cached(&bins) {
        build_servers(&mut apt, cache)?;
    }
    if !bins.etcd.is_file() {
        bail!(
            "{} is missing although etcd-server is installed",
            bins.etcd.display()
        );
    }
    eprintln!("setup: Kubernetes {VERSION} in {CACHE_DIR}");
    Ok(bins)
}

/// kubectl 1.20.2, matching the server, from Debian's `kubernetes-client`. The
/// package is unpacked into the cache rather than installed: its `/usr/bin/kubectl`
/// would clash with, or replace, a kubectl the machine has from another package.
fn fetch_kubectl(apt: &mut Apt, cache: &Path) -> Result<PathBuf> {
    let target = cache.join("kubectl");
    let candidate = apt.candidate("kubernetes-client")?;
    match candidate {
        Some(version) if version.contains("1.20.") => {
            eprintln!("setup: unpacking kubectl from Debian's kubernetes-client {version}");
            let work = Scratch::create(KUBECTL_DIR)?;
            exec(
                Command::new("apt-get")
                    .current_dir(&work.0)
                    // The scratch directory is root's; without this apt only warns
                    // that `_apt` cannot write there and downloads as root anyway.
                    .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
                    .arg(format!("kubernetes-client={version}")),
            )?;
            let deb = find_file(&work.0, "kubernetes-client_", ".deb")?;
            let root = work.0.join("root");
            exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
            install_file(&root.join("usr/bin/kubectl"), &target)?;
            Ok(target)
        }
        _ => {
            let found = find_on_path("kubectl").context(
                "no kubectl: Debian's kubernetes-client 1.20 is not in this machine's apt \
                 sources and there is no kubectl on PATH",
            )?;
            eprintln!(
                "setup: Debian's kubernetes-client 1.20 is not available (candidate: {}); \
                 using {} instead (a newer kubectl works, with a version-skew warning)",
                candidate.as_deref().unwrap_or("none"),
                found.display()
            );
            Ok(found)
        }
    }
}

fn build_servers(apt: &mut Apt, cache: &Path) -> Result<()> {
    apt.install_missing(BUILD_PACKAGES)?;
    let work = Scratch::create(BUILD_DIR)?;
    let tree = fetch_source(&work.0)?;
    replace_reflect2(apt, &work.0, &tree)?;
    backport_internal_traffic_policy(&work.0, &tree)?;
    let path = format!("{GO_BIN}:{}", env::var("PATH").unwrap_or_default());
    for (name, estimate) in [
        ("kube-apiserver", "about 4 minutes"),
        ("kube-controller-manager", "about a minute"),
    ] {
        eprintln!("setup: building {name} {VERSION} from Debian's source ({estimate})");
        let started = Instant::now();
        exec(
            Command::new("make")
                .arg(format!("WHAT=cmd/{name}"))
                .current_dir(&tree)
                .env("PATH", &path)
                .env("GOPROXY", "off")
                .env("CGO_ENABLED", "0")
                .env("GOFLAGS", "")
                // Go's build cache would otherwise grow in $HOME and outlive the tree.
                .env("GOCACHE", work.0.join("go-build-cache"))
                // Go 1.19 must use its own standard library.
                .env_remove("GOROOT"),
        )
        .with_context(|| format!("building {name} in {}", tree.display()))?;
        eprintln!("setup: built {name} in {} s", started.elapsed().as_secs());
        install_file(&tree.join("_output/bin").join(name), &cache.join(name))?;
    }
    Ok(())
}

/// Downloads and unpacks Debian's `kubernetes` source package under `work`, with
/// a private apt configuration: the machine's own Debian sources as `deb-src`
/// entries, with their own lists and caches, so `/etc/apt` and the machine's
/// package lists stay as they are.
fn fetch_source(work: &Path) -> Result<PathBuf> {
    let apt_dir = work.join("apt");
    let parts = apt_dir.join("sources.list.d");
    let lists = apt_dir.join("lists");
    let apt_cache = apt_dir.join("cache");
    for dir in [
        &parts,
        &lists.join("partial"),
        &apt_cache.join("archives/partial"),
    ] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let (file_name, entries) = source_entries()?;
    fs::write(parts.join(file_name), entries)?;
    let apt_get = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.arg("-q");
        for option in [
            "Dir::Etc::SourceList=/dev/null".to_string(),
            format!("Dir::Etc::SourceParts={}", parts.display()),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", apt_cache.display()),
            "APT::Sandbox::User=root".to_string(),
        ] {
            cmd.arg("-o").arg(option);
        }
        cmd.args(args);
        cmd
    };

    eprintln!("setup: fetching Debian's kubernetes source package (about 30 MB)");
    exec(&mut apt_get(&["update"]))?;
    let src = work.join("src");
    fs::create_dir_all(&src)?;
    let pinned = format!("kubernetes={DEBIAN_VERSION}");
    if exec(apt_get(&["source", "--download-only", &pinned]).current_dir(&src)).is_err() {
        eprintln!("setup: kubernetes {DEBIAN_VERSION} is not in this machine's sources; trying the version they have");
        exec(apt_get(&["source", "--download-only", "kubernetes"]).current_dir(&src))?;
    }
    let dsc = find_file(&src, "kubernetes_", ".dsc")?;
    let tree = src.join("kubernetes");
    // --no-check as `apt-get source` itself unpacks: apt has already checked the
    // files against the signed index.
    exec(
        Command::new("dpkg-source")
            .args(["--no-check", "-x"])
            .arg(&dsc)
            .arg(&tree)
            .current_dir(&src),
    )?;
    if !tree.join("cmd/kube-apiserver").is_dir() {
        bail!(
            "{} has no cmd/kube-apiserver: only bookworm's kubernetes {DEBIAN_VERSION} holds the server",
            dsc.display()
        );
    }
    Ok(tree)
}

/// v1.20 vendors `github.com/modern-go/reflect2` 1.0.1, which links to the Go
/// runtime's map iterator with its pre-1.18 signature. Built with Go 1.19 the
/// apiserver then dies with SIGSEGV whenever it encodes a map to JSON (seen on the
/// first Pod status patch). reflect2 1.0.2 fixed that without changing its API;
/// Debian ships its source, which replaces the vendored copy here.
fn replace_reflect2(apt: &mut Apt, work: &Path, tree: &Path) -> Result<()> {
    const PACKAGE: &str = "golang-github-modern-go-reflect2-dev";
    let Some(version) = apt.candidate(PACKAGE)? else {
        bail!("{PACKAGE} (reflect2 >= 1.0.2) is not in this machine's apt sources");
    };
    eprintln!("setup: replacing vendored reflect2 1.0.1 with Debian's {version} (Go 1.18+ fix)");
    let dir = work.join("reflect2");
    fs::create_dir_all(&dir)?;
    exec(
        Command::new("apt-get")
            .current_dir(&dir)
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{PACKAGE}={version}")),
    )?;
    let deb = find_file(&dir, PACKAGE, ".deb")?;
    let root = dir.join("root");
    exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let source = root.join("usr/share/gocode/src/github.com/modern-go/reflect2");
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    fs::remove_dir_all(&vendored).with_context(|| format!("removing {}", vendored.display()))?;
    fs::create_dir_all(&vendored)?;
    // A flat package: its files, no subdirectories.
    for entry in fs::read_dir(&source).with_context(|| format!("reading {}", source.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::copy(entry.path(), vendored.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// `Service.spec.internalTrafficPolicy` arrived in v1.21; v1.20 drops it from
/// every Service it is given, so the lab could not show what the agent does with
/// it. The patch (`xtask/patches/`) adds the field exactly as v1.21 defines it
/// (type, json name, protobuf field 22) to both the internal and the v1 types,
/// with v1.21's check that it is "Cluster" or "Local", and extends the protobuf
/// code by hand because `make` does not regenerate that (it regenerates deepcopy,
/// conversion and OpenAPI itself). Without the protobuf part the apiserver would
/// lose the field on its way to etcd, which it writes in protobuf, and so would
/// every protobuf client (the controller manager is one). `--fuzz=0`: the tree
/// must look exactly as the patch expects, or the build stops here.
fn backport_internal_traffic_policy(work: &Path, tree: &Path) -> Result<()> {
    eprintln!("setup: backporting Service.spec.internalTrafficPolicy (v1.21) to {VERSION}");
    let patch = work.join("internal-traffic-policy.patch");
    fs::write(&patch, INTERNAL_TRAFFIC_POLICY_PATCH)?;
    exec(
        Command::new("patch")
            .args(["-p1", "--forward", "--batch", "--fuzz=0"])
            .args(["--no-backup-if-mismatch", "--input"])
            .arg(&patch)
            .current_dir(tree),
    )
    .context("the kubernetes source does not take the internalTrafficPolicy backport")
}

/// The machine's Debian apt sources turned into `deb-src` entries, as a file name
/// and its contents. Read at run time, so no mirror is named in this code.
fn source_entries() -> Result<(&'static str, String)> {
    let deb822 = Path::new("/etc/apt/sources.list.d/debian.sources");
    if deb822.is_file() {
        let text = fs::read_to_string(deb822)?;
        let mut out = String::new();
        for line in text.lines() {
            let line = if line.trim_start().starts_with("Types:") {
                "Types: deb-src"
            } else {
                line
            };
            out.push_str(line);
            out.push('\n');
        }
        return Ok(("debian-src.sources", out));
    }
    // Older installs list one-line entries in /etc/apt/sources.list.
    let text = fs::read_to_string("/etc/apt/sources.list")
        .context("no /etc/apt/sources.list.d/debian.sources nor /etc/apt/sources.list")?;
    let entries: String = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("deb "))
        .map(|rest| format!("deb-src {rest}\n"))
        .collect();
    if entries.is_empty() {
        bail!("/etc/apt/sources.list has no `deb` entries to take source packages from");
    }
    Ok(("debian-src.list", entries))
}

/// The machine's apt, used through its ordinary client; `apt-get update` runs at
/// most once, and only when something is missing.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn update(&mut self) -> Result<()> {
        if !self.updated {
            exec(Command::new("apt-get").args(["update", "-q"]))?;
            self.updated = true;
        }
        Ok(())
    }

    fn install_missing(&mut self, packages: &[&str]) -> Result<()> {
        let missing = crate::debian::missing_packages(packages);
        if missing.is_empty() {
            return Ok(());
        }
        eprintln!("setup: installing {}", missing.join(" "));
        self.update()?;
        exec(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )
    }

    /// The version `apt-get install` would take, after an update if there is none.
    fn candidate(&mut self, package: &str) -> Result<Option<String>> {
        let policy = |package: &str| -> Result<Option<String>> {
            let out = Command::new("apt-cache")
                .args(["policy", package])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|line| line.trim().strip_prefix("Candidate:"))
                .map(str::trim)
                .filter(|v| *v != "(none)")
                .map(String::from))
        };
        match policy(package)? {
            None if !self.updated => {
                self.update()?;
                policy(package)
            }
            found => Ok(found),
        }
    }
}

/// A scratch directory, removed when dropped (so also when a build fails). A
/// leftover at the same path from a killed run is removed first.
struct Scratch(PathBuf);

impl Scratch {
    fn create(path: &str) -> Result<Self> {
        let path = PathBuf::from(path);
        if path.exists() {
            eprintln!("setup: removing {} left by an earlier run", path.display());
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        eprintln!("setup: removing {}", self.0.display());
        if let Err(err) = fs::remove_dir_all(&self.0) {
            eprintln!("setup: could not remove {}: {err}", self.0.display());
        }
    }
}

/// The one file in `dir` named `prefix*suffix`.
fn find_file(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(prefix) && name.ends_with(suffix) {
            return Ok(dir.join(&*name));
        }
    }
    bail!("no {prefix}*{suffix} in {}", dir.display())
}

/// Copies `from` to `to` through a temporary name, so `to` is never half written.
fn install_file(from: &Path, to: &Path) -> Result<()> {
    let mut part = to.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    fs::copy(from, &part)
        .with_context(|| format!("copying {} to {}", from.display(), part.display()))?;
    fs::rename(&part, to)?;
    eprintln!("setup: installed {}", to.display());
    Ok(())
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

// ---------------------------------------------------------------------------
// Running the control plane
// ---------------------------------------------------------------------------

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

struct Tokens {
    admin: String,
    controller_manager: String,
    agent: String,
}

fn launch(bins: &Binaries, cfg: &ControlPlaneConfig, dir: &Path) -> Result<ControlPlane> {
    let netns = cfg.netns.as_deref();
    if let Some(ns) = netns {
        // etcd and the apiserver's own loopback client need 127.0.0.1.
        quiet(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
    }
    let pki = dir.join("pki");
    fs::create_dir_all(&pki)?;
    make_pki(&pki, cfg.listen_addr, first_host(&cfg.service_cidr)?)?;

    let tokens = Tokens {
        admin: random_token()?,
        controller_manager: random_token()?,
        agent: random_token()?,
    };
    // token,user,uid,"groups": the agent's row is what a ServiceAccount token of
    // kube-system/ferry authenticates as, so RBAC bound to that ServiceAccount
    // applies to it unchanged.
    let token_file = dir.join("tokens.csv");
    write_private(
        &token_file,
        &format!(
            "{},ferry-admin,ferry-admin,\"system:masters\"\n\
             {},system:kube-controller-manager,system:kube-controller-manager\n\
             {},system:serviceaccount:kube-system:ferry,ferry-agent,\"system:serviceaccounts,system:serviceaccounts:kube-system\"\n",
            tokens.admin, tokens.controller_manager, tokens.agent
        ),
    )?;

    let server_url = format!("https://{}:{SECURE_PORT}", cfg.listen_addr);
    let ca_cert = pki.join("ca.crt");
    let ca_data = String::from_utf8(quiet(
        Command::new("openssl")
            .args(["base64", "-A", "-in"])
            .arg(&ca_cert),
    )?)?;
    let kubeconfig = |name: &str, user: &str, token: &str| -> Result<PathBuf> {
        let path = dir.join(format!("{name}.kubeconfig"));
        write_private(&path, &kubeconfig(&server_url, ca_data.trim(), user, token))?;
        Ok(path)
    };
    let admin_kubeconfig = kubeconfig("admin", "ferry-admin", &tokens.admin)?;
    let agent_kubeconfig = kubeconfig("agent", "ferry-agent", &tokens.agent)?;
    let cm_kubeconfig = kubeconfig(
        "controller-manager",
        "system:kube-controller-manager",
        &tokens.controller_manager,
    )?;

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
    ])
    .arg(arg("--data-dir", &dir.join("etcd")));
    let mut etcd = spawn_detached(etcd, dir, "etcd")?;

    let mut apiserver = in_netns(netns, &bins.kube_apiserver);
    apiserver
        .args([
            &format!("--advertise-address={}", cfg.listen_addr),
            &format!("--bind-address={}", cfg.listen_addr),
            &format!("--secure-port={SECURE_PORT}"),
            // No unauthenticated HTTP port. v1.20 already serves none and accepts
            // only 0 here (with a deprecation notice); explicit all the same.
            "--insecure-port=0",
            &format!("--etcd-servers={ETCD_CLIENT_URL}"),
            "--authorization-mode=RBAC",
            &format!("--service-cluster-ip-range={}", cfg.service_cidr),
            &format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            // Pods name ServiceAccounts whose token Secrets no controller here
            // creates; this admission plugin would reject them.
            "--disable-admission-plugins=ServiceAccount",
            // Serving and terminating conditions on EndpointSlices (alpha in
            // 1.20): what kube-proxy's terminating-endpoint fallback reads.
            TERMINATING_CONDITION,
            "--profiling=false",
        ])
        .arg(arg("--token-auth-file", &token_file))
        .arg(arg("--tls-cert-file", &pki.join("apiserver.crt")))
        .arg(arg("--tls-private-key-file", &pki.join("apiserver.key")))
        .arg(arg("--service-account-key-file", &pki.join("sa.pub")))
        .arg(arg(
            "--service-account-signing-key-file",
            &pki.join("sa.key"),
        ))
        // Never /var/run/kubernetes, even for files we did not ask for.
        .arg(arg("--cert-dir", &pki));
    let mut apiserver = spawn_detached(apiserver, dir, "kube-apiserver")?;

    let kubectl = |path: &str| {
        let mut cmd = in_netns(netns, &bins.kubectl);
        cmd.arg(arg("--kubeconfig", &admin_kubeconfig))
            .arg(arg("--cache-dir", &dir.join("kubectl-cache")))
            .args(["--request-timeout=5s", "get", "--raw", path]);
        cmd
    };
    eprintln!("control plane: waiting for {server_url}/readyz");
    let started = Instant::now();
    loop {
        for (name, child) in [("etcd", &mut etcd), ("kube-apiserver", &mut apiserver)] {
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

    // Started only now: v1.20's controller manager gives up if the apiserver is
    // not healthy within 10 s of its start.
    let mut controller_manager = in_netns(netns, &bins.kube_controller_manager);
    controller_manager
        .arg(arg("--kubeconfig", &cm_kubeconfig))
        .args([
            "--controllers=endpointslice,endpoint",
            TERMINATING_CONDITION,
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
    let mut controller_manager =
        spawn_detached(controller_manager, dir, "kube-controller-manager")?;
    wait_for_controllers(&mut controller_manager, dir)?;

    Ok(ControlPlane {
        admin_kubeconfig,
        agent_kubeconfig,
        server_url,
        ca_cert,
        admin_token: tokens.admin,
    })
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

/// A kubeconfig with the CA embedded and a bearer token.
fn kubeconfig(server: &str, ca_data: &str, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ferry-lab
  cluster:
    server: {server}
    certificate-authority-data: {ca_data}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: ferry-lab
  context:
    cluster: ferry-lab
    user: {user}
current-context: ferry-lab
"
    )
}

/// A CA, a serving certificate it signs for the apiserver's addresses and names
/// (clients such as rustls refuse a self-signed CA used as a server certificate),
/// and the service-account signing key.
fn make_pki(pki: &Path, listen_addr: Ipv4Addr, service_ip: Ipv4Addr) -> Result<()> {
    let config = pki.join("openssl.cnf");
    fs::write(
        &config,
        format!(
            "[req]
distinguished_name = dn
prompt = no
[dn]
CN = ferry-lab
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[serving]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:{listen_addr}, IP:{service_ip}, IP:127.0.0.1, DNS:localhost, DNS:kubernetes, \
DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
"
        ),
    )?;
    // No argument here contains a space.
    let openssl = |args: &str| {
        quiet(
            Command::new("openssl")
                .current_dir(pki)
                .args(args.split_whitespace()),
        )
        .map(drop)
    };
    const EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    openssl(&format!(
        "req -x509 -config openssl.cnf -extensions ca -days 3650 {EC_KEY} \
         -subj /CN=ferry-lab-ca -keyout ca.key -out ca.crt"
    ))?;
    openssl(&format!(
        "req -new -config openssl.cnf {EC_KEY} \
         -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr"
    ))?;
    openssl(
        "x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
         -extfile openssl.cnf -extensions serving -out apiserver.crt",
    )?;
    openssl("genrsa -out sa.key 2048")?;
    openssl("rsa -in sa.key -pubout -out sa.pub")
}

/// The first host address of a CIDR: the ClusterIP of the `kubernetes` Service.
fn first_host(cidr: &str) -> Result<Ipv4Addr> {
    let parsed = cidr.split_once('/').and_then(|(addr, len)| {
        Some((
            addr.parse::<Ipv4Addr>().ok()?,
            len.parse::<u32>().ok().filter(|l| *l <= 30)?,
        ))
    });
    let Some((addr, len)) = parsed else {
        bail!("service CIDR {cidr:?}: expected an IPv4 prefix such as 10.96.0.0/16");
    };
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    Ok(Ipv4Addr::from((u32::from(addr) & mask) + 1))
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// Writes a file only root can read (it holds tokens).
fn write_private(path: &Path, contents: &str) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

fn arg(flag: &str, path: &Path) -> String {
    format!("{flag}={}", path.display())
}

fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        // `ip netns exec` execs the program (no fork), so the PID we get is the
        // program's own.
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Runs a command, capturing its output; fails with its stderr.
fn quiet(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Starts `cmd` in a session of its own (no controlling terminal, so neither
/// Ctrl-C nor a closing terminal reaches it), output to `<dir>/<name>.log`, and
/// records its PID in `<dir>/<name>.pid`.
fn spawn_detached(mut cmd: Command, dir: &Path, name: &str) -> Result<Child> {
    let log_path = dir.join(format!("{name}.log"));
    let log = File::create(&log_path)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe, as code between fork and exec must be.
    unsafe {
        cmd.pre_exec(|| {
            if setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    eprintln!("+ {} > {}", show(&cmd), log_path.display());
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    fs::write(dir.join(format!("{name}.pid")), child.id().to_string())?;
    Ok(child)
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
        signal_group(*pid, SIGTERM);
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
        signal_group(*pid, SIGKILL);
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
    unsafe {
        if kill(-pid, sig) != 0 {
            kill(pid, sig);
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
