//! The API client, and which API server address it uses and where that came
//! from (the origin is pure: from the flag, the environment and the address
//! kube-rs settled on).
//!
//! In a pod, kube-rs takes `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT`.
//! The kubelet sets them to the `kubernetes` Service's ClusterIP, which only a
//! running service proxy serves (and Ferry's programs do not serve the host
//! network's own connections), so the DaemonSet sets them from the ConfigMap
//! `ferry-config` (`k8sServiceHost`, `k8sServicePort`) instead. Left unset,
//! the kubelet's ClusterIP stays: that works only while another proxy serves
//! it, and the agent says so.

use std::{fmt, path::PathBuf};

use anyhow::{bail, Context, Result};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Client,
};
use serde::Serialize;
use tracing::{info, warn};

/// A client from `kubeconfig`, or as kube-rs infers it (`$KUBECONFIG`,
/// `~/.kube/config`, in-cluster); its URL and origin are logged and returned.
pub async fn connect(kubeconfig: Option<&PathBuf>) -> Result<(Client, String, Origin)> {
    let env = Env::from_process();
    if kubeconfig.is_none() {
        env.check()?;
    }
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and none found")?,
    };
    let url = &config.cluster_url;
    let default_port = if url.scheme_str() == Some("http") {
        80
    } else {
        443
    };
    let port = url.port_u16().unwrap_or(default_port);
    let from = origin(kubeconfig, &env, url.host().unwrap_or_default(), port);
    if from.needs_another_proxy() {
        warn!(api_server = %url, %from, "API server");
    } else {
        info!(api_server = %url, %from, "API server");
    }
    let url = url.to_string();
    Ok((Client::try_from(config)?, url, from))
}

/// The variables the address can come from, as the process has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    /// `KUBERNETES_SERVICE_HOST`
    pub host: Option<String>,
    /// `KUBERNETES_SERVICE_PORT`
    pub port: Option<String>,
    /// `KUBERNETES_PORT` (`tcp://CLUSTER_IP:PORT`), which only the kubelet sets.
    pub kubelet_port: Option<String>,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).ok();
        Self {
            host: var("KUBERNETES_SERVICE_HOST"),
            port: var("KUBERNETES_SERVICE_PORT"),
            kubelet_port: var("KUBERNETES_PORT"),
        }
    }

    /// An empty variable (a ConfigMap key set to "") is a mistake to report
    /// as such, not a URL that fails to parse.
    pub fn check(&self) -> Result<()> {
        for (name, key, value) in [
            ("KUBERNETES_SERVICE_HOST", "k8sServiceHost", &self.host),
            ("KUBERNETES_SERVICE_PORT", "k8sServicePort", &self.port),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                bail!(
                    "{name} is empty: set {key} in the ConfigMap ferry-config to the API server's \
                     address, or remove the key to use the kubelet's"
                );
            }
        }
        Ok(())
    }
}

/// Where the API server address came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Origin {
    /// `--kubeconfig`.
    KubeconfigFlag { path: PathBuf },
    /// `$KUBECONFIG` or `~/.kube/config`, as kube-rs infers it.
    Kubeconfig,
    /// `KUBERNETES_SERVICE_HOST`/`PORT` set to an address of their own (in the
    /// DaemonSet: `ferry-config`).
    ServiceEnv,
    /// `KUBERNETES_SERVICE_HOST`/`PORT` as the kubelet sets them: the
    /// `kubernetes` Service's ClusterIP.
    ClusterIp,
}

impl Origin {
    /// Whether the agent depends on another proxy to reach the API server.
    pub fn needs_another_proxy(&self) -> bool {
        *self == Self::ClusterIp
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KubeconfigFlag { path } => write!(f, "--kubeconfig {}", path.display()),
            Self::Kubeconfig => write!(f, "kubeconfig ($KUBECONFIG or ~/.kube/config)"),
            Self::ServiceEnv => write!(
                f,
                "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT (the DaemonSet sets them from \
                 k8sServiceHost/k8sServicePort in the ConfigMap ferry-config)"
            ),
            Self::ClusterIp => write!(
                f,
                "the kubelet's KUBERNETES_SERVICE_HOST: the kubernetes Service's ClusterIP, which \
                 only another running service proxy serves; set k8sServiceHost and \
                 k8sServicePort in the ConfigMap ferry-config"
            ),
        }
    }
}

