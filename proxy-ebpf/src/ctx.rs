//! The program contexts as packets: `Frame` (read access, from `flow`) and
//! `Packet` (rewrites, MACs, interface) for tc and XDP, so one code path
//! serves tc (sk_buff) and XDP (xdp_md) alike. Only the rewrite differs: tc uses
//! the checksum helpers (which also handle offloaded checksums); XDP frames are
//! plain bytes, rewritten with incremental checksum arithmetic (RFC 1624).
//!
//! SCTP's checksum, a CRC32c over its packet, does not cover the addresses,
//! and cannot be updated port by port at a low cost: tc's rewrite leaves it,
//! and `sctp` fixes it once, for all of a packet's rewrites, at the end.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use proxy_common::{proto, stats::Stat};

use crate::{
    csum,
    family::Family,
    flow::{self, Flow, Frame, ETH_LEN, IP_CSUM_OFF},
    reject,
    verdict::{Action, Dropped, Out, Outcome},
};

/// Which end of a flow a rewrite changes.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

pub trait Packet: Frame {
    /// The raw context pointer, for helpers that take either kind.
    fn raw(&self) -> *mut c_void;
    /// The interface the packet arrived on.
    fn ifindex(&self) -> u32;
    /// Rewrites one end of the flow to `addr:port` (network order), fixing the
    /// IPv4 header checksum (IPv6 has none) and the L4 checksum, whose
    /// pseudo-header covers the addresses (SCTP's is left to `sctp`). A
    /// UDP checksum of zero (none) stays zero; a computed zero becomes
    /// 0xffff. A later fragment has only its address rewritten: its L4
    /// header (ports and checksum, over the whole datagram) is in the first
    /// fragment.
    fn rewrite<F: Family>(
        &self,
        flow: &Flow<F>,
        end: End,
        addr: F::Addr,
        port: u16,
    ) -> Result<(), Dropped>;
    /// Writes `value` at `offset`, as it is: the caller keeps the checksums
    /// that cover it right (see `icmp`).
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), Dropped>;
    /// Writes the Ethernet addresses.
    fn set_macs(&self, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), Dropped>;
    /// Rejects `flow`'s packet with an ICMP (ICMPv6) port unreachable: tc
    /// turns the packet into it, XDP hands the packet on to tc for that.
    fn reject<F: Family>(&self, flow: &Flow<F>) -> Outcome;
}

/// The end's address and port now, and the offsets of both in the frame.
#[inline(always)]
fn offsets<F: Family>(flow: &Flow<F>, end: End) -> (F::Addr, u16, usize, usize) {
    match end {
        End::Source => (flow.saddr, flow.sport, ETH_LEN + F::SADDR_OFF, flow.l4_off),
        End::Destination => (
            flow.daddr,
            flow.dport,
            ETH_LEN + F::DADDR_OFF,
            flow.l4_off + 2,
        ),
    }
}

impl Frame for TcContext {
    const XDP: bool = false;
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn linear(&self, len: usize) -> bool {
        if TcContext::data(self) + len <= TcContext::data_end(self) {
            return true;
        }
        TcContext::len(self) as usize >= len
            && self.pull_data(len as u32).is_ok()
            && TcContext::data(self) + len <= TcContext::data_end(self)
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load::<T>(offset).ok()
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.skb.skb.cast()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of our own context.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn rewrite<F: Family>(
        &self,
        flow: &Flow<F>,
        end: End,
        addr: F::Addr,
        port: u16,
    ) -> Result<(), Dropped> {
        let (old_addr, old_port, addr_off, port_off) = offsets(flow, end);
        let l4 = !flow::later_fragment::<_, F>(self);
        let sctp = flow.proto == proto::SCTP;
        let mangled = if flow.proto == proto::UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let csum_off = flow.l4_csum_off();
        let failed = |_| Dropped(Stat::DropRewrite);
        if old_addr != addr {
            for (old, new) in F::words(&old_addr).iter().zip(F::words(&addr)) {
                if old == new {
                    continue;
                }
                if l4 && !sctp {
                    self.l4_csum_replace(
                        csum_off,
                        u64::from(*old),
                        u64::from(*new),
                        u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
                    )
                    .map_err(failed)?;
                }
                if F::IP_CSUM {
                    self.l3_csum_replace(
                        ETH_LEN + IP_CSUM_OFF,
                        u64::from(*old),
                        u64::from(*new),
                        4,
                    )
                    .map_err(failed)?;
                }
            }
            self.store(addr_off, &addr, 0).map_err(failed)?;
        }
        if old_port != port && l4 {
            if !sctp {
                self.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), mangled | 2)
                    .map_err(failed)?;
            }
            self.store(port_off, &port, 0).map_err(failed)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), Dropped> {
        self.store(offset, value, 0)
            .map_err(|_| Dropped(Stat::DropRewrite))
    }

