//! Building the cluster's binaries once, from Debian's `kubernetes` source
//! package, into a cache outside the repository: kube-apiserver,
//! kube-controller-manager, kube-scheduler and the kubelet (with reflect2 replaced and one v1.21
//! field backported), and kubectl 1.20 from Debian's `kubernetes-client`.

use std::{
    env,
    fs::{self, File},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use super::{Binaries, VERSION};
use crate::{
    debian::{self, Apt, PrivateApt},
    sys::{exec, require_root, which, TempDir},
};

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
    include_str!("../../patches/kubernetes-1.20.2-internal-traffic-policy.patch");
const GO_BIN: &str = "/usr/lib/go-1.19/bin";
/// What `start` needs on every run.
const RUNTIME_PACKAGES: &[&str] = &[
    "etcd-server",
    "openssl",
    "iproute2",
    // The lab nodes' kubelets run pods with these.
    "containerd",
    "runc",
    "containernetworking-plugins",
];
/// What the build needs, checked only when the cache is empty.
const BUILD_PACKAGES: &[&str] = &[
    "golang-1.19-go",
    "rsync",
    "make",
    "dpkg-dev",
    "xz-utils",
    "patch",
];

/// Makes sure the binaries exist, building them on first use (about 5 minutes on
/// 2 cores) and returning in milliseconds afterwards.
pub fn ensure_built() -> Result<Binaries> {
    require_root(&format!(
        "the Kubernetes control plane needs root (apt, {CACHE_DIR}, network namespaces)"
    ))?;
    let cache = Path::new(CACHE_DIR);
    let mut apt = Apt::new("setup");
    apt.install_missing(RUNTIME_PACKAGES)?;
    let mut bins = Binaries {
        kube_apiserver: cache.join("kube-apiserver"),
        kube_controller_manager: cache.join("kube-controller-manager"),
        kube_scheduler: cache.join("kube-scheduler"),
        kubelet: cache.join("kubelet"),
        kubectl: cache.join("kubectl"),
        etcd: PathBuf::from("/usr/bin/etcd"),
    };
    let missing = |cache: &Path| -> Vec<&'static str> {
        SERVERS
            .iter()
            .filter(|(name, _)| !cache.join(name).is_file())
            .map(|(name, _)| *name)
            .collect()
    };
    if missing(cache).is_empty() && bins.kubectl.is_file() {
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
    // Again under the lock: a build that held it may have made them.
    let to_build = missing(cache);
    if !to_build.is_empty() {
        build_servers(&mut apt, cache, &to_build)?;
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
            let work = TempDir::at(KUBECTL_DIR, "setup")?;
            let deb = debian::download(work.path(), &format!("kubernetes-client={version}"))?;
            let root = work.path().join("root");
            debian::extract(&deb, &root)?;
            install_file(&root.join("usr/bin/kubectl"), &target)?;
            Ok(target)
        }
        _ => {
            let found = which("kubectl").context(
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

/// The binaries built from the source, with how long each takes on 2 cores.
/// One missing (a cache from before the kubelet joined the list) is built
/// alone.
const SERVERS: &[(&str, &str)] = &[
    ("kube-apiserver", "about 4 minutes"),
    ("kube-controller-manager", "about a minute"),
    ("kube-scheduler", "about a minute"),
    ("kubelet", "about 2 minutes"),
];

fn build_servers(apt: &mut Apt, cache: &Path, names: &[&str]) -> Result<()> {
    apt.install_missing(BUILD_PACKAGES)?;
    let work = TempDir::at(BUILD_DIR, "setup")?;
    let tree = fetch_source(work.path())?;
    replace_reflect2(apt, work.path(), &tree)?;
    backport_internal_traffic_policy(work.path(), &tree)?;
    let path = format!("{GO_BIN}:{}", env::var("PATH").unwrap_or_default());
    for (name, estimate) in SERVERS.iter().filter(|(n, _)| names.contains(n)) {
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
                .env("GOCACHE", work.path().join("go-build-cache"))
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
    let (file_name, entries) = source_entries()?;
    let apt = PrivateApt::create(&work.join("apt"), file_name, &entries)?;
    let apt_get = |args: &[&str]| {
        let mut cmd = apt.command("apt-get");
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
    let dsc = debian::find_file(&src, "kubernetes_", ".dsc")?;
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
    let deb = debian::download(&dir, &format!("{PACKAGE}={version}"))?;
    let root = dir.join("root");
    debian::extract(&deb, &root)?;
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
    let (file_name, text) = debian::machine_sources()?;
    if file_name.ends_with(".sources") {
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
