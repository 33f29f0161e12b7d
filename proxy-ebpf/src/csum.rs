//! Internet checksum arithmetic (RFC 1071) for headers the programs build. Sums
//! are over 16-bit words in whatever byte order they were read; the folded result
//! is stored back in that same order.

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