/// Where the address kube-rs chose (`host`, `port`, from its cluster URL)
/// came from, given `--kubeconfig` and the environment.
pub fn origin(flag: Option<&PathBuf>, env: &Env, host: &str, port: u16) -> Origin {
    if let Some(path) = flag {
        return Origin::KubeconfigFlag { path: path.clone() };
    }
    let host = unbracket(host);
    let env_port = env
        .port
        .as_deref()
        .and_then(|p| p.trim().parse::<u16>().ok());
    if env.host.as_deref().map(unbracket) != Some(host) || env_port != Some(port) {
        return Origin::Kubeconfig;
    }
    let kubelet = env
        .kubelet_port
        .as_deref()
        .and_then(|p| p.strip_prefix("tcp://"))
        .and_then(|p| p.rsplit_once(':'))
        .and_then(|(h, p)| Some((unbracket(h), p.parse::<u16>().ok()?)));
    if kubelet == Some((host, port)) {
        Origin::ClusterIp
    } else {
        Origin::ServiceEnv
    }
}

fn unbracket(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod's environment: the kubelet's variables for the ClusterIP
    /// 10.96.0.1:443, and the host and port the container sets (or not).
    fn pod(host: Option<&str>, port: Option<&str>) -> Env {
        Env {
            host: Some(host.unwrap_or("10.96.0.1").into()),
            port: Some(port.unwrap_or("443").into()),
            kubelet_port: Some("tcp://10.96.0.1:443".into()),
        }
    }

    #[test]
    fn the_configmap_address_is_named_as_such() {
        let env = pod(Some("192.168.10.2"), Some("6443"));
        assert_eq!(origin(None, &env, "192.168.10.2", 6443), Origin::ServiceEnv);
        assert!(!Origin::ServiceEnv.needs_another_proxy());
    }

    #[test]
    fn the_kubelets_cluster_ip_is_recognised() {
        let env = pod(None, None);
        let from = origin(None, &env, "10.96.0.1", 443);
        assert_eq!(from, Origin::ClusterIp);
        assert!(from.needs_another_proxy());
        assert!(from.to_string().contains("k8sServiceHost"), "{from}");
        // Only the port set: still the ClusterIP's host, on another port.
        let env = pod(None, Some("6443"));
        assert_eq!(origin(None, &env, "10.96.0.1", 6443), Origin::ServiceEnv);
    }

    #[test]
    fn ipv6_addresses_compare_without_brackets() {
        let env = Env {
            host: Some("fd00::1".into()),
            port: Some("443".into()),
            kubelet_port: Some("tcp://[fd00::1]:443".into()),
        };
        assert_eq!(origin(None, &env, "[fd00::1]", 443), Origin::ClusterIp);
    }

    #[test]
    fn kubeconfigs_win_when_they_gave_the_address() {
        let path = PathBuf::from("/etc/ferry/kubeconfig");
        let env = pod(Some("192.168.10.2"), Some("6443"));
        assert_eq!(
            origin(Some(&path), &env, "192.168.10.2", 6443),
            Origin::KubeconfigFlag { path }
        );
        // kube-rs read $KUBECONFIG: its address is not the environment's.
        assert_eq!(origin(None, &env, "127.0.0.1", 6443), Origin::Kubeconfig);
        assert_eq!(
            origin(None, &Env::default(), "127.0.0.1", 6443),
            Origin::Kubeconfig
        );
    }

    #[test]
    fn an_empty_variable_is_reported_by_its_configmap_key() {
        assert!(pod(None, None).check().is_ok());
        assert!(Env::default().check().is_ok());
        let err = pod(Some(""), Some("6443")).check().unwrap_err().to_string();
        assert!(err.contains("KUBERNETES_SERVICE_HOST is empty"), "{err}");
        assert!(err.contains("k8sServiceHost"), "{err}");
        let err = pod(Some("10.0.0.1"), Some(" "))
            .check()
            .unwrap_err()
            .to_string();
        assert!(err.contains("k8sServicePort"), "{err}");
    }
}
