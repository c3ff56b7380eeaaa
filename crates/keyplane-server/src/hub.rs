//! Wake-ups for agent streams. A commit on this replica wakes its site's streams at
//! once; a poller catches commits made by other replicas sharing the database. The
//! change log stays the truth: a wake-up only says "look again", so a missed or
//! duplicated one costs a query, never a change. Nothing here is in the write path.

use keyplane_store::{SiteChange, Store};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a site's streams were last told.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The highest revision seen.
    pub revision: i64,
    /// The highest session epoch seen: a stream whose own epoch is lower re-checks
    /// whether it may go on (revoked, replaced).
    pub epoch: i64,
    /// The site was deleted.
    pub gone: bool,
    /// The highest resync sequence seen (OpsService/ResyncSite): a stream that
    /// opened at a lower one sends a full snapshot.
    pub resync: i64,
}

/// Per-site wake-up channels.
#[derive(Debug, Default, Clone)]
pub struct Hub {
    sites: Arc<Mutex<HashMap<Uuid, watch::Sender<Seen>>>>,
}

impl Hub {
    /// Subscribes to wake-ups of `site`.
    pub fn subscribe(&self, site: Uuid) -> watch::Receiver<Seen> {
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        sites
            .entry(site)
            .or_insert_with(|| watch::channel(Seen::default()).0)
            .subscribe()
    }

    /// Tells the streams of `site` on this replica that its session epoch reached
    /// `epoch` (after a local revocation or a new session), before the poller would.
    pub fn epoch(&self, site: Uuid, epoch: i64) {
        self.observe(SiteChange {
            site,
            revision: 0,
            session_epoch: epoch,
            gone: false,
            resync: 0,
        });
    }

    /// Tells the streams of `site` on this replica that a resync was asked for, up to
    /// `resync`, before the poller would.
    pub fn resync(&self, site: Uuid, resync: i64) {
        self.observe(SiteChange {
            site,
            revision: 0,
            session_epoch: 0,
            gone: false,
            resync,
        });
    }

    /// Tells the streams of `site` on this replica that it was deleted.
    pub fn gone(&self, site: Uuid) {
        self.observe(SiteChange {
            site,
            revision: 0,
            session_epoch: 0,
            gone: true,
            resync: 0,
        });
    }

    /// Wakes the streams of `site` (after a local commit).
    pub fn poke(&self, site: Uuid) {
        let sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = sites.get(&site) {
            tx.send_modify(|_| {});
        }
    }

    fn watched(&self) -> Vec<Uuid> {
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        sites.retain(|_, tx| tx.receiver_count() > 0);
        sites.keys().copied().collect()
    }

    fn observe(&self, change: SiteChange) {
        let sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = sites.get(&change.site) {
            tx.send_if_modified(|seen| {
                let mut modified = false;
                if change.revision > seen.revision {
                    seen.revision = change.revision;
                    modified = true;
                }
                if change.session_epoch > seen.epoch {
                    seen.epoch = change.session_epoch;
                    modified = true;
                }
                if change.gone && !seen.gone {
                    seen.gone = true;
                    modified = true;
                }
                if change.resync > seen.resync {
                    seen.resync = change.resync;
                    modified = true;
                }
                modified
            });
        }
    }

    /// Polls every `period` until cancelled for sites whose revision or session epoch
    /// advanced, or that were deleted, waking their streams (commits, revocations and
    /// takeovers from other replicas). One query per tick,
    /// whatever the number of agents held: it reads the sites changed since the last
    /// tick (see [`Store::sites_changed`]), not every held site.
    ///
    /// Every `seen_every` it also records, in one statement, that the agents whose
    /// streams this replica holds are still connected: an idle agent sends nothing,
    /// and GetSyncStatus counts an agent unheard of for 90 s as disconnected.
    pub async fn poll(
        self,
        store: Store,
        period: Duration,
        seen_every: Duration,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut since = None;
        let mut last_seen_refresh = tokio::time::Instant::now();
        loop {
            tokio::select! {
                // cancel-safe: only a token.
                _ = cancel.cancelled() => return,
                // cancel-safe: interval ticks.
                _ = tick.tick() => {}
            }
            if last_seen_refresh.elapsed() >= seen_every {
                last_seen_refresh = tokio::time::Instant::now();
                if let Err(e) = store.agents_seen(&self.watched()).await {
                    tracing::warn!(error = %e, "recording held agents as seen failed");
                }
            }
            if self.watched().is_empty() {
                // A stream reads the change log when it starts, so what changed while
                // nobody watched needs no wake-up.
                since = None;
                continue;
            }
            match store.sites_changed(since, POLL_SLACK).await {
                Ok((changed, now)) => {
                    for change in changed {
                        self.observe(change);
                    }
                    since = Some(now);
                }
                // `since` stays, so the next poll covers the gap.
                Err(e) => tracing::warn!(error = %e, "polling site revisions failed"),
            }
        }
    }
}

/// How far before the last poll each poll looks again: longer than a write takes from
/// advancing a site's revision to committing.
const POLL_SLACK: Duration = Duration::from_secs(2);

/// Rings whenever this replica stores a new event, waking event watchers at once;
/// watchers also re-check on a timer, which catches events stored by other replicas.
#[derive(Debug, Clone)]
pub struct EventBell(Arc<watch::Sender<u64>>);

impl Default for EventBell {
    fn default() -> Self {
        EventBell(Arc::new(watch::channel(0).0))
    }
}

impl EventBell {
    /// Wakes every watcher.
    pub fn ring(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes on every ring.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}
