//! How a program's outcome becomes a tc action and a statistics count: every
//! packet is counted exactly once, here.

use aya_ebpf::bindings::TC_ACT_SHOT;
use proxy_common::StatCounter;

use crate::maps::STATS;

/// Let the packet continue: to the next tc filter if there is one, else to the stack.
pub const TC_ACT_UNSPEC: i32 = -1;

/// What a program decided for a packet it did not drop.
pub struct Out {
    /// The tc action to return.
    pub action: i32,
    /// The statistics counter this outcome is counted under.
    pub stat: u32,
}

impl Out {
    #[inline(always)]
    pub const fn pass(stat: u32) -> Self {
        Self {
            action: TC_ACT_UNSPEC,
            stat,
        }
    }
}

/// A reason to drop the packet, as a statistics counter index.
pub struct Drop(pub u32);

/// Counts the packet (with `len`, its length as it arrived) and returns the action.
#[inline(always)]
pub fn finish(len: u32, result: Result<Out, Drop>) -> i32 {
    let (action, stat) = match result {
        Ok(out) => (out.action, out.stat),
        Err(Drop(stat)) => (TC_ACT_SHOT as i32, stat),
    };
    if let Some(counter) = STATS.get_ptr_mut(stat) {
        // SAFETY: a per-CPU array slot is only touched by this CPU.
        unsafe {
            let counter: &mut StatCounter = &mut *counter;
            counter.packets += 1;
            counter.bytes += u64::from(len);
        }
    }
    action
}
