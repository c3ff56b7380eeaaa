//! The keyplane edge agent: holds one Sync stream to `keyplaned`, journals the desired
//! slot table locally, and reconciles each device through its driver.
//!
//! No database here. Tasks: [`run`] runs one task that owns the stream, the journal
//! and the drivers; an mpsc channel carries its outbound messages (Hello, acks) into
//! the gRPC request stream. It reconciles from the journal before connecting, so
//! devices converge on the last known table even while `keyplaned` is unreachable.

pub mod backoff;
pub mod clock;
pub mod intake;
pub mod journal;
mod reconcile;

pub use reconcile::{Agent, DriverFactory, SimulatorFactory};

use backoff::Backoff;
use clock::{Clock, SystemClock};
use keyplane_proto::v1 as pb;
use keyplane_proto::v1::agent_service_client::AgentServiceClient;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

/// How the agent reaches keyplaned and where it keeps its state.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// keyplaned URL, e.g. `http://127.0.0.1:50051`.
    pub server: String,
    /// `sites/{site}`.
    pub site: String,
    /// Agent bearer token.
    pub token: String,
    /// Directory of the journal.
    pub state_dir: PathBuf,
    /// Re-check every device this often even without news.
    pub reconcile_every: Duration,
    /// Read panels' event logs this often.
    pub event_poll: Duration,
    /// Where schedules read the time.
    pub clock: Arc<dyn Clock>,
    /// Read every device's slot table back at least this often (battery locks
    /// drain when polled: keep it long; writes trigger a read anyway).
    pub observe_every: Duration,
}

impl AgentConfig {
    /// A config with the default reconcile period.
    pub fn new(
        server: impl Into<String>,
        site: impl Into<String>,
        token: impl Into<String>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        AgentConfig {
            server: server.into(),
            site: site.into(),
            token: token.into(),
            state_dir: state_dir.into(),
            // Cheap when nothing changed; also how schedules open and close on time.
            reconcile_every: Duration::from_secs(1),
            event_poll: Duration::from_millis(200),
            clock: Arc::new(SystemClock),
            observe_every: Duration::from_secs(60),
        }
    }
}

/// Runs the agent until `shutdown` is cancelled: reconciles from the journal, then
/// keeps a Sync stream open, reconnecting with jittered backoff when it drops.
pub async fn run(
    config: AgentConfig,
    factory: Box<dyn DriverFactory>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut agent = Agent::open(&config.state_dir, factory, config.clock.clone())?;
    agent.observe_every = config.observe_every;
    agent.reconcile_all(None).await;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let mut healthy = false;
        let result = session(&config, &mut agent, &shutdown, &mut healthy).await;
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match result {
            Ok(()) => tracing::info!("keyplaned closed the stream; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "sync stream failed; reconnecting"),
        }
        if healthy {
            backoff.reset();
        }
        // Offline, the journal still rules: schedules open and close on time.
        let wake = tokio::time::Instant::now() + backoff.next_delay();
        let mut tick = tokio::time::interval(config.reconcile_every);
        loop {
            tokio::select! {
                // cancel-safe: a token.
                _ = shutdown.cancelled() => return Ok(()),
                // cancel-safe: a timer.
                _ = tokio::time::sleep_until(wake) => break,
                // cancel-safe: interval ticks.
                _ = tick.tick() => agent.reconcile_all(None).await,
            }
        }
    }
}

/// One stream: Hello, then apply what the server sends until it ends.
async fn session(
    config: &AgentConfig,
    agent: &mut Agent,
    shutdown: &CancellationToken,
    healthy: &mut bool,
) -> anyhow::Result<()> {
    let channel = Endpoint::from_shared(config.server.clone())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let mut client = AgentServiceClient::new(channel);
    // Two queues into one stream: urgent (Hello, then duress) always goes first.
    let (urgent, urgent_rx) = mpsc::channel(16);
    let (tx, rx) = mpsc::channel(64);
    urgent.send(agent.hello(&config.site)).await?;
    agent.stream_started();
    let mut request = tonic::Request::new(Prioritized {
        urgent: urgent_rx,
        routine: rx,
    });
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {}", config.token))?,
    );
    let mut inbound = client.sync(request).await?.into_inner();
    let mut tick = tokio::time::interval(config.reconcile_every);
    tick.reset();
    let mut events = tokio::time::interval(config.event_poll);
    events.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // cancel-safe: a token.
            _ = shutdown.cancelled() => return Ok(()),
            // cancel-safe: Streaming::message buffers partial frames internally.
            msg = inbound.message() => match msg? {
                Some(pb::ServerMessage { msg: Some(msg) }) => {
                    *healthy = true;
                    agent.apply(msg, &tx).await?;
                }
                Some(pb::ServerMessage { msg: None }) => tracing::warn!("empty server message ignored"),
                None => return Ok(()),
            },
            // cancel-safe: interval ticks.
            _ = tick.tick() => agent.reconcile_all(Some(&tx)).await,
            // cancel-safe: interval ticks.
            _ = events.tick() => agent.poll_events(&urgent, &tx).await,
        }
    }
}

/// The outbound stream of a session: drains `urgent` before `routine`, so a duress
/// event overtakes queued acks and routine events.
struct Prioritized {
    urgent: mpsc::Receiver<pb::AgentMessage>,
    routine: mpsc::Receiver<pb::AgentMessage>,
}

impl tokio_stream::Stream for Prioritized {
    type Item = pb::AgentMessage;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<pb::AgentMessage>> {
        use std::task::Poll;
        match self.urgent.poll_recv(cx) {
            Poll::Ready(Some(msg)) => return Poll::Ready(Some(msg)),
            Poll::Ready(None) | Poll::Pending => {}
        }
        self.routine.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn ack(revision: i64) -> pb::AgentMessage {
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Ack(pb::Ack {
                device: "d".into(),
                revision,
            })),
        }
    }

    #[tokio::test]
    async fn urgent_messages_overtake_queued_routine_ones() {
        let (urgent, urgent_rx) = mpsc::channel(4);
        let (routine, routine_rx) = mpsc::channel(4);
        for r in 1..=3 {
            routine.send(ack(r)).await.expect("queued");
        }
        urgent.send(ack(100)).await.expect("queued");
        let mut stream = Prioritized {
            urgent: urgent_rx,
            routine: routine_rx,
        };
        let mut order = Vec::new();
        drop((urgent, routine));
        while let Some(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Ack(a)),
        }) = stream.next().await
        {
            order.push(a.revision);
        }
        assert_eq!(order, vec![100, 1, 2, 3]);
    }
}
