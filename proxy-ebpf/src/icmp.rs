//! ICMP and ICMPv6 errors about translated flows. An error quotes the packet
//! that caused it: a router's "fragmentation needed" ("packet too big") on
//! the path to a backend, a backend's "port unreachable", a "time exceeded".
//! The client must find in it the packet it sent, to the frontend it
//! dialled, or its path-MTU discovery and its socket never learn of it (a
//! large transfer through a Service stalls for good).
//!
//! As netfilter does, an error about the backend's side of a flow that Ferry
//! translated is translated back in both of its headers: the quoted packet's
//! addresses and ports (with its IP and L4 checksums, where the quote holds
//! them), and the outer packet, from the frontend to the client, with the
//! ICMP checksum kept right over all of it. An error about a flow conntrack
//! does not know, an ICMP message that is not an error, or a quote that is
//! not TCP, UDP or SCTP (or, in IPv6, that has extension headers) pass
//! untouched. A quoted SCTP packet's CRC32c is left as it is, as netfilter
//! leaves it: a quote seldom holds the whole packet it covers, and the
//! client's stack finds its association by addresses, ports and tag.

use proxy_common::{proto, stats::Stat};

use crate::{
    csum, ct,
    ctx::Packet,
    family::{Endpoint, Family, V4, V6},
    flow::{Flow, Frame, ETH_LEN, IP_CSUM_OFF},
    verdict::Dropped,
};

/// Length of the ICMP header before the quote.
const ICMP_HDR_LEN: usize = 8;
/// The IPv6 header, the only one a quote may have before its L4 header.
const IPV6_HDR_LEN: usize = 40;
/// Offsets inside the quoted packet's headers.
const IPV4_FRAG_OFF: usize = 6;
const IPV4_PROTO_OFF: usize = 9;
const IPV6_NEXT_OFF: usize = 6;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;

/// Whether an ICMP (ICMPv6) type is an error that quotes a packet: RFC 792's
/// destination unreachable, time exceeded and parameter problem; RFC 4443's
/// destination unreachable, packet too big, time exceeded and parameter
/// problem.
#[inline(always)]
fn is_error<F: Family>(kind: u8) -> bool {
    if F::IP_CSUM {
        kind == 3 || kind == 11 || kind == 12
    } else {
        (1..=4).contains(&kind)
    }
}

/// An ICMP error and the packet it quotes, as they sit in the frame.
pub struct Quote<F: Family> {
    icmp_off: usize,
    /// The quoted IP header's offset.
    ip_off: usize,
    /// The quoted packet's tuple; its `l4_off` is its L4 header's offset in
    /// this frame.
    pub inner: Flow<F>,
    /// The quoted L4 checksum's offset; 0 when the quote stops short of it,
    /// the datagram has none (UDP over IPv4) or it is SCTP's.
    l4_csum_off: usize,
}

impl<F: Family> Quote<F> {
    /// The tuple an answer to the quoted packet carries: the conntrack key
    /// of the flow's other direction.
    #[inline(always)]
    pub fn answer(&self) -> Flow<F> {
        Flow {
            saddr: self.inner.daddr,
            daddr: self.inner.saddr,
            sport: self.inner.dport,
            dport: self.inner.sport,
            ..self.inner
        }
    }
}

