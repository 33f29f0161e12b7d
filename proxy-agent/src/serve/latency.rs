//! Network programming latency as kube-proxy measures it (the SIG Scalability
//! SLI behind `kubeproxy_network_programming_duration_seconds`): from the trigger
//! time the EndpointSlice controller writes on a slice (when the Pod or Service
//! change that caused it happened) to the moment this node's maps hold the
//! change. Pure: the agent feeds it slice events and the end of each sync.

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;

/// The annotation the EndpointSlice controller sets on every slice it writes.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The trigger time of a slice, if its annotation is there and readable
/// (RFC 3339, fractional seconds optional, as Go's `time.RFC3339Nano` writes
/// it). A missing or malformed annotation is no measurement, as in kube-proxy.
pub fn trigger_time(annotations: Option<&BTreeMap<String, String>>) -> Option<Timestamp> {
    annotations?.get(TRIGGER_TIME_ANNOTATION)?.parse().ok()
}

/// Trigger times waiting for the sync that programs them, by Service
/// (`namespace/name`), following kube-proxy's EndpointChangeTracker.
#[derive(Debug)]
pub struct Triggers {
    /// Changes from before the agent started are not its latency: the first
    /// list carries the trigger times of changes made hours or days ago.
    started: Timestamp,
    pending: HashMap<String, Vec<Timestamp>>,
}

impl Triggers {
    pub fn new(started: Timestamp) -> Self {
        Self {
            started,
            pending: HashMap::new(),
        }
    }

    /// A slice of `service` was created or updated. It counts only when what the
    /// agent reads of it changed (an update that changes nothing the maps hold,
    /// say a label, programs nothing) and its trigger time is after the start.
    pub fn updated(&mut self, service: &str, trigger: Option<Timestamp>, changed: bool) {
        if let Some(t) = trigger.filter(|t| changed && *t > self.started) {
            self.pending.entry(service.to_string()).or_default().push(t);
        }
    }

    /// A slice of `service` was deleted. Its annotation holds the time of its
    /// last update, not of the deletion, so it measures nothing; like kube-proxy,
    /// the Service's pending times are dropped too.
    pub fn deleted(&mut self, service: &str) {
        self.pending.remove(service);
    }

    /// The maps now hold every change seen so far: the latency of each, in
    /// seconds at `now`, and nothing pending any more. Negative values (a
    /// trigger time ahead of this node's clock) are kept: the histogram's
    /// `le="0"` bucket shows clock skew rather than hiding it.
    pub fn programmed(&mut self, now: Timestamp) -> Vec<f64> {
        self.pending
            .drain()
            .flat_map(|(_, times)| times)
            .map(|t| now.duration_since(t).as_secs_f64())
            .collect()
    }
}

/// Network programming latency buckets (seconds): kube-proxy's bounds with
/// finer ones below its smallest, 0.25 s: Ferry's goal is a p99 under
/// 100 ms, which kube-proxy's buckets cannot tell from 250 ms. Its bounds are
/// kept as they are (its leading 0 too), so queries and dashboards written
/// for kube-proxy read the same values.
pub fn programming_buckets() -> Vec<f64> {
    let mut bounds = vec![0.0, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1];
    bounds.extend([0.25, 0.5]);
    bounds.extend((1..=59).map(f64::from));
    bounds.extend((0..12).map(|i| f64::from(60 + 5 * i)));
    bounds.extend((0..7).map(|i| f64::from(120 + 30 * i)));
    bounds
}

/// One programming round: kube-proxy's `sync_proxy_rules_duration_seconds`
/// bounds, 1 ms doubling to 16 s, fine enough for Ferry as they are.
pub fn sync_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn annotated(value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(TRIGGER_TIME_ANNOTATION.to_string(), value.to_string())])
    }

    #[test]
    fn trigger_time_reads_go_rfc3339nano_with_or_without_fraction() {
        assert_eq!(
            trigger_time(Some(&annotated("2026-12-01T14:19:07.123456789Z"))),
            Some(at("2026-12-01T14:19:07.123456789Z"))
        );
        // Go's RFC3339Nano drops trailing zeros, and the whole fraction when it is 0.
        assert_eq!(
            trigger_time(Some(&annotated("2026-12-01T14:19:07Z"))),
            Some(at("2026-12-01T14:19:07Z"))
        );
        assert_eq!(
            trigger_time(Some(&annotated("2026-12-01T15:19:07.5+01:00"))),
            Some(at("2026-12-01T14:19:07.5Z"))
        );
    }

    #[test]
    fn missing_or_malformed_trigger_time_is_no_measurement() {
        assert_eq!(trigger_time(None), None);
        assert_eq!(trigger_time(Some(&BTreeMap::new())), None);
        assert_eq!(trigger_time(Some(&annotated("yesterday"))), None);
    }

    #[test]
    fn only_changes_after_the_start_that_change_the_slice_count() {
        let mut triggers = Triggers::new(at("2026-12-01T12:00:00Z"));
        triggers.updated("default/old", Some(at("2026-12-01T11:59:59Z")), true);
        triggers.updated("default/noop", Some(at("2026-12-01T12:00:01Z")), false);
        triggers.updated("default/none", None, true);
        triggers.updated("default/web", Some(at("2026-12-01T12:00:01Z")), true);
        triggers.updated("default/web", Some(at("2026-12-01T12:00:01.5Z")), true);
        let mut latencies = triggers.programmed(at("2026-12-01T12:00:02Z"));
        latencies.sort_by(f64::total_cmp);
        assert_eq!(latencies, vec![0.5, 1.0]);
        assert!(triggers.programmed(at("2026-12-01T12:00:03Z")).is_empty());
    }

    #[test]
    fn a_deleted_slice_drops_its_services_pending_times() {
        let mut triggers = Triggers::new(at("2026-12-01T12:00:00Z"));
        triggers.updated("default/web", Some(at("2026-12-01T12:00:01Z")), true);
        triggers.updated("default/db", Some(at("2026-12-01T12:00:01Z")), true);
        triggers.deleted("default/web");
        assert_eq!(triggers.programmed(at("2026-12-01T12:00:02Z")), vec![1.0]);
    }

    #[test]
    fn programming_buckets_refine_kube_proxys_below_a_quarter_second_and_keep_the_rest() {
        let bounds = programming_buckets();
        assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            &bounds[..8],
            &[0.0, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]
        );
        // kube-proxy: 0, 0.25, 0.5, 1..59, 60..115 by 5, 120..300 by 30.
        assert_eq!(bounds.len() - 7, 1 + 2 + 59 + 12 + 7);
        assert_eq!(bounds.last(), Some(&300.0));
    }

    #[test]
    fn sync_buckets_are_kube_proxys_one_millisecond_doubling() {
        let bounds = sync_buckets();
        assert_eq!(bounds.len(), 15);
        assert_eq!(bounds[0], 0.001);
        assert_eq!(bounds[14], 16.384);
    }
}
