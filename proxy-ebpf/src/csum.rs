//! Internet checksum arithmetic (RFC 1071, RFC 1624). Values are 16-bit words in
//! whatever byte order they were read; results are stored back in that order.

/// Adds the two 16-bit halves of a 32-bit word to a running sum.
#[inline(always)]
pub fn add_word(sum: u64, word: u32) -> u64 {
    sum + u64::from(word & 0xffff) + u64::from(word >> 16)
}

/// Folds a running sum into the 16-bit one's complement checksum.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The checksum after a covered 32-bit word changed from `old` to `new`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let mut sum = u64::from(!check);
    sum = add_word(sum, !old);
    sum = add_word(sum, new);
    fold(sum)
}

/// The same for a 16-bit word.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = u64::from(!check) + u64::from(!old) + u64::from(new);
    fold(sum)
}
