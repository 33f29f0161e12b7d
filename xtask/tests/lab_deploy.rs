//! deploy/ as an operator installs it, against the lab's real API server: an
//! overlay of their own names the image and the API server with kustomize
//! (kubectl 1.20's, v2.0.3), and the server accepts every object (server-side
//! dry run: nothing is persisted, so the lab's own agents are left alone) with
//! the ConfigMap's keys reaching the agent's environment. The same for the
//! uninstall DaemonSet.

mod support;

use std::path::{Component, Path, PathBuf};

use serde_json::Value;
use support::*;

const IMAGE: &str = "registry.example.com/ferry/proxy-agent:0.1.0";

/// An overlay directory of `base` (under the repository's deploy/), with
/// `extra` after its `bases:` and `images:`. kustomize v2.0 takes only
/// relative bases.
fn overlay(lab: &Lab, name: &str, base: &str, extra: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{}-{name}", lab.name));
    std::fs::create_dir_all(&dir).unwrap();
    let target = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join(base)
        .canonicalize()
        .unwrap();
    let up = dir
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .map(|_| "..")
        .collect::<Vec<_>>()
        .join("/");
    let relative = format!("{up}{}", target.display());
    let (name, tag) = IMAGE.rsplit_once(':').unwrap();
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "bases: [\"{relative}\"]\nimages:\n  - {{name: ghcr.io/ferry-proxy/proxy-agent, newName: {name}, newTag: \"{tag}\"}}\n{extra}"
        ),
    )
    .unwrap();
    dir
}

/// The objects the API server would store for `kubectl apply -k dir`.
fn dry_run(lab: &Lab, dir: &Path) -> Vec<Value> {
    let out = lab.kubectl(&[
        "apply",
        "-k",
        dir.to_str().unwrap(),
        "--dry-run=server",
        "-o",
        "json",
    ]);
    let list: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    match list["kind"].as_str() {
        Some("List") => list["items"].as_array().unwrap().clone(),
        _ => vec![list],
    }
}

fn find<'a>(objects: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}* in {objects:#?}"))
}

/// The ConfigMap key an env variable of `container` is read from.
fn env_ref<'a>(container: &'a Value, var: &str) -> (&'a str, &'a str, bool) {
    let env = container["env"].as_array().unwrap();
    let entry = env
        .iter()
        .find(|e| e["name"] == var)
        .unwrap_or_else(|| panic!("no {var} in {env:#?}"));
    let r = &entry["valueFrom"]["configMapKeyRef"];
    (
        r["name"].as_str().unwrap(),
        r["key"].as_str().unwrap(),
        r["optional"].as_bool().unwrap_or(false),
    )
}

#[test]
fn lab_deploy_installs_with_kustomize_on_a_real_api_server() {
    let lab = Lab::up();
    let install = overlay(
        &lab,
        "install",
        "deploy",
        "configMapGenerator:\n  - name: ferry-config\n    namespace: kube-system\n    behavior: merge\n    literals: [k8sServiceHost=10.250.0.1, k8sServicePort=\"6443\", uplinkInterface=eth0]\n",
    );
    let objects = dry_run(&lab, &install);
    for (kind, name) in [
        ("ServiceAccount", "ferry"),
        ("ClusterRole", "ferry"),
        ("ClusterRoleBinding", "ferry"),
    ] {
        find(&objects, kind, name);
    }
    let config = find(&objects, "ConfigMap", "ferry-config-");
    assert_eq!(config["metadata"]["namespace"], "kube-system");
    assert_eq!(config["data"]["k8sServiceHost"], "10.250.0.1");
    assert_eq!(config["data"]["k8sServicePort"], "6443");
    assert_eq!(config["data"]["uplinkInterface"], "eth0");
    let config_name = config["metadata"]["name"].as_str().unwrap();

    let ds = find(&objects, "DaemonSet", "ferry");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let agent = &pod["containers"][0];
    assert_eq!(agent["image"], IMAGE, "the overlay's image");
    for (var, key) in [
        ("KUBERNETES_SERVICE_HOST", "k8sServiceHost"),
        ("KUBERNETES_SERVICE_PORT", "k8sServicePort"),
        ("FERRY_UPLINK_IFACE", "uplinkInterface"),
    ] {
        // Optional: a key left out keeps the kubelet's value or the default.
        assert_eq!(env_ref(agent, var), (config_name, key, true), "{var}");
    }
    assert_eq!(agent["securityContext"]["privileged"], false);

    // The base alone applies too, its ConfigMap without keys.
    let base = dry_run(
        &lab,
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy"),
    );
    let config = find(&base, "ConfigMap", "ferry-config-");
    assert!(
        config["data"].as_object().is_none_or(|d| d.is_empty()),
        "{config}"
    );

    let uninstall = overlay(&lab, "uninstall", "deploy/uninstall", "");
    let objects = dry_run(&lab, &uninstall);
    let ds = find(&objects, "DaemonSet", "ferry-cleanup");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let init = &pod["initContainers"][0];
    assert_eq!(init["image"], IMAGE);
    assert_eq!(init["args"], serde_json::json!(["cleanup"]));
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN"])
    );
    assert_eq!(pod["containers"][0]["image"], IMAGE);
    assert_eq!(
        pod["containers"][0]["args"],
        serde_json::json!(["cleanup", "--wait"])
    );
    for dir in [install, uninstall] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
