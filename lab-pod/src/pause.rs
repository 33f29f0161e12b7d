//! The pod sandbox's process, as Kubernetes' pause image runs it: PID 1 of
//! the pod, holding its namespaces. It sleeps until SIGTERM or SIGINT (then
//! exits 0) and reaps the children that the kernel re-parents to it.
//!
//! The three signals are blocked and taken with `sigwait`: a blocked signal
//! is queued even for PID 1, which the kernel would otherwise spare from
//! signals it has no handler for.

use std::{io, mem, ptr};

pub fn run() -> io::Result<()> {
    // SAFETY: plain libc calls on a local signal set; `set` is initialised by
    // sigemptyset before any other use.
    unsafe {
        let mut set: libc::sigset_t = mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, signal);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut signal = 0;
            let err = libc::sigwait(&set, &mut signal);
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
            match signal {
                libc::SIGCHLD => reap(),
                _ => return Ok(()),
            }
        }
    }
}

/// Waits for every child that has exited, without blocking.
fn reap() {
    // SAFETY: waitpid with a null status pointer only reaps.
    while unsafe { libc::waitpid(-1, ptr::null_mut(), libc::WNOHANG) } > 0 {}
}
