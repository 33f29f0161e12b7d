//! `/healthz` as kube-proxy serves it on port 10256: 200 with a small JSON
//! body while the dataplane is programmed and in sync and the Node is not
//! leaving (`nodeEligible`: not being deleted, no ToBeDeletedByClusterAutoscaler
//! taint), 503 otherwise; `/livez`
//! (the liveness probe's) 200 while the agent's loop goes round, in sync or
//! not, so an API server outage never gets the agent restarted;
//! `/metrics` with the agent's counters, and `/statusz` (the uplinks, their
//! attach modes and why they were chosen; the API server and where its
//! address came from).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::warn;

use crate::{
    k8s::client::Origin,
    serve::latency::{Histogram, ProgrammingBuckets, SyncBuckets},
    uplink::Choice,
};

/// What the health endpoints report on, updated by the sync loop.
#[derive(Debug, Default)]
pub struct Health {
    /// When the maps last matched the API server's state.
    last_synced: Option<(Instant, jiff::Timestamp)>,
    /// Since when a change has been waiting to be programmed, if one is.
    pending_since: Option<Instant>,
    /// When the agent's loop last went round (see [`HEARTBEAT`]).
    last_beat: Option<Instant>,
    /// Why the node should get no new traffic (`nodeEligible: false`), if
    /// it should not (see `k8s::nodes::leaving`).
    node_leaving: Option<&'static str>,
}

/// A change older than this that is still not programmed makes the agent unhealthy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the loop says it is alive, and how long without that makes
/// `/livez` fail: only a loop that stopped going round is worth a restart.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Counters served on `/metrics` in Prometheus' text format.
#[derive(Debug, Default)]
pub struct Metrics {
    pub syncs: u64,
    pub sync_errors: u64,
    pub watch_errors: u64,
    pub attach_errors: u64,
    pub services_skipped: u64,
    pub service_problems: u64,
    /// Frontends refused (or kept as they were) because a map is full.
    pub frontends_refused: u64,
    /// Map writes that failed or were skipped behind a failed one.
    pub map_write_failures: u64,
    /// Pod interfaces whose tc filters were found gone and put back.
    pub filters_restored: u64,
    pub frontends: u64,
    pub backends: u64,
    pub pod_interfaces: u64,
    /// Endpoints on this node that the kernel reaches through an interface
    /// without the pod programs (see `kernel::ifaces::unattached`).
    pub local_endpoints_unattached: u64,
    /// Entries in the conntrack and NAT maps after the last garbage collection.
    pub conntrack_entries: u64,
    pub nat_entries: u64,
    /// New flows dropped because every NAT port towards the backend was held,
    /// by backend (`address:port/protocol`).
    pub nat_port_exhaustion: std::collections::BTreeMap<String, u64>,
    /// Pinned maps of an older agent not (or not wholly) carried over at
    /// start, by name.
    pub maps_not_carried: std::collections::BTreeMap<String, u64>,
    /// From each EndpointSlice change's trigger time to its programming.
    pub network_programming: Histogram<ProgrammingBuckets>,
    /// How long each successful programming round took.
    pub sync_duration: Histogram<SyncBuckets>,
}

