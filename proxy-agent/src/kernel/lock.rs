//! One agent per pin directory. Two agents on one node would adopt the same
//! maps with id allocators of their own and overwrite each other's entries;
//! the second one must refuse to start instead. The agent holds an exclusive
//! `flock` on the pin directory while it runs; the kernel drops it when the
//! process exits, however it exits.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// How long a new agent waits for the lock: an agent that is exiting (a
/// DaemonSet's pod being replaced) lets it go in that time.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// The pin directory's lock, held while this value lives.
#[derive(Debug)]
pub struct PinDirLock {
    _dir: File,
}

impl PinDirLock {
    /// Takes the lock on `dir` (which must exist), waiting up to `wait` for
    /// another holder to let it go.
    pub fn take(dir: &Path, wait: Duration) -> Result<Self> {
        let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        let deadline = Instant::now() + wait;
        loop {
            // SAFETY: a plain syscall on a descriptor this value owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self { _dir: file });
            }
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(error).with_context(|| format!("locking {}", dir.display()));
            }
            if Instant::now() >= deadline {
                bail!(
                    "another agent runs on {}: it has held the pin directory's lock for {} s. \
                     Two agents would overwrite each other's maps; stop the other one, or give \
                     this one its own --pin-dir",
                    dir.display(),
                    wait.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_then_is_refused_and_gets_it_once_free() {
        let dir = std::env::temp_dir().join(format!("ferry-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = PinDirLock::take(&dir, Duration::ZERO).unwrap();
        let started = Instant::now();
        let refused = PinDirLock::take(&dir, Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300));
        let message = format!("{refused:#}");
        assert!(message.contains("another agent runs on"), "{message}");
        assert!(message.contains(&dir.display().to_string()), "{message}");
        drop(first);
        PinDirLock::take(&dir, Duration::ZERO).expect("free again once dropped");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
