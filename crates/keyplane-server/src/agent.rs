//! AgentService: one bidirectional Sync stream per site agent.
//!
//! Each stream runs one task: it answers Hello with a snapshot or the changes since
//! the agent's revision, then sends live changes whenever the hub wakes it, and
//! records acks. An idle stream asks the database nothing: the hub's one poller per
//! replica stands in for a periodic re-check per stream (670 queries a second with
//! 10,000 agents); a read that failed is retried by the stream itself. Responses go through an mpsc channel;
//! a failed send means the agent left.
//!
//! A stream ends, with a status saying why, when the site's session epoch advances
//! past its own and a re-check finds it revoked (certificate or token), replaced by a
//! newer stream for the same site, or its site deleted: the hub's poller sees the
//! epoch on every replica within a poll interval. Enroll and RenewCertificate issue
//! client certificates from keyplaned's CA (see [`crate::pki`]).

use crate::auth;
use crate::error::store_status;
use crate::hub::EventBell;
use crate::hub::Hub;
use keyplane_core::DeviceModel;
use keyplane_core::names::{DeviceName, SiteName};

/// The most slots one ObservedSlots may carry (the largest panel has a few hundred).
pub const MAX_OBSERVED_SLOTS: usize = 1024;

use keyplane_proto::v1 as pb;
use keyplane_proto::v1::agent_service_server::AgentService;
use keyplane_store::{
    AgentPrincipal, AgentUpdate, DesiredSlot, EventKind, NewEvent, Observed, ObservedState,
    SessionCheck, Store, StoreError,
};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

/// Response header of Sync: the agent protocol this server speaks.
pub const PROTOCOL_HEADER: &str = "keyplane-protocol-version";
/// Response header of Sync: this server takes `ClockReport`s on the stream (an
/// older one would end the stream on a message it does not know, so the agent sends
/// them only when told).
pub const CLOCK_REPORTS_HEADER: &str = "keyplane-clock-reports";
/// How long an agent has to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait before a stream retries a database read that failed; it doubles
/// up to [`RETRY_MAX`] while the reads keep failing.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between a stream's retries.
const RETRY_MAX: Duration = Duration::from_secs(15);

/// The AgentService implementation.
#[derive(Debug, Clone)]
pub struct AgentApi {
    store: Store,
    /// Records the acks of every stream together.
    acks: crate::acks::AckBatcher,
    hub: Hub,
    bell: EventBell,
    shutdown: CancellationToken,
    ca: Option<Arc<crate::pki::CertAuthority>>,
    /// Skew beyond which an agent's clock is flagged (issue 14).
    clock_skew_threshold: Duration,
    /// The oldest agent protocol served (`keyplane_core::compat`).
    min_protocol: i32,
    /// This replica's name, recorded with the streams it holds (OpsService).
    replica: String,
    /// The most bytes of slots in one part ([`PART_BYTES`]).
    part_bytes: usize,
    /// Places among the sessions being opened at once (Hello until the first update
    /// is read): see [`AgentApi::with_open_limit`].
    openings: Arc<tokio::sync::Semaphore>,
    /// How many places there are.
    open_max: usize,
    /// How long a Hello waits for a place before it is shed.
    open_wait: Duration,
    /// The streams' tasks, so shutdown can wait for each to record its agent
    /// disconnected before the pool closes ([`AgentApi::sessions`]).
    sessions: tokio_util::task::TaskTracker,
}

/// Agent sessions a replica opens at once unless configured.
pub const OPENS_MAX: usize = 8;
/// How long a Hello waits for a place unless configured: long enough that a storm
/// queues rather than backs off (a refused agent waits 0.2 s doubling to 30 s, idle
/// time the replica could have used: 2 s gave 191 reconnects/s in the bench's G4,
/// 10 s 535/s with a lower write p99), short enough to shed a storm it cannot serve.
pub const OPEN_WAIT: Duration = Duration::from_secs(10);

impl AgentApi {
    /// The tasks of the streams this service opened: a stream's task ends after
    /// recording its agent disconnected, so shutdown waits for them (closed and
    /// bounded) before it closes the pool.
    pub fn sessions(&self) -> tokio_util::task::TaskTracker {
        self.sessions.clone()
    }

    /// Builds the service; without `ca`, Enroll and RenewCertificate are refused.
    pub fn new(
        store: Store,
        hub: Hub,
        bell: EventBell,
        shutdown: CancellationToken,
        ca: Option<Arc<crate::pki::CertAuthority>>,
    ) -> Self {
        AgentApi {
            acks: crate::acks::AckBatcher::start(store.clone()),
            store,
            hub,
            bell,
            shutdown,
            ca,
            clock_skew_threshold: keyplane_core::clock::DEFAULT_SKEW_THRESHOLD,
            min_protocol: keyplane_core::compat::MIN_PROTOCOL_VERSION,
            replica: String::new(),
            sessions: tokio_util::task::TaskTracker::new(),
            part_bytes: PART_BYTES,
            openings: Arc::new(tokio::sync::Semaphore::new(OPENS_MAX)),
            open_max: OPENS_MAX,
            open_wait: OPEN_WAIT,
        }
    }

    /// Opens at most `max` agent sessions at once; a Hello that finds no place
    /// within `wait` is refused with RESOURCE_EXHAUSTED, and its agent comes back
    /// after its jittered backoff. In a reconnect storm (every agent of a restarted
    /// replica at once) this keeps opening sessions, each a few queries and a
    /// snapshot or change read, from taking the whole database pool from writes.
    pub fn with_open_limit(mut self, max: usize, wait: Duration) -> Self {
        let max = max.max(1);
        self.openings = Arc::new(tokio::sync::Semaphore::new(max));
        self.open_max = max;
        self.open_wait = wait;
        self
    }

