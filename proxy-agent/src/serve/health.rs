//! `/healthz` as kube-proxy serves it on port 10256: 200 with a small JSON
//! body while the dataplane is programmed and in sync and the Node is not
//! leaving (`nodeEligible`: not being deleted, no ToBeDeletedByClusterAutoscaler
//! taint), 503 otherwise; `/livez` (the liveness probe's) 200 while the
//! agent's loop goes round, in sync or not, so an API server outage never
//! gets the agent restarted; `/readyz` 200 once the first programming round
//! is done (the readiness probe's). On the metrics address (10249, as kube-proxy's):
//! `/metrics` (see [`crate::serve::metrics`]) and `/statusz` (the uplinks,
//! their attach modes and why they were chosen; the API server and where its
//! address came from).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::net::TcpListener;

use crate::{
    k8s::client::Origin,
    serve::{
        http::{self, Reply},
        metrics::{self, Metrics},
    },
    uplink::Choice,
};

/// What the health endpoints report on, updated by the sync loop.
#[derive(Debug)]
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
    /// Since when each failing watch (by kind) has failed: while one does,
    /// the maps may be missing changes the agent cannot see.
    watches_failing: BTreeMap<&'static str, Instant>,
    /// How long a change may wait, or a watch fail, before `/healthz` says
    /// 503 (kube-proxy's: twice the sync period; see [`Health::new`]).
    timeout: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(HEALTH_TIMEOUT)
    }
}

/// By default, a change older than this that is still not programmed (or a
/// watch failing this long) makes the agent unhealthy: twice the default
/// resync period, as kube-proxy's is twice its sync period.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the loop says it is alive, and how long without that makes
/// `/livez` fail: only a loop that stopped going round is worth a restart.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the HTTP endpoints report.
#[derive(Debug, Default)]
pub struct Status {
    pub health: Health,
    /// Shared with the metrics server, which renders them without this
    /// lock: a scrape reads the kernel's maps, and the loop must not wait.
    pub metrics: Arc<Metrics>,
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
    /// The Service of each frontend (`namespace/name`), served on
    /// `/frontends` for `proxy-agent monitor` to name what it reports.
    pub services: std::collections::BTreeMap<crate::frontend::Frontend, Arc<str>>,
}

impl Status {
    /// The status of an agent on the maps pinned in `pin_dir`, whose
    /// `/healthz` allows changes and watch failures `health_timeout`.
    pub fn new(pin_dir: Option<std::path::PathBuf>, health_timeout: Duration) -> Self {
        Self {
            health: Health::new(health_timeout),
            metrics: Arc::new(Metrics::new(pin_dir)),
            ..Self::default()
        }
    }

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
            self.metrics.frontends.get(),
            self.metrics.backends.get(),
            self.metrics.pod_interfaces.get(),
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
        self.metrics
            .service_problems
            .set(self.problems.len() as i64);
        self.metrics
            .frontends_refused
            .set(self.problems.values().filter(|p| p.map_full()).count() as i64);
    }

    /// Names the frontends of a round (`scope` as in `note_problems`).
    pub fn note_services(
        &mut self,
        scope: Option<&[crate::frontend::Frontend]>,
        named: impl IntoIterator<Item = (crate::frontend::Frontend, Arc<str>)>,
    ) {
        match scope {
            None => self.services.clear(),
            Some(scope) => scope.iter().for_each(|f| drop(self.services.remove(f))),
        }
        self.services.extend(named);
    }

    /// `/frontends`: `{"10.96.0.10:80/TCP": "default/web", ...}`.
    fn render_services(&self) -> String {
        let services: serde_json::Map<String, serde_json::Value> = self
            .services
            .iter()
            .map(|(f, s)| (f.to_string(), serde_json::Value::from(&**s)))
            .collect();
        serde_json::Value::Object(services).to_string()
    }
}

