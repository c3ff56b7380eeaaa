//! keyplaned's own re-evaluation of slot assignments (docs/STATUS.md): on a timer, the
//! sites due (something they are decided from changed, or something changes by the
//! clock: a delay, an offline device, a schedule) are evaluated again with
//! keyplane-core's rule, and each transition since the last evaluation becomes an
//! event on ListEvents / WatchEvents. Bounded work per tick: at most
//! [`SITES_PER_TICK`] sites, least recently evaluated first, after one statement
//! that settles up to [`QUIET_SITES_PER_TICK`] due sites holding no codes.

use crate::hub::EventBell;
use keyplane_core::status::{
    PendingChange, SlotStatus, SlotSummary, slot_state, summary_transitions,
};
use keyplane_store::{AssignmentFacts, EvaluatedSlot, StatusEvent, Store, StoreError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Most sites evaluated per tick.
pub const SITES_PER_TICK: i64 = 32;

/// Most sites with nothing to evaluate settled per tick, in one statement (see
/// [`Store::status_settle_quiet_sites`]): a fleet's connections make every site due.
pub const QUIET_SITES_PER_TICK: i64 = 5_000;

/// Evaluates due sites every `interval` until `shutdown`.
pub async fn sweep(store: Store, bell: EventBell, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // cancel-safe: a token.
            _ = shutdown.cancelled() => break,
            // cancel-safe: interval ticks.
            _ = tick.tick() => {}
        }
        if let Err(e) = store.status_settle_quiet_sites(QUIET_SITES_PER_TICK).await {
            tracing::warn!(error = %e, "settling sites with nothing to evaluate failed; will retry");
        }
        let sites = match store.status_due_sites(SITES_PER_TICK).await {
            Ok(sites) => sites,
            Err(e) => {
                tracing::warn!(error = %e, "reading sites due for status evaluation failed; will retry");
                continue;
            }
        };
        for site in sites {
            match evaluate(&store, site).await {
                Ok(0) => {}
                Ok(_) => bell.ring(),
                Err(e) => {
                    tracing::warn!(%site, error = %e, "status evaluation failed; will retry")
                }
            }
        }
    }
}

/// Whether the assignment's status may change by the clock alone, so its site is
/// evaluated on every sweep while it holds.
fn clock_bound(a: &AssignmentFacts, status: SlotStatus, pending: &[PendingChange]) -> bool {
    let f = &a.facts;
    matches!(
        status,
        SlotStatus::Setting | SlotStatus::Removing | SlotStatus::Unknown
    ) || pending
        .iter()
        .any(|p| matches!(p, PendingChange::DeferredCreation { .. }))
        || f.desired.as_ref().is_some_and(|d| d.schedules.is_some())
        || f.presence.valid_from.is_some_and(|t| t > f.now)
        || f.presence.valid_until.is_some_and(|t| t > f.now)
        || f.device_last_seen.is_none_or(|t| t < f.now)
}

/// Evaluates every assignment of `site` and records what changed; returns the number
/// of events raised. A site's baseline evaluation (its assignments predate the sweep)
/// records what holds and raises nothing: a code set long ago is not news.
pub async fn evaluate(store: &Store, site: Uuid) -> Result<usize, StoreError> {
    let facts = store.slot_status_facts_for_sweep(site).await?;
    let mut changed = Vec::new();
    let mut events = Vec::new();
    let mut pending = false;
    for a in &facts.assignments {
        let state = slot_state(&a.facts);
        pending |= !state.issues.is_empty() || clock_bound(a, state.status, &state.pending);
        let summary = SlotSummary::of(&state);
        let done = a.removed && state.status == SlotStatus::Unset && state.issues.is_empty();
        if a.last.as_ref() == Some(&summary) && a.held_now == a.held && !done {
            continue;
        }
        let raised = if facts.baseline {
            Vec::new()
        } else {
            summary_transitions(a.last.as_ref(), &state)
        };
        for t in raised {
            events.push(StatusEvent {
                device: a.device,
                slot: a.facts.slot,
                credential: a.credential,
                user: a.user,
                kind: t.event_kind(),
                issue: t.issue(),
                at: a.facts.now,
            });
        }
        changed.push(EvaluatedSlot {
            device: a.device,
            slot: a.facts.slot,
            credential: a.credential,
            user: a.user,
            // The device confirmed a removal: nothing is left to show.
            done,
            summary,
            held: a.held_now.clone(),
        });
    }
    store
        .status_record(site, facts.seq, pending, facts.baseline, &changed, &events)
        .await?;
    Ok(events.len())
}
