//! `cargo xtask bench [--quick] [--only PART]`: the benchmarks, with their
//! results (a table and a plot each) written under bench/results/ with the
//! machine, kernel, commit and command in the header. A quick run's results
//! go to target/bench-quick/ instead: they are a check that the benchmarks
//! run, not figures to commit, and must not overwrite the full run's.

mod file_agent;
mod kube_proxy_rules;
mod nodeport_throughput;
mod vs_kube_proxy;

use std::{collections::BTreeMap, fs, path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    agent, build_ebpf, debian,
    sys::{exec, workspace_root},
};

mod control_plane;
mod memory;

/// The parts, in the order a full run takes them.
pub const PARTS: [&str; 5] = [
    "per-packet",
    "map-io",
    "control-plane",
    "vs-kube-proxy",
    "nodeport-throughput",
];

pub fn run(quick: bool, only: Option<&str>) -> Result<()> {
    if let Some(part) = only {
        if !PARTS.contains(&part) {
            bail!("unknown part {part:?}: one of {}", PARTS.join(", "));
        }
    }
    crate::setup::run()?;
    debian::install("bench", &["gnuplot-nox", "iptables", "nftables"])?;
    build_ebpf::run()?;
    let results = workspace_root().join(if quick {
        "target/bench-quick"
    } else {
        "bench/results"
    });
    fs::create_dir_all(&results)?;
    let mut command = String::from("cargo xtask bench");
    if quick {
        command.push_str(" --quick");
    }
    if let Some(part) = only {
        command.push_str(" --only ");
        command.push_str(part);
    }
    let wanted = |part: &str| only.is_none_or(|o| o == part);
    if wanted("per-packet") {
        per_packet(quick, &results, &command)?;
    }
    if wanted("map-io") {
        map_io(quick, &results, &command)?;
    }
    if wanted("control-plane") {
        // Also the memory part: it is measured on the control plane's lab.
        control_plane::run(quick, &results, &command)?;
    }
    if wanted("vs-kube-proxy") {
        vs_kube_proxy(quick, &results, &command)?;
    }
    if wanted("nodeport-throughput") {
        nodeport_throughput(quick, &results, &command)?;
    }
    Ok(())
}

/// NodePort forwarding on one core: Ferry's XDP path against kube-proxy's
/// rule sets, with the generator's own ceiling.
fn nodeport_throughput(quick: bool, results: &Path, command: &str) -> Result<()> {
    let agent = release_agent()?;
    let settings = nodeport_throughput::Settings::new(quick);
    vs_kube_proxy::clean_leftovers();
    let scratch = std::env::temp_dir().join("ferry-bench-np");
    fs::create_dir_all(&scratch)?;
    let rows =
        nodeport_throughput::measure(&settings, &build_ebpf::object_path(), &agent, &scratch);
    vs_kube_proxy::clean_leftovers();
    let _ = fs::remove_dir_all(&scratch);
    let rows = rows?;
    let md = format!(
        "# NodePort forwarding throughput on one core\n\n{}\n{}\n{}\n\
         ![NodePort forwarding, frames a second](nodeport_throughput.png)\n",
        header(command)?,
        nodeport_throughput::DESCRIPTION,
        nodeport_throughput::render(&rows, &settings),
    );
    fs::write(results.join("nodeport_throughput.md"), md)?;
    plot_bars(
        &results.join("nodeport_throughput.png"),
        "NodePort forwarding on one core (median of the rounds)",
        "million frames a second",
        &nodeport_throughput::bars(&rows),
    )?;
    eprintln!(
        "bench: {}",
        results.join("nodeport_throughput.md").display()
    );
    Ok(())
}

/// The agent as a node runs it: a release build.
fn release_agent() -> Result<std::path::PathBuf> {
    agent::build(true)
}