impl Metrics {
    fn render(&self) -> String {
        let rows: [(&str, &str, u64, &str); 15] = [
            (
                "ferry_syncs_total",
                "counter",
                self.syncs,
                "Map programming rounds.",
            ),
            (
                "ferry_sync_errors_total",
                "counter",
                self.sync_errors,
                "Programming rounds that failed.",
            ),
            (
                "ferry_watch_errors_total",
                "counter",
                self.watch_errors,
                "API watch failures (retried).",
            ),
            (
                "ferry_attach_errors_total",
                "counter",
                self.attach_errors,
                "Pod interfaces the programs could not attach to.",
            ),
            (
                "ferry_services_skipped",
                "gauge",
                self.services_skipped,
                "Services or ports not proxied (headless, ExternalName, ...).",
            ),
            (
                "ferry_service_problems",
                "gauge",
                self.service_problems,
                "Frontends that could not be programmed.",
            ),
            (
                "ferry_frontends_refused_map_full",
                "gauge",
                self.frontends_refused,
                "Frontends not programmed, or kept as they were, because a map is full (see /statusz).",
            ),
            (
                "ferry_map_write_failures_total",
                "counter",
                self.map_write_failures,
                "Map writes that failed, or were skipped behind a failed write of the same frontend.",
            ),
            (
                "ferry_tc_filters_restored_total",
                "counter",
                self.filters_restored,
                "Pod interfaces whose tc filters were found gone at a resync and put back.",
            ),
            (
                "ferry_frontends",
                "gauge",
                self.frontends,
                "Frontends in the maps.",
            ),
            (
                "ferry_backends",
                "gauge",
                self.backends,
                "Backends in the maps.",
            ),
            (
                "ferry_pod_interfaces",
                "gauge",
                self.pod_interfaces,
                "Pod interfaces with the programs attached.",
            ),
            (
                "ferry_local_endpoints_unattached",
                "gauge",
                self.local_endpoints_unattached,
                "Endpoints on this node routed through an interface without the pod programs: their pods' connections to Services are not translated (extend --pod-iface-pattern).",
            ),
            (
                "ferry_conntrack_entries",
                "gauge",
                self.conntrack_entries,
                "Conntrack entries (both directions of each flow) after the last garbage collection.",
            ),
            (
                "ferry_nat_entries",
                "gauge",
                self.nat_entries,
                "NAT entries (one per flow SNATed to a remote backend) after the last garbage collection.",
            ),
        ];
        let mut out: String = rows
            .iter()
            .map(|(name, kind, value, help)| {
                format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n")
            })
            .collect();
        let name = "ferry_nat_port_exhaustion_drops_total";
        out.push_str(&format!(
            "# HELP {name} New flows dropped because every NAT port towards the backend was held.\n# TYPE {name} counter\n"
        ));
        for (backend, dropped) in &self.nat_port_exhaustion {
            out.push_str(&format!("{name}{{backend=\"{backend}\"}} {dropped}\n"));
        }
        let name = "ferry_maps_not_carried_total";
        out.push_str(&format!(
            "# HELP {name} Pinned maps of an older agent whose entries were not (or not all) carried over at start.\n# TYPE {name} counter\n"
        ));
        for (map, count) in &self.maps_not_carried {
            out.push_str(&format!("{name}{{map=\"{map}\"}} {count}\n"));
        }
        // kube-proxy's name, so the SIG Scalability SLI queries and dashboards
        // written for kube-proxy work unchanged against Ferry.
        out.push_str(&self.network_programming.render(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
        ));
        out.push_str(&self.sync_duration.render(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
        ));
        out
    }
}

