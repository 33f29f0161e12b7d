//! Golden tests, after Cilium's script tests: each folder under tests/golden/
//! holds Kubernetes manifests (*.yaml) and, beside them, `expected.txt`: the
//! frontends, skips, healthCheckNodePorts and desired map state the first
//! Node's agent computes from them (no kernel, no API server). A change in
//! what the agent would program fails here with a line diff.
//!
//! After a deliberate change, regenerate the expected files and review them in
//! the diff:
//!
//!     FERRY_BLESS=1 cargo test -p proxy-agent --test golden

use std::{fmt::Write as _, fs, path::Path};

use proxy_agent::{
    desired::{self, Ids},
    frontend::Scheduler,
    k8s::manifests::read_manifests,
};

/// What the agent makes of the manifests in `dir`, as text.
fn render(dir: &Path) -> String {
    let manifests = read_manifests(dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    let node_name = manifests
        .nodes
        .first()
        .and_then(|n| n.metadata.name.clone())
        .unwrap_or_default();
    let node = manifests.node(&node_name);
    let served = manifests.frontends(&node, Scheduler::default());
    let (state, problems) = desired::map_state(&served.frontends, &mut Ids::default());
    let mut out = format!("# node {node_name:?} addresses {:?}\n", node.addresses);
    out.push_str("# frontends\n");
    let mut frontends: Vec<_> = served.frontends.iter().collect();
    frontends.sort_by_key(|f| f.frontend);
    for f in frontends {
        let endpoints = |list: &[proxy_agent::frontend::Endpoint]| {
            list.iter()
                .map(|e| {
                    let mut s = format!("{}:{}", e.address, e.port);
                    if e.local {
                        s.push_str("(local)");
                    }
                    if e.terminating {
                        s.push_str("(terminating)");
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            out,
            "{}\n  endpoints: [{}]\n  reachable: [{}]",
            f.name,
            endpoints(&f.endpoints),
            endpoints(&f.reachable)
        );
        if !f.cluster_endpoints.is_empty() {
            let _ = writeln!(out, "  in-cluster: [{}]", endpoints(&f.cluster_endpoints));
        }
    }
    out.push_str("# ignored objects\n");
    for ignored in &manifests.ignored {
        let file = dir.display().to_string() + "/";
        let _ = writeln!(out, "{}", ignored.replace(&file, ""));
    }
    out.push_str("# skipped\n");
    for skip in &served.skipped {
        let _ = writeln!(out, "{skip}");
    }
    out.push_str("# health checks\n");
    for hc in &served.health_checks {
        let _ = writeln!(
            out,
            "{}/{} port {} local endpoints {}",
            hc.namespace, hc.name, hc.port, hc.local_endpoints
        );
    }
    out.push_str("# problems\n");
    for problem in &problems {
        let _ = writeln!(out, "{problem}");
    }
    out.push_str("# maps\n");
    out.push_str(&desired::dump(&state));
    out
}

/// A line diff (longest common subsequence): `-` expected, `+` got.
fn diff(want: &str, got: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            let _ = writeln!(out, "  {}", a[i]);
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            let _ = writeln!(out, "+ {}", b[j]);
            j += 1;
        } else {
            let _ = writeln!(out, "- {}", a[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn manifests_give_the_expected_desired_map_state() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("FERRY_BLESS").is_some();
    let mut cases: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases under {}", root.display());
    let mut failures = String::new();
    for case in &cases {
        let got = render(case);
        let expected = case.join("expected.txt");
        if bless {
            fs::write(&expected, &got).unwrap();
            continue;
        }
        let want = fs::read_to_string(&expected).unwrap_or_default();
        if want != got {
            let _ = write!(
                failures,
                "\n{} differs:\n{}",
                expected.display(),
                diff(&want, &got)
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{failures}\nIf the change is meant, regenerate with \
         `FERRY_BLESS=1 cargo test -p proxy-agent --test golden` and review the diff."
    );
}
