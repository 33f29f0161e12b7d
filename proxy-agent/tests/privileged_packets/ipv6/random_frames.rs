//! Random and mutated IPv6 frames (short, another version, a payload length
//! past the end or short of the headers, extension headers of every kind and
//! length, a routing header with segments left, fragments, flipped bytes,
//! random bytes) through `from_pod` and `to_pod`, each compared with a small
//! reference model of the extension-header walk: a frame is rewritten only
//! if it is a whole, unfragmented TCP or UDP packet to a frontend behind at
//! most four extension headers (or the reply of a flow the programs
//! translated), and every frame rewritten from one whose checksum was valid
//! has a valid checksum. The twin of `random_frames.rs`.

use crate::random_frames::{pad_for_test_run, Rng};

use super::*;

/// How many extension headers the programs walk (`proxy-ebpf`'s flow.rs).
const MAX_EXT_HEADERS: usize = 4;

/// A packet's protocol, source address and port, destination address and port.
type Tuple6 = (u8, Ipv6Addr, u16, Ipv6Addr, u16);

/// The fields of a whole, unfragmented IPv6 TCP or UDP packet, and where
/// its L4 header starts; None for anything else. The walk reads each
/// extension header's first bytes from the frame, as the programs do.
fn whole6(frame: &[u8]) -> Option<(Tuple6, usize)> {
    if frame.len() < 54 || frame[12..14] != [0x86, 0xdd] || frame[14] >> 4 != 6 {
        return None;
    }
    let total = 40 + usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    if 14 + total > frame.len() {
        return None;
    }
    let (mut next, mut header) = (frame[20], 40);
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            packet::HOP_BY_HOP | packet::DEST_OPTS | packet::ROUTING => {
                let ext = frame.get(14 + header..14 + header + 4)?;
                if next == packet::ROUTING && ext[3] != 0 {
                    return None;
                }
                next = ext[0];
                header += (usize::from(ext[1]) + 1) * 8;
            }
            _ => break,
        }
    }
    let l4_len = match next {
        proto::TCP => 20,
        proto::UDP => 8,
        _ => return None,
    };
    if header + l4_len > total {
        return None;
    }
    let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&frame[at..at + 16]).unwrap());
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let l4 = 14 + header;
    Some(((next, addr(22), port(l4), addr(38), port(l4 + 2)), l4))
}

/// Whether the L4 checksum (TCP, UDP or ICMPv6) of a frame holding a whole
/// IPv6 packet, its L4 header at `l4`, is valid. A zero UDP checksum is not:
/// IPv6 requires one.
fn checksum_valid(frame: &[u8], l4: usize, proto: u8) -> bool {
    let total = 40 + usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    let Some(l4) = frame.get(l4..14 + total) else {
        return false;
    };
    let src: [u8; 16] = frame[22..38].try_into().unwrap();
    let dst: [u8; 16] = frame[38..54].try_into().unwrap();
    let mut pseudo = Vec::new();
    pseudo.extend(src);
    pseudo.extend(dst);
    pseudo.extend((l4.len() as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, proto]);
    pseudo.extend(l4);
    packet::checksum(&pseudo) == 0
}

/// A frame to mutate: TCP or UDP, to a frontend, an empty frontend or
/// elsewhere, sometimes behind extension headers, with a payload or a trailer.
fn base(rng: &mut Rng, sport: u16) -> Frame {
    let (proto, daddr, dport) = *rng.pick(&[
        (proto::TCP, VIP6, 80),
        (proto::UDP, VIP6, 53),
        (proto::TCP, EMPTY_VIP6, 80),
        (proto::TCP, "fd00:10:96::99", 80),
        (proto::UDP, VIP6, 80),
    ]);
    let mut f = Frame::of(proto, ip6(CLIENT6), sport, ip6(daddr), dport);
    if rng.below(3) == 0 {
        let kinds = [
            packet::HOP_BY_HOP,
            packet::DEST_OPTS,
            packet::ROUTING,
            packet::FRAGMENT,
        ];
        f.ext6 = (0..1 + rng.below(5)).map(|_| *rng.pick(&kinds)).collect();
        f.segments_left = *rng.pick(&[0, 0, 1]);
    }
    if rng.below(3) == 0 {
        f.payload = vec![0x5a; rng.below(200)];
    }
    if rng.below(6) == 0 {
        f.trailer = vec![0; 1 + rng.below(20)];
    }
    f
}

/// One of the mutations, or none; the Ethernet header stays (see the IPv4
/// twin).
fn mutate(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    match rng.below(10) {
        0 => bytes.truncate(14 + rng.below(bytes.len() - 14)),
        1 => bytes[14] = ((rng.below(16) as u8) << 4) | (bytes[14] & 0x0f),
        2 => {
            let payload = rng.below(1600) as u16;
            bytes[18..20].copy_from_slice(&payload.to_be_bytes());
        }
        3 => {
            let any = rng.next() as u8;
            bytes[20] = *rng.pick(&[0, 6, 17, 43, 44, 58, 60, any]);
        }
        4 => {
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(bytes.len());
                bytes[at] ^= 1 << rng.below(8);
            }
        }
        5 => {
            let len = 14 + rng.below(160);
            bytes = (0..len).map(|_| rng.next() as u8).collect();
            if len > 15 && rng.below(2) == 0 {
                bytes[12..14].copy_from_slice(&[0x86, 0xdd]);
                bytes[14] = 0x60;
            }
        }
        6 => bytes[12..14].copy_from_slice(&[0x08, 0x00]),
        // The first extension header's length, if there is one.
        7 if bytes.len() > 55 => bytes[55] = rng.next() as u8,
        _ => {}
    }
    pad_for_test_run(bytes)
}