    /// A place among the sessions being opened, or RESOURCE_EXHAUSTED after
    /// `open_wait`.
    async fn admit(&self, site: Uuid) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        let place = self.openings.clone().acquire_owned();
        match tokio::time::timeout(self.open_wait, place).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                tracing::info!(%site, "agent shed: {} sessions already opening", self.open_max);
                Err(Status::resource_exhausted(format!(
                    "keyplaned is opening {} other agent sessions (a reconnect storm?); \
                     the agent retries after its backoff",
                    self.open_max
                )))
            }
        }
    }

    /// Sets the most bytes of slots one part carries (at least one slot goes in each).
    pub fn with_part_bytes(mut self, part_bytes: usize) -> Self {
        self.part_bytes = part_bytes;
        self
    }

    /// Names this replica in the connections it records (OpsService).
    pub fn with_replica(mut self, replica: impl Into<String>) -> Self {
        self.replica = replica.into();
        self
    }

    /// Sets the clock-skew threshold and the oldest agent protocol served.
    pub fn with_policy(mut self, clock_skew_threshold: Duration, min_protocol: i32) -> Self {
        self.clock_skew_threshold = clock_skew_threshold;
        self.min_protocol = min_protocol;
        self
    }

    /// Stores what the agent said about itself and its clock's skew; a skew flag
    /// that changed is an event, so event watchers are woken. A failure here does not
    /// refuse the agent: it is logged and the stream goes on.
    async fn record_hello(&self, site: Uuid, hello: &pb::Hello, protocol: i32) {
        let record = keyplane_store::AgentHello {
            agent_version: hello.agent_version.clone(),
            protocol_version: protocol,
            tzdb_version: hello.tzdb_version.clone(),
            agent_time: hello.agent_time.and_then(|t| SystemTime::try_from(t).ok()),
        };
        match self
            .store
            .agent_hello_record(site, &record, SystemTime::now(), self.clock_skew_threshold)
            .await
        {
            Ok((check, change)) => {
                if check.skewed() {
                    tracing::warn!(%site, skew_ms = ?check.skew_ms(), "agent clock skewed beyond the threshold");
                }
                if change.is_some() {
                    self.bell.ring();
                }
            }
            Err(e) => tracing::warn!(%site, error = %e, "recording the agent's Hello failed"),
        }
    }

    fn ca(&self) -> Result<&crate::pki::CertAuthority, Status> {
        self.ca.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "this keyplaned has no agent certificate authority (--ca-key-file): enrollment is unavailable",
            )
        })
    }

    fn certificate_pb(
        agent: Uuid,
        site: Uuid,
        cert: crate::pki::AgentCert,
    ) -> pb::AgentCertificate {
        pb::AgentCertificate {
            agent: format!("agents/{agent}"),
            site: format!("sites/{site}"),
            certificate_pem: cert.pem,
            expire_time: Some(prost_types::Timestamp::from(cert.not_after)),
        }
    }
}

fn bad_code() -> Status {
    Status::unauthenticated(
        "unknown, used or expired enrollment code: create a new one with AdminService/CreateEnrollmentCode",
    )
}

fn slot_pb(site: Uuid, s: &DesiredSlot) -> pb::DesiredSlot {
    let mut slot = pb::DesiredSlot {
        device: format!("sites/{site}/devices/{}", s.device),
        slot: i32::from(s.slot),
        ..Default::default()
    };
    slot.remove_local = s.remove_local;
    if let Some(code) = &s.code {
        slot.credential = format!(
            "sites/{site}/users/{}/credentials/{}",
            code.user, code.credential
        );
        slot.pin = code.pin.expose().to_owned();
        slot.authorities = code
            .authorities
            .iter()
            .map(|(p, l)| pb::PartitionAuthority {
                partition: i32::from(*p),
                level: pb::Level::from(*l) as i32,
            })
            .collect();
        slot.open_close_reporting = code.open_close_reporting;
        if let Some(schedules) = &code.schedules {
            slot.scheduled = true;
            slot.schedules = schedules.iter().map(pb::Schedule::from).collect();
        }
        slot.write_generation = code.write_generation;
        slot.valid_from_time = code.valid_from.map(keyplane_proto::convert::timestamp);
        slot.valid_until_time = code.valid_until.map(keyplane_proto::convert::timestamp);
    }
    slot
}

fn devices_pb(site: Uuid, devices: &[(Uuid, &'static DeviceModel)]) -> Vec<pb::SiteDevice> {
    devices
        .iter()
        .map(|(id, model)| pb::SiteDevice {
            name: format!("sites/{site}/devices/{id}"),
            kind: pb::DeviceKind::from(model.kind) as i32,
            model: model.id.to_owned(),
        })
        .collect()
}

/// The most bytes of slots one part of a snapshot or change set carries. Parts queue
/// in the stream's channel (16 messages), so this bounds what a slow agent holds in
/// keyplaned's memory besides the update itself: 4 MiB.
pub const PART_BYTES: usize = 256 * 1024;

/// The largest message an agent that does not assemble parts accepts: tonic's default
/// decoding limit, which agents before `Hello.accepts_parts` kept.
pub const SINGLE_MESSAGE_LIMIT: usize = 4 * 1024 * 1024;

/// Room kept in a single message for everything but the slots (devices, time zone).
const HEADER_ROOM: usize = 256 * 1024;

/// An update as messages of at most `max_bytes` of slots each, built one at a time
/// as they are sent, so the update is never held twice. An update with no slots is
/// one message; every message carries the update's other fields, and all but the
/// last say `more_parts`.
struct Parts<'a> {
    site: Uuid,
    update: &'a AgentUpdate,
    max_bytes: usize,
    next: usize,
    part: i32,
    done: bool,
}

impl<'a> Parts<'a> {
    fn new(site: Uuid, update: &'a AgentUpdate, max_bytes: usize) -> Self {
        Parts {
            site,
            update,
            max_bytes,
            next: 0,
            part: 0,
            done: false,
        }
    }

    fn all_slots(&self) -> &'a [DesiredSlot] {
        match self.update {
            AgentUpdate::Snapshot { slots, .. } | AgentUpdate::Changes { slots, .. } => slots,
        }
    }
}