/// Everything the HTTP endpoints report.
#[derive(Debug, Default)]
pub struct Status {
    pub health: Health,
    pub metrics: Metrics,
    /// How the uplink program is attached, per interface.
    pub uplinks: Vec<(String, &'static str)>,
    /// Which uplinks were chosen and why (none yet: the Node is still to be read).
    pub uplink_choice: Option<Choice>,
    /// The API server's URL and where it came from (none: no API server).
    pub api_server: Option<(String, Origin)>,
    /// The socket hooks: mode, cgroup and refusal, or why they are not attached.
    pub socket_lb: serde_json::Value,
    /// Frontends not programmed (or kept as they were), and why.
    pub problems: std::collections::BTreeMap<crate::frontend::Frontend, crate::desired::Problem>,
}

impl Status {
    /// `/statusz`: what this agent runs, as JSON.
    fn render(&self) -> String {
        let uplinks: Vec<String> = self
            .uplinks
            .iter()
            .map(|(iface, mode)| format!(r#"{{"interface": "{iface}", "mode": "{mode}"}}"#))
            .collect();
        let choice = self.uplink_choice.as_ref().map(|c| {
            serde_json::json!({
                "interfaces": c.interfaces,
                "reason": c.reason,
                "detail": c.reason.to_string(),
            })
        });
        let api_server = self.api_server.as_ref().map(
            |(url, from)| serde_json::json!({"url": url, "from": from, "detail": from.to_string()}),
        );
        format!(
            r#"{{"healthy": {}, "uplinks": [{}], "uplinkChoice": {}, "apiServer": {}, "socketLb": {}, "frontends": {}, "backends": {}, "podInterfaces": {}, "problems": {}}}"#,
            self.health.healthy(),
            uplinks.join(", "),
            serde_json::Value::from(choice),
            serde_json::Value::from(api_server),
            self.socket_lb,
            self.metrics.frontends,
            self.metrics.backends,
            self.metrics.pod_interfaces,
            serde_json::Value::from(
                self.problems
                    .values()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
            )
        )
    }

    /// Notes a round's problems: a full round's replace them all, a partial
    /// round's those of the frontends it covered (`scope`).
    pub fn note_problems(
        &mut self,
        scope: Option<&[crate::frontend::Frontend]>,
        problems: &[crate::desired::Problem],
    ) {
        match scope {
            None => self.problems.clear(),
            Some(scope) => scope.iter().for_each(|f| drop(self.problems.remove(f))),
        }
        for problem in problems {
            self.problems.insert(problem.frontend(), problem.clone());
        }
        self.metrics.service_problems = self.problems.len() as u64;
        self.metrics.frontends_refused =
            self.problems.values().filter(|p| p.map_full()).count() as u64;
    }
}

pub type Shared = Arc<Mutex<Status>>;

impl Health {
    pub fn synced(&mut self) {
        self.last_synced = Some((Instant::now(), jiff::Timestamp::now()));
        self.pending_since = None;
    }

    pub fn pending(&mut self) {
        self.pending_since.get_or_insert_with(Instant::now);
    }

    pub fn beat(&mut self) {
        self.last_beat = Some(Instant::now());
    }

    /// The loop goes round: events are taken in, pods attached, flows
    /// collected, whether or not the API server answers.
    pub fn live(&self) -> bool {
        self.last_beat
            .is_some_and(|beat| beat.elapsed() < LIVENESS_TIMEOUT)
    }

    pub fn healthy(&self) -> bool {
        self.last_synced.is_some()
            && self
                .pending_since
                .is_none_or(|since| since.elapsed() < HEALTH_TIMEOUT)
    }

    /// Notes whether the node is leaving; returns whether that changed.
    pub fn set_node_leaving(&mut self, leaving: Option<&'static str>) -> bool {
        std::mem::replace(&mut self.node_leaving, leaving) != leaving
    }

    /// `/healthz`, as kube-proxy's: in sync, and the node eligible for new
    /// traffic. `/livez` ignores eligibility (a leaving node's agent is
    /// alive), as kube-proxy's does.
    fn serving(&self) -> bool {
        self.healthy() && self.node_leaving.is_none()
    }

    fn body(&self) -> String {
        let last = self
            .last_synced
            .map(|(_, t)| t.to_string())
            .unwrap_or_default();
        format!(
            r#"{{"lastUpdated": "{last}","currentTime": "{}", "nodeEligible": {}}}"#,
            jiff::Timestamp::now(),
            self.node_leaving.is_none()
        )
    }
}

/// Serves the endpoints in a background task.
pub async fn serve(addr: SocketAddr, health: Shared) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the health server to {addr}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let health = health.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let mut len = 0;
                while len < buf.len() {
                    match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[len..]))
                        .await
                    {
                        Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => len += n,
                    }
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let request = String::from_utf8_lossy(&buf[..len]);
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let path = path.split('?').next().unwrap_or(path);
                let (status, content_type, body) = match path {
                    "/healthz" | "/livez" => {
                        let h = &health.lock().unwrap().health;
                        let ok = if path == "/livez" {
                            h.live()
                        } else {
                            h.serving()
                        };
                        let status = if ok {
                            "200 OK"
                        } else {
                            "503 Service Unavailable"
                        };
                        (status, "application/json", h.body())
                    }
                    "/metrics" => {
                        let status = health.lock().unwrap();
                        let mut body = status.metrics.render();
                        for (iface, mode) in &status.uplinks {
                            body.push_str(&format!(
                                "ferry_uplink_attach_mode{{interface=\"{iface}\",mode=\"{mode}\"}} 1\n"
                            ));
                        }
                        ("200 OK", "text/plain; version=0.0.4", body)
                    }
                    "/statusz" => (
                        "200 OK",
                        "application/json",
                        health.lock().unwrap().render(),
                    ),
                    _ => (
                        "404 Not Found",
                        "text/plain",
                        "404 page not found\n".to_string(),
                    ),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = conn.write_all(response.as_bytes()).await {
                    warn!(error = %e, "health response");
                }
            });
        }
    });
    Ok(())
}

/// The healthCheckNodePort servers of externalTrafficPolicy=Local LoadBalancer
/// Services: 200 while this node has an endpoint of the Service, 503 otherwise,
/// with kube-proxy's JSON body, so a load balancer only sends to nodes that serve.
#[derive(Default)]
pub struct HealthChecks {
    servers: std::collections::HashMap<
        u16,
        (
            Arc<Mutex<crate::k8s::frontends::HealthCheck>>,
            tokio::task::JoinHandle<()>,
        ),
    >,
}