/// What the model says must happen to a frame.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Untouched,
    /// To one of these backends (address, port), the rest as it was.
    Translated(Vec<(Ipv6Addr, u16)>),
    /// An ICMPv6 port unreachable back to the sender.
    Rejected,
    /// The reply of a translated flow: its source back to the frontend.
    ReverseNat(Ipv6Addr, u16),
}

/// A translated flow as the backend saw it (the client's address and port,
/// the frontend), and its backend.
type Flow6 = (Tuple6, (Ipv6Addr, u16));

fn model(frame: &[u8], flows: &[Flow6]) -> Expect {
    let Some(((proto, saddr, sport, daddr, dport), _)) = whole6(frame) else {
        return Expect::Untouched;
    };
    let both = |port| vec![(ip6(BACKEND6_A), port), (ip6(BACKEND6_B), port)];
    if daddr == ip6(VIP6) {
        match (dport, proto) {
            (80, proto::TCP) => return Expect::Translated(both(8080)),
            (53, proto::UDP) => return Expect::Translated(both(5353)),
            _ => {}
        }
    }
    if daddr == ip6(EMPTY_VIP6) && [(80, proto::TCP), (53, proto::UDP)].contains(&(dport, proto)) {
        return Expect::Rejected;
    }
    for ((sent_proto, client, client_port, vip, vport), backend) in flows {
        if (proto, saddr, sport, daddr, dport)
            == (*sent_proto, backend.0, backend.1, *client, *client_port)
        {
            return Expect::ReverseNat(*vip, *vport);
        }
    }
    Expect::Untouched
}

#[test]
fn random_and_mutated_ipv6_frames_are_rewritten_only_as_the_model_says() {
    let mut p = dual_stack();
    let mut rng = Rng(0x5eed_f00d_cafe_0006);
    let mut flows: Vec<Flow6> = Vec::new();
    let mut failures = Vec::new();
    let (mut rewritten, mut untouched) = (0, 0);
    for i in 0..20000u16 {
        let sport = 10000 + i;
        let to_pod = rng.below(3) == 0 && !flows.is_empty();
        let frame = if to_pod {
            // A translated flow's reply, mutated or not, or a stranger's.
            let ((proto, client, client_port, _, _), backend) = *rng.pick(&flows);
            let mut reply = Frame::of(proto, backend.0, backend.1, client, client_port);
            reply.tcp_flags = 0x12;
            if rng.below(3) == 0 {
                reply.saddr = ip6("fd00:10:244:9::9").into();
            }
            mutate(&mut rng, reply.bytes())
        } else {
            let bytes = base(&mut rng, sport).bytes();
            mutate(&mut rng, bytes)
        };
        let program = if to_pod { TO_POD } else { FROM_POD };
        let expect = model(&frame, &flows);
        let (verdict, out) = p.run(program, &frame);
        let input = whole6(&frame);
        let valid_in = input.is_some_and(|((proto, ..), l4)| checksum_valid(&frame, l4, proto));
        let output = whole6(&out);
        let valid_out = || output.is_some_and(|((proto, ..), l4)| checksum_valid(&out, l4, proto));
        let ok = match &expect {
            Expect::Untouched => out == frame && [TC_ACT_UNSPEC, TC_ACT_SHOT].contains(&verdict),
            Expect::Rejected => {
                verdict == TC_ACT_REDIRECT
                    && out.get(20) == Some(&packet::ICMP6)
                    && out.get(54) == Some(&1)
                    && checksum_valid(&out, 54, packet::ICMP6)
            }
            Expect::Translated(backends) => output.is_some_and(|((_, s, sp, d, dp), _)| {
                let ((_, client, client_port, ..), _) = input.unwrap();
                backends.contains(&(d, dp))
                    && s == client
                    && (sp == client_port || sp >= 61000)
                    && (!valid_in || valid_out())
            }),
            Expect::ReverseNat(vip, vport) => output.is_some_and(|((_, s, sp, ..), _)| {
                (s, sp) == (*vip, *vport) && (!valid_in || valid_out())
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
        // A whole packet the programs translated: its reply comes later,
        // to the client port the backend saw (remapped or not).
        if let (Expect::Translated(_), Some(((proto, s, sp, d, dp), _)), false) =
            (&expect, output, to_pod)
        {
            let ((_, _, _, vip, vport), _) = input.unwrap();
            flows.push(((proto, s, sp, vip, vport), (d, dp)));
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
