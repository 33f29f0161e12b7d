//! Random and mutated frames (short, a bad IHL or total length, options,
//! fragments, flipped bytes, random bytes) through `from_pod` and `to_pod`,
//! each compared with a small reference model of what must happen: a frame
//! is rewritten only if it is a TCP or UDP packet (or a first fragment) to a
//! frontend, or the reply of a flow the programs translated, or a later
//! fragment of such a datagram whose first fragment passed (its addresses
//! only); and every frame rewritten from one whose checksums were valid has
//! valid checksums.

use std::collections::HashMap;

use super::*;

/// A small deterministic generator (xorshift64*), so a failure replays.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub(super) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What the model says must happen to a frame.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Untouched,
    /// To one of these backends (address, port), the rest as it was.
    Translated(Vec<(Ipv4Addr, u16)>),
    /// An ICMP port unreachable back to the sender.
    Rejected,
    /// The reply of a translated flow: its source back to the frontend.
    ReverseNat(Ipv4Addr, u16),
    /// A later fragment of a datagram to a frontend: its destination (to
    /// one of these backends) and the IPv4 checksum rewritten, nothing else.
    FragmentTo(Vec<Ipv4Addr>),
    /// A later fragment of a reply: its source (back to this frontend) and
    /// the IPv4 checksum rewritten, nothing else.
    FragmentFrom(Ipv4Addr),
    /// A later fragment of a datagram to a frontend without backends.
    Dropped,
}

/// The datagram of an IPv4 fragment: (source, destination, id, protocol).
type Datagram = (Ipv4Addr, Ipv4Addr, u16, u8);

/// The datagram of a later IPv4 fragment (one with an offset) whose header
/// is sound; None for anything else.
fn later_fragment(frame: &[u8]) -> Option<Datagram> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let frag = u16::from_be_bytes([frame[20], frame[21]]);
    if ihl < 20 || total < ihl || 14 + total > frame.len() || frag & 0x1fff == 0 {
        return None;
    }
    let ip = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    Some((
        ip(26),
        ip(30),
        u16::from_be_bytes([frame[18], frame[19]]),
        frame[23],
    ))
}

/// The first fragment's datagram, for a whole packet with more fragments.
fn first_fragment(frame: &[u8]) -> Option<Datagram> {
    let (proto, saddr, _, daddr, _) = whole_packet(frame)?;
    let frag = u16::from_be_bytes([frame[20], frame[21]]);
    (frag & 0x2000 != 0).then(|| {
        (
            saddr,
            daddr,
            u16::from_be_bytes([frame[18], frame[19]]),
            proto,
        )
    })
}

/// Whether `out` is `frame` with only the IPv4 checksum and the address at
/// `at` changed, to one of `addrs`, the checksum valid if it was.
fn only_address_changed(frame: &[u8], out: &[u8], at: usize, addrs: &[Ipv4Addr]) -> bool {
    let ip = Ipv4Addr::new(out[at], out[at + 1], out[at + 2], out[at + 3]);
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let valid = |f: &[u8]| packet::checksum(&f[14..14 + ihl]) == 0;
    out.len() == frame.len()
        && addrs.contains(&ip)
        && (0..frame.len())
            .all(|i| frame[i] == out[i] || (24..26).contains(&i) || (at..at + 4).contains(&i))
        && (!valid(frame) || valid(out))
}

/// The fields of a whole IPv4 TCP or UDP packet, or of a first fragment
/// (which holds the L4 header); None for anything else.
fn whole_packet(frame: &[u8]) -> Option<(u8, Ipv4Addr, u16, Ipv4Addr, u16)> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let frag = u16::from_be_bytes([frame[20], frame[21]]);
    let proto = frame[23];
    let l4_len = match proto {
        6 => 20,
        17 => 8,
        _ => return None,
    };
    if ihl < 20 || total < ihl + l4_len || 14 + total > frame.len() || frag & 0x1fff != 0 {
        return None;
    }
    let ip = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let l4 = 14 + ihl;
    Some((proto, ip(26), port(l4), ip(30), port(l4 + 2)))
}

/// Whether the IPv4 header and the TCP, UDP or ICMP checksum of a frame
/// holding a whole IPv4 packet are valid.
fn checksums_valid(frame: &[u8]) -> bool {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    if ihl < 20 || total < ihl || frame.len() < 14 + total {
        return false;
    }
    let (ip, l4) = (&frame[14..14 + ihl], &frame[14 + ihl..14 + total]);
    let proto = frame[23];
    if packet::checksum(ip) != 0 {
        return false;
    }
    if proto == 1 {
        return packet::checksum(l4) == 0;
    }
    if proto == proto::UDP && l4.get(6..8) == Some(&[0, 0]) {
        return true;
    }
    let mut pseudo = ip[12..20].to_vec();
    pseudo.extend([0, proto]);
    pseudo.extend((l4.len() as u16).to_be_bytes());
    pseudo.extend(l4);
    packet::checksum(&pseudo) == 0
}

