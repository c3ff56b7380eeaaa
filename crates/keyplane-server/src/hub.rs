//! Wake-ups for agent streams. A commit on this replica wakes its site's streams at
//! once and queues the site for [`Hub::announce`], which names it to every replica in
//! a NOTIFY after the commit; [`Hub::listen`] wakes this replica's streams of the
//! sites others name. A poller catches what a lost notification missed. The change
//! log stays the truth: a wake-up only says "look again", so a missed or duplicated
//! one costs a query, never a change. Nothing here is in the write transaction.

use keyplane_store::{SiteChange, SiteListener, Store};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// How often the poller has re-read the revision of every site held: each time
    /// wakes the site's streams, and one that sent less than `revision` reads what
    /// it missed (however its wake-up was lost).
    pub checks: u64,
}

/// Sites written on this replica, waiting to be named to the others.
#[derive(Debug, Default)]
struct Outbox {
    /// Set while [`Hub::announce`] runs: without it nothing would empty the set.
    open: AtomicBool,
    sites: Mutex<HashSet<Uuid>>,
    bell: tokio::sync::Notify,
}

/// Per-site wake-up channels.
#[derive(Debug, Default, Clone)]
pub struct Hub {
    sites: Arc<Mutex<HashMap<Uuid, watch::Sender<Seen>>>>,
    outbox: Arc<Outbox>,
    /// Whether [`Hub::listen`] is listening now: the poller slows down meanwhile.
    listening: Arc<AtomicBool>,
}

impl Hub {
    /// Queues `site` to be named to every replica (after a commit that changed what
    /// its agent holds or may do), without waking this replica's streams first: its
    /// own listener hears the name too.
    pub fn changed(&self, site: Uuid) {
        if !self.outbox.open.load(Ordering::Relaxed) {
            return;
        }
        self.outbox
            .sites
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(site);
        self.outbox.bell.notify_one();
    }

    /// Whether the listener is up (a NOTIFY would reach this replica now).
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// Subscribes to wake-ups of `site`.
    pub fn subscribe(&self, site: Uuid) -> watch::Receiver<Seen> {
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        sites
            .entry(site)
            .or_insert_with(|| watch::channel(Seen::default()).0)
            .subscribe()
    }

    /// Tells the streams of `site` (on every replica) that its session epoch reached
    /// `epoch` (after a local revocation or a new session), before the poller would.
    pub fn epoch(&self, site: Uuid, epoch: i64) {
        self.changed(site);
        self.observe(SiteChange {
            site,
            revision: 0,
            session_epoch: epoch,
            gone: false,
            resync: 0,
        });
    }

    /// Tells the streams of `site` (on every replica) that a resync was asked for, up to
    /// `resync`, before the poller would.
    pub fn resync(&self, site: Uuid, resync: i64) {
        self.changed(site);
        self.observe(SiteChange {
            site,
            revision: 0,
            session_epoch: 0,
            gone: false,
            resync,
        });
    }

    /// Tells the streams of `site` (on every replica) that it was deleted.
    pub fn gone(&self, site: Uuid) {
        self.changed(site);
        self.observe(SiteChange {
            site,
            revision: 0,
            session_epoch: 0,
            gone: true,
            resync: 0,
        });
    }