fn vs_kube_proxy(quick: bool, results: &Path, command: &str) -> Result<()> {
    let agent = release_agent()?;
    let settings = vs_kube_proxy::Settings::new(quick);
    vs_kube_proxy::clean_leftovers();
    let scratch = std::env::temp_dir().join("ferry-bench");
    fs::create_dir_all(&scratch)?;
    let traffic = vs_kube_proxy::traffic(&settings, &agent, &scratch);
    vs_kube_proxy::clean_leftovers();
    let traffic = traffic?;
    let loads = vs_kube_proxy::rule_loading(&settings);
    vs_kube_proxy::clean_leftovers();
    let loads = loads?;
    let _ = fs::remove_dir_all(&scratch);
    let md = format!(
        "# Ferry beside kube-proxy's iptables and nftables rule sets\n\n{}\n{}\n\
         ![connect time and connection rate at the last Service](vs_kube_proxy.png)\n\n\
         ![loading kube-proxy's rules](kube_proxy_rules.png)\n",
        header(command)?,
        vs_kube_proxy::render(&traffic, &loads, &settings),
    );
    fs::write(results.join("vs_kube_proxy.md"), md)?;
    plot_lines(
        &results.join("vs_kube_proxy.png"),
        &[
            Panel {
                title: "connect time to the last Service, p50",
                key: "top left",
                ylabel: "microseconds",
                logy: false,
                series: vs_kube_proxy::series(&traffic, vs_kube_proxy::p50),
            },
            Panel {
                title: "connections/s to the last Service (median)",
                key: "bottom left",
                ylabel: "connections per second",
                logy: false,
                series: vs_kube_proxy::series(&traffic, vs_kube_proxy::Connections::rate),
            },
        ],
    )?;
    plot_lines(
        &results.join("kube_proxy_rules.png"),
        &[
            Panel {
                title: "full load of kube-proxy's rules (median)",
                key: "top left",
                ylabel: "seconds",
                logy: true,
                series: vs_kube_proxy::load_series(&loads, |r| r.full.clone()),
            },
            Panel {
                title: "one-Service change (median)",
                key: "top left",
                ylabel: "seconds",
                logy: true,
                series: vs_kube_proxy::load_series(&loads, |r| r.change.clone()),
            },
        ],
    )?;
    eprintln!("bench: {}", results.join("vs_kube_proxy.md").display());
    Ok(())
}

/// Runs proxy-agent's bench `name`, its table to `table`.
fn cargo_bench(name: &str, quick: bool, table: &Path) -> Result<()> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args(["bench", "-p", "proxy-agent", "--bench", name, "--"]);
    if quick {
        cmd.arg("--quick");
    }
    exec(cmd.arg("--out").arg(table))
}

/// The resync's read of the maps and the first round's writes, batched
/// against one entry at a time.
fn map_io(quick: bool, results: &Path, command: &str) -> Result<()> {
    let table = results.join("map_io.md.part");
    cargo_bench("map_io", quick, &table)?;
    let md = format!(
        "# Map reads and writes, batched against one entry at a time\n\n{}\n\
         Each Service has 10 backends and an IPv4 and an IPv6 ClusterIP; both ways\n\
         alternate in one run (medians of 7, 3 with `--quick`).\n\n\
         - Read: `Dataplane::read_state`, what the agent reads back every\n  \
         `--resync-seconds`: the services, backends, reverse-NAT and Maglev maps of\n  \
         both families, in batches (`BPF_MAP_LOOKUP_BATCH`) against one entry at a\n  \
         time (two system calls each). The times include building the agent's view\n  \
         of the state from the entries.\n\
         - First round: every Service into empty maps, as at the agent's start. Its\n  \
         runs of puts into one map in batches (`BPF_MAP_UPDATE_BATCH`) against one\n  \
         system call per entry. The times include the round's own work (desired\n  \
         state, ids, diff), the same both ways.\n\n{}",
        header(command)?,
        fs::read_to_string(&table)?
    );
    fs::remove_file(&table)?;
    fs::write(results.join("map_io.md"), md)?;
    eprintln!("bench: {}", results.join("map_io.md").display());
    Ok(())
}