/// A frame to mutate: TCP or UDP, to a frontend, an empty frontend or
/// elsewhere, sometimes with options, a payload or a trailer.
fn base(rng: &mut Rng, sport: u16) -> Frame {
    let (proto, daddr, dport) = *rng.pick(&[
        (proto::TCP, VIP, 80),
        (proto::UDP, VIP, 53),
        (proto::TCP, EMPTY_VIP, 80),
        (proto::TCP, "10.96.0.99", 80),
        (proto::UDP, VIP, 80),
    ]);
    let mut f = Frame::of(proto, ip(CLIENT), sport, ip(daddr), dport);
    if rng.below(4) == 0 {
        f.options = vec![1; 4 * (1 + rng.below(10))];
    }
    if rng.below(3) == 0 {
        f.payload = vec![0x5a; rng.below(200)];
    }
    if rng.below(6) == 0 {
        f.trailer = vec![0; 1 + rng.below(20)];
    }
    f
}

/// One of the mutations, or none. Frames keep their 14 bytes of Ethernet
/// header: tc never sees less (and BPF_PROG_TEST_RUN refuses less).
fn mutate(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    match rng.below(9) {
        0 => bytes.truncate(14 + rng.below(bytes.len() - 14)),
        1 if bytes.len() > 14 => bytes[14] = (bytes[14] & 0xf0) | rng.below(16) as u8,
        2 if bytes.len() > 17 => {
            let total = rng.below(1600) as u16;
            bytes[16..18].copy_from_slice(&total.to_be_bytes());
        }
        3 if bytes.len() > 21 => {
            let frag = *rng.pick(&[0x2000u16, 0x0001, 0x2010, 0x1fff]);
            bytes[20..22].copy_from_slice(&frag.to_be_bytes());
        }
        4 => {
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(bytes.len());
                bytes[at] ^= 1 << rng.below(8);
            }
        }
        5 => {
            let len = 14 + rng.below(120);
            bytes = (0..len).map(|_| rng.next() as u8).collect();
            if len > 15 && rng.below(2) == 0 {
                bytes[12..14].copy_from_slice(&[0x08, 0x00]);
                bytes[14] = 0x45;
            }
        }
        6 if bytes.len() > 13 => bytes[12..14].copy_from_slice(&[0x86, 0xdd]),
        _ => {}
    }
    pad_for_test_run(bytes)
}

/// BPF_PROG_TEST_RUN refuses an IPv4 frame shorter than an IPv4 header and
/// an IPv6 one shorter than an IPv6 header: `bytes` padded with zeros to
/// its EtherType's least.
pub(super) fn pad_for_test_run(mut bytes: Vec<u8>) -> Vec<u8> {
    let least = match bytes[12..14] {
        [0x08, 0x00] => 34,
        [0x86, 0xdd] => 54,
        _ => 14,
    };
    if bytes.len() < least {
        bytes.resize(least, 0);
    }
    bytes
}

/// What must happen to `frame`, given the flows translated so far and the
/// ports of the datagrams whose first fragment passed.
fn model(
    frame: &[u8],
    flows: &[(Frame, (Ipv4Addr, u16))],
    datagrams: &HashMap<Datagram, (u16, u16)>,
) -> Expect {
    let later = later_fragment(frame);
    let (proto, saddr, sport, daddr, dport) = match (whole_packet(frame), later) {
        (Some(fields), _) => fields,
        (None, Some(datagram)) => match datagrams.get(&datagram) {
            Some(&(sport, dport)) => (datagram.3, datagram.0, sport, datagram.1, dport),
            None => return Expect::Untouched,
        },
        (None, None) => return Expect::Untouched,
    };
    let backends = match (daddr.to_string().as_str(), dport, proto) {
        (VIP, 80, proto::TCP) => vec![(ip(BACKEND_A), 8080), (ip(BACKEND_B), 8080)],
        (VIP, 53, proto::UDP) => vec![(ip(BACKEND_A), 5353), (ip(BACKEND_B), 5353)],
        (EMPTY_VIP, 80, proto::TCP) if later.is_some() => return Expect::Dropped,
        (EMPTY_VIP, 80, proto::TCP) => return Expect::Rejected,
        _ => Vec::new(),
    };
    if !backends.is_empty() {
        if later.is_some() {
            return Expect::FragmentTo(backends.iter().map(|b| b.0).collect());
        }
        return Expect::Translated(backends);
    }
    for (sent, backend) in flows {
        let reply = (proto, saddr, sport, daddr, dport)
            == (sent.proto, backend.0, backend.1, sent.saddr4(), sent.sport);
        if reply && later.is_some() {
            return Expect::FragmentFrom(sent.daddr4());
        }
        if reply {
            return Expect::ReverseNat(sent.daddr4(), sent.dport);
        }
    }
    Expect::Untouched
}

