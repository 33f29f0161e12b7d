//! Packets and bytes of each (frontend, backend) pair, each way: what the
//! agent serves per Service and per backend on `/metrics`. One per-CPU hash
//! lookup per translated packet; the pair's first packet on a CPU inserts
//! its entry. The agent removes the entries of pairs that are gone.

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{Traffic, TrafficKey};

use crate::maps::TRAFFIC;

/// Whether packets are counted: set by the agent when it loads the
/// programs (`--traffic-counters`). A load-time constant: the verifier
/// drops the counting code when it is 0, so that off costs nothing.
#[no_mangle]
static TRAFFIC_COUNTERS: u8 = 1;

/// Which way a packet goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// A client's packet, to its backend.
    ToBackend,
    /// A backend's reply, to its client.
    ToClient,
}

/// Counts a packet of `len` bytes (as it arrived) of the flow between
/// frontend `rev_nat_id` and backend `backend_id`. A full map leaves the
/// packet uncounted, nothing else.
#[inline(always)]
pub fn count(rev_nat_id: u32, backend_id: u32, way: Way, len: u32) {
    // SAFETY: a plain read of a global the loader may have set.
    if unsafe { core::ptr::read_volatile(&TRAFFIC_COUNTERS) } == 0 {
        return;
    }
    let key = TrafficKey {
        rev_nat_id,
        backend_id,
    };
    let entry = match TRAFFIC.get_ptr_mut(&key) {
        Some(entry) => entry,
        None => {
            let _ = TRAFFIC.insert(&key, &Traffic::default(), u64::from(BPF_NOEXIST));
            match TRAFFIC.get_ptr_mut(&key) {
                Some(entry) => entry,
                None => return,
            }
        }
    };
    // SAFETY: this CPU's value of a per-CPU map entry: nothing else writes it.
    unsafe {
        if way == Way::ToBackend {
            (*entry).to_backend_packets += 1;
            (*entry).to_backend_bytes += u64::from(len);
        } else {
            (*entry).to_client_packets += 1;
            (*entry).to_client_bytes += u64::from(len);
        }
    }
}
