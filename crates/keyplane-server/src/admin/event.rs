//! Device and site events: listed by cursor or watched as a stream.

use super::*;
use keyplane_core::event_cursor::WatchCursor;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;

/// The most WatchEvents streams one dealer may hold open, over every replica: each
/// is a task polling the database, so a dealer opening thousands would starve every
/// tenant.
pub const MAX_WATCHES_PER_DEALER: usize = 16;

/// How long a stream's place outlives its replica (a crashed replica's places come
/// back after this); a live replica renews its places three times as often.
const WATCH_LEASE_TTL: Duration = Duration::from_secs(30);

/// This replica's WatchEvents places, leased in the database (keyplane-store
/// watch.rs) so that the cap holds over every replica.
#[derive(Clone, Debug)]
pub(super) struct Watches {
    store: keyplane_store::Store,
    replica: uuid::Uuid,
    /// Places this replica holds; the renewal skips its query at zero.
    held: Arc<std::sync::atomic::AtomicUsize>,
    renewing: Arc<std::sync::Once>,
}

/// One open stream; gives its place back when the stream's task ends.
pub(super) struct WatchGuard {
    watches: Watches,
    lease: keyplane_store::WatchLease,
}

impl Watches {
    pub(super) fn new(store: keyplane_store::Store) -> Self {
        Watches {
            store,
            replica: uuid::Uuid::new_v4(),
            held: Default::default(),
            renewing: Arc::new(std::sync::Once::new()),
        }
    }

    async fn acquire(
        &self,
        dealer: uuid::Uuid,
        shutdown: &CancellationToken,
    ) -> Result<WatchGuard, Status> {
        self.renewing.call_once(|| {
            tokio::spawn(self.clone().renew(shutdown.clone()));
        });
        let lease = self
            .store
            .watch_lease_take(
                dealer,
                self.replica,
                MAX_WATCHES_PER_DEALER,
                WATCH_LEASE_TTL,
            )
            .await
            .map_err(store_status)?;
        self.held.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(WatchGuard {
            watches: self.clone(),
            lease,
        })
    }

    /// Keeps this replica's places alive until shutdown.
    async fn renew(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(WATCH_LEASE_TTL / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // cancel-safe: a token.
                _ = shutdown.cancelled() => return,
                // cancel-safe: interval ticks.
                _ = tick.tick() => {}
            }
            if self.held.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                continue;
            }
            if let Err(e) = self
                .store
                .watch_leases_renew(self.replica, WATCH_LEASE_TTL)
                .await
            {
                // The places lapse unless renewed: the cap then errs towards
                // admitting streams, for at most one TTL of an outage.
                tracing::warn!(error = %e, "could not renew this replica's WatchEvents places");
            }
        }
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.watches
            .held
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let store = self.watches.store.clone();
        let lease = self.lease;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = store.watch_lease_release(lease).await {
                    // Not renewed any more: the place comes back when it expires.
                    tracing::debug!(error = %e, "WatchEvents place not released; it expires");
                }
            });
        }
    }
}

/// The stream of WatchEvents.
pub(super) type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListEventsRequest>,
) -> Res<pb::ListEventsResponse> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    // Keyed by the site's event position (issue 15), no longer by id: "v2" refuses a
    // token issued before.
    let list = format!("ListEvents.v2 sites/{}", parent.site);
    let (after, limit) = page_cursor(&list, req.page_size, &req.page_token)?;
    let events = api
        .store
        .event_list(actor.dealer, parent.site, after, limit + 1)
        .await
        .map_err(store_status)?;
    let (events, next_page_token) = page_split(&list, events, limit, |e| e.site_seq.to_string());
    Ok(Response::new(pb::ListEventsResponse {
        events: events
            .iter()
            .map(|e| {
                let mut cursor = WatchCursor::new(Some(e.site), []);
                cursor.advance(e.site, e.site_seq);
                res::event_pb(e, &cursor)
            })
            .collect(),
        next_page_token,
    }))
}

/// Events read per site and pass of a watch.
const WATCH_BATCH: i64 = 100;

