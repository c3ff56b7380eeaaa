//! The retention sweep: deletes events and audit records past their dealer's period
//! (`RetentionPolicy`), a bounded number of small batches per pass, and keeps each
//! site's change log to its window ([`keyplane_store::ChangeWindow`]).

use keyplane_store::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Rows deleted per batch (one short transaction each).
pub const RETENTION_BATCH: i64 = 1000;
/// Batches per pass at most: a large backlog is worked off over several passes
/// rather than holding the database busy for long.
pub const MAX_BATCHES_PER_PASS: usize = 100;

/// What the sweep has done so far; clones share it, and tests wait on it.
#[derive(Clone, Default)]
pub struct RetentionProgress(Arc<Inner>);

#[derive(Default)]
struct Inner {
    passes: AtomicU64,
    events: AtomicU64,
    audit: AtomicU64,
    changes: AtomicU64,
    notify: tokio::sync::Notify,
}

impl std::fmt::Debug for RetentionProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetentionProgress")
            .field("passes", &self.passes())
            .field("events_deleted", &self.events_deleted())
            .field("audit_deleted", &self.audit_deleted())
            .field("changes_pruned", &self.changes_pruned())
            .finish()
    }
}

impl RetentionProgress {
    /// Passes completed.
    pub fn passes(&self) -> u64 {
        self.0.passes.load(Ordering::SeqCst)
    }

    /// Events deleted so far.
    pub fn events_deleted(&self) -> u64 {
        self.0.events.load(Ordering::SeqCst)
    }

    /// Audit records deleted so far.
    pub fn audit_deleted(&self) -> u64 {
        self.0.audit.load(Ordering::SeqCst)
    }

    /// Change log rows pruned so far.
    pub fn changes_pruned(&self) -> u64 {
        self.0.changes.load(Ordering::SeqCst)
    }

    /// Waits until at least `count` passes have completed.
    pub async fn reached(&self, count: u64) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a pass in between is not missed.
            notified.as_mut().enable();
            if self.passes() >= count {
                return;
            }
            notified.await;
        }
    }

    fn record(&self, swept: keyplane_store::Swept) {
        self.0.events.fetch_add(swept.events, Ordering::SeqCst);
        self.0.audit.fetch_add(swept.audit, Ordering::SeqCst);
    }

    fn pass_done(&self) {
        self.0.passes.fetch_add(1, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }
}

/// Sites whose change log one pass looks at, at most (the rest wait for the next).
pub const PRUNE_SITES_PER_PASS: i64 = 1000;

/// Where the change log pruning left off: the database clock of its last pass.
#[derive(Debug, Default)]
pub struct PruneCursor(Option<std::time::SystemTime>);

/// One pass: batches of `batch` until a batch finds fewer than `batch` of each kind
/// (or [`MAX_BATCHES_PER_PASS`]), then the change logs of the sites written since
/// the last pass (and of those holding changes past the window's age) pruned to
/// `window`. Every replica may run it: deletes of the same rows by two replicas only
/// contend, never double count beyond what each deleted.
pub async fn pass(
    store: &Store,
    batch: i64,
    window: keyplane_store::ChangeWindow,
    cursor: &mut PruneCursor,
    progress: &RetentionProgress,
) {
    for _ in 0..MAX_BATCHES_PER_PASS {
        match store.retention_sweep(batch).await {
            Ok(swept) => {
                progress.record(swept);
                if swept.events < batch.unsigned_abs() && swept.audit < batch.unsigned_abs() {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!("retention sweep failed ({e}); trying again at the next pass");
                break;
            }
        }
    }
    match store
        .change_log_prune(window, cursor.0, PRUNE_SITES_PER_PASS)
        .await
    {
        Ok((pruned, now)) => {
            // A site written while the pass ran is looked at again next time: the
            // slack covers a write that committed after `now` but bumped before.
            cursor.0 = Some(now - std::time::Duration::from_secs(5));
            if pruned.rows > 0 {
                tracing::debug!(
                    sites = pruned.sites,
                    rows = pruned.rows,
                    "change log pruned to its window"
                );
            }
            progress.0.changes.fetch_add(pruned.rows, Ordering::SeqCst);
        }
        Err(e) => {
            tracing::warn!("pruning the change log failed ({e}); trying again at the next pass")
        }
    }
    progress.pass_done();
}

/// Runs a pass every `interval` until `shutdown`.
pub async fn sweep(
    store: Store,
    interval: Duration,
    batch: i64,
    window: keyplane_store::ChangeWindow,
    progress: RetentionProgress,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cursor = PruneCursor::default();
    loop {
        tokio::select! {
            // cancel-safe: a token.
            _ = shutdown.cancelled() => return,
            // cancel-safe: interval ticks.
            _ = tick.tick() => pass(&store, batch, window, &mut cursor, &progress).await,
        }
    }
}
