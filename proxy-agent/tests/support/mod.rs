//! Helpers shared by the integration tests.
#![allow(dead_code, reason = "each test binary uses its own subset")]

pub mod cgroup;
pub mod fib;
pub mod monitor;
pub mod netns;
pub mod pins;
#[allow(unused_imports, reason = "only the packet test binaries build frames")]
pub use proxy_agent::harness::packet;

/// Privileged tests need root (CAP_BPF, CAP_NET_ADMIN). They fail, loudly,
/// rather than skip: `cargo xtask test` runs them as root.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "privileged test: run as root (as `cargo xtask test` and CI do)"
    );
}