/// The error whose ICMP header is at `icmp_off`, and the TCP, UDP or SCTP
/// packet it quotes. None for anything else.
#[inline(always)]
pub fn quote<C: Frame, F: Family>(ctx: &C, icmp_off: usize) -> Option<Quote<F>> {
    // Type, code and checksum: one read of four bytes (a one-byte read of
    // an XDP frame compiles to a bounds check the verifier does not take).
    let head: [u8; 4] = ctx.read(icmp_off)?;
    if !is_error::<F>(head[0]) {
        return None;
    }
    let ip_off = icmp_off + ICMP_HDR_LEN;
    let (l4_proto, ip_hdr_len) = if F::IP_CSUM {
        let head: [u8; IPV4_PROTO_OFF + 1] = ctx.read(ip_off)?;
        let frag = u16::from_be_bytes([head[IPV4_FRAG_OFF], head[IPV4_FRAG_OFF + 1]]);
        // Only a first fragment (or a whole packet) has the ports.
        if head[0] >> 4 != 4 || frag & 0x1fff != 0 {
            return None;
        }
        (head[IPV4_PROTO_OFF], usize::from(head[0] & 0x0f) * 4)
    } else {
        let head: [u8; IPV6_NEXT_OFF + 1] = ctx.read(ip_off)?;
        if head[0] >> 4 != 6 {
            return None;
        }
        (head[IPV6_NEXT_OFF], IPV6_HDR_LEN)
    };
    let csum_off = match l4_proto {
        p if p == proto::TCP => Some(TCP_CSUM_OFF),
        p if p == proto::UDP => Some(UDP_CSUM_OFF),
        p if p == proto::SCTP => None,
        _ => return None,
    };
    if ip_hdr_len < 20 {
        return None;
    }
    // Both addresses in one read: they are adjacent in either header, and
    // one bounds check for each would let the compiler drop one the
    // verifier needs in an XDP frame.
    const _: () = assert!(V4::DADDR_OFF == V4::SADDR_OFF + 4);
    const _: () = assert!(V6::DADDR_OFF == V6::SADDR_OFF + 16);
    let addrs: [F::Addr; 2] = ctx.read(ip_off + F::SADDR_OFF)?;
    let l4_off = ip_off + ip_hdr_len;
    let ports: [u8; 4] = ctx.read(l4_off)?;
    let l4_csum_off = match csum_off.and_then(|off| ctx.read::<u16>(l4_off + off).map(|c| (off, c)))
    {
        Some((_, 0)) if l4_proto == proto::UDP => 0,
        Some((off, _)) => l4_off + off,
        None => 0,
    };
    Some(Quote {
        icmp_off,
        ip_off,
        inner: Flow {
            l4_off,
            ip_hdr_len,
            proto: l4_proto,
            saddr: addrs[0],
            daddr: addrs[1],
            sport: u16::from_ne_bytes([ports[0], ports[1]]),
            dport: u16::from_ne_bytes([ports[2], ports[3]]),
            external: false,
            tcp_flags: 0,
        },
        l4_csum_off,
    })
}

