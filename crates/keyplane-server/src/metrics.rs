//! keyplaned's Prometheus metrics (issue 17), served on `--metrics-listen` with
//! `keyplane_telemetry::metrics`. One set per process ([`metrics`]): counters and
//! histograms move where things happen; the gauges read from the database (pending
//! changes, undelivered duress events) and the pool are refreshed at each scrape
//! ([`refresh`]). Labels stay bounded: methods and kinds are closed sets, a site
//! label only on the per-site pending gauges (the most behind [`PENDING_SITES`]).
//! docs/OBSERVABILITY.md lists every series.

use keyplane_store::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Sites named by the per-site pending gauges: the ones whose oldest pending change
/// is oldest (each scrape).
pub const PENDING_SITES: i64 = 500;

/// A float gauge.
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// Labels of one site.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabel {
    /// The site id.
    pub site: String,
}

/// Labels of a gRPC call count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `package.Service/Method` (`unknown` for a method no service has).
    pub method: String,
    /// The gRPC status code's name (`OK`, `NOT_FOUND`, ...).
    pub code: String,
}

/// A label with one closed-set value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: String,
}

/// A failure reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason (a closed set: see [`apply_failure`]).
    pub reason: String,
}

/// Every series keyplaned exports.
pub struct ServerMetrics {
    registry: Arc<Registry>,
    /// Agent streams this replica holds.
    pub agents_connected: Gauge,
    /// Changes not yet applied by every device, per site.
    pub site_pending_changes: Family<SiteLabel, Gauge>,
    /// Age of each site's oldest change not yet applied, seconds.
    pub site_oldest_pending_age: Family<SiteLabel, FloatGauge>,
    /// Seconds from the commit of a revision to a device's ack of it.
    pub commit_to_ack: Histogram,
    /// Device writes that did not land, by reason (as the agent reported them).
    pub apply_failures: Family<ReasonLabel, Counter>,
    /// Device events stored, by kind.
    pub events_stored: Family<KindLabel, Counter>,
    /// Database pool: connections open.
    pub db_pool_size: Gauge,
    /// Database pool: connections idle.
    pub db_pool_available: Gauge,
    /// Database pool: callers waiting for a connection.
    pub db_pool_waiting: Gauge,
    /// Database pool: most connections.
    pub db_pool_max: Gauge,
    /// Seconds a caller waited for a pool connection.
    pub db_pool_wait: Histogram,
    /// gRPC calls, by method and status (the status of the response's start: a
    /// stream counts OK once it begins).
    pub grpc_calls: Family<CallLabels, Counter>,
    /// Duress events stored (also in `events_stored{kind="duress"}`).
    pub duress_stored: Counter,
    /// Duress events of the last day stored and not yet sent to any WatchEvents
    /// stream (all replicas: the database's count).
    pub duress_undelivered: Gauge,
    /// Seconds since the oldest of those was stored (0 when there is none).
    pub duress_undelivered_oldest_age: FloatGauge,
    /// Seconds from the panel's event time to its first WatchEvents delivery.
    pub duress_to_watch: Histogram,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 5 ms .. ~80 s.
    exponential_buckets(0.005, 2.0, 15)
}

impl ServerMetrics {
    fn new() -> ServerMetrics {
        let m = ServerMetrics {
            registry: Arc::new(Registry::default()),
            agents_connected: Gauge::default(),
            site_pending_changes: Family::default(),
            site_oldest_pending_age: Family::default(),
            commit_to_ack: Histogram::new(seconds_buckets()),
            apply_failures: Family::default(),
            events_stored: Family::default(),
            db_pool_size: Gauge::default(),
            db_pool_available: Gauge::default(),
            db_pool_waiting: Gauge::default(),
            db_pool_max: Gauge::default(),
            db_pool_wait: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            grpc_calls: Family::default(),
            duress_stored: Counter::default(),
            duress_undelivered: Gauge::default(),
            duress_undelivered_oldest_age: FloatGauge::default(),
            duress_to_watch: Histogram::new(seconds_buckets()),
        };
        let mut r = Registry::with_prefix("keyplane");
        r.register(
            "agents_connected",
            "Agent streams this replica holds",
            m.agents_connected.clone(),
        );
        r.register(
            "site_pending_changes",
            "Slot changes some device of the site has not applied (the most behind sites)",
            m.site_pending_changes.clone(),
        );
        r.register(
            "site_oldest_pending_age_seconds",
            "Age of the site's oldest change not applied by every device",
            m.site_oldest_pending_age.clone(),
        );
        r.register(
            "commit_to_ack_seconds",
            "From the commit of a revision to a device's ack of it",
            m.commit_to_ack.clone(),
        );
        r.register(
            "device_apply_failures",
            "Device writes that did not land, by reason",
            m.apply_failures.clone(),
        );
        r.register(
            "events_stored",
            "Device events stored, by kind",
            m.events_stored.clone(),
        );
        r.register(
            "db_pool_connections",
            "Database pool connections open",
            m.db_pool_size.clone(),
        );
        r.register(
            "db_pool_available",
            "Database pool connections idle",
            m.db_pool_available.clone(),
        );
        r.register(
            "db_pool_waiting",
            "Callers waiting for a database connection",
            m.db_pool_waiting.clone(),
        );
        r.register(
            "db_pool_max",
            "Most database pool connections",
            m.db_pool_max.clone(),
        );
        r.register(
            "db_pool_wait_seconds",
            "Time waited for a database connection",
            m.db_pool_wait.clone(),
        );
        r.register(
            "grpc_calls",
            "gRPC calls, by method and status",
            m.grpc_calls.clone(),
        );
        r.register(
            "duress_stored",
            "Duress events stored",
            m.duress_stored.clone(),
        );
        r.register(
            "duress_undelivered",
            "Duress events of the last day not yet sent to any WatchEvents stream",
            m.duress_undelivered.clone(),
        );
        r.register(
            "duress_undelivered_oldest_age_seconds",
            "Age of the oldest duress event not yet sent to any WatchEvents stream (0: none)",
            m.duress_undelivered_oldest_age.clone(),
        );
        r.register(
            "duress_to_watch_seconds",
            "From the panel's duress event to its first WatchEvents delivery",
            m.duress_to_watch.clone(),
        );
        ServerMetrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }
}