pub type Shared = Arc<Mutex<Status>>;

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self {
            last_synced: None,
            pending_since: None,
            last_beat: None,
            node_leaving: None,
            watches_failing: BTreeMap::new(),
            timeout,
        }
    }

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

    /// The first programming round is done: the agent serves the cluster's
    /// Services (`/readyz`, the readiness probe's), and stays ready after.
    pub fn ready(&self) -> bool {
        self.last_synced.is_some()
    }

    /// The watch of `kind` failed (it is retried).
    pub fn watch_failed(&mut self, kind: &'static str) {
        self.watches_failing
            .entry(kind)
            .or_insert_with(Instant::now);
    }

    /// The watch of `kind` delivered an event; returns whether it had been
    /// failing (what it missed meanwhile is to be programmed).
    pub fn watch_answered(&mut self, kind: &'static str) -> bool {
        self.watches_failing.remove(kind).is_some()
    }

    /// Programmed, with no change waiting and no watch failing for longer
    /// than the timeout. As in kube-proxy, a change is allowed the timeout
    /// to be programmed; unlike it, a watch that cannot reach the API
    /// server counts as such a change: after the timeout the node's view
    /// of the cluster is stale, and a load balancer should know.
    pub fn healthy(&self) -> bool {
        let fresh = |since: &Instant| since.elapsed() < self.timeout;
        self.last_synced.is_some()
            && self.pending_since.as_ref().is_none_or(fresh)
            && self.watches_failing.values().all(fresh)
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

/// Serves `/healthz`, `/livez` and `/readyz` on `healthz` and `/metrics` and
/// `/statusz` on `metrics`, in background tasks.
pub async fn serve(
    healthz: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    status: Shared,
) -> Result<()> {
    if let Some(addr) = healthz {
        let status = status.clone();
        http::listen(addr, move |path| {
            let status = status.lock().unwrap();
            let (health, counter) = match path {
                "/healthz" => (status.health.serving(), &status.metrics.healthz),
                "/livez" => (status.health.live(), &status.metrics.livez),
                "/readyz" => {
                    let ready = status.health.ready();
                    return Reply::json(ready, format!(r#"{{"ready": {ready}}}"#));
                }
                _ => return Reply::not_found(),
            };
            let reply = Reply::json(health, status.health.body());
            counter
                .get_or_create(&metrics::label("code", reply.status.as_u16()))
                .inc();
            reply
        })
        .await?;
    }
    if let Some(addr) = metrics {
        http::listen(addr, move |path| match path {
            "/metrics" => {
                let metrics = status.lock().unwrap().metrics.clone();
                Reply::ok(metrics::CONTENT_TYPE, metrics.render())
            }
            "/statusz" => Reply::ok("application/json", status.lock().unwrap().render()),
            "/frontends" => Reply::ok("application/json", status.lock().unwrap().render_services()),
            _ => Reply::not_found(),
        })
        .await?;
    }
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
                    let task = http::serve(listener, health_check(shared.clone()));
                    self.servers.insert(check.port, (shared, task));
                }
                Err(e) => failures.push((check.port, e)),
            }
        }
        failures
    }
}

/// A healthCheckNodePort's answer, at any path: 200 while the node has a
/// local endpoint of the Service, 503 otherwise, with kube-proxy's body.
fn health_check(
    check: Arc<Mutex<crate::k8s::frontends::HealthCheck>>,
) -> impl Fn(&str) -> Reply + Send + Sync + 'static {
    move |_| {
        let check = check.lock().unwrap();
        Reply::json(
            check.local_endpoints > 0,
            format!(
                r#"{{"service": {{"namespace": "{}", "name": "{}"}}, "localEndpoints": {}, "serviceProxyHealthy": true}}"#,
                check.namespace, check.name, check.local_endpoints
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn healthz_fails_when_a_watch_fails_longer_than_the_timeout() {
        let mut health = Health::new(Duration::from_millis(50));
        health.synced();
        health.watch_failed("services");
        assert!(health.serving(), "a failure is allowed the timeout");
        std::thread::sleep(Duration::from_millis(60));
        health.watch_failed("services");
        assert!(!health.serving(), "the first failure counts, not the last");
        assert!(!health.watch_answered("endpointslices"));
        assert!(health.watch_answered("services"));
        assert!(health.serving());
        health.pending();
        std::thread::sleep(Duration::from_millis(60));
        assert!(!health.serving(), "a change not programmed in time");
        health.synced();
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
