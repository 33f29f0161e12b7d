//! Ferry's node agent: from services to eBPF maps.
//!
//! `model` describes services, `state` turns them into map contents and ordered
//! writes (pure), `dataplane` does everything that touches the kernel.

pub mod agent;
pub mod cluster;
pub mod dataplane;
pub mod gc;
pub mod health;
pub mod ifaces;
pub mod inspect;
pub mod latency;
pub mod maglev;
pub mod model;
pub mod simulate;
pub mod state;
pub mod topology;
pub mod watch;
