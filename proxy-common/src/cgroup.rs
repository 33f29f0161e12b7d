//! Where the socket hooks attach: the cgroup v2 hierarchy, found the one way
//! the agent (its default `--cgroup-root`), the lab and the tests find it.

extern crate std;

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on a v2-only
/// host, `/sys/fs/cgroup/unified` beside v1 controllers (hybrid).
pub fn v2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .context("no cgroup v2 hierarchy is mounted (the socket hooks attach to one)")
}
