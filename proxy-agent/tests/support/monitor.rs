//! Reading what the programs report to `proxy-agent monitor`.

use std::time::{Duration, Instant};

use proxy_agent::kernel::monitor::Monitor;

/// The reports (raw samples) that arrive within `wait`, up to `n`.
pub fn reports(monitor: &mut Monitor, n: usize, wait: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let end = Instant::now() + wait;
    while got.len() < n && Instant::now() < end {
        let lost = monitor
            .poll(Duration::from_millis(50), |s| got.push(s.to_vec()))
            .unwrap();
        assert_eq!(lost, 0, "no report lost");
    }
    got
}