fn per_packet(quick: bool, results: &Path, command: &str) -> Result<()> {
    let table = results.join("per_packet.md.part");
    cargo_bench("per_packet", quick, &table)?;

    let header = header(command)?;
    let body = fs::read_to_string(&table)?;
    let md = format!(
        "# Per-packet cost against the number of Services\n\n{header}\n\
         Each sample is one BPF_PROG_TEST_RUN (repeat 1) on a fresh frame, timed by the\n\
         kernel; medians of {} samples with p10..p90. Services have 10 backends each;\n\
         the packet goes to the Service in the middle of the range. `tc` is `from_pod`\n\
         (ClusterIP DNAT), `xdp` is `uplink_xdp` (a local backend: DNAT and pass);\n\
         `new flow` misses conntrack, `established` hits it (an ACK of a flow a SYN\n\
         opened). `tc translated at connect` is a pod's packet that the socket hooks\n\
         (`--socket-lb all`) translated at connect(): to a backend's address, which\n\
         `from_pod` passes unchanged. `uplink tc` is the uplink's two tc filters as\n\
         the kernel runs them (`uplink_tc` and `uplink_tc6`, each on what the other\n\
         lets through): the path of IPv6 from outside, which XDP hands on. Rows marked\n\
         `(IPv6)` take the Services' IPv6 ClusterIPs (each Service has one of each\n\
         family); the second table puts each beside its IPv4 row. The floor is an XDP\n\
         program that only returns PASS, measured the same way. `established, random\n\
         flow` rows time ACKs of 10 flows per Service (at most a million) spread over\n\
         every Service, opened first, each sample one of them picked at random: cache\n\
         and TLB misses included. Their `vs floor` column is against the same program's\n\
         `established` row (one flow, hot).\n\n\
         Rows marked `wrapped` time the established flow in a warm loop: each sample\n\
         is one BPF_PROG_TEST_RUN with repeat 10000 through a frame-restoring wrapper,\n\
         which writes the original frame back and tail-calls the program before each\n\
         run, so that every run takes the real path (each sample's verdict and output\n\
         frame are checked); the kernel's mean per run, medians of {} samples. Their\n\
         floor is the same wrapper around a PASS-only program of their hook. `xdp PASS\n\
         only, repeated without wrapper` is the XDP PASS-only program under plain\n\
         repeat (it changes nothing): the difference between the two XDP floors is the\n\
         wrapper's own cost.\n\n\
         Rows marked `spread, wrapped` visit the XDP random-order flows in that warm\n\
         loop: the spread wrapper gives each run the tuple of one of them, in\n\
         pseudo-random order, so they are timed as the hot wrapped rows are, cache\n\
         and TLB misses included; their floor is the spread wrapper around the\n\
         PASS-only program. `conntrack lookup alone` is one conntrack lookup and a\n\
         read of the entry, nothing else: spread, what a lookup's misses cost; on\n\
         the one hot flow, what it costs in cache. The table after the rows puts\n\
         spread beside hot, net of the floors.\n\n\
         The programs count traffic per (frontend, backend) pair in every row but\n\
         those marked `counters off`: the object's own default, where the agent's\n\
         (`--traffic-counters`) is off. The `counters off` rows are the hot and\n\
         spread established XDP rows again, from programs loaded with the counters\n\
         off, their maps filled alike, in the same run; their table puts them\n\
         beside the counting rows.\n\n{body}\n![per-packet cost](per_packet.png)\n",
        if quick { 3_000 } else { 20_000 },
        if quick { 30 } else { 200 },
    );
    fs::write(results.join("per_packet.md"), md)?;
    plot(
        &table.with_extension("part.dat"),
        &results.join("per_packet.png"),
    )?;
    let _ = fs::remove_file(&table);
    let _ = fs::remove_file(table.with_extension("part.dat"));
    eprintln!("bench: {}", results.join("per_packet.md").display());
    Ok(())
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn header(command: &str) -> Result<String> {
    let cpu = fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    Ok(format!(
        "- machine: {cpu}, {cores} cores\n- kernel: {}\n- commit: {}\n- command: `{command}`\n",
        output(Command::new("uname").arg("-r")),
        output(Command::new("git").current_dir(workspace_root()).args([
            "rev-parse",
            "--short",
            "HEAD"
        ])),
    ))
}

/// A line per path: median ns against Services (both log scales: the paths
/// span 20 ns to several us, and a flat line stays flat). The top of the
/// range follows the data, so no path runs off the chart.
fn plot(data: &std::path::Path, png: &std::path::Path) -> Result<()> {
    let text = fs::read_to_string(data).context("reading the benchmark data")?;
    let mut by_path: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(2, ' ');
        let services = parts.next().unwrap_or_default().to_string();
        let rest = parts.next().unwrap_or_default();
        let (path, numbers) = rest
            .trim_start_matches('"')
            .split_once('"')
            .unwrap_or((rest, ""));
        let median = numbers.split_whitespace().next().unwrap_or("0").to_string();
        by_path
            .entry(path.to_string())
            .or_default()
            .push((services, median));
    }
    let blocks: String = by_path
        .values()
        .map(|points| {
            points
                .iter()
                .map(|(s, m)| format!("{s} {m}\n"))
                .collect::<String>()
                + "\n\n"
        })
        .collect();
    let services = by_path
        .values()
        .flatten()
        .filter_map(|(s, _)| s.parse::<f64>().ok());
    let lowest = services.clone().fold(f64::INFINITY, f64::min);
    let highest = services.fold(1.0, f64::max);
    let dat = png.with_extension("dat");
    fs::write(&dat, blocks)?;
    // A colour of its own for each path (gnuplot's default cycle has eight),
    // and the floors dashed.
    const COLORS: [&str; 10] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf",
    ];
    let plots: Vec<String> = by_path
        .keys()
        .enumerate()
        .map(|(i, path)| {
            format!(
                "'{}' index {i} using 1:2 with linespoints linewidth 2 linecolor rgb '{}' \
                 dashtype {} title '{path}'",
                dat.display(),
                COLORS[i % COLORS.len()],
                if path.contains("PASS") { 2 } else { 1 },
            )
        })
        .collect();
    let script = format!(
        "set terminal pngcairo size 1000,640 noenhanced font ',10'\nset output '{}'\nset logscale xy\n\
         set xlabel 'Services (10 backends each)'\nset ylabel 'ns per packet (median, log scale)'\n\
         set yrange [10:*]\nset grid\nset xrange [{}:{}]\n\
         set key outside below center horizontal maxrows 5 height 1.5\n\
         set title 'Ferry per-packet cost (BPF_PROG_TEST_RUN)'\nplot {}\n",
        png.display(),
        // A margin either side, so the end points do not sit on the frame.
        lowest / 2.0,
        highest * 2.0,
        plots.join(", ")
    );
    let plotted = gnuplot(&script);
    let _ = fs::remove_file(&dat);
    plotted
}