    #[inline(always)]
    fn set_macs(&self, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), Dropped> {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(dst);
        macs[6..].copy_from_slice(src);
        self.store(0, &macs, 0)
            .map_err(|_| Dropped(Stat::DropRewrite))
    }

    #[inline(always)]
    fn reject<F: Family>(&self, flow: &Flow<F>) -> Outcome {
        reject::port_unreachable(self, flow, Stat::RejectNoBackend)
    }
}

/// A later fragment's address rewrite in an XDP frame: the address and the
/// IPv4 header checksum, nothing of an L4 header it does not have. (XDP
/// never rewrites SCTP: it hands SCTP to tc, see `sctp`.)
#[inline(always)]
fn rewrite_fragment<F: Family>(
    ctx: &XdpContext,
    addr_ptr: *mut F::Addr,
    old: F::Addr,
    new: F::Addr,
) -> Result<(), Dropped> {
    if F::IP_CSUM {
        let ip_csum =
            xdp_ptr::<u16>(ctx, ETH_LEN + IP_CSUM_OFF).ok_or(Dropped(Stat::DropRewrite))?;
        // SAFETY: bounds-checked.
        unsafe {
            let mut check = ip_csum.read_unaligned();
            for (o, n) in F::words(&old).iter().zip(F::words(&new)) {
                check = csum::replace4(check, *o, *n);
            }
            ip_csum.write_unaligned(check);
        }
    }
    // SAFETY: bounds-checked by the caller.
    unsafe { addr_ptr.write_unaligned(new) };
    Ok(())
}

/// A bounds-checked pointer into an XDP frame.
#[inline(always)]
fn xdp_ptr<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data() + offset;
    if start + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *mut T)
}

impl Frame for XdpContext {
    const XDP: bool = true;
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    #[inline(always)]
    fn linear(&self, len: usize) -> bool {
        XdpContext::data(self) + len <= XdpContext::data_end(self)
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: bounds checked by xdp_ptr.
        xdp_ptr::<T>(self, offset).map(|p| unsafe { p.read_unaligned() })
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.ctx.cast()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of our own context.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn rewrite<F: Family>(
        &self,
        flow: &Flow<F>,
        end: End,
        addr: F::Addr,
        port: u16,
    ) -> Result<(), Dropped> {
        let (old_addr, old_port, addr_off, port_off) = offsets(flow, end);
        let bad = Dropped(Stat::DropRewrite);
        let addr_ptr = xdp_ptr::<F::Addr>(self, addr_off).ok_or(bad)?;
        if flow::later_fragment::<_, F>(self) {
            return rewrite_fragment::<F>(self, addr_ptr, old_addr, addr);
        }
        let port_ptr = xdp_ptr::<u16>(self, port_off).ok_or(Dropped(Stat::DropRewrite))?;
        let l4_csum = xdp_ptr::<u16>(self, flow.l4_csum_off()).ok_or(Dropped(Stat::DropRewrite))?;
        let ip_csum = if F::IP_CSUM {
            Some(xdp_ptr::<u16>(self, ETH_LEN + IP_CSUM_OFF).ok_or(Dropped(Stat::DropRewrite))?)
        } else {
            None
        };
        // SAFETY: every pointer was bounds-checked against the frame above.
        unsafe {
            let old_l4 = l4_csum.read_unaligned();
            let mut l4 = old_l4;
            for (old, new) in F::words(&old_addr).iter().zip(F::words(&addr)) {
                if let Some(ip_csum) = ip_csum {
                    ip_csum.write_unaligned(csum::replace4(ip_csum.read_unaligned(), *old, *new));
                }
                l4 = csum::replace4(l4, *old, *new);
            }
            addr_ptr.write_unaligned(addr);
            port_ptr.write_unaligned(port);
            if flow.proto == proto::UDP && old_l4 == 0 {
                return Ok(());
            }
            l4 = csum::replace2(l4, old_port, port);
            if flow.proto == proto::UDP && l4 == 0 {
                l4 = 0xffff;
            }
            l4_csum.write_unaligned(l4);
        }
        Ok(())
    }

    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: &T) -> Result<(), Dropped> {
        let at = xdp_ptr::<T>(self, offset).ok_or(Dropped(Stat::DropRewrite))?;
        // SAFETY: bounds-checked.
        unsafe { at.write_unaligned(*value) };
        Ok(())
    }

    #[inline(always)]
    fn set_macs(&self, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), Dropped> {
        let macs = xdp_ptr::<[u8; 12]>(self, 0).ok_or(Dropped(Stat::DropRewrite))?;
        let mut value = [0u8; 12];
        value[..6].copy_from_slice(dst);
        value[6..].copy_from_slice(src);
        // SAFETY: bounds-checked.
        unsafe { macs.write_unaligned(value) };
        Ok(())
    }

    #[inline(always)]
    fn reject<F: Family>(&self, _flow: &Flow<F>) -> Outcome {
        Ok(Out::new(Action::Reject, Stat::RejectNoBackend))
    }
}
