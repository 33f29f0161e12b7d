//! Stage 2, pure: frontends in, map contents and ordered writes out. Ids,
//! slots and Maglev tables; the diff against what the maps hold; the plan for
//! removing ended conntrack and NAT entries. Nothing here touches the kernel.

pub mod apply;
pub mod diff;
pub mod dump;
pub mod entries;
pub mod gc;
pub mod ids;
pub mod maglev;
pub mod maps;
pub mod round;

pub use diff::diff;
pub use dump::dump;
pub use entries::{Backend, RevNat, ServiceKey, SourceRange};
pub use ids::{Ids, MAX_FRONTEND_ID};
pub use maps::{
    map_state, map_state_in, update, Capacity, Fill, MapOp, MapState, Problem, PutTarget, MAX_SLOTS,
};
pub use round::{Programmed, RoundReport};
