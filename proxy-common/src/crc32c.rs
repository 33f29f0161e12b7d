//! CRC32c (Castagnoli, RFC 3309), SCTP's checksum, and how it changes when
//! a packet's first bytes (SCTP's ports) change.
//!
//! Unlike the Internet checksum, a CRC cannot be patched with the changed
//! bytes alone: a change's effect on it depends on how many bytes follow.
//! But it is linear over GF(2): for two messages of one length, the XOR of
//! their CRCs is the raw CRC (no initial value, no final XOR) of the XOR of
//! the messages. A change `d` in the first four bytes of an `n`-byte message
//! moves the CRC by `d · x^(8n) mod P`, which takes a few carry-less
//! multiplications (`port_change`) rather than a pass over the packet.
//!
//! Polynomials are held reflected, as the CRC register is: bit 31 is the
//! coefficient of x^0, bit 0 that of x^31. The eBPF programs use this: every
//! loop is bounded and without branches (the verifier walks each branch),
//! and the powers of x come from two tables of 256 words (`POWERS_LOW`,
//! `POWERS_HIGH`, read-only data the loader puts in a map), so a change
//! costs three multiplications.

/// P(x), the Castagnoli polynomial, reflected (x^32 implied).
const POLY: u32 = 0x82f6_3b78;
/// The polynomial 1.
const ONE: u32 = 1 << 31;

/// `a(x) · x mod P(x)`.
#[inline(always)]
const fn times_x(a: u32) -> u32 {
    (a >> 1) ^ (POLY & (a & 1).wrapping_neg())
}

/// `a(x) · b(x) mod P(x)`.
#[inline(always)]
pub const fn multiply(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut i = 0;
    while i < 32 {
        // b is b(x) · x^i here; a's bit 31 - i is its coefficient of x^i.
        product ^= b & ((a >> (31 - i)) & 1).wrapping_neg();
        b = times_x(b);
        i += 1;
    }
    product
}

/// `x^(8 · step · i) mod P(x)` for i in 0..256.
const fn powers(step: u32) -> [u32; 256] {
    let mut table = [0; 256];
    // x^(8 · step): step bytes.
    let mut base = ONE;
    let mut i = 0;
    while i < step {
        base = multiply(base, ONE >> 8);
        i += 1;
    }
    let mut power = ONE;
    let mut i = 0;
    while i < 256 {
        table[i] = power;
        power = multiply(power, base);
        i += 1;
    }
    table
}

/// What `n` bytes do to a register, for `n` below 256, and for 256 · `n`.
pub static POWERS_LOW: [u32; 256] = powers(1);
pub static POWERS_HIGH: [u32; 256] = powers(256);

/// `x^(8n) mod P(x)`: what `n` bytes do to a register.
#[inline(always)]
fn bytes_power(n: u16) -> u32 {
    let [high, low] = n.to_be_bytes();
    multiply(POWERS_LOW[usize::from(low)], POWERS_HIGH[usize::from(high)])
}

/// The CRC32c field of an SCTP packet of `len` bytes (its common header
/// and chunks) after its first four bytes (the ports) changed from `old` to
/// `new`. The field is as the packet holds it (the CRC, little-endian).
#[inline(always)]
pub fn port_change(field: [u8; 4], old: [u8; 4], new: [u8; 4], len: u16) -> [u8; 4] {
    let change = u32::from_le_bytes(old) ^ u32::from_le_bytes(new);
    (u32::from_le_bytes(field) ^ multiply(change, bytes_power(len))).to_le_bytes()
}

/// The CRC32c of `bytes`, bit by bit: for tests and the lab's SCTP peers
/// (the programs never sum a whole packet). An SCTP packet carries the CRC
/// of itself with the field zeroed, little-endian.
pub fn checksum(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        let mut i = 0;
        while i < 8 {
            crc = times_x(crc);
            i += 1;
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3720's check values (iSCSI uses the same CRC).
    #[test]
    fn checksum_matches_the_published_check_values() {
        assert_eq!(checksum(b"123456789"), 0xe306_9283);
        assert_eq!(checksum(&[0; 32]), 0x8a91_36aa);
        assert_eq!(checksum(&[0xff; 32]), 0x62a8_ab43);
    }

    #[test]
    fn powers_are_of_x() {
        // x^8 · x^8 = x^16, and one zero byte is x^8.
        assert_eq!(multiply(ONE >> 8, ONE >> 8), ONE >> 16);
        assert_eq!(bytes_power(1), ONE >> 8);
        assert_eq!(bytes_power(0), ONE);
        assert_eq!(multiply(bytes_power(3), bytes_power(5)), bytes_power(8));
    }

    /// A packet's bytes from a seed (xorshift), with the CRC in its field.
    fn packet(len: usize, mut seed: u32) -> [u8; 2048] {
        let mut p = [0u8; 2048];
        for b in &mut p[..len] {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            *b = seed as u8;
        }
        p[8..12].copy_from_slice(&[0; 4]);
        let crc = checksum(&p[..len]);
        p[8..12].copy_from_slice(&crc.to_le_bytes());
        p
    }

    #[test]
    fn a_port_change_gives_the_checksum_of_the_changed_packet() {
        for (i, len) in [16usize, 17, 52, 100, 1280, 1500, 2048]
            .into_iter()
            .enumerate()
        {
            let mut p = packet(len, 0x9e37_79b9 ^ i as u32);
            let old = [p[0], p[1], p[2], p[3]];
            let new = [0x1f, 0x90, old[2] ^ 0x5a, 0x07];
            let field = [p[8], p[9], p[10], p[11]];
            p[..4].copy_from_slice(&new);
            p[8..12].copy_from_slice(&[0; 4]);
            let expected = checksum(&p[..len]).to_le_bytes();
            assert_eq!(
                port_change(field, old, new, len as u16),
                expected,
                "{len} bytes"
            );
        }
    }

    #[test]
    fn no_change_leaves_the_field() {
        assert_eq!(port_change([1, 2, 3, 4], [5; 4], [5; 4], 100), [1, 2, 3, 4]);
    }
}
