//! The agent's Prometheus metrics (issue 17), served on `--metrics-listen` with
//! `keyplane_telemetry::metrics`: its devices, whether it is connected, how many
//! messages wait in its outbound queue, and when a device last applied a change.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

/// Every series the agent exports.
pub struct AgentMetrics {
    registry: Arc<Registry>,
    /// Devices the agent runs a task for.
    pub devices: Gauge,
    /// 1 while a Sync stream is open.
    pub connected: Gauge,
    /// Messages waiting in the outbound (routine) queue of the stream.
    pub queue_depth: Gauge,
    /// Unix time a device last applied a revision and acked it.
    pub last_apply: Gauge<f64, AtomicU64>,
}

impl AgentMetrics {
    fn new() -> AgentMetrics {
        let devices = Gauge::default();
        let connected = Gauge::default();
        let queue_depth = Gauge::default();
        let last_apply = Gauge::<f64, AtomicU64>::default();
        let mut r = Registry::with_prefix("keyplane_agent");
        r.register("devices", "Devices the agent runs", devices.clone());
        r.register(
            "connected",
            "1 while the stream to keyplaned is open",
            connected.clone(),
        );
        r.register(
            "queue_depth",
            "Messages waiting in the outbound queue to keyplaned",
            queue_depth.clone(),
        );
        r.register(
            "last_apply_timestamp_seconds",
            "Unix time a device last applied a revision and acked it",
            last_apply.clone(),
        );
        AgentMetrics {
            registry: Arc::new(r),
            devices,
            connected,
            queue_depth,
            last_apply,
        }
    }

    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Records that a device applied and acked a revision now.
    pub(crate) fn applied(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_apply.set(now.as_secs_f64());
    }
}

/// This process's metrics.
pub fn metrics() -> &'static AgentMetrics {
    static METRICS: OnceLock<AgentMetrics> = OnceLock::new();
    METRICS.get_or_init(AgentMetrics::new)
}
