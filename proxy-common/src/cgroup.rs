//! Where the socket hooks attach: the cgroup v2 hierarchy, found the one way
//! the agent (its default `--cgroup-root`), the lab and the tests find it.

extern crate std;

use std::{fs, path::PathBuf, string::ToString};

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

/// This process moved into a v2 cgroup (every thread, as `cgroup.procs`
/// moves them); back in the cgroup it came from when dropped. For tests and
/// benches that act as a node's process where socket hooks apply.
pub struct Joined {
    home: PathBuf,
}

/// Moves this process into the v2 cgroup `cgroup`.
pub fn join(cgroup: &std::path::Path) -> Result<Joined> {
    let mount = v2_mount()?;
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let home = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| mount.join(p.trim_start_matches('/')))
        .context("this process is in no v2 cgroup")?;
    move_to(cgroup)?;
    Ok(Joined { home })
}

fn move_to(cgroup: &std::path::Path) -> Result<()> {
    fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| std::format!("joining {}", cgroup.display()))
}

impl Drop for Joined {
    fn drop(&mut self) {
        // Home can only be gone if something removed it meanwhile.
        let _ = move_to(&self.home);
    }
}