impl Iterator for Parts<'_> {
    type Item = pb::ServerMessage;

    fn next(&mut self) -> Option<pb::ServerMessage> {
        use prost::Message;
        if self.done {
            return None;
        }
        let all = self.all_slots();
        let mut slots = Vec::new();
        let mut bytes = 0;
        while let Some(s) = all.get(self.next) {
            let slot = slot_pb(self.site, s);
            let len = slot.encoded_len();
            // The field's tag and length prefix.
            let size = 1 + prost::length_delimiter_len(len) + len;
            if !slots.is_empty() && bytes + size > self.max_bytes {
                break;
            }
            bytes += size;
            slots.push(slot);
            self.next += 1;
        }
        let more_parts = self.next < all.len();
        let part = self.part;
        self.part += 1;
        self.done = !more_parts;
        let site = self.site;
        let msg = match self.update {
            AgentUpdate::Snapshot {
                revision,
                devices,
                time_zone,
                lockdown,
                traceparent,
                ..
            } => pb::server_message::Msg::Snapshot(pb::DesiredSnapshot {
                traceparent: traceparent.clone().unwrap_or_default(),
                lockdown: *lockdown,
                revision: *revision,
                devices: devices_pb(site, devices),
                slots,
                time_zone: time_zone.clone(),
                more_parts,
                part,
            }),
            AgentUpdate::Changes {
                from,
                revision,
                devices,
                time_zone,
                lockdown,
                traceparent,
                ..
            } => pb::server_message::Msg::Changes(pb::DesiredChanges {
                traceparent: traceparent.clone().unwrap_or_default(),
                lockdown: *lockdown,
                from_revision: *from,
                revision: *revision,
                slots,
                devices: devices_pb(site, devices),
                time_zone: time_zone.clone(),
                more_parts,
                part,
            }),
        };
        Some(pb::ServerMessage { msg: Some(msg) })
    }
}

/// How log lines name an agent: `agents/{id}`, or `token` for one not enrolled
/// (never the token's hash, which would identify it across logs for nothing).
fn principal_label(principal: &AgentPrincipal) -> String {
    match principal {
        AgentPrincipal::Agent(id) => format!("agents/{id}"),
        AgentPrincipal::Token(_) => "token".to_owned(),
    }
}