/// This process's metrics.
pub fn metrics() -> &'static ServerMetrics {
    static METRICS: OnceLock<ServerMetrics> = OnceLock::new();
    METRICS.get_or_init(ServerMetrics::new)
}

/// Counts a gRPC call to `path` (`/package.Service/Method`) answered with `code`.
pub fn call(path: &str, code: tonic::Code) {
    // A path no service has is the caller's text: never a label.
    let method = if code == tonic::Code::Unimplemented {
        "unknown".to_owned()
    } else {
        path.strip_prefix('/').unwrap_or(path).to_owned()
    };
    metrics()
        .grpc_calls
        .get_or_create(&CallLabels {
            method,
            code: code_name(code).to_owned(),
        })
        .inc();
}

/// The status of a response as its headers give it: a call that failed before any
/// message is answered headers-only with `grpc-status`; any other response starts OK
/// (a stream's final status is not counted).
pub fn response_code(headers: &tonic::codegen::http::HeaderMap) -> tonic::Code {
    tonic::Status::from_header_map(headers).map_or(tonic::Code::Ok, |s| s.code())
}

/// The canonical name of a gRPC status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Counts a device write that did not land, by the closed set of reasons:
/// `duplicate`, `no_space`, `refused` (the device's own words, never a label),
/// `unconfirmed`, `deferred_armed`.
pub fn apply_failure(outcome: &keyplane_core::status::WriteOutcome) {
    use keyplane_core::status::{Refusal, WriteOutcome};
    let reason = match outcome {
        WriteOutcome::Done => return,
        WriteOutcome::Refused(Refusal::Duplicate) => "duplicate",
        WriteOutcome::Refused(Refusal::NoSpace) => "no_space",
        WriteOutcome::Refused(Refusal::Other(_)) => "refused",
        WriteOutcome::Unconfirmed => "unconfirmed",
        WriteOutcome::DeferredArmed { .. } => "deferred_armed",
    };
    metrics()
        .apply_failures
        .get_or_create(&ReasonLabel {
            reason: reason.to_owned(),
        })
        .inc();
}

/// Counts a stored device event.
pub fn event_stored(kind: keyplane_core::EventKind) {
    let m = metrics();
    m.events_stored
        .get_or_create(&KindLabel {
            kind: kind.as_str().to_owned(),
        })
        .inc();
    if kind == keyplane_core::EventKind::Duress {
        m.duress_stored.inc();
    }
}

/// How long the database reads of a scrape may take; past it the scrape answers
/// with the values it had.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// Refreshes the gauges read from the pool and the database.
pub async fn refresh(store: &Store) {
    let m = metrics();
    let pool = store.pool_status();
    m.db_pool_size
        .set(i64::try_from(pool.size).unwrap_or(i64::MAX));
    m.db_pool_available
        .set(i64::try_from(pool.available).unwrap_or(i64::MAX));
    m.db_pool_waiting
        .set(i64::try_from(pool.waiting).unwrap_or(i64::MAX));
    m.db_pool_max
        .set(i64::try_from(pool.max_size).unwrap_or(i64::MAX));
    match tokio::time::timeout(REFRESH_TIMEOUT, store.metrics_snapshot(PENDING_SITES)).await {
        Ok(Ok(snapshot)) => {
            m.site_pending_changes.clear();
            m.site_oldest_pending_age.clear();
            for site in &snapshot.pending {
                let label = SiteLabel {
                    site: site.site.to_string(),
                };
                m.site_pending_changes
                    .get_or_create(&label)
                    .set(site.changes);
                m.site_oldest_pending_age
                    .get_or_create(&label)
                    .set(site.oldest_age_secs);
            }
            m.duress_undelivered.set(snapshot.duress_undelivered);
            m.duress_undelivered_oldest_age
                .set(snapshot.duress_oldest_age_secs);
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "metrics: reading pending changes failed"),
        Err(_) => tracing::warn!("metrics: reading pending changes timed out"),
    }
}
