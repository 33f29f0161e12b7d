//! Random and mutated frames (short, a bad IHL or total length, options,
//! fragments, flipped bytes, random bytes) through `from_pod` and `to_pod`,
//! each compared with a small reference model of what must happen: a frame
//! is rewritten only if it is a whole, unfragmented TCP or UDP packet to a
//! frontend (or the reply of a flow the programs translated), and every frame
//! rewritten from one whose checksums were valid has valid checksums.

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
}

/// The fields of a whole, unfragmented IPv4 TCP or UDP packet; None for
/// anything else.
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
    if ihl < 20 || total < ihl + l4_len || 14 + total > frame.len() || frag & 0x3fff != 0 {
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

fn model(frame: &[u8], flows: &[(Frame, (Ipv4Addr, u16))]) -> Expect {
    let Some((proto, saddr, sport, daddr, dport)) = whole_packet(frame) else {
        return Expect::Untouched;
    };
    let backends = match (daddr.to_string().as_str(), dport, proto) {
        (VIP, 80, proto::TCP) => vec![(ip(BACKEND_A), 8080), (ip(BACKEND_B), 8080)],
        (VIP, 53, proto::UDP) => vec![(ip(BACKEND_A), 5353), (ip(BACKEND_B), 5353)],
        (EMPTY_VIP, 80, proto::TCP) => return Expect::Rejected,
        _ => Vec::new(),
    };
    if !backends.is_empty() {
        return Expect::Translated(backends);
    }
    for (sent, backend) in flows {
        let reply = (proto, saddr, sport, daddr, dport)
            == (sent.proto, backend.0, backend.1, sent.saddr4(), sent.sport);
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
    let mut failures = Vec::new();
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
        let expect = model(&frame, &flows);
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
        };
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
    eprintln!("{rewritten} frames rewritten, {untouched} untouched");
    assert!(
        rewritten > 2500 && untouched > 2500,
        "the mix is too one-sided"
    );
    assert!(
        failures.is_empty(),
        "{} of 20000 frames:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
}
