//! A real Kubernetes control plane for the lab and the tests.
//!
//! No package registry ships a current kube-apiserver, but Debian bookworm's
//! `kubernetes` source package is the full upstream v1.20.2 tree. [`ensure_built`]
//! (in `build`) builds kube-apiserver and kube-controller-manager from it once,
//! with one API field of v1.21 backported (`Service.spec.internalTrafficPolicy`),
//! and keeps only those two binaries (and kubectl 1.20 from Debian's
//! `kubernetes-client`) in a cache outside the repository, so fresh clones on the
//! same machine reuse them.
//!
//! [`start`] (in `run`) runs Debian's etcd, the apiserver and the controller
//! manager (only the EndpointSlice and Endpoints controllers) inside a network
//! namespace, with the keys, certificates and kubeconfigs `pki` makes. The
//! processes are detached and their PIDs kept in the state directory, so the
//! control plane outlives the xtask process that started it and [`stop`] needs
//! nothing but that directory.
//!
//! v1.20 shapes what a client sees: EndpointSlices are served only as
//! `discovery.k8s.io/v1beta1`, and streaming lists are refused.

mod build;
mod pki;
mod run;

use std::{net::Ipv4Addr, path::PathBuf};

pub use build::ensure_built;
pub use run::{halt, start, stop, Halted};

/// The upstream version the binaries are built from.
pub const VERSION: &str = "v1.20.2";

pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kubelet: PathBuf,
    pub kubectl: PathBuf,
    pub etcd: PathBuf,
}

pub struct ControlPlaneConfig {
    /// The network namespace to run in (`ip netns exec`).
    pub netns: String,
    /// A v2 cgroup every process joins (a node's host cgroup, whose socket
    /// hooks then serve the API server's connections to Services), if any.
    pub cgroup: Option<PathBuf>,
    /// Where kube-apiserver listens (port 6443); also its advertised address.
    pub listen_addr: Ipv4Addr,
    /// Keys, certificates, kubeconfigs, etcd data, logs and PIDs. `start` replaces
    /// whatever is there; `stop` removes it.
    pub state_dir: PathBuf,
    /// The Service ClusterIP range, e.g. `10.96.0.0/16`.
    pub service_cidr: String,
    /// The IPv6 one of a dual-stack cluster, e.g. `fd00:10:96::/112`.
    pub service_cidr6: Option<String>,
    /// The nodes whose kubelets get credentials (`kubelet-<node>.kubeconfig`).
    pub nodes: Vec<String>,
}

/// What a started control plane gives its callers. The kubeconfigs sit in the
/// state directory as `admin.kubeconfig` (`system:masters`) and
/// `agent.kubeconfig` (the ServiceAccount kube-system/ferry, with only what RBAC
/// grants it).
pub struct ControlPlane {
    /// The admin bearer token, for callers that speak HTTP themselves (a lab
    /// "kubelet" patching Pod status).
    pub admin_token: String,
}