fn update_revision(update: &AgentUpdate) -> i64 {
    match update {
        AgentUpdate::Snapshot { revision, .. } | AgentUpdate::Changes { revision, .. } => *revision,
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let result: Result<Response<Self::SyncStream>, Status> = async move {
            let (site, principal, expires) = auth::agent(&self.store, &request).await?;
            let peer = auth::peer_addr(request.extensions()).map(|a| a.to_string());
            let mut inbound = request.into_inner();
            let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
                Err(_) => return Err(Status::deadline_exceeded("no Hello within 10 s")),
                Ok(Err(status)) => return Err(crate::error::undecodable_is_invalid(status)),
                Ok(Ok(None)) => return Err(Status::cancelled("stream closed before Hello")),
                Ok(Ok(Some(pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Hello(hello)),
                }))) => hello,
                Ok(Ok(Some(_))) => {
                    return Err(Status::invalid_argument("the first message must be Hello"));
                }
            };
            let named = SiteName::parse(&hello.site)
                .map_err(|e| Status::invalid_argument(format!("hello.site: {e}")))?;
            if named.site != site {
                return Err(Status::permission_denied(format!(
                    "this agent's certificate or token belongs to sites/{site}, not {}",
                    hello.site
                )));
            }
            if hello.applied_revision < 0 {
                return Err(Status::invalid_argument(
                    "hello.applied_revision must not be negative",
                ));
            }
            let protocol = match keyplane_core::compat::check(hello.protocol_version, self.min_protocol)
            {
                keyplane_core::compat::Compat::TooOld { agent, min } => {
                    tracing::info!(%site, agent = ?principal, protocol = agent, version = %hello.agent_version, "agent refused: protocol too old");
                    return Err(Status::failed_precondition(
                        keyplane_core::compat::too_old_message(agent, min),
                    ));
                }
                keyplane_core::compat::Compat::Newer(p) => {
                    tracing::info!(%site, protocol = p, "agent speaks a newer protocol; served with this server's");
                    p
                }
                keyplane_core::compat::Compat::Older(p) => p,
                keyplane_core::compat::Compat::Current => keyplane_core::compat::PROTOCOL_VERSION,
            };
            // Held until the first update is read and the session recorded.
            let _opening = self.admit(site).await?;
            let mut wake = self.hub.subscribe(site);
            // Taken before `first` is read: whatever moves after it is still to be
            // looked at, so no wake-up is lost between reading `first` and the
            // stream's loop (the hub's own poller would not repeat one whose
            // revision it had already passed on).
            let before = *wake.borrow_and_update();
            // Identifies this stream, so only the newest one marks the site disconnected.
            let session = Uuid::new_v4();
            // The Hello record and the first read are independent: each on its own
            // connection at once, so an open (eight at a time) waits for one commit
            // less, which is what bounds the reconnect rate after a restart.
            let ((), first) = tokio::join!(
                self.record_hello(site, &hello, protocol),
                self.store.agent_update(site, hello.applied_revision),
            );
            let first = first.map_err(store_status)?;
            let place = keyplane_store::AgentPlace {
                peer,
                replica: self.replica.clone(),
                agent: match &principal {
                    AgentPrincipal::Agent(id) => Some(*id),
                    AgentPrincipal::Token(_) => None,
                },
            };
            let keyplane_store::SessionOpened { epoch, resync } = self
                .store
                .agent_session_open_at(site, session, &place)
                .await
                .map_err(store_status)?;
            // A stream this replica holds for the site re-checks now, not at the next poll.
            self.hub.epoch(site, epoch);
            tracing::info!(%site, agent = ?principal, applied = hello.applied_revision, devices = hello.inventory.len(), version = %hello.agent_version, "agent connected");
            // Issue 11: what devices report about themselves (crate::reports).
            for d in hello.inventory.iter().filter(|d| d.constraints.is_some()) {
                if let Err(status) = crate::reports::inventory(&self.store, site, d).await {
                    tracing::warn!(%site, device = %d.device, %status, "reported constraints not taken");
                }
            }

            let (tx, rx) = mpsc::channel(16);
            let session = Session {
                site,
                session,
                store: self.store.clone(),
                acks: self.acks.clone(),
                bell: self.bell.clone(),
                hub: self.hub.clone(),
                tx,
                sent: 0,
                principal,
                parts: hello.accepts_parts.then_some(self.part_bytes),
                epoch,
                resync,
                expires,
                shutdown: self.shutdown.clone(),
                clock_skew_threshold: self.clock_skew_threshold,
                owed: Owed::default(),
            };
            // Every line of the stream's task names the site and agent.
            let span = tracing::info_span!("agent_stream", %site, agent = %principal_label(&session.principal));
            self.sessions.spawn(tracing::Instrument::instrument(
                session.run(first, before, inbound, wake),
                span,
            ));
            let mut response: Response<Self::SyncStream> = Response::new(Box::pin(
                crate::shutdown::until_shutdown(rx, self.shutdown.clone()),
            ));
            // A newer agent learns which protocol it is served with.
            response.metadata_mut().insert(
                PROTOCOL_HEADER,
                tonic::metadata::MetadataValue::from(keyplane_core::compat::PROTOCOL_VERSION),
            );
            response.metadata_mut().insert(
                CLOCK_REPORTS_HEADER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            Ok(response)
        }
        .await;
        crate::metrics::call(
            "/keyplane.v1.AgentService/Sync",
            result
                .as_ref()
                .map_or_else(Status::code, |_| tonic::Code::Ok),
        );
        result
    }

    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::AgentCertificate>, Status> {
        let ca = self.ca()?;
        let req = request.into_inner();
        let code = req.enrollment_code.trim();
        if code.is_empty() {
            return Err(Status::invalid_argument("enrollment_code is required"));
        }
        // Checked before signing so a bad code costs no signature; used up below.
        self.store
            .enrollment_code_site(code)
            .await
            .map_err(store_status)?
            .ok_or_else(bad_code)?;
        let agent = Uuid::new_v4();
        let cert = ca
            .sign_agent(&req.csr_der, agent, SystemTime::now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let site = self
            .store
            .agent_enroll(code, agent, &cert.sha256, cert.not_after)
            .await
            .map_err(store_status)?
            .ok_or_else(bad_code)?;
        // The enrollment revoked the site's earlier agents: their streams end.
        self.hub.changed(site);
        tracing::info!(%site, %agent, "agent enrolled");
        Ok(Response::new(Self::certificate_pb(agent, site, cert)))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::AgentCertificate>, Status> {
        let ca = self.ca()?;
        let auth::AgentCert {
            agent,
            site,
            sha256: old,
            ..
        } = auth::agent_cert(&self.store, &request)
            .await?
            .ok_or_else(|| {
                Status::unauthenticated(
                    "RenewCertificate needs the agent's current client certificate (mutual TLS)",
                )
            })?;
        let cert = ca
            .sign_agent(&request.get_ref().csr_der, agent, SystemTime::now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !self
            .store
            .agent_renew(agent, &old, &cert.sha256, cert.not_after)
            .await
            .map_err(store_status)?
        {
            return Err(Status::unauthenticated(
                "this certificate was revoked or already renewed",
            ));
        }
        tracing::info!(%site, %agent, "agent certificate renewed");
        Ok(Response::new(Self::certificate_pb(agent, site, cert)))
    }
}

struct Session {
    site: Uuid,
    session: Uuid,
    store: Store,
    acks: crate::acks::AckBatcher,
    bell: EventBell,
    hub: Hub,
    tx: mpsc::Sender<Result<pb::ServerMessage, Status>>,
    sent: i64,
    principal: AgentPrincipal,
    /// The agent assembles parts (`Hello.accepts_parts`): large updates are sent in
    /// parts of this many bytes of slots; otherwise (None) as one message of at most
    /// [`SINGLE_MESSAGE_LIMIT`].
    parts: Option<usize>,
    /// The site's session epoch this stream last checked itself against.
    epoch: i64,
    /// The site's resync sequence this stream has answered (OpsService/ResyncSite).
    resync: i64,
    /// When the agent's certificate expires, as last read (renewal moves it): the
    /// periodic re-check asks the database only once it has passed.
    expires: Option<SystemTime>,
    /// Every send also waits on it: an agent that stops reading cannot hold the
    /// task past shutdown.
    shutdown: CancellationToken,
    /// The agent clock skew beyond which CLOCK_SKEW is raised.
    clock_skew_threshold: Duration,
    /// What this stream still owes after a database read failed, and when to retry.
    owed: Owed,
}

/// Reads a stream could not make (the database was unreachable), retried with
/// backoff: no wake-up may be lost to a failed read, and a revocation that could not
/// be checked is checked again rather than let pass.
#[derive(Debug, Default)]
struct Owed {
    /// The session check (revoked, replaced, closed, deleted?).
    check: bool,
    /// A full snapshot (an operator's resync).
    snapshot: bool,
    /// The changes since the last message sent.
    changes: bool,
    /// When to retry; None while nothing is owed.
    at: Option<tokio::time::Instant>,
    /// The wait before the next retry.
    backoff: Duration,
}

impl Owed {
    fn any(&self) -> bool {
        self.check || self.snapshot || self.changes
    }

    /// Schedules the next retry after a failure (backing off), or clears the timer
    /// once nothing is owed.
    fn reschedule(&mut self, failed: bool) {
        if !self.any() {
            self.at = None;
            self.backoff = Duration::ZERO;
        } else if failed {
            self.backoff = if self.backoff.is_zero() {
                RETRY_FIRST
            } else {
                (self.backoff * 2).min(RETRY_MAX)
            };
            self.at = Some(tokio::time::Instant::now() + self.backoff);
        }
    }
}

impl Session {
    async fn run(
        mut self,
        first: AgentUpdate,
        before: crate::hub::Seen,
        mut inbound: Streaming<pb::AgentMessage>,
        mut wake: tokio::sync::watch::Receiver<crate::hub::Seen>,
    ) {
        let site = self.site;
        let shutdown = self.shutdown.clone();
        crate::metrics::metrics().agents_connected.inc();
        if self.send(&first).await {
            // What the hub said before `first` was read; anything since is read
            // again (a catch-up that finds nothing new costs one query).
            let mut last = before;
            loop {
                // A certificate that expires mid-stream (not renewed) ends it at its
                // expiry; revocations and takeovers come through the epoch.
                let due = self.owed.at.or_else(|| self.expires.map(instant_of));
                tokio::select! {
                    // cancel-safe: a token.
                    _ = shutdown.cancelled() => break,
                    // cancel-safe: Streaming::message keeps partial frames in the stream.
                    msg = inbound.message() => match msg {
                        Ok(Some(msg)) => {
                            if let Err(status) = self.handle(msg).await {
                                self.send_msg(Err(status)).await;
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%site, %status, "agent stream error");
                            let status = crate::error::undecodable_is_invalid(status);
                            if status.code() == tonic::Code::InvalidArgument {
                                self.send_msg(Err(status)).await;
                            }
                            break;
                        }
                    },
                    // cancel-safe: watch::changed.
                    changed = wake.changed() => {
                        if changed.is_err() { break; }
                        let seen = *wake.borrow_and_update();
                        if (seen.gone || seen.epoch > self.epoch) && !self.may_go_on().await {
                            break;
                        }
                        if seen.resync > self.resync {
                            // An operator asked for a full snapshot (on any replica).
                            self.resync = seen.resync;
                            last = seen;
                            if !self.resend_snapshot().await { break; }
                            continue;
                        }
                        // A local poke leaves `seen` as it was: read. Otherwise read
                        // only when the site moved past what this stream sent: an
                        // epoch change or the poller's periodic check alone changes no
                        // slot, and a write coalesced with one shows in the revision
                        // (from the listener, the poll or that check).
                        let poked = seen == last;
                        last = seen;
                        if (poked || seen.revision > self.sent) && !self.catch_up().await { break; }
                    }
                    // cancel-safe: a timer.
                    _ = sleep_until_some(due) => {
                        if !self.settle().await { break; }
                    }
                }
            }
        }
        if let Err(e) = self.store.agent_session_close(site, self.session).await {
            tracing::warn!(%site, error = %e, "marking agent disconnected failed");
        }
        crate::metrics::metrics().agents_connected.dec();
        tracing::info!(%site, "agent disconnected");
    }

    /// Makes the reads owed after failures, and the session check once the
    /// certificate has expired; false when the stream must end.
    async fn settle(&mut self) -> bool {
        let expired = self.expires.is_some_and(|t| SystemTime::now() >= t);
        if (expired || self.owed.check) && !self.may_go_on().await {
            return false;
        }
        if self.expires.is_some_and(|t| SystemTime::now() >= t) && !self.owed.check {
            // The check passed with an expiry still behind us: check again later
            // rather than at once, for ever.
            self.owed.check = true;
            self.owed.reschedule(true);
        }
        if self.owed.snapshot {
            return self.resend_snapshot().await;
        }
        if self.owed.changes {
            return self.catch_up().await;
        }
        true
    }

    /// Whether this stream may go on (not revoked, replaced or of a deleted site);
    /// when not, the agent is told why before the stream ends.
    async fn may_go_on(&mut self) -> bool {
        let site = self.site;
        let status = match self
            .store
            .agent_session_check(site, self.session, &self.principal)
            .await
        {
            Ok(SessionCheck::Current { epoch, not_after }) => {
                self.epoch = epoch;
                self.expires = not_after;
                self.owed.check = false;
                self.owed.reschedule(false);
                return true;
            }
            Ok(SessionCheck::Replaced) => Status::aborted(format!(
                "another agent stream for sites/{site} took over; this one is closed"
            )),
            Ok(SessionCheck::Closed) => Status::unavailable(format!(
                "an operator closed the agent stream of sites/{site} (OpsService/CloseAgentConnection): reconnect"
            )),
            Ok(SessionCheck::Revoked) => Status::unauthenticated(
                "this agent's certificate or token was revoked, expired, or replaced by a new enrollment: enroll again with a new enrollment code",
            ),
            Ok(SessionCheck::SiteGone) => Status::not_found(format!("sites/{site} was deleted")),
            Err(e) => {
                tracing::warn!(%site, error = %e, "re-checking the agent session failed; will retry");
                self.owed.check = true;
                self.owed.reschedule(true);
                return true;
            }
        };
        tracing::info!(%site, agent = ?self.principal, %status, "closing agent stream");
        self.send_msg(Err(status)).await;
        false
    }

    /// Sends a full snapshot, as if the agent had just connected; false when the
    /// agent is gone.
    async fn resend_snapshot(&mut self) -> bool {
        match self.store.agent_update(self.site, 0).await {
            Ok(update) => {
                tracing::info!(site = %self.site, "resync: sending the agent a full snapshot");
                // A snapshot holds every change too.
                self.owed.snapshot = false;
                self.owed.changes = false;
                self.owed.reschedule(false);
                self.send(&update).await
            }
            Err(e) => {
                tracing::warn!(site = %self.site, error = %e, "reading the resync snapshot failed; will retry");
                self.owed.snapshot = true;
                self.owed.reschedule(true);
                true
            }
        }
    }

    /// Sends what changed since the last message; false when the agent is gone.
    async fn catch_up(&mut self) -> bool {
        let result = self.store.agent_update(self.site, self.sent).await;
        if result.is_ok() {
            self.owed.changes = false;
            self.owed.reschedule(false);
        }
        match result {
            Ok(AgentUpdate::Changes { revision, .. }) if revision <= self.sent => true,
            Ok(update) => self.send(&update).await,
            Err(e) => {
                tracing::warn!(site = %self.site, error = %e, "reading changes failed; will retry");
                self.owed.changes = true;
                self.owed.reschedule(true);
                true
            }
        }
    }

    /// Sends `update`, in parts when the agent assembles them; false when the agent is
    /// gone, or when the update does not fit the one message an agent that does not
    /// assemble parts accepts (the stream ends with FAILED_PRECONDITION saying so).
    async fn send(&mut self, update: &AgentUpdate) -> bool {
        if let Some(part_bytes) = self.parts {
            for msg in Parts::new(self.site, update, part_bytes) {
                if !self.send_msg(Ok(msg)).await {
                    return false;
                }
            }
        } else {
            let mut parts = Parts::new(self.site, update, SINGLE_MESSAGE_LIMIT - HEADER_ROOM);
            let Some(msg) = parts.next() else {
                return false;
            };
            if parts.next().is_some() {
                let site = self.site;
                tracing::warn!(%site, "the site's desired table does not fit one message: the agent must assemble parts");
                self.send_msg(Err(Status::failed_precondition(format!(
                    "what sites/{site}'s agent must apply is over the {} MiB one message may carry to an agent \
                     that does not assemble parts: upgrade keyplane-agent to a release that sets Hello.accepts_parts",
                    SINGLE_MESSAGE_LIMIT / (1024 * 1024)
                ))))
                .await;
                return false;
            }
            if !self.send_msg(Ok(msg)).await {
                return false;
            }
        }
        self.sent = update_revision(update);
        true
    }

    /// Sends one message; false when the agent is gone or the server shuts down.
    async fn send_msg(&self, msg: Result<pb::ServerMessage, Status>) -> bool {
        crate::shutdown::send(&self.tx, msg, &self.shutdown).await
    }

    /// Stores what the agent saw on a device; wakes agents when policy acted on it.
    async fn record_observed(&mut self, observed: pb::ObservedSlots) -> Result<(), Status> {
        let device = DeviceName::parse(&observed.device)
            .map_err(|e| Status::invalid_argument(format!("observed.device: {e}")))?;
        if device.site != self.site {
            return Err(Status::permission_denied(format!(
                "observed.device {} is not a device of sites/{}",
                observed.device, self.site
            )));
        }
        // Each slot costs a seal, an INSERT and maybe an audit row: no device has more
        // than MAX_OBSERVED_SLOTS, and a slot is reported once. (Numbers outside the
        // device's range are ignored by the store, which knows the model.)
        if observed.slots.len() > MAX_OBSERVED_SLOTS {
            return Err(Status::invalid_argument(format!(
                "observed.slots: {} slots, more than any device has ({MAX_OBSERVED_SLOTS})",
                observed.slots.len()
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(observed.slots.len());
        if let Some(dup) = observed.slots.iter().find(|o| !seen.insert(o.slot)) {
            return Err(Status::invalid_argument(format!(
                "observed.slots: slot {} reported twice",
                dup.slot
            )));
        }
        let mut slots = Vec::with_capacity(observed.slots.len());
        for o in &observed.slots {
            let state: ObservedState =
                keyplane_proto::convert::decode::<pb::ObservedState, _>(o.state, "state")
                    .map_err(|_| Status::invalid_argument("observed.slots[].state is not set"))?;
            let slot = u16::try_from(o.slot)
                .map_err(|_| Status::invalid_argument("observed slot out of range"))?;
            // A code the device holds need not follow keyplane's policy: keep what parses.
            let pin = if o.pin.is_empty() {
                None
            } else {
                keyplane_core::pin::Pin::parse(&o.pin).ok()
            };
            slots.push(Observed { slot, state, pin });
        }
        match self
            .store
            .observed_record(self.site, device.device, &slots)
            .await
        {
            Ok(true) => self.hub.poke(self.site),
            Ok(false) => {}
            Err(StoreError::NotFound(what)) => {
                tracing::debug!(site = %self.site, %what, "observation of an unknown device")
            }
            Err(e) => return Err(store_status(e)),
        }
        Ok(())
    }

    /// Stores an event once and acks it, so the agent stops re-sending it.
    async fn record_event(&mut self, event: pb::DeviceEvent) -> Result<(), Status> {
        let device = DeviceName::parse(&event.device)
            .map_err(|e| Status::invalid_argument(format!("event.device: {e}")))?;
        if device.site != self.site {
            return Err(Status::permission_denied(format!(
                "event.device {} is not a device of sites/{}",
                event.device, self.site
            )));
        }
        let new = NewEvent {
            device: device.device,
            epoch: i64::try_from(event.epoch)
                .map_err(|_| Status::invalid_argument("event.epoch is above 2^63-1"))?,
            seq: i64::try_from(event.seq)
                .map_err(|_| Status::invalid_argument("event.seq is too large"))?,
            kind: crate::fields::device_event_kind(event.kind)?,
            partition: u8::try_from(event.partition).ok().filter(|p| *p > 0),
            user_number: u16::try_from(event.user_number).ok().filter(|n| *n > 0),
            occur_time: event
                .occur_time
                .and_then(|t| std::time::SystemTime::try_from(t).ok())
                .unwrap_or_else(std::time::SystemTime::now),
        };
        match self.store.event_record(self.site, &new).await {
            Ok(true) => {
                crate::metrics::event_stored(new.kind);
                if new.kind == EventKind::Duress {
                    tracing::warn!(site = %self.site, device = %event.device, "DURESS: silent alarm");
                }
                self.bell.ring();
            }
            Ok(false) => {
                tracing::debug!(site = %self.site, seq = event.seq, "duplicate event ignored")
            }
            Err(StoreError::NotFound(what)) => {
                tracing::warn!(site = %self.site, %what, "event for an unknown device dropped");
            }
            // Acked anyway: re-sending it would not make it storable.
            Err(StoreError::InvalidArgument(why)) => {
                tracing::warn!(site = %self.site, device = %event.device, %why, "event dropped");
            }
            Err(e) => return Err(store_status(e)),
        }
        let ack = pb::ServerMessage {
            msg: Some(pb::server_message::Msg::EventAck(pb::EventAck {
                device: event.device,
                seq: event.seq,
                epoch: event.epoch,
            })),
        };
        if !self.send_msg(Ok(ack)).await {
            return Err(Status::cancelled("agent left"));
        }
        Ok(())
    }

    /// Measures the skew of the agent's clock again, as at Hello (issue 14: a clock
    /// that goes wrong mid-stream is flagged without a reconnect). A report without
    /// a time says nothing; a failure to record is logged, not fatal to the stream.
    async fn record_clock(&self, report: pb::ClockReport) {
        let Some(agent_time) = report.agent_time.and_then(|t| SystemTime::try_from(t).ok()) else {
            return;
        };
        match self
            .store
            .agent_clock_record(
                self.site,
                agent_time,
                SystemTime::now(),
                self.clock_skew_threshold,
            )
            .await
        {
            Ok((check, change)) => {
                if change.is_some() {
                    if check.skewed() {
                        tracing::warn!(site = %self.site, skew_ms = ?check.skew_ms(), "agent clock skewed beyond the threshold");
                    } else {
                        tracing::info!(site = %self.site, "agent clock back within the threshold");
                    }
                    self.bell.ring();
                }
            }
            Err(e) => {
                tracing::warn!(site = %self.site, error = %e, "recording the agent's clock report failed")
            }
        }
    }

    async fn handle(&mut self, msg: pb::AgentMessage) -> Result<(), Status> {
        match msg.msg {
            Some(pb::agent_message::Msg::Ack(ack)) => {
                let device = DeviceName::parse(&ack.device)
                    .map_err(|e| Status::invalid_argument(format!("ack.device: {e}")))?;
                if device.site != self.site {
                    return Err(Status::permission_denied(format!(
                        "ack.device {} is not a device of sites/{}",
                        ack.device, self.site
                    )));
                }
                // The end of a change's trace: the ack, a child of the agent's apply.
                let span = tracing::info_span!(
                    "agent.ack",
                    device = %ack.device,
                    revision = ack.revision,
                    trace_id = tracing::field::Empty
                );
                if !ack.traceparent.is_empty()
                    && let Some(trace) = keyplane_telemetry::set_parent(&span, &ack.traceparent)
                {
                    span.record("trace_id", trace);
                }
                let acked = tracing::Instrument::instrument(
                    self.acks.ack(self.site, device.device, ack.revision),
                    span,
                )
                .await
                .map_err(store_status)?;
                if let Some(age) = acked.and_then(|a| a.commit_age) {
                    crate::metrics::metrics()
                        .commit_to_ack
                        .observe(age.as_secs_f64());
                }
                if acked.is_none() {
                    tracing::debug!(site = %self.site, device = %ack.device, "ack for a device no longer at the site");
                }
                Ok(())
            }
            Some(pb::agent_message::Msg::Event(event)) => self.record_event(event).await,
            Some(pb::agent_message::Msg::Observed(observed)) => {
                self.record_observed(observed).await
            }
            // Issue 11 status reports: handled in crate::reports.
            Some(pb::agent_message::Msg::WriteReport(r)) => {
                crate::reports::write_report(&self.store, self.site, r).await
            }
            Some(pb::agent_message::Msg::Reachability(r)) => {
                crate::reports::reachability(&self.store, self.site, r).await
            }
            Some(pb::agent_message::Msg::Inventory(d)) => {
                // A report that makes no sense is not worth the stream.
                if let Err(status) = crate::reports::inventory(&self.store, self.site, &d).await {
                    tracing::warn!(site = %self.site, device = %d.device, %status, "reported constraints not taken");
                }
                Ok(())
            }
            Some(pb::agent_message::Msg::Clock(report)) => {
                self.record_clock(report).await;
                Ok(())
            }
            Some(pb::agent_message::Msg::Hello(_)) => {
                Err(Status::invalid_argument("Hello may be sent only once"))
            }
            None => Err(Status::invalid_argument("empty agent message")),
        }
    }
}

/// The monotonic instant of a wall-clock time (now when it has passed).
fn instant_of(at: SystemTime) -> tokio::time::Instant {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now() + left
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owed_reads_back_off_and_clear() {
        let mut owed = Owed::default();
        owed.reschedule(false);
        assert_eq!(owed.at, None, "nothing owed: no timer");
        owed.changes = true;
        let waits: Vec<Duration> = (0..6)
            .map(|_| {
                owed.reschedule(true);
                owed.backoff
            })
            .collect();
        assert_eq!(
            waits,
            [1, 2, 4, 8, 15, 15].map(Duration::from_secs),
            "each failure doubles the wait, up to RETRY_MAX"
        );
        assert!(owed.at.is_some());
        owed.changes = false;
        owed.reschedule(false);
        assert_eq!(
            (owed.at, owed.backoff),
            (None, Duration::ZERO),
            "paid: cleared"
        );
        owed.check = true;
        owed.reschedule(true);
        assert_eq!(owed.backoff, RETRY_FIRST, "a new debt starts over");
    }

    fn update(slots: usize, snapshot: bool) -> AgentUpdate {
        let device = Uuid::new_v4();
        let slots = (1..=slots)
            .map(|n| DesiredSlot {
                device,
                slot: u16::try_from(n).expect("slot"),
                code: Some(keyplane_store::DesiredCode {
                    credential: Uuid::new_v4(),
                    user: Uuid::new_v4(),
                    pin: keyplane_core::pin::Pin::parse("48213").expect("pin"),
                    authorities: Vec::new(),
                    open_close_reporting: false,
                    schedules: None,
                    valid_from: None,
                    valid_until: None,
                    write_generation: 0,
                }),
                remove_local: false,
            })
            .collect();
        let devices = vec![(device, DeviceModel::find("door-1000").expect("model"))];
        if snapshot {
            AgentUpdate::Snapshot {
                revision: 7,
                devices,
                time_zone: "Europe/Paris".into(),
                lockdown: false,
                slots,
                traceparent: None,
            }
        } else {
            AgentUpdate::Changes {
                from: 3,
                revision: 7,
                devices,
                time_zone: "Europe/Paris".into(),
                lockdown: false,
                slots,
                traceparent: None,
            }
        }
    }

    /// (part, more_parts, slot numbers, encoded slot bytes) of each message.
    fn split(update: &AgentUpdate, max: usize) -> Vec<(i32, bool, Vec<i32>, usize)> {
        use prost::Message;
        Parts::new(Uuid::new_v4(), update, max)
            .map(|m| match m.msg {
                Some(pb::server_message::Msg::Snapshot(s)) => (
                    s.part,
                    s.more_parts,
                    s.slots.iter().map(|s| s.slot).collect(),
                    s.slots.iter().map(|s| s.encoded_len() + 2).sum(),
                ),
                Some(pb::server_message::Msg::Changes(c)) => {
                    assert_eq!((c.from_revision, c.revision), (3, 7));
                    (
                        c.part,
                        c.more_parts,
                        c.slots.iter().map(|s| s.slot).collect(),
                        c.slots.iter().map(|s| s.encoded_len() + 2).sum(),
                    )
                }
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn parts_cover_every_slot_in_order_and_only_the_last_says_no_more() {
        // (slots, snapshot, max bytes, parts expected)
        let table = [
            (0, true, PART_BYTES, 1),
            (1, true, PART_BYTES, 1),
            (100, false, PART_BYTES, 1),
            (100, true, 1, 100),
            (20_000, true, PART_BYTES, 0),
        ];
        for (n, snapshot, max, want) in table {
            let parts = split(&update(n, snapshot), max);
            if want > 0 {
                assert_eq!(parts.len(), want, "{n} slots, max {max}");
            } else {
                assert!(parts.len() > 1, "{n} slots are over one part");
            }
            let numbers: Vec<i32> = parts.iter().flat_map(|p| p.2.clone()).collect();
            assert_eq!(numbers, (1..=n as i32).collect::<Vec<_>>());
            for (i, (part, more, slots, bytes)) in parts.iter().enumerate() {
                assert_eq!(*part, i as i32);
                assert_eq!(*more, i + 1 < parts.len());
                // Over the bound only when one slot alone is.
                assert!(*bytes <= max || slots.len() == 1, "part {i}: {bytes} bytes");
            }
        }
    }
}
