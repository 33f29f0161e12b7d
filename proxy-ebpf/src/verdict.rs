//! What a program decided for a packet (`Out`, or `Dropped` with its reason)
//! and how that becomes its return code and a statistics count: every packet
//! is counted exactly once, here.

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};
use proxy_common::{monitor as program, stats::Stat, StatCounter};

use crate::{ctx::Packet, diag, flow::Early, maps::STATS, monitor};

/// tc: let the packet continue, to the next filter if there is one, else to the stack.
pub const TC_ACT_UNSPEC: i32 = -1;

/// Where a packet goes when it is not dropped. Fieldless, with the interface
/// beside it in `Out`: a payload that only some variants write would leave
/// stack bytes uninitialized on the others, which 5.10 and 6.1 refuse to read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// On to the kernel's stack (possibly rewritten).
    Pass,
    /// Back out of the interface it came in on (addresses already rewritten).
    Tx,
    /// Out of interface `Out::ifindex`, MACs already set.
    Redirect,
    /// Out of interface `Out::ifindex` whose next hop's MAC is not known yet
    /// (tc only: the kernel resolves it; XDP hands such packets to the tc
    /// program instead).
    RedirectNeigh,
    /// Reject with ICMP port unreachable (tc builds it; XDP hands it to tc).
    Reject,
}

/// What a program decided for a packet it did not drop.
pub struct Out {
    pub action: Action,
    /// The interface of `Redirect` and `RedirectNeigh` (0 otherwise).
    pub ifindex: u32,
    /// The statistics counter this outcome is counted under.
    pub stat: Stat,
}

impl Out {
    #[inline(always)]
    pub const fn pass(stat: Stat) -> Self {
        Self::new(Action::Pass, stat)
    }

    /// An outcome without an interface (any action but the redirects).
    #[inline(always)]
    pub const fn new(action: Action, stat: Stat) -> Self {
        Self {
            action,
            ifindex: 0,
            stat,
        }
    }
}

/// A reason to drop the packet, as the statistics counter it is counted under.
pub struct Dropped(pub Stat);

/// A packet's outcome so far: on its way somewhere, or dropped.
pub type Outcome = Result<Out, Dropped>;

impl Early {
    /// The outcome of a packet the parser found no flow in.
    #[inline(always)]
    pub fn outcome(self) -> Outcome {
        match self {
            Early::Pass(stat) => Ok(Out::pass(stat)),
            Early::Drop(stat) => Err(Dropped(stat)),
            Early::Icmp(_) => Ok(Out::pass(Stat::PassNotTcpUdp)),
        }
    }
}

#[inline(always)]
fn count(len: u32, stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat.index()) {
        // SAFETY: a per-CPU array slot is only touched by this CPU.
        unsafe {
            let counter: &mut StatCounter = &mut *counter;
            counter.packets += 1;
            counter.bytes += u64::from(len);
        }
    }
}

/// tc: counts the packet (with `len`, its length as it arrived), reports a
/// drop or reject to a monitor (and a translated packet to one that asks
/// for traces), and returns the action. `program`: which
/// one, as `proxy_common::monitor` numbers them.
#[inline(always)]
pub fn finish_tc(ctx: &TcContext, program: u32, len: u32, result: Outcome) -> i32 {
    match result {
        Ok(out) => {
            count(len, out.stat);
            if out.stat.is_reject() || (out.stat.is_translation() && monitor::tracing()) {
                monitor::report(ctx, program, out.stat);
            }
            // SAFETY: plain helper calls.
            unsafe {
                match out.action {
                    Action::Pass | Action::Reject => TC_ACT_UNSPEC,
                    Action::Tx => bpf_redirect(Packet::ifindex(ctx), 0) as i32,
                    Action::Redirect => bpf_redirect(out.ifindex, 0) as i32,
                    Action::RedirectNeigh => {
                        bpf_redirect_neigh(out.ifindex, core::ptr::null_mut(), 0, 0) as i32
                    }
                }
            }
        }
        Err(Dropped(stat)) => {
            count(len, stat);
            monitor::report(ctx, program, stat);
            diag::log_drop(stat);
            TC_ACT_SHOT as i32
        }
    }
}

/// XDP: the same for `uplink_xdp`. A reject is tc's to report: XDP hands
/// the packet on to it.
#[inline(always)]
pub fn finish_xdp(ctx: &XdpContext, len: u32, result: Outcome) -> u32 {
    match result {
        Ok(out) => {
            count(len, out.stat);
            if out.stat.is_translation() && monitor::tracing() {
                monitor::report(ctx, program::UPLINK_XDP, out.stat);
            }
            match out.action {
                Action::Pass | Action::Reject | Action::RedirectNeigh => xdp_action::XDP_PASS,
                Action::Tx => xdp_action::XDP_TX,
                // SAFETY: plain helper call.
                Action::Redirect => unsafe { bpf_redirect(out.ifindex, 0) as u32 },
            }
        }
        Err(Dropped(stat)) => {
            count(len, stat);
            monitor::report(ctx, program::UPLINK_XDP, stat);
            diag::log_drop(stat);
            xdp_action::XDP_DROP
        }
    }
}
