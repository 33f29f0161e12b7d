//! `cargo xtask image`: the project's container images, as OCI archives under
//! `target/images/`, and their import into a containerd.
//! - the agent (`ghcr.io/ferry-proxy/proxy-agent:<version>`, the name
//!   `deploy/daemonset.yaml` runs): the static `proxy-agent` with the eBPF object
//!   inside, and nothing else;
//! - the lab's pods (`ferry.local/lab-pod:<version>`) and pod sandboxes
//!   (`ferry.local/pause:<version>`): the static `ferry-lab-pod`, for a lab that
//!   reaches no registry.
//!
//! This file holds the recipes (which files, which command); `static_bin`
//! builds the binaries, `oci` writes the archives.

mod oci;
mod static_bin;

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{
    build_ebpf,
    sys::{exec, workspace_root},
};

/// The workspace's version: every crate, so every image, carries it.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The namespace the kubelet's CRI uses in containerd.
pub const KUBERNETES_NAMESPACE: &str = "k8s.io";

pub fn agent_image() -> String {
    format!("ghcr.io/ferry-proxy/proxy-agent:{VERSION}")
}

pub fn lab_pod_image() -> String {
    format!("ferry.local/lab-pod:{VERSION}")
}

pub fn pause_image() -> String {
    format!("ferry.local/pause:{VERSION}")
}

/// An image archive written by [`build`].
pub struct Built {
    pub name: String,
    pub archive: PathBuf,
}

/// Where the archives land.
pub fn images_dir() -> PathBuf {
    workspace_root().join("target/images")
}

fn executable(path: &str, binary: &Path) -> Result<oci::File> {
    Ok(oci::File {
        path: path.into(),
        mode: 0o755,
        contents: fs::read(binary).with_context(|| format!("reading {}", binary.display()))?,
    })
}

/// The three images' recipes, from the static binaries.
fn recipes(agent_bin: &Path, lab_pod_bin: &Path) -> Result<Vec<(&'static str, oci::Image)>> {
    let agent = oci::Image {
        names: vec![agent_image()],
        files: vec![executable("proxy-agent", agent_bin)?],
        entrypoint: vec!["/proxy-agent".into()],
        cmd: vec!["run".into()],
    };
    let lab_pod = oci::Image {
        names: vec![lab_pod_image()],
        files: vec![executable("ferry-lab-pod", lab_pod_bin)?],
        // The pod's name comes as an argument or from `POD_NAME`.
        entrypoint: vec!["/ferry-lab-pod".into(), "serve".into()],
        cmd: vec![],
    };
    let pause = oci::Image {
        names: vec![pause_image()],
        files: vec![executable("ferry-lab-pod", lab_pod_bin)?],
        entrypoint: vec!["/ferry-lab-pod".into(), "pause".into()],
        cmd: vec![],
    };
    Ok(vec![
        ("proxy-agent", agent),
        ("lab-pod", lab_pod),
        ("pause", pause),
    ])
}

/// Builds the static binaries (the eBPF object first, which the agent
/// embeds) and writes the images to [`images_dir`].
pub fn build() -> Result<Vec<Built>> {
    build_ebpf::run()?;
    let agent = static_bin::build("proxy-agent", "proxy-agent")?;
    let lab_pod = static_bin::build("ferry-lab-pod", "ferry-lab-pod")?;
    let dir = images_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut built = Vec::new();
    for (file, image) in recipes(&agent, &lab_pod)? {
        let archive = dir.join(format!("{file}.tar"));
        fs::write(&archive, oci::archive(&image)?)
            .with_context(|| format!("writing {}", archive.display()))?;
        built.push(Built {
            name: image.names.join(" "),
            archive,
        });
    }
    Ok(built)
}

/// Imports an image archive into the containerd at `socket`, in `namespace`
/// (the kubelet's is [`KUBERNETES_NAMESPACE`]), and unpacks it for its
/// default snapshotter.
pub fn load(socket: &Path, namespace: &str, archive: &Path) -> Result<()> {
    exec(
        Command::new("ctr")
            // Its progress to stderr: stdout keeps the task's list of images.
            .stdout(io::stderr())
            .arg("--address")
            .arg(socket)
            .args(["--namespace", namespace, "images", "import"])
            .arg(archive),
    )
    .with_context(|| format!("importing {} into {}", archive.display(), socket.display()))
}

/// The task: build, print each image and its archive, and load them into
/// the containerd at `socket` if one is given.
pub fn run(socket: Option<&Path>, namespace: &str) -> Result<()> {
    let built = build()?;
    if let Some(socket) = socket {
        for image in &built {
            load(socket, namespace, &image.archive)?;
        }
    }
    for image in &built {
        println!("{}\t{}", image.name, image.archive.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemonset_runs_the_agent_image_this_builds() {
        let daemonset = fs::read_to_string(workspace_root().join("deploy/daemonset.yaml")).unwrap();
        let images: Vec<&str> = daemonset
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .collect();
        assert_eq!(images, [agent_image().as_str()]);
    }
}