pub(super) async fn watch(
    api: &AdminApi,
    request: Request<pb::WatchEventsRequest>,
) -> Res<EventStream> {
    let (actor, req) = dealer_call(request)?;
    let site = if req.parent == "sites/-" {
        None
    } else {
        Some(parse("parent", &req.parent, SiteName::parse)?.site)
    };
    if req.after_cursor != 0 {
        return Err(Status::invalid_argument(
            "after_cursor is retired (events are numbered per site, with no global id): resume with the resume_token of the last event received, or start at now without one and read the past with ListEvents",
        ));
    }
    // Checks access (and the site) before the stream starts; the heads are where a
    // watch without a token begins.
    let heads = api
        .store
        .event_heads(actor.dealer, site)
        .await
        .map_err(store_status)?;
    let mut cursor = if !req.resume_token.is_empty() {
        WatchCursor::decode(&req.resume_token, site)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
    } else {
        WatchCursor::new(site, heads)
    };
    let guard = api.watches.acquire(actor.dealer, &api.shutdown).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let store = api.store.clone();
    let mut bell = api.bell.subscribe();
    let shutdown = api.shutdown.clone();
    let ends = shutdown.clone();
    tokio::spawn(async move {
        let _guard = guard;
        // Other replicas store events too: re-check on a timer as well as on the bell.
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            match store
                .event_read(actor.dealer, site, &cursor.pairs(), WATCH_BATCH)
                .await
            {
                Ok(events) => {
                    let mut per_site = std::collections::HashMap::new();
                    for e in &events {
                        cursor.advance(e.site, e.site_seq);
                        *per_site.entry(e.site).or_insert(0i64) += 1;
                        let event = res::event_pb(e, &cursor);
                        if !crate::shutdown::send(&tx, Ok(event), &shutdown).await {
                            return;
                        }
                        if e.kind == keyplane_core::EventKind::Duress {
                            duress_delivered(&store, e).await;
                        }
                    }
                    if per_site.values().any(|n| *n >= WATCH_BATCH) {
                        continue;
                    }
                }
                Err(e) => {
                    let _ = crate::shutdown::send(&tx, Err(store_status(e)), &shutdown).await;
                    return;
                }
            }
            tokio::select! {
                // cancel-safe: a token.
                _ = shutdown.cancelled() => return,
                // cancel-safe: resolves when the watcher hangs up.
                _ = tx.closed() => return,
                // cancel-safe: watch::changed.
                changed = bell.changed() => if changed.is_err() { return },
                // cancel-safe: interval ticks.
                _ = tick.tick() => {}
            }
        }
    });
    Ok(Response::new(Box::pin(crate::shutdown::until_shutdown(
        rx, ends,
    ))))
}

/// Records a duress event's first delivery to a watcher (any replica's), timing it
/// from the panel's event time.
async fn duress_delivered(store: &keyplane_store::Store, e: &keyplane_store::Event) {
    match store.event_delivered(e.site, e.site_seq).await {
        Ok(Some(occurred)) => {
            let latency = std::time::SystemTime::now()
                .duration_since(occurred)
                .unwrap_or_default();
            crate::metrics::metrics()
                .duress_to_watch
                .observe(latency.as_secs_f64());
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "recording a duress event's delivery failed"),
    }
}

pub(super) async fn audit_list(
    api: &AdminApi,
    request: Request<pb::ListAuditLogRequest>,
) -> Res<pb::ListAuditLogResponse> {
    let (actor, req) = dealer_call(request)?;
    let site = if req.parent == "sites/-" {
        None
    } else {
        Some(parse("parent", &req.parent, SiteName::parse)?.site)
    };
    if req.actor.len() > 200 {
        return Err(Status::invalid_argument("actor must be at most 200 bytes"));
    }
    let user = if req.user.is_empty() {
        None
    } else {
        let user = parse("user", &req.user, UserName::parse)?;
        if site.is_some_and(|s| s != user.site) {
            return Err(Status::invalid_argument(
                "user must be a user of the parent site",
            ));
        }
        Some(user.to_string())
    };
    let time = |field: &str, t: &Option<prost_types::Timestamp>| {
        t.as_ref().map(|t| fields::timestamp(field, t)).transpose()
    };
    let filter = store::AuditFilter {
        site,
        actor: (!req.actor.is_empty()).then(|| req.actor.clone()),
        resource_under: user,
        start: time("start_time", &req.start_time)?,
        end: time("end_time", &req.end_time)?,
    };
    // The token is bound to the parent and every filter: a token of another query is
    // refused instead of silently skipping records.
    let list = format!(
        "ListAuditLog {} {:?} {:?} {:?} {:?}",
        req.parent, filter.actor, filter.resource_under, filter.start, filter.end
    );
    let (after, limit) = crate::page::page_key(&list, req.page_size, &req.page_token)?;
    let after = after
        .map(|k| store::AuditCursor::parse(&k).ok_or_else(crate::page::malformed))
        .transpose()?;
    let records = api
        .store
        .audit_list(actor.dealer, &filter, after, limit + 1)
        .await
        .map_err(store_status)?;
    let (records, next_page_token) = page_split(&list, records, limit, |r| r.cursor().to_key());
    Ok(Response::new(pb::ListAuditLogResponse {
        records: records
            .iter()
            .map(|r| pb::AuditRecord {
                id: r.position,
                site: r
                    .site
                    .map(|s| SiteName { site: s }.to_string())
                    .unwrap_or_default(),
                actor: r.actor.clone(),
                action: r.action.clone(),
                resource: r.resource.clone(),
                peer: r.peer.clone().unwrap_or_default(),
                detail_json: r.detail.clone(),
                acting_user: r.acting_user.clone().unwrap_or_default(),
                request_id: r.request_id.clone().unwrap_or_default(),
                before_json: r.before.clone().unwrap_or_default(),
                after_json: r.after.clone().unwrap_or_default(),
                create_time: Some(prost_types::Timestamp::from(std::time::SystemTime::from(
                    r.create_time,
                ))),
            })
            .collect(),
        next_page_token,
    }))
}
