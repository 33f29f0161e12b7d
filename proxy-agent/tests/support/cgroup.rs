//! A cgroup v2 directory of a test's own, `ferry-t<pid>-<tag><n>` under the v2
//! mount, for the socket hooks to attach to; the test process joins it while
//! it dials, and it is removed (the process back where it was) when dropped,
//! even when the test panics.

use std::{fs, path::PathBuf};

use proxy_common::cgroup::{self, Joined};

pub struct Cgroup {
    pub path: PathBuf,
    joined: Option<Joined>,
}

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        super::require_root();
        let mount = cgroup::v2_mount().expect("a cgroup v2 mount");
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = mount.join(format!("ferry-t{}-{tag}{n}", std::process::id()));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { path, joined: None }
    }

    /// Moves this whole process (every thread) into the cgroup until dropped.
    pub fn join(&mut self) {
        self.joined = Some(cgroup::join(&self.path).unwrap_or_else(|e| panic!("{e:#}")));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Back home first: a cgroup with a process in it cannot go.
        self.joined.take();
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("removing {}: {e}", self.path.display());
        }
    }
}