/// One chart of a figure: lines of (x, y) points against Services (log x).
struct Panel<'a> {
    title: &'a str,
    /// Where the legend goes, in gnuplot's words ("top left").
    key: &'a str,
    ylabel: &'a str,
    logy: bool,
    series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Draws `panels` side by side into `png` with gnuplot.
fn plot_lines(png: &Path, panels: &[Panel]) -> Result<()> {
    let dat = png.with_extension("dat");
    let mut data = String::new();
    let mut script = format!(
        "set terminal png size {},520 noenhanced\nset output '{}'\nset multiplot layout 1,{}\n",
        560 * panels.len(),
        png.display(),
        panels.len()
    );
    let mut index = 0;
    for panel in panels {
        let mut plots = Vec::new();
        for (name, points) in &panel.series {
            for (x, y) in points {
                data.push_str(&format!("{x} {y}\n"));
            }
            data.push_str("\n\n");
            plots.push(format!(
                "'{}' index {index} using 1:2 with linespoints title '{name}'",
                dat.display()
            ));
            index += 1;
        }
        script.push_str(&format!(
            "set title \"{}\"\nset logscale x\n{}set xlabel 'Services'\nset ylabel '{}'\n\
             set key {}\nset grid\n{}plot {}\n",
            panel.title,
            if panel.logy {
                "set logscale y\n"
            } else {
                "unset logscale y\n"
            },
            panel.ylabel,
            panel.key,
            if panel.logy {
                "set yrange [*:*]\n"
            } else {
                "set yrange [0:*]\n"
            },
            plots.join(", ")
        ));
    }
    script.push_str("unset multiplot\n");
    fs::write(&dat, data)?;
    let plotted = gnuplot(&script);
    let _ = fs::remove_file(&dat);
    plotted
}

/// A bar chart of `bars` (label, value) into `png`.
fn plot_bars(png: &Path, title: &str, ylabel: &str, bars: &[(String, f64)]) -> Result<()> {
    let dat = png.with_extension("dat");
    let data: String = bars
        .iter()
        .map(|(label, value)| format!("\"{label}\" {value}\n"))
        .collect();
    fs::write(&dat, data)?;
    let script = format!(
        "set terminal png size 900,520 noenhanced\nset output '{}'\nset title '{title}'\n\
         set ylabel '{ylabel}'\nset yrange [0:*]\nset grid ytics\nset style fill solid 0.6\n\
         set boxwidth 0.6\nset xtics rotate by -20\nunset key\n\
         plot '{}' using 0:2:xtic(1) with boxes, '' using 0:2:(sprintf('%.2f', $2)) with labels offset 0,1\n",
        png.display(),
        dat.display()
    );
    let plotted = gnuplot(&script);
    let _ = fs::remove_file(&dat);
    plotted
}

/// Runs a gnuplot script.
fn gnuplot(script: &str) -> Result<()> {
    let mut child = Command::new("gnuplot")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("starting gnuplot")?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("gnuplot's stdin")?,
        script.as_bytes(),
    )?;
    anyhow::ensure!(child.wait()?.success(), "gnuplot failed");
    Ok(())
}