#[test]
fn random_and_mutated_frames_are_rewritten_only_as_the_model_says() {
    let mut p = Programs::new(&cluster());
    let mut rng = Rng(0x5eed_f00d_cafe_beef);
    let mut flows: Vec<(Frame, (Ipv4Addr, u16))> = Vec::new();
    let mut datagrams = HashMap::new();
    let mut failures = Vec::new();
    let mut later_fragments = 0;
    let (mut rewritten, mut untouched) = (0, 0);
    for i in 0..20000u16 {
        let sport = 10000 + i;
        let to_pod = rng.below(3) == 0 && !flows.is_empty();
        let frame = if to_pod {
            // A translated flow's reply, mutated or not, or a stranger's.
            let (sent, backend) = rng.pick(&flows).clone();
            let mut reply = sent.with_dst(backend.0, backend.1).reply();
            if rng.below(3) == 0 {
                reply.saddr = ip("10.244.9.9").into();
            }
            mutate(&mut rng, reply.bytes())
        } else {
            let bytes = base(&mut rng, sport).bytes();
            mutate(&mut rng, bytes)
        };
        let program = if to_pod { TO_POD } else { FROM_POD };
        let expect = model(&frame, &flows, &datagrams);
        if matches!(
            expect,
            Expect::FragmentTo(_) | Expect::FragmentFrom(_) | Expect::Dropped
        ) {
            later_fragments += 1;
        }
        let (verdict, out) = p.run(program, &frame);
        let valid_in = whole_packet(&frame).is_some() && checksums_valid(&frame);
        let fields = whole_packet(&out);
        let ok = match &expect {
            Expect::Untouched => out == frame && [TC_ACT_UNSPEC, TC_ACT_SHOT].contains(&verdict),
            Expect::Rejected => {
                verdict == TC_ACT_REDIRECT && out.get(23) == Some(&1) && checksums_valid(&out)
            }
            Expect::Translated(backends) => fields.is_some_and(|(_, s, sp, d, dp)| {
                let input = whole_packet(&frame).unwrap();
                // A pod that reaches itself is hairpinned from the
                // link-local address.
                let hairpin = s == Ipv4Addr::new(169, 254, 42, 1) && d == input.1;
                backends.contains(&(d, dp))
                    && (s == input.1 || hairpin)
                    && (sp == input.2 || sp >= 61000)
                    && (!valid_in || checksums_valid(&out))
            }),
            Expect::ReverseNat(vip, vport) => fields.is_some_and(|(_, s, sp, _, _)| {
                (s, sp) == (*vip, *vport) && (!valid_in || checksums_valid(&out))
            }),
            Expect::FragmentTo(backends) => {
                verdict == TC_ACT_UNSPEC && only_address_changed(&frame, &out, 30, backends)
            }
            Expect::FragmentFrom(vip) => {
                verdict == TC_ACT_UNSPEC && only_address_changed(&frame, &out, 26, &[*vip])
            }
            Expect::Dropped => verdict == TC_ACT_SHOT && out == frame,
        };
        // A first fragment the programs parsed leaves its ports for the
        // rest of its datagram.
        if let Some(datagram) = first_fragment(&frame) {
            let (_, _, sport, _, dport) = whole_packet(&frame).unwrap();
            datagrams.insert(datagram, (sport, dport));
        }
        if out == frame {
            untouched += 1;
        } else {
            rewritten += 1;
        }
        if !ok {
            failures.push(format!(
                "frame {i} through {program}: expected {expect:?}, verdict {verdict}\n in  {frame:02x?}\n out {out:02x?}"
            ));
        }
        // A whole packet the programs translated: its reply comes later.
        // (with the client port the backend saw, remapped or not).
        if let (Expect::Translated(_), Some((_, s, sp, d, dp)), false) = (&expect, fields, to_pod) {
            let (proto, _, _, daddr, dport) = whole_packet(&frame).unwrap();
            let mut sent = Frame::of(proto, s, sp, daddr, dport);
            sent.tcp_flags = 0x12;
            flows.push((sent, (d, dp)));
        }
    }
    eprintln!(
        "{rewritten} frames rewritten, {untouched} untouched; {later_fragments} later fragments of a datagram whose first passed"
    );
    assert!(
        rewritten > 2500 && untouched > 2500 && later_fragments > 100,
        "the mix is too one-sided"
    );
    assert!(
        failures.is_empty(),
        "{} of 20000 frames:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
}
