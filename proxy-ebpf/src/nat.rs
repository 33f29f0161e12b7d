//! Address and port rewrites with incremental checksum updates. A UDP checksum of
//! zero (none) stays zero; a computed zero becomes 0xffff (BPF_F_MARK_MANGLED_0).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{proto, stats};

use crate::{
    parse::{Flow, ETH_LEN, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
    verdict::Drop,
};

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites one end of the flow to `addr:port` (network order), fixing the IPv4
/// header checksum and the L4 checksum (which covers the pseudo header).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, flow: &Flow, end: End, addr: u32, port: u16) -> Result<(), Drop> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Source => (flow.saddr, flow.sport, ETH_LEN + IP_SADDR_OFF, flow.l4_off),
        End::Destination => (
            flow.daddr,
            flow.dport,
            ETH_LEN + IP_DADDR_OFF,
            flow.l4_off + 2,
        ),
    };
    let mangled = if flow.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let csum_off = flow.l4_csum_off();
    let failed = |_| Drop(stats::DROP_REWRITE);
    if old_addr != addr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(addr),
            u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
        )
        .map_err(failed)?;
        ctx.l3_csum_replace(
            ETH_LEN + IP_CSUM_OFF,
            u64::from(old_addr),
            u64::from(addr),
            4,
        )
        .map_err(failed)?;
        ctx.store(addr_off, &addr, 0).map_err(failed)?;
    }
    if old_port != port {
        ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), mangled | 2)
            .map_err(failed)?;
        ctx.store(port_off, &port, 0).map_err(failed)?;
    }
    Ok(())
}
