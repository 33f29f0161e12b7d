//! The control-plane benchmark's report: its tables (control_plane.md) and
//! the plot of the latency distribution (control_plane.png).

use std::{fmt::Write as _, fs, path::Path};

use anyhow::Result;

use super::{FirstSync, Scale, CONCURRENCY, ENDPOINTS_PER_SERVICE, POLL, PROGRAMMING, SYNC_ROUND};

/// Nearest-rank percentile of sorted values.
pub(super) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn bound_ms(bound: Option<f64>) -> String {
    match bound {
        Some(b) if b.is_infinite() => "> 300 s".into(),
        Some(b) => format!("≤ {}", b * 1000.0),
        None => "-".into(),
    }
}

fn goal(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}

pub(super) fn report(results: &Path, header: &str, scales: &[Scale]) -> Result<()> {
    let mut md = format!(
        "# Control plane: EndpointSlice changes through a real API server\n\n{header}\n\
         A lab cluster (kube-apiserver {}, etcd, network namespaces) with one agent\n\
         (release build) on node1; node2's agent is stopped so that it does not share\n\
         the machine's cores. Services have no selector; the benchmark writes one\n\
         `discovery.k8s.io/v1beta1` EndpointSlice of {ENDPOINTS_PER_SERVICE} ready endpoints per Service\n\
         (managed-by `bench.ferry.dev`). A change replaces one endpoint's address with\n\
         a new one, one Service at a time, 20-50 ms apart; it is visible once a slot of\n\
         that Service in node1's pinned maps names a backend with the new address\n\
         (polled every {} ms). The agent's own histogram (`{PROGRAMMING}`)\n\
         measures from the trigger-time annotation, set just before each request, to\n\
         the end of the map writes, over the same changes; `round` is the agent's\n\
         `{SYNC_ROUND}` over them (one programming round: desired\n\
         state from all Services, diff, map writes). Histogram figures are bucket bounds.\n\
         The API server, etcd, the agent and this client share the machine, with\n\
         whatever else runs on it (`load`: the 1-minute load average).\n\n",
        crate::kube::VERSION,
        POLL.as_secs_f64() * 1000.0,
    );
    latency_table(&mut md, scales);
    first_sync_table(&mut md, scales);
    creation_table(&mut md, scales);
    for scale in scales {
        goals(&mut md, scale);
    }
    md.push_str("\n![programming latency](control_plane.png)\n");
    fs::write(results.join("control_plane.md"), md)?;
    plot(&results.join("control_plane.png"), scales)
}

/// Programming latency, one row per scale.
fn latency_table(md: &mut String, scales: &[Scale]) {
    md.push_str(
        "## Programming latency (ms)\n\n\
         | Services | endpoints | changes | response -> maps p50 | p99 | p10..p90 | max | request -> maps p50 | p99 | agent histogram p50 | p99 | mean | round p50 | round mean | load |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for s in scales {
        let r = sorted(&s.from_response);
        let q = sorted(&s.from_request);
        let missed = if s.missed > 0 {
            format!(" ({} missed)", s.missed)
        } else {
            String::new()
        };
        let _ = writeln!(
            md,
            "| {} | {} | {}{missed} | {:.1} | {:.1} | {:.1}..{:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} | {} | {:.1} | {:.1} |",
            s.services,
            s.services * ENDPOINTS_PER_SERVICE,
            r.len(),
            percentile(&r, 0.5),
            percentile(&r, 0.99),
            percentile(&r, 0.1),
            percentile(&r, 0.9),
            r.last().copied().unwrap_or(f64::NAN),
            percentile(&q, 0.5),
            percentile(&q, 0.99),
            bound_ms(s.agent.quantile_bound(0.5)),
            bound_ms(s.agent.quantile_bound(0.99)),
            s.agent.sum / s.agent.count.max(1) as f64 * 1000.0,
            bound_ms(s.rounds.quantile_bound(0.5)),
            s.rounds.sum / s.rounds.count.max(1) as f64 * 1000.0,
            s.load,
        );
    }
}

