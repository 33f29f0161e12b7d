//! Ferry's node agent: from services to eBPF maps.
//!
//! `model` describes services, `state` turns them into map contents and ordered
//! writes (pure), `dataplane` does everything that touches the kernel.

pub mod dataplane;
pub mod model;
pub mod state;
