//! The flow hash that picks a backend slot. Kernel and agent share it, so the
//! agent (and the tests) can say which backend a given flow lands on.

const SEED: u32 = 0x9e37_79b9;

#[inline(always)]
fn mix(mut h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    h ^= k;
    h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of an IPv4 5-tuple. Arguments are the raw network-byte-order values as
/// they sit in the packet (loaded as native integers).
#[inline(always)]
pub fn flow_hash4(saddr_be: u32, daddr_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let ports = (u32::from(sport_be) << 16) | u32::from(dport_be);
    let mut h = mix(SEED, saddr_be);
    h = mix(h, daddr_be);
    h = mix(h, ports);
    h = mix(h, u32::from(proto));
    finish(h)
}

/// Hash of an IPv6 5-tuple: each address as four 32-bit words, loaded as
/// native integers from network order like [`flow_hash4`]'s.
#[inline(always)]
pub fn flow_hash6(
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let ports = (u32::from(sport_be) << 16) | u32::from(dport_be);
    let mut h = SEED;
    for word in saddr {
        h = mix(h, word);
    }
    for word in daddr {
        h = mix(h, word);
    }
    h = mix(h, ports);
    h = mix(h, u32::from(proto));
    finish(h)
}

/// The backend slot (1-based) a flow hash selects among `count` slots. Callers
/// handle `count == 0` first; the checked remainder keeps any panic path (which
/// the verifier would refuse) out of the eBPF programs.
#[inline(always)]
pub fn slot_for(hash: u32, count: u16) -> u16 {
    hash.checked_rem(u32::from(count)).unwrap_or(0) as u16 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stay_in_range_and_spread() {
        let mut seen = [0u32; 4];
        for port in 0..4000u16 {
            let h = flow_hash4(0x0201_f40a, 0x0a00_600a, port.to_be(), 80u16.to_be(), 6);
            let slot = slot_for(h, 4);
            assert!((1..=4).contains(&slot));
            seen[usize::from(slot - 1)] += 1;
        }
        for n in seen {
            assert!((800..1200).contains(&n), "uneven spread: {seen:?}");
        }
    }

    #[test]
    fn ipv6_hash_depends_on_every_word() {
        let (s, d) = ([1, 2, 3, 4], [5, 6, 7, 8]);
        let base = flow_hash6(s, d, 9, 10, 6);
        for i in 0..4 {
            let mut other = s;
            other[i] ^= 1;
            assert_ne!(base, flow_hash6(other, d, 9, 10, 6), "source word {i}");
            let mut other = d;
            other[i] ^= 1;
            assert_ne!(base, flow_hash6(s, other, 9, 10, 6), "destination word {i}");
        }
        assert_ne!(base, flow_hash6(s, d, 11, 10, 6));
        assert_ne!(base, flow_hash6(s, d, 9, 11, 6));
        assert_ne!(base, flow_hash6(s, d, 9, 10, 17));
        assert_ne!(base, flow_hash6(d, s, 9, 10, 6), "direction");
    }

    #[test]
    fn hash_depends_on_every_field() {
        let base = flow_hash4(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash4(9, 2, 3, 4, 6));
        assert_ne!(base, flow_hash4(1, 9, 3, 4, 6));
        assert_ne!(base, flow_hash4(1, 2, 9, 4, 6));
        assert_ne!(base, flow_hash4(1, 2, 3, 9, 6));
        assert_ne!(base, flow_hash4(1, 2, 3, 4, 17));
    }
}
