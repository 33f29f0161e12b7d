//! Next hops from the kernel's FIB, for packets the programs send straight out
//! instead of handing them to the stack.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_fib_lookup as fib_lookup,
};
use proxy_common::stats::Stat;

use crate::{
    ctx::Packet,
    diag,
    family::Family,
    maps::SCRATCH,
    verdict::{Action, Dropped, Out, Outcome},
};

/// Where the FIB says a packet goes.
pub enum Hop {
    Resolved {
        ifindex: u32,
        dmac: [u8; 6],
        smac: [u8; 6],
    },
    Unresolved {
        ifindex: u32,
    },
}

#[inline(always)]
pub fn fib<C: Packet, F: Family>(
    ctx: &C,
    proto: u8,
    src: F::Addr,
    dst: F::Addr,
    sport: u16,
    dport: u16,
) -> Result<Hop, Dropped> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(Dropped(Stat::DropScratch))?;
    // SAFETY: our CPU's slot; its `fib` is not in use by anything else while we run.
    let params = unsafe { &mut (*scratch).fib };
    // SAFETY: an all-zero bpf_fib_lookup is a valid request to fill in.
    *params = unsafe { core::mem::zeroed() };
    params.family = F::AF;
    params.l4_protocol = proto;
    params.sport = sport;
    params.dport = dport;
    params.ifindex = ctx.ifindex();
    F::fib_addresses(params, src, dst);
    // SAFETY: the helper reads and fills `params`, whose size we pass.
    let ret = unsafe {
        fib_lookup(
            ctx.raw(),
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(Hop::Resolved {
            ifindex: params.ifindex,
            dmac: params.dmac,
            smac: params.smac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(Hop::Unresolved {
            ifindex: params.ifindex,
        }),
        _ => {
            diag::record(ret);
            Err(Dropped(Stat::DropFib))
        }
    }
}

/// Sends a rewritten packet to its next hop.
#[inline(always)]
pub fn send<C: Packet>(ctx: &C, hop: Hop, stat: Stat) -> Outcome {
    match hop {
        Hop::Resolved {
            ifindex,
            dmac,
            smac,
        } => {
            ctx.set_macs(&dmac, &smac)?;
            if ifindex == ctx.ifindex() {
                return Ok(Out::new(Action::Tx, stat));
            }
            Ok(Out {
                action: Action::Redirect,
                ifindex,
                stat,
            })
        }
        Hop::Unresolved { ifindex } => Ok(Out {
            action: Action::RedirectNeigh,
            ifindex,
            stat,
        }),
    }
}
