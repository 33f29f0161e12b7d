//! One programming round, whole or for the frontends a change touched: the
//! map contents wanted (within the maps' capacity), the ordered writes, and
//! what of them landed. The agent and the test harness both program through
//! it; the caller passes the function that writes one entry to the kernel.

use std::borrow::Borrow;

use super::{
    apply::{self, Outcome},
    diff,
    maps::{map_state_in, update, Capacity, Fill, MapState, Problem},
    Ids,
};
use crate::frontend::{Frontend, FrontendSpec};

/// What the maps hold and the ids their entries were given.
#[derive(Debug, Default)]
pub struct Programmed {
    pub ids: Ids,
    /// What the maps hold: every write that landed, none that did not.
    applied: MapState,
    /// `applied`'s entries counted by map and family.
    fill: Fill,
    /// The maps' sizes: frontends beyond them are refused, not written.
    pub capacity: Capacity,
}

/// What one round did.
#[derive(Debug, Default)]
pub struct RoundReport {
    /// Services not programmed (or left as they were), each with why.
    pub problems: Vec<Problem>,
    /// Writes the round wanted.
    pub writes: usize,
    /// What of them landed.
    pub outcome: Outcome,
}

impl RoundReport {
    /// Every write landed.
    pub fn complete(&self) -> bool {
        self.outcome.failures.is_empty()
    }
}

impl Programmed {
    /// Maps that hold `applied` (adopted from an earlier agent, say), of `capacity`.
    pub fn adopt(applied: MapState, mut ids: Ids, capacity: Capacity) -> Self {
        // Frontend ids stay below the reverse-NAT map's size, as the
        // round-robin map's.
        ids.limit_frontend_ids(
            u32::try_from(capacity.revnat)
                .unwrap_or(u32::MAX)
                .saturating_sub(1),
        );
        // Backend ids each to a slot of their own in the IPv4 array.
        ids.set_backend_slots(u32::try_from(capacity.backends).unwrap_or(u32::MAX));
        Self {
            ids,
            fill: Fill::of(&applied),
            applied,
            capacity,
        }
    }

    /// What the maps hold: every write that landed, none that did not.
    pub fn applied(&self) -> &MapState {
        &self.applied
    }

    /// The entries of [`Self::applied`] by map and family.
    pub fn fill(&self) -> Fill {
        self.fill
    }

    /// Takes `actual` (read back from the maps) as what they hold.
    pub fn replace_applied(&mut self, actual: MapState) {
        self.fill = Fill::of(&actual);
        self.applied = actual;
    }

    /// Programs every frontend: the maps end up serving `frontends` and nothing else.
    pub fn full<S: Borrow<FrontendSpec>>(
        &mut self,
        frontends: &[S],
        writer: impl apply::Write,
    ) -> RoundReport {
        let (wanted, problems) =
            map_state_in(frontends, &mut self.ids, &self.applied, &self.capacity);
        let ops = diff(&wanted, &self.applied);
        if ops.is_empty() {
            // Nothing to write: the maps hold `wanted` already.
            return RoundReport {
                problems,
                ..RoundReport::default()
            };
        }
        let outcome = apply::run_whole(&ops, &mut self.applied, wanted, writer);
        let writes = ops.len();
        self.fill = Fill::of(&self.applied);
        RoundReport {
            problems,
            writes,
            outcome,
        }
    }

    /// Programs only `frontends` (what they serve now) and removes `gone`;
    /// every other frontend stays as it is.
    pub fn partial(
        &mut self,
        frontends: &[&FrontendSpec],
        gone: &[Frontend],
        writer: impl apply::Write,
    ) -> RoundReport {
        let (ops, problems) = update(
            frontends,
            gone,
            &self.applied,
            &mut self.ids,
            &self.capacity,
        );
        // At every key the round writes, what the maps held before and
        // after (a write that did not land leaves its key as it was).
        let before = Fill::entries_at(&self.applied, &ops);
        let outcome = apply::run(&ops, &mut self.applied, writer);
        let after = Fill::entries_at(&self.applied, &ops);
        self.fill = self.fill.replaced(&before, &after);
        RoundReport {
            problems,
            writes: ops.len(),
            outcome,
        }
    }
}
