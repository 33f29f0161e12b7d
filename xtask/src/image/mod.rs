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

/// The agent's recipe: `deploy/image.json`, beside the manifests that run
/// it. Its `files` name the workspace binaries (built static) each layer file
/// is; the tag is the workspace's version.
struct Recipe {
    name: String,
    files: Vec<RecipeFile>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

struct RecipeFile {
    path: String,
    binary: String,
    mode: u32,
}

fn agent_recipe() -> Result<Recipe> {
    let path = workspace_root().join("deploy/image.json");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_recipe(&text).with_context(|| format!("parsing {}", path.display()))
}

fn parse_recipe(text: &str) -> Result<Recipe> {
    let json: serde_json::Value = serde_json::from_str(text)?;
    let string = |v: &serde_json::Value, key: &str| -> Result<String> {
        v[key]
            .as_str()
            .map(String::from)
            .with_context(|| format!("`{key}` is not a string"))
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        json[key]
            .as_array()
            .with_context(|| format!("`{key}` is not a list"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .with_context(|| format!("`{key}` holds a non-string"))
            })
            .collect()
    };
    let files = json["files"]
        .as_array()
        .context("`files` is not a list")?
        .iter()
        .map(|f| {
            let mode = string(f, "mode")?;
            Ok(RecipeFile {
                path: string(f, "path")?,
                binary: string(f, "binary")?,
                mode: u32::from_str_radix(&mode, 8)
                    .with_context(|| format!("mode {mode:?} is not octal"))?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Recipe {
        name: string(&json, "name")?,
        files,
        entrypoint: strings("entrypoint")?,
        cmd: strings("cmd")?,
    })
}

/// The agent's image, as the recipe names it and tagged with the version.
pub fn agent_image() -> String {
    let name = agent_recipe()
        .map(|r| r.name)
        .unwrap_or_else(|e| panic!("{e:#}"));
    format!("{name}:{VERSION}")
}

/// The agent's image from `recipe`, named `name`, with each file's binary
/// found by `binary` (the static build of that workspace binary).
fn agent_from_recipe(
    recipe: &Recipe,
    name: String,
    binary: impl Fn(&str) -> Result<PathBuf>,
) -> Result<oci::Image> {
    let files = recipe
        .files
        .iter()
        .map(|f| {
            let path = binary(&f.binary)?;
            Ok(oci::File {
                path: f.path.clone(),
                mode: f.mode,
                contents: fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(oci::Image {
        names: vec![name],
        files,
        entrypoint: recipe.entrypoint.clone(),
        cmd: recipe.cmd.clone(),
    })
}

/// The agent of [`PREVIOUS_RELEASE`], for upgrade tests.
pub fn previous_agent_image() -> String {
    "ghcr.io/ferry-proxy/proxy-agent:previous".to_string()
}

/// The last commit whose maps are one layout older than today's (`nat4_v2`,
/// before NAT entries got their flags): an upgrade from its agent exercises
/// the migration of the one older layout the agent keeps
/// (`proxy_common::previous`). Moves forward when a layout changes again.
pub const PREVIOUS_RELEASE: &str = "e7f9527017eb56e8c474e8cd7b7dced9fc1c6403";

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

/// The agent's static binary, the one its image holds (built if needed).
pub fn agent_binary() -> Result<PathBuf> {
    static_bin::build("proxy-agent", "proxy-agent")
}

/// The three images: the agent's from its recipe in deploy/, the lab's two
/// here, from the static binaries.
fn recipes(lab_pod_bin: &Path) -> Result<Vec<(&'static str, oci::Image)>> {
    let agent = agent_from_recipe(&agent_recipe()?, agent_image(), |bin| {
        static_bin::build(bin, bin)
    })?;
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
    let lab_pod = static_bin::build("ferry-lab-pod", "ferry-lab-pod")?;
    let dir = images_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut built = Vec::new();
    for (file, image) in recipes(&lab_pod)? {
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

/// Builds the agent of [`PREVIOUS_RELEASE`] as today's is built (its own
/// eBPF object embedded, linked statically) from a checkout of its own in
/// `/var/tmp` (outside this workspace, whose manifests would claim its
/// crates; kept, so a second build is incremental), and writes its image,
/// [`previous_agent_image`].
pub fn build_previous() -> Result<Built> {
    let root = PathBuf::from(format!(
        "/var/tmp/ferry-previous-{}",
        &PREVIOUS_RELEASE[..12]
    ));
    // A checkout that git no longer knows (its clone removed) is replaced.
    let usable = Command::new("git")
        .current_dir(&root)
        .args(["rev-parse", "--verify", "--quiet", "HEAD"])
        .output()
        .is_ok_and(|o| o.status.success());
    if root.exists() && !usable {
        fs::remove_dir_all(&root)?;
    }
    let _ = Command::new("git")
        .current_dir(workspace_root())
        .args(["worktree", "prune"])
        .status();
    if !root.join(".git").exists() {
        exec(
            Command::new("git")
                .current_dir(workspace_root())
                .args(["worktree", "add", "--detach"])
                .arg(&root)
                .arg(PREVIOUS_RELEASE),
        )
        .context("checking out the previous release (the clone needs its history)")?;
    } else {
        exec(Command::new("git").current_dir(&root).args([
            "checkout",
            "--detach",
            PREVIOUS_RELEASE,
        ]))?;
    }
    // Its own xtask builds its own eBPF object, into its own target/.
    exec(Command::new(env!("CARGO")).current_dir(&root).args([
        "run",
        "--quiet",
        "-p",
        "xtask",
        "--",
        "build-ebpf",
    ]))?;
    // Today's recipe: the image differs only in the binary.
    let image = agent_from_recipe(&agent_recipe()?, previous_agent_image(), |bin| {
        static_bin::build_in(&root, bin, bin)
    })?;
    let dir = images_dir();
    fs::create_dir_all(&dir)?;
    let archive = dir.join("proxy-agent-previous.tar");
    fs::write(&archive, oci::archive(&image)?)
        .with_context(|| format!("writing {}", archive.display()))?;
    Ok(Built {
        name: previous_agent_image(),
        archive,
    })
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
pub fn run(socket: Option<&Path>, namespace: &str, previous: bool) -> Result<()> {
    let built = if previous {
        vec![build_previous()?]
    } else {
        build()?
    };
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
    fn the_recipe_in_deploy_is_read_and_a_bad_one_refused() {
        let recipe = agent_recipe().unwrap();
        assert_eq!(recipe.entrypoint, ["/proxy-agent"]);
        assert_eq!(recipe.files[0].binary, "proxy-agent");
        assert_eq!(recipe.files[0].mode, 0o755);
        let bad = r#"{"name": "x", "files": [{"path": "a", "binary": "a", "mode": "9"}],
            "entrypoint": [], "cmd": []}"#;
        let err = parse_recipe(bad).err().expect("mode 9 is not octal");
        assert!(format!("{err:#}").contains("not octal"), "{err:#}");
    }

    #[test]
    fn deploy_names_the_agent_image_this_builds() {
        for file in ["deploy/daemonset.yaml", "deploy/uninstall/cleanup.yaml"] {
            let yaml = fs::read_to_string(workspace_root().join(file)).unwrap();
            let images: Vec<&str> = yaml
                .lines()
                .filter_map(|l| l.trim().strip_prefix("image:"))
                .map(str::trim)
                .collect();
            assert!(!images.is_empty(), "{file} names no image");
            for image in images {
                assert_eq!(image, agent_image(), "{file}");
            }
        }
    }
}
