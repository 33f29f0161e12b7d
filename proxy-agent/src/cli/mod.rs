//! Operator commands beside `run`: `simulate` (where does this packet go?) and
//! `inspect` (the pinned maps as tables).

pub mod inspect;
#[cfg(feature = "harness")]
pub mod simulate;
