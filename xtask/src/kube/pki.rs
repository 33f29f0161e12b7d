//! The control plane's credentials: a CA and the apiserver's serving
//! certificate, the service-account key, bearer tokens and kubeconfigs.

use std::{
    fmt::Write as _,
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    net::Ipv4Addr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::sys::quiet;

/// The bearer tokens of the control plane's users.
pub struct Tokens {
    pub admin: String,
    pub controller_manager: String,
    pub scheduler: String,
    pub agent: String,
    /// Each node's kubelet, by node name.
    pub kubelets: Vec<(String, String)>,
}

impl Tokens {
    pub fn random(nodes: &[String]) -> Result<Self> {
        Ok(Self {
            admin: random_token()?,
            controller_manager: random_token()?,
            scheduler: random_token()?,
            agent: random_token()?,
            kubelets: nodes
                .iter()
                .map(|node| Ok((node.clone(), random_token()?)))
                .collect::<Result<_>>()?,
        })
    }

    /// Writes the apiserver's `--token-auth-file` (token,user,uid,"groups"): the
    /// agent's row is what a ServiceAccount token of kube-system/ferry
    /// authenticates as, so RBAC bound to that ServiceAccount applies to it
    /// unchanged. A kubelet's row is the identity the Node authorizer and
    /// NodeRestriction know (`system:node:<name>` in `system:nodes`), as a
    /// kubelet's client certificate would carry it.
    pub fn write_auth_file(&self, path: &Path) -> Result<()> {
        let mut rows = format!(
            "{},ferry-admin,ferry-admin,\"system:masters\"\n\
             {},system:kube-controller-manager,system:kube-controller-manager\n\
             {},system:kube-scheduler,system:kube-scheduler\n\
             {},system:serviceaccount:kube-system:ferry,ferry-agent,\"system:serviceaccounts,system:serviceaccounts:kube-system\"\n",
            self.admin, self.controller_manager, self.scheduler, self.agent
        );
        for (node, token) in &self.kubelets {
            writeln!(
                rows,
                "{token},system:node:{node},kubelet-{node},system:nodes"
            )?;
        }
        write_private(path, &rows)
    }
}

/// The kubeconfigs of the admin, the agent and the controller manager, in `dir`
/// as `<name>.kubeconfig`, for `server_url` and the CA in `ca_cert`. The
/// agent's is only written: the lab hands `agent.kubeconfig` to its agents.
pub struct Kubeconfigs {
    pub admin: PathBuf,
    pub controller_manager: PathBuf,
    pub scheduler: PathBuf,
}

impl Kubeconfigs {
    pub fn write(dir: &Path, server_url: &str, ca_cert: &Path, tokens: &Tokens) -> Result<Self> {
        let ca_data = String::from_utf8(quiet(
            Command::new("openssl")
                .args(["base64", "-A", "-in"])
                .arg(ca_cert),
        )?)?;
        let write = |name: &str, user: &str, token: &str| -> Result<PathBuf> {
            let path = dir.join(format!("{name}.kubeconfig"));
            write_private(&path, &kubeconfig(server_url, ca_data.trim(), user, token))?;
            Ok(path)
        };
        write("agent", "ferry-agent", &tokens.agent)?;
        for (node, token) in &tokens.kubelets {
            write(
                &format!("kubelet-{node}"),
                &format!("system:node:{node}"),
                token,
            )?;
        }
        Ok(Self {
            admin: write("admin", "ferry-admin", &tokens.admin)?,
            controller_manager: write(
                "controller-manager",
                "system:kube-controller-manager",
                &tokens.controller_manager,
            )?,
            scheduler: write("scheduler", "system:kube-scheduler", &tokens.scheduler)?,
        })
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
pub fn make_pki(pki: &Path, listen_addr: Ipv4Addr, service_ip: Ipv4Addr) -> Result<()> {
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
pub fn first_host(cidr: &str) -> Result<Ipv4Addr> {
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
