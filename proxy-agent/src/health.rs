//! `/healthz` and `/livez` as kube-proxy serves them on port 10256: 200 with a
//! small JSON body while the dataplane is programmed and in sync, 503 otherwise;
//! and `/metrics` with the agent's counters.

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

/// What the health endpoints report on, updated by the sync loop.
#[derive(Debug, Default)]
pub struct Health {
    /// When the maps last matched the API server's state.
    last_synced: Option<(Instant, jiff::Timestamp)>,
    /// Since when a change has been waiting to be programmed, if one is.
    pending_since: Option<Instant>,
}

/// A change older than this that is still not programmed makes the agent unhealthy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Counters served on `/metrics` in Prometheus' text format.
#[derive(Debug, Default)]
pub struct Metrics {
    pub syncs: u64,
    pub sync_errors: u64,
    pub watch_errors: u64,
    pub attach_errors: u64,
    pub services_skipped: u64,
    pub service_problems: u64,
    pub frontends: u64,
    pub backends: u64,
    pub pod_interfaces: u64,
}

impl Metrics {
    fn render(&self) -> String {
        let rows: [(&str, &str, u64, &str); 9] = [
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
        ];
        rows.iter()
            .map(|(name, kind, value, help)| {
                format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n")
            })
            .collect()
    }
}

/// Everything the HTTP endpoints report.
#[derive(Debug, Default)]
pub struct Status {
    pub health: Health,
    pub metrics: Metrics,
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

    pub fn healthy(&self) -> bool {
        self.last_synced.is_some()
            && self
                .pending_since
                .is_none_or(|since| since.elapsed() < HEALTH_TIMEOUT)
    }

    fn body(&self) -> String {
        let last = self
            .last_synced
            .map(|(_, t)| t.to_string())
            .unwrap_or_default();
        format!(
            r#"{{"lastUpdated": "{last}","currentTime": "{}", "nodeEligible": true}}"#,
            jiff::Timestamp::now()
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
                        let status = if h.healthy() {
                            "200 OK"
                        } else {
                            "503 Service Unavailable"
                        };
                        (status, "application/json", h.body())
                    }
                    "/metrics" => (
                        "200 OK",
                        "text/plain; version=0.0.4",
                        health.lock().unwrap().metrics.render(),
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
