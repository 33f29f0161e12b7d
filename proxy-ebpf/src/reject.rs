//! Rejecting a connection to a frontend without backends, as kube-proxy does:
//! an ICMP (ICMPv6) port unreachable back to the client (for TCP too, like
//! iptables' REJECT default), so the client fails at once instead of timing
//! out.

use aya_ebpf::{
    helpers::{bpf_skb_change_head, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::stats::Stat;

use crate::{
    csum,
    family::Family,
    flow::{self, Flow, ETH_LEN},
    verdict::{Action, Dropped, Out, Outcome},
};

const IP_LEN: usize = 20;
const IP6_LEN: usize = 40;
const ICMP_LEN: usize = 8;
/// Longest IPv4 quote: a 60-byte IPv4 header plus a 20-byte TCP header.
const MAX_QUOTE: usize = 60 + 20;
/// Longest IPv6 quote: the fixed header, extension headers and the L4
/// header, cut here if longer (a multiple of 4, as every quote is).
const MAX_QUOTE6: usize = 128;
/// ICMPv6's next-header value.
const NEXT_ICMP6: u8 = 58;

/// Turns the packet into an ICMP destination-unreachable (port) from the
/// frontend to the client and sends it back out of the interface it came in
/// on, counted as `stat`. A later fragment is dropped instead.
#[inline(always)]
pub fn port_unreachable<F: Family>(ctx: &TcContext, flow: &Flow<F>, stat: Stat) -> Outcome {
    // The rest of a datagram whose first fragment was rejected: dropped,
    // counted with it (the client has its error already).
    if flow::later_fragment::<_, F>(ctx) {
        return Err(Dropped(stat));
    }
    // The quote is the IP header and the fixed L4 header: at least the 8 bytes
    // RFC 792 asks for (RFC 1812 and 4443 allow more), and never shorter than
    // a packet with an offloaded checksum may be cut (past its TCP checksum
    // field).
    let quoted = flow.ip_hdr_len + flow.l4_min_len();
    let (src, dst) = (F::words(&flow.daddr), F::words(&flow.saddr));
    if F::IP_CSUM {
        reply4(ctx, quoted, src, dst, stat)
    } else {
        reply6(ctx, quoted.min(MAX_QUOTE6), src, dst, stat)
    }
}

/// Cuts the packet to Ethernet and `quoted` bytes and makes room in front for
/// `room` bytes of new headers: the quote lands right behind them. Returns
/// the old Ethernet addresses.
#[inline(always)]
fn make_room(ctx: &TcContext, quoted: usize, room: usize) -> Result<[u8; 12], Dropped> {
    let failed = Dropped(Stat::DropRejectFailed);
    let macs: [u8; 12] = ctx.load(0).map_err(|_| Dropped(Stat::DropRejectFailed))?;
    let skb = ctx.skb.skb;
    // SAFETY: helpers on our own skb; their results are checked.
    unsafe {
        if bpf_skb_change_tail(skb, (ETH_LEN + quoted) as u32, 0) != 0
            || bpf_skb_change_head(skb, room as u32, 0) != 0
        {
            return Err(failed);
        }
    }
    Ok(macs)
}

/// Ethernet back to where the packet came from.
#[inline(always)]
fn ethernet(hdr: &mut [u8], macs: &[u8; 12], ether_type: [u8; 2]) {
    hdr[0..6].copy_from_slice(&macs[6..12]);
    hdr[6..12].copy_from_slice(&macs[0..6]);
    hdr[12..14].copy_from_slice(&ether_type);
}

/// Adds `words` 32-bit words of the frame from `offset` to `sum`, and
/// stores the folded checksum at `csum_off`.
#[inline(always)]
fn checksum<const MAX: usize>(
    ctx: &TcContext,
    mut sum: u64,
    offset: usize,
    words: usize,
    csum_off: usize,
) -> Result<(), Dropped> {
    let mut w = 0;
    while w < MAX {
        if w >= words {
            break;
        }
        let word: u32 = ctx
            .load(offset + w * 4)
            .map_err(|_| Dropped(Stat::DropRejectFailed))?;
        sum = csum::add_word(sum, word);
        w += 1;
    }
    ctx.store(csum_off, &csum::fold(sum), 0)
        .map_err(|_| Dropped(Stat::DropRejectFailed))?;
    Ok(())
}

#[inline(always)]
fn reply4(ctx: &TcContext, quoted: usize, src: &[u32], dst: &[u32], stat: Stat) -> Outcome {
    let macs = make_room(ctx, quoted, IP_LEN + ICMP_LEN)?;
    let mut hdr = [0u8; ETH_LEN + IP_LEN + ICMP_LEN];
    ethernet(&mut hdr, &macs, [0x08, 0x00]);
    // IPv4: from the frontend the client dialled, to the client.
    let ip_total = (IP_LEN + ICMP_LEN + quoted) as u16;
    hdr[14] = 0x45;
    hdr[16..18].copy_from_slice(&ip_total.to_be_bytes());
    hdr[22] = 64; // TTL
    hdr[23] = 1; // ICMP
    hdr[26..30].copy_from_slice(&src[0].to_ne_bytes());
    hdr[30..34].copy_from_slice(&dst[0].to_ne_bytes());
    let mut sum = 0u64;
    let mut i = ETH_LEN;
    while i < ETH_LEN + IP_LEN {
        sum += u64::from(u16::from_ne_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    hdr[24..26].copy_from_slice(&csum::fold(sum).to_ne_bytes());
    // ICMP: type 3 (destination unreachable), code 3 (port unreachable).
    hdr[34] = 3;
    hdr[35] = 3;
    ctx.store(0, &hdr, 0)
        .map_err(|_| Dropped(Stat::DropRejectFailed))?;
    // The ICMP checksum covers its header and the quote.
    checksum::<{ (ICMP_LEN + MAX_QUOTE) / 4 }>(
        ctx,
        0,
        ETH_LEN + IP_LEN,
        (ICMP_LEN + quoted) / 4,
        ETH_LEN + IP_LEN + 2,
    )?;
    Ok(Out::new(Action::Tx, stat))
}

#[inline(always)]
fn reply6(ctx: &TcContext, quoted: usize, src: &[u32], dst: &[u32], stat: Stat) -> Outcome {
    let macs = make_room(ctx, quoted, IP6_LEN + ICMP_LEN)?;
    let mut hdr = [0u8; ETH_LEN + IP6_LEN + ICMP_LEN];
    ethernet(&mut hdr, &macs, [0x86, 0xdd]);
    // IPv6: from the frontend the client dialled, to the client.
    let payload = (ICMP_LEN + quoted) as u16;
    hdr[14] = 0x60;
    hdr[18..20].copy_from_slice(&payload.to_be_bytes());
    hdr[20] = NEXT_ICMP6;
    hdr[21] = 64; // hop limit
                  // The pseudo-header's part of the ICMPv6 checksum (RFC 8200, 8.1).
    let mut sum = 0u64;
    for (i, (s, d)) in src.iter().zip(dst).enumerate().take(4) {
        hdr[22 + 4 * i..26 + 4 * i].copy_from_slice(&s.to_ne_bytes());
        hdr[38 + 4 * i..42 + 4 * i].copy_from_slice(&d.to_ne_bytes());
        sum = csum::add_word(csum::add_word(sum, *s), *d);
    }
    sum = csum::add_word(sum, u32::from(payload).to_be());
    sum = csum::add_word(sum, u32::from(NEXT_ICMP6).to_be());
    // ICMPv6: type 1 (destination unreachable), code 4 (port unreachable).
    hdr[54] = 1;
    hdr[55] = 4;
    ctx.store(0, &hdr, 0)
        .map_err(|_| Dropped(Stat::DropRejectFailed))?;
    checksum::<{ (ICMP_LEN + MAX_QUOTE6) / 4 }>(
        ctx,
        sum,
        ETH_LEN + IP6_LEN,
        (ICMP_LEN + quoted) / 4,
        ETH_LEN + IP6_LEN + 2,
    )?;
    Ok(Out::new(Action::Tx, stat))
}
