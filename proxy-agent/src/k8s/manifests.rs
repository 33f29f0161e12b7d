//! Kubernetes objects from a directory of YAML or JSON manifests, and the
//! frontends a node's agent would serve for them: what `simulate` and the
//! golden tests start from, without an API server.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
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
    /// Objects left out, each named with why (as the agent's watches leave
    /// out, and log, what they cannot read); everything else is read.
    pub ignored: Vec<String>,
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
        out.add_text(&path.display().to_string(), &text)?;
    }
    Ok(out)
}

impl Manifests {
    /// Adds the objects of one manifest's text (`label`: its file, for
    /// messages). Fails only for text that is no manifest at all (nested
    /// too deep); an object that cannot be read is named in `ignored`.
    pub fn add_text(&mut self, label: &str, text: &str) -> Result<()> {
        let depth = flow_depth(text);
        if depth > MAX_DEPTH {
            bail!("{label}: collections nested {depth} deep, more than {MAX_DEPTH}: not a Kubernetes object");
        }
        for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let value = match serde_yaml_ng::Value::deserialize(doc) {
                Ok(value) => serde_json::to_value(value),
                Err(e) => {
                    // Past a syntax error the rest of the text cannot be read.
                    self.ignored
                        .push(format!("{label} (document {}): not YAML: {e}", index + 1));
                    break;
                }
            };
            let value = match value {
                Ok(value) if value.is_null() => continue,
                Ok(value) => value,
                Err(e) => {
                    self.ignored
                        .push(format!("{label} (document {}): {e}", index + 1));
                    continue;
                }
            };
            if let Err(e) = self.add(value) {
                self.ignored
                    .push(format!("{label} (document {}): {e:#}", index + 1));
            }
        }
        Ok(())
    }

    /// Adds one object; an error names it and says why it cannot be read.
    fn add(&mut self, value: serde_json::Value) -> Result<()> {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let kind = text(&value["kind"]);
        let api = text(&value["apiVersion"]);
        let meta = &value["metadata"];
        let what = format!(
            "{kind} {}/{}",
            text(&meta["namespace"]),
            text(&meta["name"])
        );
        if kind.is_empty() {
            bail!("not a Kubernetes object: no kind");
        }
        match kind.as_str() {
            "Service" => {
                let service: Service =
                    serde_json::from_value(value).with_context(|| what.clone())?;
                // As the API has one object of a name: a later document replaces it.
                let key = |s: &Service| (s.metadata.namespace.clone(), s.metadata.name.clone());
                if let Some(i) = self.services.iter().position(|s| key(s) == key(&service)) {
                    self.ignored.push(format!(
                        "{what}: replaced by a later document of the same name"
                    ));
                    self.services.remove(i);
                }
                self.services.push(service);
            }
            "Node" => self
                .nodes
                .push(serde_json::from_value(value).with_context(|| what.clone())?),
            "EndpointSlice" => {
                let version = if api.ends_with("v1beta1") {
                    SliceVersion::V1beta1
                } else {
                    SliceVersion::V1
                };
                // The error says what in the slice is wrong.
                let slice =
                    slices::parse_slice(version, value).map_err(|e| anyhow!("{what}: {e}"))?;
                self.slices.push(slice);
            }
            "List" => bail!("a List: unpack List objects into documents"),
            _ => {}
        }
        Ok(())
    }
}

/// A manifest file's text, once it is known to be one: a regular file (not a
/// FIFO, device or directory named like one, which would block or fail
/// unnamed), of a sane size.
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
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
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
