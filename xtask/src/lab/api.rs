//! The lab's API server as the lab's own pieces use it: kubectl (from the
//! fabric namespace, as admin), the Nodes' pod CIDRs, and the status patches
//! a cloud's load-balancer controller would send.

use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{pod_cidrs, Lab, FABRIC_GATEWAY};
use crate::sys::{output, output_with_input};

impl Lab {
    fn kubectl_path(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(
            std::fs::read_to_string(self.state_dir().join("kubectl"))?.trim(),
        ))
    }

    /// Sets the node's pod CIDR, as a cloud's IPAM or the controller
    /// manager's node-ipam would: each node's is fixed here, and matches its
    /// CNI configuration.
    pub(super) fn set_pod_cidr(&self, node: &str) -> Result<()> {
        let cidrs = pod_cidrs(node)?;
        let patch = json!({"spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs}});
        self.kubectl(&[
            "patch",
            "node",
            node,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])
        .map(drop)
    }

    /// `kubectl apply` of one object.
    pub(super) fn apply(&self, manifest: &Value) -> Result<()> {
        self.kubectl_stdin(&["apply", "-f", "-"], &manifest.to_string())
            .map(drop)
    }

    /// A JSON merge patch on a status subresource, as the kubelet would send it.
    pub(super) fn patch_status(&self, path: &str, body: &Value) -> Result<()> {
        let token = std::fs::read_to_string(self.state_dir().join("admin.token"))
            .context("reading the lab's admin token")?;
        output(
            ferry_netns::exec(&self.ns("fabric"), "curl")
                .args(["-sSf", "-k", "--http1.1", "-X", "PATCH"])
                .args([
                    "-H",
                    &format!("Authorization: Bearer {}", token.trim()),
                    "-H",
                    "Content-Type: application/merge-patch+json",
                    "--data",
                    &body.to_string(),
                    &format!("https://{FABRIC_GATEWAY}:6443{path}"),
                ]),
        )
        .map(drop)
    }

    /// kubectl against the lab's API server (run from the fabric namespace).
    fn kubectl_cmd(&self) -> Result<Command> {
        if !self.is_up() {
            bail!("lab {} is not up (`cargo xtask lab up`)", self.name);
        }
        let mut cmd = ferry_netns::exec(&self.ns("fabric"), self.kubectl_path()?);
        cmd.arg("--kubeconfig").arg(self.admin_kubeconfig());
        Ok(cmd)
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        output(self.kubectl_cmd()?.args(args))
    }

    /// kubectl with the terminal: what `cargo xtask lab kubectl` runs.
    pub fn kubectl_interactive(&self, args: &[String]) -> Result<()> {
        let status = self.kubectl_cmd()?.args(args).status()?;
        if !status.success() {
            bail!("kubectl: {status}");
        }
        Ok(())
    }

    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        output_with_input(self.kubectl_cmd()?.args(args), input)
            .with_context(|| format!("kubectl {}", args.join(" ")))
    }

    /// Gives a LoadBalancer Service an ingress IP through the status subresource,
    /// as a cloud's load-balancer controller would.
    pub fn set_load_balancer_ip(&self, service: &str, addr: Ipv4Addr) -> Result<()> {
        self.patch_status(
            &format!("/api/v1/namespaces/default/services/{service}/status"),
            &json!({"status": {"loadBalancer": {"ingress": [{"ip": addr.to_string()}]}}}),
        )
    }

    /// Addresses of the ready endpoints in a Service's EndpointSlices.
    pub fn ready_endpoints(&self, service: &str) -> Result<Vec<Ipv4Addr>> {
        let json = self.kubectl(&[
            "get",
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={service}"),
            "-o",
            "json",
        ])?;
        let list: Value = serde_json::from_str(&json)?;
        let mut addrs = Vec::new();
        for slice in list["items"].as_array().into_iter().flatten() {
            for ep in slice["endpoints"].as_array().into_iter().flatten() {
                if ep["conditions"]["ready"] == Value::Bool(true) {
                    if let Some(addr) = ep["addresses"][0].as_str() {
                        addrs.push(addr.parse()?);
                    }
                }
            }
        }
        addrs.sort();
        Ok(addrs)
    }
}
