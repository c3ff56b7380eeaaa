//! The `keyplaned` gRPC service: AdminService for dealers, OpsService for their
//! operators ([`ops`]), AgentService for site agents, plus `grpc.health.v1.Health` and server reflection (v1 and v1alpha).
//!
//! Served over TLS (rustls, ring) when given a certificate, and then only; plaintext
//! only on a loopback address. With a CA ([`pki`]) agents enroll and connect with
//! client certificates (see docs/SECURITY.md).
//!
//! No SQL here: persistence is `keyplane-store`. Dealers are authenticated by
//! [`auth::DealerAuthLayer`] in front of AdminService, before any handler runs. Tasks started by [`serve`]: the tonic
//! server, one task per agent stream (see [`agent`]), the wake-up tasks of
//! [`hub::Hub`] (announcer, listener, revision poller) and, with `metrics_listen`, the
//! metrics endpoint ([`metrics`]); all stop when the shutdown token is cancelled.

pub mod acks;
pub mod admin;
pub mod agent;
pub mod auth;
pub mod demo;
pub mod error;
pub mod fields;
pub mod hub;
pub mod limits;
pub mod mask;
pub mod metrics;
pub mod ops;
pub mod page;
pub mod pki;
pub mod reports;
pub mod resources;
pub mod retention;
pub mod shutdown;
pub mod status;
pub mod trace;

use keyplane_proto::v1::admin_service_server::AdminServiceServer;
use keyplane_proto::v1::agent_service_server::AgentServiceServer;
use keyplane_proto::v1::ops_service_server::OpsServiceServer;
use keyplane_store::{PinKey, Store};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tower_layer::Layer;

/// The largest AdminService request decoded (tonic's default is 4 MiB): the largest
/// legitimate request (a credential with its scope and schedules, an access plan with
/// its holidays) is a few KiB.
pub const MAX_ADMIN_MESSAGE: usize = 1024 * 1024;

/// The largest agent stream message decoded: an ObservedSlots of the largest panel
/// (a few hundred slots, each a few dozen bytes) fits many times over.
pub const MAX_AGENT_MESSAGE: usize = 256 * 1024;

