//! Kubernetes objects from a directory of YAML or JSON manifests, and the
//! frontends a node's agent would serve for them: what `simulate` and the
//! golden tests start from, without an API server.

use std::path::Path;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Service};
use serde::Deserialize as _;

use super::{
    frontends::{self, Frontends},
    nodes::NodeInfo,
    slices::{self, Slice, SliceVersion},
};
use crate::{frontend::Scheduler, settings};

/// The Kubernetes objects of a directory of YAML or JSON manifests.
#[derive(Default)]
pub struct Manifests {
    pub services: Vec<Service>,
    pub slices: Vec<Slice>,
    pub nodes: Vec<Node>,
}

/// Collections nested deeper than this are refused before parsing: the YAML
/// parser's time grows with the square of the depth of flow collections
/// (100,000 levels of `[` took minutes), and its deserializer refuses more
/// than 128 levels after that anyway.
const MAX_DEPTH: usize = 128;
/// Kubernetes limits an object to about 1.5 MiB in etcd; a manifest file of
/// many objects may be larger, but not this large.
const MAX_FILE_BYTES: u64 = 64 << 20;

pub fn read_manifests(dir: &Path) -> Result<Manifests> {
    let mut out = Manifests::default();
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    paths.sort();
    for path in paths {
        let text = read_manifest(&path)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::to_value(
                serde_yaml::Value::deserialize(doc)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )?;
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            let api = value["apiVersion"].as_str().unwrap_or_default().to_string();
            let what = || format!("{kind} in {}", path.display());
            match kind.as_str() {
                "Service" => out
                    .services
                    .push(serde_json::from_value(value).with_context(what)?),
                "Node" => out
                    .nodes
                    .push(serde_json::from_value(value).with_context(what)?),
                "EndpointSlice" => {
                    let version = if api.ends_with("v1beta1") {
                        SliceVersion::V1beta1
                    } else {
                        SliceVersion::V1
                    };
                    out.slices
                        .push(slices::parse_slice(version, value).with_context(what)?);
                }
                "List" => bail!("{}: unpack List objects into documents", path.display()),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// A manifest file's text, once it is known to be one: a regular file (not a
/// FIFO, device or directory named like one, which would block or fail
/// unnamed), of a sane size, without collections nested beyond `MAX_DEPTH`.
fn read_manifest(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{}: not a regular file ({:?}), though named like a manifest",
            path.display(),
            meta.file_type()
        );
    }
    if meta.len() > MAX_FILE_BYTES {
        bail!(
            "{}: {} bytes, more than the {} MiB a manifest file may have",
            path.display(),
            meta.len(),
            MAX_FILE_BYTES >> 20
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let depth = flow_depth(&text);
    if depth > MAX_DEPTH {
        bail!(
            "{}: collections nested {depth} deep, more than {MAX_DEPTH}: not a Kubernetes object",
            path.display()
        );
    }
    Ok(text)
}

/// The deepest nesting of flow collections (`[`, `{`) in YAML or JSON
/// `text`, outside quoted scalars and comments.
fn flow_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut chars = text.chars().peekable();
    let mut previous = '\n';
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            // A quote starts a quoted scalar only where a scalar starts.
            '\'' if previous.is_whitespace() || "[{,:".contains(previous) => {
                while let Some(d) = chars.next() {
                    if d == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            break;
                        }
                    }
                }
            }
            '#' if previous.is_whitespace() => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        previous = c;
    }
    deepest
}

impl Manifests {
    /// What node `name` knows of itself from its Node object (if there is one).
    pub fn node(&self, name: &str) -> NodeInfo {
        let object = self
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name));
        NodeInfo::from_node(name, object)
    }

    /// The frontends `node`'s agent serves for these objects, the default
    /// `scheduler` filled in as the agent does.
    pub fn frontends(&self, node: &NodeInfo, scheduler: Scheduler) -> Frontends {
        let services: Vec<&Service> = self.services.iter().collect();
        let slices: Vec<&Slice> = self.slices.iter().collect();
        let mut served = frontends::of_cluster(&services, &slices, node);
        settings::fill_defaults(&mut served.frontends, scheduler);
        served
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn flow_depth_counts_collections_outside_strings_and_comments() {
        assert_eq!(flow_depth("a: [[1], {b: [2]}]"), 3);
        assert_eq!(flow_depth(r#"{"a": "[[[[", "b": "\\\"[["}"#), 1);
        assert_eq!(flow_depth("a: '[[[ it''s [[['\nb: [1]"), 1);
        assert_eq!(flow_depth("a: 1 # [[[[\nb: it's [x]"), 1);
        assert_eq!(flow_depth("kind: Service\n"), 0);
    }

    fn dir_with(name: &str, contents: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferry-manifests-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), contents).unwrap();
        dir
    }

    #[test]
    fn deeply_nested_yaml_is_refused_at_once() {
        let n = 100_000;
        let dir = dir_with(
            "deep.yaml",
            &format!("a: {}{}\n", "[".repeat(n), "]".repeat(n)),
        );
        let started = Instant::now();
        let error = format!("{:#}", read_manifests(&dir).err().expect("refused"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            error.contains("nested 100000 deep") && error.contains("deep.yaml"),
            "{error}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_fifo_named_like_a_manifest_is_refused_without_blocking() {
        let dir = dir_with("x.txt", "");
        let fifo = dir.join("pipe.yaml");
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain syscall with a valid path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let error = format!("{:#}", read_manifests(&dir).err().expect("refused"));
        assert!(error.contains("pipe.yaml: not a regular file"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
