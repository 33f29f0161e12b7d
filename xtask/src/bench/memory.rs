//! Part 4 of `cargo xtask bench`: memory. What each pinned map costs the kernel
//! (bpftool's memlock figure, which on 6.x kernels is the map's real memory
//! use), whether that depends on how full the map is, and the agent's resident
//! memory, at each scale the control-plane part builds.

use std::{fmt::Write as _, fs, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use proxy_common::map_names;

/// `BPF_F_NO_PREALLOC`: a hash map that allocates entries as they are added.
const NO_PREALLOC: u64 = 1;
const MIB: f64 = 1024.0 * 1024.0;

/// One pinned map as bpftool shows it.
#[derive(Debug, Clone)]
pub struct MapMemory {
    pub name: String,
    pub kind: String,
    pub max_entries: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
    pub memlock: u64,
    /// Its memory is reserved for `max_entries` at creation, used or not.
    pub preallocated: bool,
}

/// Memory at one scale of the control-plane benchmark.
#[derive(Debug, Clone)]
pub struct Sample {
    pub services: usize,
    pub backends: usize,
    pub maps: Vec<MapMemory>,
    /// The agent's VmRSS and VmHWM (peak), KiB.
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// Every map the agent pinned under `pin_dir`.
pub fn snapshot(pin_dir: &Path) -> Result<Vec<MapMemory>> {
    map_names::ALL
        .iter()
        .map(|name| {
            let path = pin_dir.join(name);
            let out = Command::new("bpftool")
                .args(["map", "show", "pinned"])
                .arg(&path)
                .arg("-j")
                .output()
                .context("running bpftool")?;
            if !out.status.success() {
                bail!(
                    "bpftool map show pinned {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            parse(&serde_json::from_slice(&out.stdout)?)
                .with_context(|| format!("bpftool's description of {}", path.display()))
        })
        .collect()
}

fn parse(json: &serde_json::Value) -> Result<MapMemory> {
    let number = |field: &str| {
        json[field]
            .as_u64()
            .with_context(|| format!("no {field} in {json}"))
    };
    let kind = json["type"].as_str().unwrap_or_default().to_string();
    let flags = json["flags"].as_u64().unwrap_or(0);
    // Arrays are always allocated whole; LPM tries never are (the kernel
    // demands BPF_F_NO_PREALLOC); hash maps are unless told otherwise.
    let preallocated = match kind.as_str() {
        "lpm_trie" => false,
        k if k.ends_with("array") => true,
        _ => flags & NO_PREALLOC == 0,
    };
    Ok(MapMemory {
        name: json["name"].as_str().unwrap_or_default().to_string(),
        kind,
        max_entries: number("max_entries")?,
        key_bytes: number("bytes_key")?,
        value_bytes: number("bytes_value")?,
        memlock: number("bytes_memlock")?,
        preallocated,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

/// bytes of one entry of a preallocated map (what its memlock reserves per entry).
fn per_entry(maps: &[MapMemory], name: &str) -> f64 {
    maps.iter()
        .find(|m| m.name == name)
        .map_or(0.0, |m| m.memlock as f64 / m.max_entries.max(1) as f64)
}

/// Writes memory.md and memory.png under `results`.
pub fn report(results: &Path, header: &str, samples: &[Sample]) -> Result<()> {
    let Some(first) = samples.first() else {
        bail!("no memory samples");
    };
    let mut md = format!(
        "# Memory: pinned maps and the agent\n\n{header}\n\
         Maps as `bpftool map show pinned ... -j` reports them (`bytes_memlock`: since\n\
         kernel 6.4 the map's actual memory). A preallocated map reserves all its\n\
         entries when it is created, so its bytes do not depend on the Services it\n\
         holds; the others grow with use. Each Service is a ClusterIP with one TCP port\n\
         and 10 endpoints (backends) of its own.\n\n"
    );
    md.push_str("| map | type | max entries | key + value bytes | preallocated |");
    for s in samples {
        let _ = write!(md, " MiB at {} Services |", s.services);
    }
    md.push_str("\n| --- | --- | ---: | ---: | --- |");
    md.push_str(&" ---: |".repeat(samples.len()));
    md.push('\n');
    for (i, map) in first.maps.iter().enumerate() {
        let _ = write!(
            md,
            "| `{}` | {} | {} | {} + {} | {} |",
            map.name,
            map.kind,
            map.max_entries,
            map.key_bytes,
            map.value_bytes,
            if map.preallocated { "yes" } else { "no" }
        );
        for s in samples {
            let _ = write!(md, " {:.2} |", mib(s.maps[i].memlock));
        }
        md.push('\n');
    }
    md.push_str("| **all maps** | | | | |");
    for s in samples {
        let total: u64 = s.maps.iter().map(|m| m.memlock).sum();
        let _ = write!(md, " **{:.1}** |", mib(total));
    }
    md.push_str("\n| agent RSS (VmRSS) | | | | |");
    for s in samples {
        let _ = write!(md, " {:.1} |", s.rss_kib as f64 / 1024.0);
    }
    md.push_str("\n| agent peak RSS (VmHWM) | | | | |");
    for s in samples {
        let _ = write!(md, " {:.1} |", s.hwm_kib as f64 / 1024.0);
    }
    md.push_str("\n\n");

    // What one Service and one backend cost in the kernel: the entries they take
    // in the preallocated maps (a Service: slot 0 and one slot per backend in
    // svc4, one revnat4 entry; a backend: one backend4 entry).
    let svc_slot = per_entry(&first.maps, map_names::SERVICES_V4);
    let revnat = per_entry(&first.maps, map_names::REVNAT_V4);
    let backend = per_entry(&first.maps, map_names::BACKENDS_V4);
    let _ = writeln!(
        md,
        "## Per Service and per backend\n\n\
         Kernel, from the entry sizes of the preallocated maps (reserved up front, so\n\
         these are what the reservation holds per Service, not what a new Service adds):\n\n\
         - one frontend slot (svc4): {svc_slot:.0} bytes; one reverse-NAT entry: {revnat:.0} bytes\n\
         - per Service (slot 0 + one reverse-NAT entry, ports alike): {:.0} bytes\n\
         - per backend (its slot in its Service + its backend4 entry): {:.0} bytes\n\
         - a Service with 10 backends: {:.0} bytes\n",
        svc_slot + revnat,
        svc_slot + backend,
        svc_slot + revnat + 10.0 * (svc_slot + backend),
    );
    md.push_str("Agent (user space), from the growth of its resident memory between scales:\n\n");
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let services = b.services.saturating_sub(a.services).max(1) as f64;
        let backends = b.backends.saturating_sub(a.backends).max(1) as f64;
        let grown = (b.rss_kib as f64 - a.rss_kib as f64) * 1024.0;
        let _ = writeln!(
            md,
            "- {} -> {} Services: {:.0} bytes of RSS per Service with its 10 backends \
             ({:.0} bytes per backend if all of it were theirs)",
            a.services,
            b.services,
            grown / services,
            grown / backends,
        );
    }
    if samples.len() < 2 {
        md.push_str("- (one scale only in this run: no growth to divide)\n");
    }
    let last = samples.last().unwrap_or(first);
    let _ = writeln!(
        md,
        "\nAgent RSS at {} Services: {:.1} MiB (its peak, during the first list and\n\
         round: {:.1} MiB; the goals are in control_plane.md).\n\n![memory](memory.png)",
        last.services,
        last.rss_kib as f64 / 1024.0,
        last.hwm_kib as f64 / 1024.0,
    );
    fs::write(results.join("memory.md"), md)?;
    plot(&results.join("memory.png"), samples)
}

/// Clustered bars: MiB per map (and the agent's RSS) at each scale, log scale.
fn plot(png: &Path, samples: &[Sample]) -> Result<()> {
    let dat = png.with_extension("dat");
    let mut rows = String::new();
    let first = &samples[0];
    for (i, map) in first.maps.iter().enumerate() {
        let _ = write!(rows, "\"{}\"", map.name);
        for s in samples {
            // Log scale: a floor of 1 KiB keeps empty maps on the chart.
            let _ = write!(rows, " {:.6}", mib(s.maps[i].memlock).max(1.0 / 1024.0));
        }
        rows.push('\n');
    }
    rows.push_str("\"agent RSS\"");
    for s in samples {
        let _ = write!(rows, " {:.6}", s.rss_kib as f64 / 1024.0);
    }
    rows.push('\n');
    fs::write(&dat, rows)?;
    let columns: Vec<String> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let using = if i == 0 {
                format!("'{}' using 2:xtic(1)", dat.display())
            } else {
                format!("'' using {}", i + 2)
            };
            format!("{using} title '{} Services'", s.services)
        })
        .collect();
    let script = format!(
        "set terminal png size 900,520 noenhanced\nset output '{}'\n\
         set style data histogram\nset style histogram cluster gap 1\nset style fill solid 0.8 border -1\n\
         set logscale y\nset yrange [0.0005:*]\nset ylabel 'MiB (log scale)'\nset xtics rotate by -30\n\
         set key outside right\nset grid ytics\n\
         set title 'Ferry memory: pinned maps (memlock) and agent RSS'\nplot {}\n",
        png.display(),
        columns.join(", ")
    );
    super::gnuplot(&script)?;
    let _ = fs::remove_file(&dat);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preallocation_follows_the_map_type_and_flags() {
        let map = |kind: &str, flags: u64| {
            parse(&serde_json::json!({
                "name": "m", "type": kind, "flags": flags, "max_entries": 4,
                "bytes_key": 4, "bytes_value": 8, "bytes_memlock": 4096
            }))
            .unwrap()
            .preallocated
        };
        assert!(map("hash", 0));
        assert!(!map("hash", NO_PREALLOC));
        assert!(map("lru_hash", 0));
        assert!(map("percpu_array", 0));
        assert!(!map("lpm_trie", NO_PREALLOC));
    }
}
