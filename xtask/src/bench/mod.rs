//! `cargo xtask bench [--quick]`: the benchmarks, with their results (a table and
//! a plot each) written under bench/results/ with the machine, kernel, commit and
//! command in the header.

use std::{collections::BTreeMap, fs, process::Command};

use anyhow::{Context, Result};

use crate::{build_ebpf, debian, exec, workspace_root};

mod control_plane;
mod memory;

pub fn run(quick: bool) -> Result<()> {
    debian::install("bench", &["gnuplot-nox"])?;
    build_ebpf::run()?;
    let results = workspace_root().join("bench/results");
    fs::create_dir_all(&results)?;
    let table = results.join("per_packet.md.part");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args([
        "bench",
        "-p",
        "proxy-agent",
        "--bench",
        "per_packet",
        "--",
    ]);
    if quick {
        cmd.arg("--quick");
    }
    exec(cmd.arg("--out").arg(&table))?;

    let command = if quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let header = header(command)?;
    let body = fs::read_to_string(&table)?;
    let md = format!(
        "# Per-packet cost against the number of Services\n\n{header}\n\
         Each sample is one BPF_PROG_TEST_RUN (repeat 1) on a fresh frame, timed by the\n\
         kernel; medians of {} samples with p10..p90. Services have 10 backends each;\n\
         the packet goes to the Service in the middle of the range. `tc` is `from_pod`\n\
         (ClusterIP DNAT), `xdp` is `uplink_xdp` (a local backend: DNAT and pass);\n\
         `new flow` misses conntrack, `established` hits it. The floor is an XDP\n\
         program that only returns PASS, measured the same way.\n\n{body}\n![per-packet cost](per_packet.png)\n",
        if quick { 3_000 } else { 20_000 },
    );
    fs::write(results.join("per_packet.md"), md)?;
    plot(
        &table.with_extension("part.dat"),
        &results.join("per_packet.png"),
    )?;
    let _ = fs::remove_file(&table);
    let _ = fs::remove_file(table.with_extension("part.dat"));
    eprintln!("bench: {}", results.join("per_packet.md").display());
    control_plane::run(quick, &results, command)
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn header(command: &str) -> Result<String> {
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

/// A line per path: median ns against Services (log scale).
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
    let dat = png.with_extension("dat");
    fs::write(&dat, blocks)?;
    let plots: Vec<String> = by_path
        .keys()
        .enumerate()
        .map(|(i, path)| {
            format!(
                "'{}' index {i} using 1:2 with linespoints title '{path}'",
                dat.display()
            )
        })
        .collect();
    let script = format!(
        "set terminal png size 900,520 noenhanced\nset output '{}'\nset logscale x\nset xlabel 'Services (10 backends each)'\n\
         set ylabel 'ns per packet (median)'\nset yrange [0:*]\nset key outside right\nset grid\n\
         set title 'Ferry per-packet cost (BPF_PROG_TEST_RUN)'\nplot {}\n",
        png.display(),
        plots.join(", ")
    );
    let mut child = Command::new("gnuplot")
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes())?;
    let status = child.wait()?;
    let _ = fs::remove_file(&dat);
    anyhow::ensure!(status.success(), "gnuplot failed");
    Ok(())
}