    /// Wakes the streams of `site` (after a local commit), on this replica at once
    /// and on the others through [`Hub::announce`].
    pub fn poke(&self, site: Uuid) {
        self.changed(site);
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

    /// Re-reads the revision of every site held, in one query, and wakes all their
    /// streams: the safety net under every other wake-up (a write slower to commit
    /// than the poll's slack whose notification was lost, a wake-up a stream took
    /// while reading). One query per replica, instead of one per stream (670
    /// queries a second with 10,000 agents on a 15 s re-check each).
    async fn check_held(&self, store: &Store) {
        let held = self.watched();
        match store.site_revisions(&held).await {
            Ok(revisions) => {
                let sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
                for (site, revision) in revisions {
                    if let Some(tx) = sites.get(&site) {
                        tx.send_modify(|seen| {
                            seen.revision = seen.revision.max(revision);
                            seen.checks += 1;
                        });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "re-reading the held sites' revisions failed"),
        }
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

    /// Polls every `period` (every `listening_period` while [`Hub::listen`] is
    /// listening) until cancelled for sites whose revision or session epoch advanced,
    /// or that were deleted, waking their streams: the fallback for notifications
    /// lost or never sent (a replica that died between its commit and its NOTIFY).
    /// One query per tick, whatever the number of agents held: it reads the sites
    /// changed since the last tick (see [`Store::sites_changed`]), not every held site.
    ///
    /// Every `seen_every` it also records, in one statement, that the agents whose
    /// streams this replica holds are still connected: an idle agent sends nothing,
    /// and GetSyncStatus counts an agent unheard of for 90 s as disconnected.
    pub async fn poll(
        self,
        store: Store,
        period: Duration,
        listening_period: Duration,
        check_every: Duration,
        seen_every: Duration,
        cancel: CancellationToken,
    ) {
        let mut since = None;
        let start = tokio::time::Instant::now();
        let (mut last_seen_refresh, mut last_check, mut last_poll) = (start, start, start);
        loop {
            let poll_every = if self.listening() {
                listening_period.max(period)
            } else {
                period
            };
            // Each of the three runs on its own period: none waits on a longer one.
            let next = [
                last_poll + poll_every,
                last_seen_refresh + seen_every,
                last_check + check_every,
            ]
            .into_iter()
            .min()
            .unwrap_or(start);
            tokio::select! {
                // cancel-safe: only a token.
                _ = cancel.cancelled() => return,
                // cancel-safe: a timer.
                _ = tokio::time::sleep_until(next) => {}
            }
            let now = tokio::time::Instant::now();
            if now >= last_seen_refresh + seen_every {
                last_seen_refresh = now;
                if let Err(e) = store.agents_seen(&self.watched()).await {
                    tracing::warn!(error = %e, "recording held agents as seen failed");
                }
            }
            if self.watched().is_empty() {
                // A stream reads the change log when it starts, so what changed while
                // nobody watched needs no wake-up.
                since = None;
                (last_check, last_poll) = (now, now);
                continue;
            }
            if now >= last_check + check_every {
                last_check = now;
                self.check_held(&store).await;
            }
            if now < last_poll + poll_every {
                continue;
            }
            last_poll = now;
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

    /// Names the sites queued by [`Hub::changed`] to every replica until cancelled:
    /// one NOTIFY statement at a time, carrying every site queued while the previous
    /// one was sent. Under load that coalesces many writes into one notification
    /// without adding a fixed delay to a lone write. A failed send is logged and
    /// dropped: the pollers cover it.
    ///
    /// Queuing starts when this is called, not when the task first runs: a write
    /// committed in between is named too.
    pub fn announce(
        self,
        store: Store,
        cancel: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.outbox.open.store(true, Ordering::Relaxed);
        self.announce_loop(store, cancel)
    }

    async fn announce_loop(self, store: Store, cancel: CancellationToken) {
        loop {
            tokio::select! {
                // cancel-safe: only a token.
                _ = cancel.cancelled() => break,
                // cancel-safe: Notify keeps the permit of a notify_one sent meanwhile.
                _ = self.outbox.bell.notified() => {}
            }
            let sites: Vec<Uuid> = self
                .outbox
                .sites
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
                .collect();
            if sites.is_empty() {
                continue;
            }
            if let Err(e) = store.sites_announce(&sites).await {
                tracing::warn!(error = %e, sites = sites.len(), "announcing changed sites failed; the poll will catch them");
            }
        }
        self.outbox.open.store(false, Ordering::Relaxed);
    }

    /// Listens for the sites other replicas (and this one) name, on one dedicated
    /// connection to `url` named `application_name`, until cancelled; wakes the
    /// streams of those this replica holds with their state as read after the
    /// notification. When the connection is lost it reconnects after `retry`
    /// (doubling to 30 s while it fails) and re-checks every held site once: a
    /// notification sent while nobody listened here is lost.
    pub async fn listen(
        self,
        store: Store,
        url: String,
        application_name: String,
        retry: Duration,
        cancel: CancellationToken,
    ) {
        let mut backoff = retry;
        loop {
            let connected = tokio::select! {
                // cancel-safe: only a token.
                _ = cancel.cancelled() => return,
                // Not cancel-safe, and need not be: cancellation drops the attempt.
                r = SiteListener::connect(&url, &application_name) => r,
            };
            match connected {
                Ok(listener) => {
                    backoff = retry;
                    self.listening.store(true, Ordering::Relaxed);
                    tracing::info!("listening for wake-ups from other replicas");
                    let ended = self.serve_listener(&store, listener, &cancel).await;
                    self.listening.store(false, Ordering::Relaxed);
                    if ended.is_none() {
                        return;
                    }
                    tracing::warn!(
                        "the wake-up listener's connection was lost; polling until it is back"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry = ?backoff, "connecting the wake-up listener failed; polling until it is up");
                }
            }
            tokio::select! {
                // cancel-safe: only a token.
                _ = cancel.cancelled() => return,
                // cancel-safe: a timer.
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(LISTEN_RETRY_MAX);
        }
    }

    /// Serves one listener connection; Some(()) when it was lost, None when cancelled.
    async fn serve_listener(
        &self,
        store: &Store,
        mut listener: SiteListener,
        cancel: &CancellationToken,
    ) -> Option<()> {
        // Listening already: whatever commits from now on is named to us, and what
        // committed before is read here.
        self.recheck(store, self.watched()).await;
        let mut ping = tokio::time::interval(LISTEN_PING);
        ping.reset();
        loop {
            tokio::select! {
                // cancel-safe: only a token.
                _ = cancel.cancelled() => return None,
                // cancel-safe: named sites stay in the listener's set until taken.
                named = listener.next() => {
                    let Some(named) = named else { return Some(()) };
                    let held = self.held_of(named);
                    if !held.is_empty() {
                        self.recheck(store, held).await;
                    }
                }
                // cancel-safe: interval ticks.
                _ = ping.tick() => {
                    // A connection cut without a word would otherwise look healthy
                    // while the poller has slowed down.
                    match tokio::time::timeout(LISTEN_PING_TIMEOUT, listener.ping()).await {
                        Ok(Ok(())) => {}
                        _ => return Some(()),
                    }
                }
            }
        }
    }

    /// The sites of `named` that this replica holds streams for.
    fn held_of(&self, named: Vec<Uuid>) -> Vec<Uuid> {
        let sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        named
            .into_iter()
            .filter(|s| sites.get(s).is_some_and(|tx| tx.receiver_count() > 0))
            .collect()
    }

    /// Reads the state of `sites` and wakes the streams of those that moved; when
    /// it cannot be read, wakes them all (each re-reads its change log).
    async fn recheck(&self, store: &Store, sites: Vec<Uuid>) {
        if sites.is_empty() {
            return;
        }
        match store.site_states(&sites).await {
            Ok(states) => {
                for state in states {
                    self.observe(state);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the state of named sites failed; waking their streams");
                let held = self.sites.lock().unwrap_or_else(|e| e.into_inner());
                for site in sites {
                    if let Some(tx) = held.get(&site) {
                        tx.send_modify(|_| {});
                    }
                }
            }
        }
    }
}

/// The longest wait between attempts to reconnect the listener.
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);

/// How often the listener's connection is checked.
const LISTEN_PING: Duration = Duration::from_secs(10);

/// How long a check may take before the connection counts as lost.
const LISTEN_PING_TIMEOUT: Duration = Duration::from_secs(5);

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
