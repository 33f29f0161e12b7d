//! Rejecting a connection to a frontend without backends, as kube-proxy does:
//! an ICMP port unreachable back to the client (for TCP too, like iptables'
//! REJECT default), so the client fails at once instead of timing out.

use aya_ebpf::{
    helpers::{bpf_skb_change_head, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::stats::Stat;

use crate::{
    csum,
    flow::{Flow, ETH_LEN},
    verdict::{Action, Dropped, Out, Outcome},
};

const IP_LEN: usize = 20;
const ICMP_LEN: usize = 8;
/// Longest quote: a 60-byte IPv4 header plus a 20-byte TCP header.
const MAX_ICMP_WORDS: usize = (ICMP_LEN + 60 + 20) / 4;

/// Turns the packet into an ICMP destination-unreachable (port) from the frontend
/// to the client and sends it back out of the interface it came in on.
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, flow: &Flow) -> Outcome {
    let failed = Dropped(Stat::DropRejectFailed);
    // The quote is the IP header and the fixed L4 header: at least the 8 bytes
    // RFC 792 asks for (RFC 1812 allows more), and never shorter than a packet
    // with an offloaded checksum may be cut (past its TCP checksum field).
    let quoted = flow.ip_hdr_len + flow.l4_min_len();
    let macs: [u8; 12] = ctx.load(0).map_err(|_| Dropped(Stat::DropRejectFailed))?;
    let skb = ctx.skb.skb;
    // Keep Ethernet + the quoted part, then make room in front for the new
    // Ethernet, IPv4 and ICMP headers: the quote lands right behind them.
    // SAFETY: helpers on our own skb; their results are checked.
    unsafe {
        if bpf_skb_change_tail(skb, (ETH_LEN + quoted) as u32, 0) != 0
            || bpf_skb_change_head(skb, (IP_LEN + ICMP_LEN) as u32, 0) != 0
        {
            return Err(failed);
        }
    }

    let mut hdr = [0u8; ETH_LEN + IP_LEN + ICMP_LEN];
    // Ethernet: back to where the packet came from.
    hdr[0..6].copy_from_slice(&macs[6..12]);
    hdr[6..12].copy_from_slice(&macs[0..6]);
    hdr[12] = 0x08;
    hdr[13] = 0x00;
    // IPv4: from the frontend the client dialled, to the client.
    let ip_total = (IP_LEN + ICMP_LEN + quoted) as u16;
    hdr[14] = 0x45;
    hdr[16..18].copy_from_slice(&ip_total.to_be_bytes());
    hdr[22] = 64; // TTL
    hdr[23] = 1; // ICMP
    hdr[26..30].copy_from_slice(&flow.daddr.to_ne_bytes());
    hdr[30..34].copy_from_slice(&flow.saddr.to_ne_bytes());
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
    let words = (ICMP_LEN + quoted) / 4;
    let mut sum = 0u64;
    let mut w = 0;
    while w < MAX_ICMP_WORDS {
        if w >= words {
            break;
        }
        let word: u32 = ctx
            .load(ETH_LEN + IP_LEN + w * 4)
            .map_err(|_| Dropped(Stat::DropRejectFailed))?;
        sum = csum::add_word(sum, word);
        w += 1;
    }
    let icmp_csum = csum::fold(sum);
    ctx.store(ETH_LEN + IP_LEN + 2, &icmp_csum, 0)
        .map_err(|_| Dropped(Stat::DropRejectFailed))?;
    Ok(Out::new(Action::Tx, Stat::RejectNoBackend))
}
