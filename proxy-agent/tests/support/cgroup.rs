//! A cgroup v2 directory of a test's own, `ferry-t<pid>-<tag><n>` under the v2
//! mount, for the socket hooks to attach to; the test process joins it while
//! it dials, and it is removed (the process back where it was) when dropped,
//! even when the test panics.

use std::{
    fs,
    path::{Path, PathBuf},
};

use proxy_common::cgroup::v2_mount;

pub struct Cgroup {
    pub path: PathBuf,
    /// Where this process was before it joined, to go back on drop.
    home: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        super::require_root();
        let mount = v2_mount().expect("a cgroup v2 mount");
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = mount.join(format!("ferry-t{}-{tag}{n}", std::process::id()));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let relative = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("this process in the v2 hierarchy");
        let home = mount.join(relative.trim_start_matches('/'));
        Self { path, home }
    }

    /// Moves this whole process (every thread) into the cgroup.
    pub fn join(&self) {
        move_to(&self.path);
    }

    /// Back to where the process was.
    pub fn leave(&self) {
        move_to(&self.home);
    }
}

fn move_to(cgroup: &Path) {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .unwrap_or_else(|e| panic!("joining {}: {e}", cgroup.display()));
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Leaving can fail only if home went; the rmdir then reports it.
        let _ = fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("removing {}: {e}", self.path.display());
        }
    }
}