/// Rewrites the error `q` as the client must see it: the quoted packet from
/// `client:client_port` to `frontend:frontend_port`, the error itself from
/// the frontend to the client. Every checksum is updated for what changed
/// under it (RFC 1624): the quoted IP header's and L4 checksum, the ICMP
/// checksum over the quote (and, for ICMPv6, over the outer addresses), and
/// the outer IPv4 header's.
#[inline(always)]
pub fn translate<C: Packet, F: Family>(
    ctx: &C,
    q: &Quote<F>,
    client: F::Addr,
    client_port: u16,
    frontend: F::Addr,
    frontend_port: u16,
) -> Result<(), Dropped> {
    let bad = Dropped(Stat::DropRewrite);
    let icmp_csum_off = q.icmp_off + 2;
    let mut icmp: u16 = ctx.read(icmp_csum_off).ok_or(bad)?;
    let old_l4: u16 = if q.l4_csum_off != 0 {
        ctx.read(q.l4_csum_off).ok_or(Dropped(Stat::DropRewrite))?
    } else {
        0
    };
    let old_ip: u16 = if F::IP_CSUM {
        ctx.read(q.ip_off + IP_CSUM_OFF)
            .ok_or(Dropped(Stat::DropRewrite))?
    } else {
        0
    };
    let (mut l4, mut ip) = (old_l4, old_ip);
    // The quoted addresses: under the quoted IP header's checksum (IPv4),
    // the quoted L4 checksum's pseudo-header, and the ICMP checksum.
    if q.inner.saddr != client {
        for (old, new) in F::words(&q.inner.saddr).iter().zip(F::words(&client)) {
            ip = csum::replace4(ip, *old, *new);
            l4 = csum::replace4(l4, *old, *new);
            icmp = csum::replace4(icmp, *old, *new);
        }
        ctx.write(q.ip_off + F::SADDR_OFF, &client)?;
    }
    if q.inner.daddr != frontend {
        for (old, new) in F::words(&q.inner.daddr).iter().zip(F::words(&frontend)) {
            ip = csum::replace4(ip, *old, *new);
            l4 = csum::replace4(l4, *old, *new);
            icmp = csum::replace4(icmp, *old, *new);
        }
        ctx.write(q.ip_off + F::DADDR_OFF, &frontend)?;
    }
    // The quoted ports: under the L4 and ICMP checksums.
    if q.inner.sport != client_port {
        l4 = csum::replace2(l4, q.inner.sport, client_port);
        icmp = csum::replace2(icmp, q.inner.sport, client_port);
        ctx.write(q.inner.l4_off, &client_port)?;
    }
    if q.inner.dport != frontend_port {
        l4 = csum::replace2(l4, q.inner.dport, frontend_port);
        icmp = csum::replace2(icmp, q.inner.dport, frontend_port);
        ctx.write(q.inner.l4_off + 2, &frontend_port)?;
    }
    // The quoted checksums are themselves under the ICMP checksum.
    if F::IP_CSUM && ip != old_ip {
        icmp = csum::replace2(icmp, old_ip, ip);
        ctx.write(q.ip_off + IP_CSUM_OFF, &ip)?;
    }
    if q.l4_csum_off != 0 {
        if q.inner.proto == proto::UDP && l4 == 0 {
            l4 = 0xffff;
        }
        icmp = csum::replace2(icmp, old_l4, l4);
        ctx.write(q.l4_csum_off, &l4)?;
    }
    // The outer addresses: under the outer IPv4 header's checksum, or
    // ICMPv6's pseudo-header.
    let outer_src: F::Addr = ctx
        .read(ETH_LEN + F::SADDR_OFF)
        .ok_or(Dropped(Stat::DropRewrite))?;
    let outer_dst: F::Addr = ctx
        .read(ETH_LEN + F::DADDR_OFF)
        .ok_or(Dropped(Stat::DropRewrite))?;
    let mut outer_ip: u16 = if F::IP_CSUM {
        ctx.read(ETH_LEN + IP_CSUM_OFF)
            .ok_or(Dropped(Stat::DropRewrite))?
    } else {
        0
    };
    for (old, new, off) in [
        (outer_src, frontend, F::SADDR_OFF),
        (outer_dst, client, F::DADDR_OFF),
    ] {
        if old == new {
            continue;
        }
        for (o, n) in F::words(&old).iter().zip(F::words(&new)) {
            if F::IP_CSUM {
                outer_ip = csum::replace4(outer_ip, *o, *n);
            } else {
                icmp = csum::replace4(icmp, *o, *n);
            }
        }
        ctx.write(ETH_LEN + off, &new)?;
    }
    if F::IP_CSUM {
        ctx.write(ETH_LEN + IP_CSUM_OFF, &outer_ip)?;
    }
    ctx.write(icmp_csum_off, &icmp)
}

/// Where a translated error goes: to `client`, from `frontend`.
pub struct Back<F: Family> {
    pub frontend: F::Addr,
    pub client: F::Addr,
    /// The client is the backend pod itself.
    pub hairpin: bool,
}

/// An error about the backend's side of a DNATed flow (its quote: a packet
/// from the client's side to the backend, whose answers the flow's reply
/// entry knows), translated back for the client. None if conntrack knows
/// no such flow.
#[inline(always)]
pub fn reverse_nat<C: Packet, F: Family>(
    ctx: &C,
    icmp_off: usize,
) -> Result<Option<Back<F>>, Dropped> {
    let Some(q) = quote::<C, F>(ctx, icmp_off) else {
        return Ok(None);
    };
    let Some(reply) = ct::reply(&q.answer()) else {
        return Ok(None);
    };
    let frontend = F::revnat(reply.rev_nat_id).ok_or(Dropped(Stat::DropNoRevnat))?;
    // A hairpinned flow's client is the backend pod itself, which the
    // quote names as its destination.
    let client = if reply.hairpin {
        q.inner.daddr
    } else {
        q.inner.saddr
    };
    let client_port = if reply.remap_port_be != 0 {
        reply.remap_port_be
    } else {
        q.inner.sport
    };
    translate(
        ctx,
        &q,
        client,
        client_port,
        frontend.addr(),
        frontend.port_be(),
    )?;
    Ok(Some(Back {
        frontend: frontend.addr(),
        client,
        hairpin: reply.hairpin,
    }))
}