/// The deadline of a call whose client names none (or a longer one).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// Everything `serve` needs. Debug shows no password of the database URL.
#[derive(Clone)]
pub struct Config {
    /// PostgreSQL URL.
    pub database_url: String,
    /// Key sealing PINs at rest.
    pub pin_key: PinKey,
    /// Pool size.
    pub max_connections: usize,
    /// How often to look for commits made by other replicas while the wake-up
    /// listener is down (or off): they are then only seen by polling.
    pub poll_interval: Duration,
    /// How often to poll while the listener is up: NOTIFY carries the wake-ups, and
    /// the poll only catches what a lost notification missed.
    pub poll_interval_listening: Duration,
    /// How often the poller re-reads the revision of every site this replica holds
    /// a stream for, and wakes those streams: the safety net under every other
    /// wake-up (one query per replica).
    pub held_check_interval: Duration,
    /// Whether to name written sites to other replicas (NOTIFY after commit) and
    /// listen for theirs; off, cross-replica wake-ups come from polling alone.
    pub notify: bool,
    /// Where the listener connects when not `database_url`: LISTEN needs a session
    /// of its own, which a transaction-pooling PgBouncer does not keep.
    pub listen_url: Option<String>,
    /// How long the listener waits before reconnecting (doubling to 30 s).
    pub listen_retry: Duration,
    /// How often this replica records the agents whose streams it holds as seen
    /// (must stay well under the 90 s after which an unheard agent counts as
    /// disconnected). 30 s unless a test needs otherwise.
    pub agent_seen_interval: Duration,
    /// How long a verified dealer token is trusted without the database; a removed
    /// token keeps working this long at most. 1 s unless a test needs otherwise.
    pub dealer_token_ttl: Duration,
    /// The listener's certificate and key. Without them keyplaned serves plaintext,
    /// which [`serve`] allows only on a loopback address.
    pub tls: Option<ServerTls>,
    /// The certificate authority of agents' client certificates. When set (with
    /// `tls`), agents may present a certificate it signed; see [`pki`].
    pub ca: Option<std::sync::Arc<pki::CertAuthority>>,
    /// How often slot assignments due for evaluation are evaluated (issue 11: their
    /// transitions become events; delays and offline devices are raised on time).
    /// Zero: never (the API still shows each status, decided when read).
    pub status_interval: Duration,
    /// How long in-flight calls may take to finish once shutdown begins; streams end
    /// at once with UNAVAILABLE, and connections still open after it are dropped.
    pub shutdown_grace: Duration,
    /// How often events and audit records past their dealer's retention period are
    /// deleted ([`retention`]). Zero: never.
    pub retention_interval: Duration,
    /// Rows per retention batch.
    pub retention_batch: i64,
    /// What the retention sweep has done (shared with whoever holds a clone).
    pub retention_progress: retention::RetentionProgress,
    /// How much of each site's change log the retention sweep keeps; an agent behind
    /// it gets a snapshot.
    pub change_window: keyplane_store::ChangeWindow,
    /// The most bytes of slots one part of a snapshot or change set carries
    /// ([`agent::PART_BYTES`] unless a test needs many parts of a small site).
    pub agent_part_bytes: usize,
    /// Skew between an agent's clock (reported in Hello) and keyplaned's beyond which
    /// GetSyncStatus raises `clock_skew` (issue 14). 30 s unless configured.
    pub clock_skew_threshold: Duration,
    /// The oldest agent protocol served (`keyplane_core::compat`): N-1 unless raised.
    pub min_agent_protocol: i32,
    /// This replica's name in the agent connections it records (OpsService); None:
    /// the host name (`HOSTNAME`, else /etc/hostname) and the listening port.
    pub replica_name: Option<String>,
    /// Where to serve Prometheus metrics (`GET /metrics`, see [`metrics`]); None: not
    /// served.
    pub metrics_listen: Option<String>,
    /// Agent sessions opened at once, and how long a Hello waits for a place before
    /// it is shed with RESOURCE_EXHAUSTED ([`agent::AgentApi::with_open_limit`]).
    pub agent_opens: (usize, Duration),
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &without_password(&self.database_url))
            .field("pin_key", &self.pin_key)
            .field("max_connections", &self.max_connections)
            .field("poll_interval", &self.poll_interval)
            .field("poll_interval_listening", &self.poll_interval_listening)
            .field("held_check_interval", &self.held_check_interval)
            .field("notify", &self.notify)
            .field(
                "listen_url",
                &self.listen_url.as_deref().map(without_password),
            )
            .field("listen_retry", &self.listen_retry)
            .field("agent_seen_interval", &self.agent_seen_interval)
            .field("dealer_token_ttl", &self.dealer_token_ttl)
            .field("tls", &self.tls)
            .field("ca", &self.ca)
            .field("status_interval", &self.status_interval)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("retention_interval", &self.retention_interval)
            .field("retention_batch", &self.retention_batch)
            .field("change_window", &self.change_window)
            .field("agent_part_bytes", &self.agent_part_bytes)
            .field("clock_skew_threshold", &self.clock_skew_threshold)
            .field("min_agent_protocol", &self.min_agent_protocol)
            .field("replica_name", &self.replica_name)
            .field("metrics_listen", &self.metrics_listen)
            .field("agent_opens", &self.agent_opens)
            .finish()
    }
}

/// `url` with the password of a `scheme://user:password@host` URL (or a
/// `password=` parameter) replaced.
fn without_password(url: &str) -> String {
    let masked = match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) if userinfo.contains(':') => {
                    let user = userinfo.split(':').next().unwrap_or("");
                    format!("{scheme}://{user}:<redacted>@{host}{tail}")
                }
                _ => url.to_owned(),
            }
        }
        None => url.to_owned(),
    };
    if masked.contains("password=") {
        return "<redacted: holds password=>".to_owned();
    }
    masked
}

