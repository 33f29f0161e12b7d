//! Operator commands beside `run`: `simulate` (where does this packet go?),
//! `inspect` (the pinned maps as tables) and `monitor` (drops as they happen).

pub mod inspect;
pub mod monitor;
#[cfg(feature = "harness")]
pub mod simulate;
