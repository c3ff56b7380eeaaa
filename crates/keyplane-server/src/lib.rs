//! The `keyplaned` gRPC service: AdminService for dealers, AgentService for site
//! agents, plus `grpc.health.v1.Health` and server reflection (v1 and v1alpha).
//!
//! No SQL here: persistence is `keyplane-store`. Dealers are authenticated by
//! [`auth::DealerAuthLayer`] in front of AdminService, before any handler runs. Tasks started by [`serve`]: the tonic
//! server, one task per agent stream (see [`agent`]) and the revision poller of
//! [`hub::Hub`]; all stop when the shutdown token is cancelled.

pub mod admin;
pub mod agent;
pub mod auth;
pub mod demo;
pub mod error;
pub mod fields;
pub mod hub;
pub mod mask;
pub mod page;
pub mod reports;
pub mod resources;
pub mod status;

use keyplane_proto::v1::admin_service_server::AdminServiceServer;
use keyplane_proto::v1::agent_service_server::AgentServiceServer;
use keyplane_store::{PinKey, Store};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tower_layer::Layer;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL URL.
    pub database_url: String,
    /// Key sealing PINs at rest.
    pub pin_key: PinKey,
    /// Pool size.
    pub max_connections: usize,
    /// How often to look for commits made by other replicas.
    pub poll_interval: Duration,
    /// How long a verified dealer token is trusted without the database; a removed
    /// token keeps working this long at most. 1 s unless a test needs otherwise.
    pub dealer_token_ttl: Duration,
    /// How often slot assignments due for evaluation are evaluated (issue 11: their
    /// transitions become events; delays and offline devices are raised on time).
    /// Zero: never (the API still shows each status, decided when read).
    pub status_interval: Duration,
}

impl Config {
    /// A config with defaults for everything but the database and key.
    pub fn new(database_url: impl Into<String>, pin_key: PinKey) -> Config {
        Config {
            database_url: database_url.into(),
            pin_key,
            max_connections: 32,
            poll_interval: Duration::from_millis(250),
            dealer_token_ttl: keyplane_store::DEALER_TOKEN_TTL,
            status_interval: Duration::from_secs(2),
        }
    }
}

/// Connects, migrates, and serves on `listener` until `shutdown` is cancelled; then
/// closes agent streams, finishes in-flight calls and drains the pool.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = Store::connect(&config.database_url, config.max_connections, config.pin_key)?
        .with_dealer_token_ttl(config.dealer_token_ttl);
    store.migrate().await?;
    store.key_check().await?;
    let hub = hub::Hub::default();
    let bell = hub::EventBell::default();
    let poller = tokio::spawn(hub.clone().poll(
        store.clone(),
        config.poll_interval,
        shutdown.clone(),
    ));

    let sweeper = (!config.status_interval.is_zero()).then(|| {
        tokio::spawn(status::sweep(
            store.clone(),
            bell.clone(),
            config.status_interval,
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
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keyplane_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keyplane_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Every AdminService call is authenticated before it reaches a handler.
    let admin = auth::DealerAuthLayer::new(store.clone()).layer(AdminServiceServer::new(
        admin::AdminApi::new(store.clone(), hub.clone(), bell.clone(), shutdown.clone()),
    ));
    let addr = listener.local_addr()?;
    // Small request/response messages: without NODELAY, Nagle and delayed ACKs
    // add ~40 ms to every call on loopback.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    tracing::info!(%addr, "keyplaned listening");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .add_service(AgentServiceServer::new(agent::AgentApi::new(
            store.clone(),
            hub,
            bell,
            shutdown.clone(),
        )))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await?;
    poller.abort();
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    store.close();
    tracing::info!("keyplaned stopped");
    Ok(())
}