impl HealthChecks {
    /// Starts, updates and stops servers to match `checks`. A port that cannot be
    /// bound is reported and retried at the next update.
    pub async fn update(
        &mut self,
        checks: &[crate::k8s::frontends::HealthCheck],
    ) -> Vec<(u16, std::io::Error)> {
        let mut failures = Vec::new();
        let wanted: std::collections::HashSet<u16> = checks.iter().map(|c| c.port).collect();
        self.servers.retain(|port, (_, task)| {
            let keep = wanted.contains(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for check in checks {
            if let Some((shared, _)) = self.servers.get(&check.port) {
                *shared.lock().unwrap() = check.clone();
                continue;
            }
            match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], check.port))).await {
                Ok(listener) => {
                    let shared = Arc::new(Mutex::new(check.clone()));
                    let task = tokio::spawn(serve_health_check(listener, shared.clone()));
                    self.servers.insert(check.port, (shared, task));
                }
                Err(e) => failures.push((check.port, e)),
            }
        }
        failures
    }
}

async fn serve_health_check(
    listener: TcpListener,
    check: Arc<Mutex<crate::k8s::frontends::HealthCheck>>,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let check = check.lock().unwrap().clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
            let status = if check.local_endpoints > 0 {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let body = format!(
                r#"{{"service": {{"namespace": "{}", "name": "{}"}}, "localEndpoints": {}, "serviceProxyHealthy": true}}"#,
                check.namespace, check.name, check.local_endpoints
            );
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_port_exhaustion_is_counted_per_backend() {
        let mut metrics = Metrics::default();
        let text = metrics.render();
        assert!(text.contains("# TYPE ferry_nat_port_exhaustion_drops_total counter\n"));
        assert!(!text.contains("ferry_nat_port_exhaustion_drops_total{"));
        metrics
            .nat_port_exhaustion
            .insert("10.244.2.3:8080/TCP".into(), 7);
        metrics.nat_entries = 3;
        let text = metrics.render();
        assert!(
            text.contains(
                "ferry_nat_port_exhaustion_drops_total{backend=\"10.244.2.3:8080/TCP\"} 7\n"
            ),
            "{text}"
        );
        assert!(text.contains("\nferry_nat_entries 3\n"), "{text}");
    }

    #[test]
    fn maps_not_carried_over_are_named() {
        let mut metrics = Metrics::default();
        assert!(!metrics.render().contains("ferry_maps_not_carried_total{"));
        metrics.maps_not_carried.insert("nat4_v1".into(), 1);
        let text = metrics.render();
        assert!(
            text.contains("# TYPE ferry_maps_not_carried_total counter\nferry_maps_not_carried_total{map=\"nat4_v1\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn healthz_fails_while_the_node_is_leaving_and_livez_does_not() {
        let mut health = Health::default();
        health.synced();
        health.beat();
        assert!(health.serving() && health.live());
        assert!(health.body().contains(r#""nodeEligible": true"#));
        assert!(health.set_node_leaving(Some("the Node is being deleted")));
        assert!(!health.set_node_leaving(Some("the Node is being deleted")));
        assert!(!health.serving(), "503: load balancers drain the node");
        assert!(health.healthy() && health.live(), "in sync and alive");
        assert!(health.body().contains(r#""nodeEligible": false"#));
        assert!(health.set_node_leaving(None));
        assert!(health.serving());
    }

    #[test]
    fn statusz_says_which_uplink_and_api_server_and_why() {
        let mut status = Status::default();
        let before: serde_json::Value = serde_json::from_str(&status.render()).unwrap();
        assert_eq!(before["uplinkChoice"], serde_json::Value::Null);
        status.uplinks.push(("eth1".into(), "native"));
        status.uplink_choice = Some(Choice {
            interfaces: vec!["eth1".into()],
            reason: crate::uplink::Reason::NodeAddress {
                address: "10.0.0.5".parse().unwrap(),
            },
        });
        status.api_server = Some(("https://10.0.0.1:6443/".into(), Origin::ServiceEnv));
        let json: serde_json::Value = serde_json::from_str(&status.render()).unwrap();
        assert_eq!(json["uplinks"][0]["interface"], "eth1");
        assert_eq!(json["uplinks"][0]["mode"], "native");
        assert_eq!(json["uplinkChoice"]["interfaces"][0], "eth1");
        assert_eq!(json["uplinkChoice"]["reason"]["kind"], "nodeAddress");
        assert_eq!(json["uplinkChoice"]["reason"]["address"], "10.0.0.5");
        assert_eq!(
            json["uplinkChoice"]["detail"],
            "holds the Node's InternalIP 10.0.0.5"
        );
        assert_eq!(json["apiServer"]["url"], "https://10.0.0.1:6443/");
        assert_eq!(json["apiServer"]["from"]["kind"], "serviceEnv");
    }
}