/// The server's TLS identity (PEM). Debug never shows the key.
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate chain, leaf first.
    pub cert_pem: String,
    /// Private key.
    pub key_pem: String,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl Config {
    /// A config with defaults for everything but the database and key.
    pub fn new(database_url: impl Into<String>, pin_key: PinKey) -> Config {
        Config {
            database_url: database_url.into(),
            pin_key,
            max_connections: 32,
            poll_interval: Duration::from_millis(250),
            poll_interval_listening: Duration::from_secs(1),
            held_check_interval: Duration::from_secs(15),
            notify: true,
            listen_url: None,
            listen_retry: Duration::from_secs(1),
            agent_seen_interval: Duration::from_secs(30),
            dealer_token_ttl: keyplane_store::DEALER_TOKEN_TTL,
            tls: None,
            ca: None,
            status_interval: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
            retention_interval: Duration::from_secs(3600),
            retention_batch: retention::RETENTION_BATCH,
            retention_progress: retention::RetentionProgress::default(),
            change_window: keyplane_store::ChangeWindow::default(),
            agent_part_bytes: agent::PART_BYTES,
            clock_skew_threshold: keyplane_core::clock::DEFAULT_SKEW_THRESHOLD,
            min_agent_protocol: keyplane_core::compat::MIN_PROTOCOL_VERSION,
            replica_name: None,
            metrics_listen: None,
            agent_opens: (agent::OPENS_MAX, agent::OPEN_WAIT),
        }
    }
}

/// The name a replica listening on `addr` gives itself by default: its host name
/// (unique per pod or container) and port (unique per process on one host).
fn default_replica_name(addr: std::net::SocketAddr) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keyplaned".to_owned());
    format!("{host}:{}", addr.port())
}