/// First full sync and the agent's memory, one row per scale.
fn first_sync_table(md: &mut String, scales: &[Scale]) {
    md.push_str(
        "\n## First full sync and agent memory\n\n\
         Agent started on empty maps (its pins removed) with every Service in place,\n\
         from its first log line until it logs that its maps are in sync (timestamps\n\
         from its own log); `load` is the part before it starts listing (loading and\n\
         verifying the programs), `round` its first programming round (all Services\n\
         into the maps); the rest is the first list of Services and EndpointSlices\n\
         from the API server. `pod start`, before that: from letting the agent back\n\
         onto its node (a label) to its first log line, the DaemonSet controller's,\n\
         the scheduler's and the kubelet's part. `lists alone`: the same two lists\n\
         fetched at once by the bench's client, bodies read and not parsed (median of\n\
         3), the API server's part of the first sync. RSS after the\n\
         programming-latency changes.\n\n\
         | Services | runs | agent start -> maps in sync, median | min..max | of which load | of which round | pod start, median | lists alone | agent RSS | peak RSS |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for s in scales {
        let of = |part: fn(&FirstSync) -> f64| {
            sorted(&s.first_syncs.iter().map(part).collect::<Vec<_>>())
        };
        let (total, load, round) = (of(|f| f.sync), of(|f| f.load), of(|f| f.round));
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} s | {:.2}..{:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.1} MiB | {:.1} MiB |",
            s.services,
            total.len(),
            percentile(&total, 0.5),
            total.first().copied().unwrap_or(f64::NAN),
            total.last().copied().unwrap_or(f64::NAN),
            percentile(&load, 0.5),
            percentile(&round, 0.5),
            percentile(&of(|f| f.pod_start), 0.5),
            percentile(&sorted(&s.lists), 0.5),
            s.memory.rss_kib as f64 / 1024.0,
            s.memory.hwm_kib as f64 / 1024.0,
        );
    }
}

/// Bulk creation rates, one row per scale.
fn creation_table(md: &mut String, scales: &[Scale]) {
    md.push_str(
        "\n## Bulk creation\n\n\
         Services and their slices created through the API with a Rust client (kube-rs),\n\
         requests in flight at once: ",
    );
    let _ = writeln!(
        md,
        "{CONCURRENCY}.\n\n| Services added | objects | seconds | objects/s |\n| ---: | ---: | ---: | ---: |"
    );
    let mut previous = 0;
    for s in scales {
        let _ = writeln!(
            md,
            "| {}..{} | {} | {:.1} | {:.0} |",
            previous,
            s.services,
            s.created,
            s.create_seconds,
            s.created as f64 / s.create_seconds
        );
        previous = s.services;
    }
}

/// The goals set for a scale (the design's at 10k Services, the scale
/// issue's at 100k): first full sync (s) and agent RSS (MiB); programming p99
/// under 100 ms at both.
fn goals_at(services: usize) -> Option<(f64, f64)> {
    match services {
        10_000 => Some((2.0, 150.0)),
        100_000 => Some((10.0, 400.0)),
        _ => None,
    }
}

/// The goals at a scale that has some, met or missed.
fn goals(md: &mut String, scale: &Scale) {
    let Some((sync_goal, rss_goal)) = goals_at(scale.services) else {
        return;
    };
    let p99 = percentile(&sorted(&scale.from_response), 0.99);
    let sync = percentile(
        &sorted(&scale.first_syncs.iter().map(|f| f.sync).collect::<Vec<_>>()),
        0.5,
    );
    let rss = scale.memory.rss_kib as f64 / 1024.0;
    let _ = write!(
        md,
        "\n## Goals at {} Services\n\n\
         - programming p99 under 100 ms: {p99:.1} ms, {}\n\
         - first full sync under {sync_goal} s: {sync:.2} s, {}\n\
         - agent RSS under {rss_goal} MiB: {rss:.1} MiB, {}\n",
        scale.services,
        goal(p99 < 100.0),
        goal(sync < sync_goal),
        goal(rss < rss_goal),
    );
}

/// The distribution (CDF) of response -> maps latency, one line per scale.
fn plot(png: &Path, scales: &[Scale]) -> Result<()> {
    let dat = png.with_extension("dat");
    let mut blocks = String::new();
    for s in scales {
        let r = sorted(&s.from_response);
        for (i, v) in r.iter().enumerate() {
            let _ = writeln!(blocks, "{v:.3} {:.4}", (i + 1) as f64 / r.len() as f64);
        }
        blocks.push_str("\n\n");
    }
    fs::write(&dat, blocks)?;
    // A log scale that always shows the goal, however far below it the data are.
    let slowest = scales
        .iter()
        .flat_map(|s| &s.from_response)
        .fold(0.0_f64, |a, b| a.max(*b));
    let right = (slowest * 1.5).max(200.0);
    let lines: Vec<String> = scales
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "'{}' index {i} using 1:2 with steps lw 2 title '{} Services'",
                dat.display(),
                s.services
            )
        })
        .collect();
    let script = format!(
        "set terminal png size 900,520 noenhanced\nset output '{}'\n\
         set xlabel 'API response -> change in the BPF maps (ms, log scale)'\nset ylabel 'fraction of changes'\n\
         set yrange [0:1.02]\nset logscale x\nset xrange [0.5:{right:.0}]\nset key outside right\nset grid\n\
         set arrow from 100, graph 0 to 100, graph 1 nohead dt 2\n\
         set label 'goal: p99 < 100 ms' at 100, graph 0.5 offset 1,0\n\
         set title 'Ferry programming latency, 10 endpoints per Service'\nplot {}\n",
        png.display(),
        lines.join(", ")
    );
    crate::bench::gnuplot(&script)?;
    let _ = fs::remove_file(&dat);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