/// Connects, migrates, and serves on `listener` until `shutdown` is cancelled; then
/// closes agent streams, finishes in-flight calls and drains the pool.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    if config.tls.is_none() && !addr.ip().is_loopback() {
        anyhow::bail!(
            "refusing to serve plaintext on {addr}: dealer tokens and PINs would cross the network in clear. \
             Pass --tls-cert-file and --tls-key-file (create them with `keyplaned ca-init --out DIR --server-name HOST`), \
             or listen on a loopback address (127.0.0.1, [::1]) for local development"
        );
    }
    // A deadline on every call (a client's shorter grpc-timeout wins): a handler
    // stuck on a lock or a slow query gives its connection back. Streams are bounded
    // only until their response starts.
    let mut server = tonic::transport::Server::builder().timeout(DEFAULT_DEADLINE);
    if let Some(tls) = &config.tls {
        let mut tls_config = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        );
        if let Some(ca) = &config.ca {
            // Optional: Enroll and the dealer API are called without a client certificate.
            tls_config = tls_config
                .client_ca_root(tonic::transport::Certificate::from_pem(ca.cert_pem()))
                .client_auth_optional(true);
        }
        server = server
            .tls_config(tls_config)
            .map_err(|e| anyhow::anyhow!("TLS certificate or key: {e}"))?;
    }
    let store = Store::connect(&config.database_url, config.max_connections, config.pin_key)?
        .with_dealer_token_ttl(config.dealer_token_ttl)
        .with_pool_wait_observer(|waited| {
            metrics::metrics()
                .db_pool_wait
                .observe(waited.as_secs_f64())
        });
    store.migrate().await?;
    store.key_check().await?;
    store
        .ca_check(config.ca.as_ref().map(|ca| ca.key_id()))
        .await?;
    let scraped = store.clone();
    let refresh: keyplane_telemetry::metrics::Refresh = std::sync::Arc::new(move || {
        let store = scraped.clone();
        Box::pin(async move { metrics::refresh(&store).await })
    });
    let metrics_server = match &config.metrics_listen {
        Some(at) => {
            let listener = TcpListener::bind(at)
                .await
                .map_err(|e| anyhow::anyhow!("metrics endpoint {at}: {e}"))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics on GET /metrics");
            Some(tokio::spawn(keyplane_telemetry::metrics::serve(
                listener,
                metrics::metrics().registry(),
                Some(refresh.clone()),
                shutdown.clone().cancelled_owned(),
            )))
        }
        None => None,
    };
    // The same registry over OTLP when the OTEL_* variables ask for it.
    let metrics_export = keyplane_telemetry::otlp_metrics::spawn_export(
        "keyplaned",
        metrics::metrics().registry(),
        Some(refresh),
        shutdown.clone().cancelled_owned(),
    )?;
    let hub = hub::Hub::default();
    let bell = hub::EventBell::default();
    let replica = config
        .replica_name
        .clone()
        .unwrap_or_else(|| default_replica_name(addr));
    let poller = tokio::spawn(hub.clone().poll(
        store.clone(),
        config.poll_interval,
        config.poll_interval_listening,
        config.held_check_interval,
        config.agent_seen_interval,
        shutdown.clone(),
    ));
    let notifiers = config.notify.then(|| {
        (
            tokio::spawn(hub.clone().announce(store.clone(), shutdown.clone())),
            tokio::spawn(
                hub.clone().listen(
                    store.clone(),
                    config
                        .listen_url
                        .clone()
                        .unwrap_or_else(|| config.database_url.clone()),
                    // What an operator finds in pg_stat_activity (63 bytes at most).
                    format!("keyplaned-listen {replica}"),
                    config.listen_retry,
                    shutdown.clone(),
                ),
            ),
        )
    });

    let sweeper = (!config.status_interval.is_zero()).then(|| {
        tokio::spawn(status::sweep(
            store.clone(),
            bell.clone(),
            config.status_interval,
            shutdown.clone(),
        ))
    });

    let retainer = (!config.retention_interval.is_zero()).then(|| {
        tokio::spawn(retention::sweep(
            store.clone(),
            config.retention_interval,
            config.retention_batch,
            config.change_window,
            config.retention_progress.clone(),
            shutdown.clone(),
        ))
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AdminServiceServer<admin::AdminApi>>()
        .await;
    health
        .set_serving::<AgentServiceServer<agent::AgentApi>>()
        .await;
    health.set_serving::<OpsServiceServer<ops::OpsApi>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keyplane_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keyplane_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Every AdminService and OpsService call is authenticated before it reaches a
    // handler, by one layer: the failure limit counts both.
    let dealer_auth = auth::DealerAuthLayer::new(store.clone());
    let ops = dealer_auth.layer(
        OpsServiceServer::new(ops::OpsApi::new(store.clone(), hub.clone()))
            .max_decoding_message_size(MAX_ADMIN_MESSAGE),
    );
    let admin = dealer_auth.layer(
        AdminServiceServer::new(admin::AdminApi::new(
            store.clone(),
            hub.clone(),
            bell.clone(),
            shutdown.clone(),
        ))
        .max_decoding_message_size(MAX_ADMIN_MESSAGE),
    );
    let agent_api = agent::AgentApi::new(
        store.clone(),
        hub,
        bell,
        shutdown.clone(),
        config.ca.clone(),
    )
    .with_policy(config.clock_skew_threshold, config.min_agent_protocol)
    .with_replica(replica)
    .with_part_bytes(config.agent_part_bytes)
    .with_open_limit(config.agent_opens.0, config.agent_opens.1);
    let sessions = agent_api.sessions();
    // Small request/response messages: without NODELAY, Nagle and delayed ACKs
    // add ~40 ms to every call on loopback.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    tracing::info!(%addr, tls = config.tls.is_some(), "keyplaned listening");
    let served = server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .add_service(ops)
        .add_service(
            AgentServiceServer::new(agent_api).max_decoding_message_size(MAX_AGENT_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled());
    // Streams end at shutdown, but a connection whose client stopped reading cannot
    // even take its closing status: the grace period bounds the wait for it.
    let grace = config.shutdown_grace;
    tokio::select! {
        served = served => served?,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(?grace, "grace period over: dropping the connections still open"),
    }
    if let Some(export) = metrics_export {
        // Its last export (shutdown was signalled), bounded like the rest.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), export).await;
    }
    // Each stream records its agent disconnected as it ends: before the pool
    // closes, or a restarted replica's sites would show their agents connected until
    // the liveness window ran out (and log a failure per stream).
    sessions.close();
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            streams = sessions.len(),
            "agent streams still recording their end after the grace period; the liveness window will show them gone"
        );
    }
    poller.abort();
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    if let Some((announcer, listener)) = notifiers {
        announcer.abort();
        listener.abort();
    }
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    if let Some(retainer) = retainer {
        retainer.abort();
    }
    store.close();
    tracing::info!("keyplaned stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_hides_the_database_password() {
        let key = PinKey::generate().expect("key");
        let config = Config::new("postgres://app:hunter2@db.example:5432/keyplane", key);
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("app:<redacted>@db.example:5432/keyplane"),
            "{shown}"
        );
        assert!(!without_password("host=h password=hunter2").contains("hunter2"));
        assert_eq!(without_password("postgres://u@h/db"), "postgres://u@h/db");
    }
}
