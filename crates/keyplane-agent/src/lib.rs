//! The keyplane edge agent: holds one Sync stream to `keyplaned`, journals the desired
//! slot table locally, and reconciles each device through its driver.
//!
//! No database here. Tasks: [`run`] owns the stream and journals what keyplaned
//! sends; each device has a task of its own (it alone reaches the device, writes to
//! it one at a time and paced, reads its events) that sends acks, reports and events
//! into the stream through two mpsc queues (urgent first). Nothing on the stream's
//! path awaits a device. The device tasks start from the journal before connecting,
//! so devices converge on the last known table even while `keyplaned` is unreachable.

pub mod backoff;
pub mod clock;
pub mod config;
mod device;
#[cfg(test)]
mod fuzz_tests;
pub mod hand;
pub mod identity;
pub mod intake;
pub mod journal;
pub mod metrics;
mod parts;
mod reconcile;
mod reports;
pub mod seal;

pub use device::Pacing;
pub use reconcile::{Agent, DriverFactory, SimulatorFactory};

use backoff::Backoff;
use clock::{Clock, SteadyClock};
use identity::Identity;
use keyplane_proto::v1 as pb;
use keyplane_proto::v1::agent_service_client::AgentServiceClient;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// How the agent reaches keyplaned and where it keeps its state. Debug never shows
/// the token.
#[derive(Clone)]
pub struct AgentConfig {
    /// keyplaned URL: `https://…`, or `http://` to a loopback address only.
    pub server: String,
    /// PEM file of the CA whose certificate keyplaned must present (https only): the
    /// agent trusts this CA alone, not the system's.
    pub server_ca_file: Option<PathBuf>,
    /// File holding a one-time enrollment code (AdminService.CreateEnrollmentCode):
    /// read when the agent has no certificate yet or its certificate expired, so a new
    /// code can be dropped in without a restart. Needs https.
    pub enrollment_code_file: Option<PathBuf>,
    /// `sites/{site}`.
    pub site: String,
    /// Agent bearer token; empty when the agent authenticates with its certificate.
    pub token: String,
    /// Directory of the journal.
    pub state_dir: PathBuf,
    /// File holding the key the journal is sealed under (64 hex digits, mode 0400 or
    /// 0600), placed by the installer apart from the state directory. Without it the
    /// key is the enrollment key's ([`seal`]).
    pub journal_key_file: Option<PathBuf>,
    /// Re-check every device this often even without news.
    pub reconcile_every: Duration,
    /// Read panels' event logs this often.
    pub event_poll: Duration,
    /// Where schedules read the time.
    pub clock: Arc<dyn Clock>,
    /// Read every device's slot table back at least this often (battery locks
    /// drain when polled: keep it long; writes trigger a read anyway).
    pub observe_every: Duration,
    /// Counts the agent's completed reconcile passes (tests wait on it instead of
    /// sleeping; clones share the count).
    pub passes: PassCounter,
    /// Counts the agent's completed event polls (every device's log read once).
    pub event_polls: PassCounter,
    /// The gap between two writes to one device, per kind of device.
    pub pacing: Pacing,
    /// Report the wall clock on the stream this often (to a keyplaned that takes
    /// clock reports), so a clock that goes wrong is flagged without a reconnect.
    pub clock_report_every: Duration,
}

/// A count of completed reconcile passes that can be waited on.
#[derive(Clone, Default)]
pub struct PassCounter(Arc<(std::sync::atomic::AtomicU64, tokio::sync::Notify)>);

impl PassCounter {
    /// Passes completed so far.
    pub fn get(&self) -> u64 {
        self.0.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records one completed pass and wakes whoever waits.
    pub(crate) fn bump(&self) {
        self.0.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.1.notify_waiters();
    }

    /// Waits until at least `count` passes have completed.
    pub async fn reached(&self, count: u64) {
        loop {
            let notified = self.0.1.notified();
            tokio::pin!(notified);
            // Registered before the check, so a bump in between is not missed.
            notified.as_mut().enable();
            if self.get() >= count {
                return;
            }
            notified.await;
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("server", &self.server)
            .field("server_ca_file", &self.server_ca_file)
            .field("enrollment_code_file", &self.enrollment_code_file)
            .field("site", &self.site)
            .field("token", &"<redacted>")
            .field("state_dir", &self.state_dir)
            .field("pacing", &self.pacing)
            .field("journal_key_file", &self.journal_key_file)
            .finish_non_exhaustive()
    }
}

impl AgentConfig {
    /// Refuses arguments that can never work (naming what to pass instead) and
    /// normalizes the rest: a `host:port` server becomes `http://host:port`.
    pub fn check(&mut self) -> Result<(), config::ConfigError> {
        self.server = config::server_url(&self.server)?;
        if self.server.starts_with("https://") && self.server_ca_file.is_none() {
            return Err(config::ConfigError::ServerCa);
        }
        if self.enrollment_code_file.is_some() && !self.server.starts_with("https://") {
            return Err(config::ConfigError::EnrollmentNeedsTls);
        }
        self.site = config::site_name(&self.site)?;
        let enrolled = self.state_dir.join("identity/agent.json").exists();
        if self.token.is_empty() {
            if self.enrollment_code_file.is_none() && !enrolled {
                return Err(config::ConfigError::NoIdentity);
            }
        } else {
            config::token(&self.token)?;
        }
        // Never fail open: a journal of PINs needs a key from somewhere but beside
        // it, except against a keyplaned on this machine (development).
        if self.journal_key_file.is_none()
            && !enrolled
            && self.enrollment_code_file.is_none()
            && !config::is_loopback_url(&self.server)
        {
            return Err(config::ConfigError::NoJournalKey);
        }
        Ok(())
    }

    /// A config with the default reconcile period.
    pub fn new(
        server: impl Into<String>,
        site: impl Into<String>,
        token: impl Into<String>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        AgentConfig {
            server: server.into(),
            server_ca_file: None,
            enrollment_code_file: None,
            site: site.into(),
            token: token.into(),
            state_dir: state_dir.into(),
            journal_key_file: None,
            // Cheap when nothing changed; also how schedules open and close on time.
            reconcile_every: Duration::from_secs(1),
            event_poll: Duration::from_millis(200),
            clock: Arc::new(SteadyClock::default()),
            observe_every: Duration::from_secs(60),
            passes: PassCounter::default(),
            event_polls: PassCounter::default(),
            pacing: Pacing::default(),
            clock_report_every: Duration::from_secs(60),
        }
    }
}

/// Runs the agent until `shutdown` is cancelled: reconciles from the journal, then
/// keeps a Sync stream open, reconnecting with jittered backoff when it drops.
///
/// Arguments that can never work (see [`AgentConfig::check`]) end it at once with an
/// error. A refused token is not one of them: it keeps retrying (and says so at
/// ERROR each time), because the devices must keep following the journal (schedules
/// open and close on time) until someone fixes the token, and a dealer may restore
/// one (e.g. keyplaned pointed back at the right database) without touching the site.
pub async fn run(
    mut config: AgentConfig,
    factory: Box<dyn DriverFactory>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.check()?;
    // Every line of this agent names its site (spawned device tasks inherit it).
    let span = tracing::info_span!("agent", site = %config.site);
    tracing::Instrument::instrument(run_in_span(config, factory, shutdown), span).await
}

async fn run_in_span(
    config: AgentConfig,
    factory: Box<dyn DriverFactory>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = reconcile::Settings {
        reconcile_every: config.reconcile_every,
        event_poll: config.event_poll,
        observe_every: config.observe_every,
        pacing: config.pacing,
    };
    let Some(key) = journal_key(&config, &shutdown).await? else {
        return Ok(());
    };
    let journal = journal::Journal::open_with_key(&config.state_dir, key)?;
    let mut agent = Agent::open_with(
        journal,
        factory,
        config.clock.clone(),
        settings,
        config.passes.clone(),
        config.event_polls.clone(),
    );
    // The devices follow the journal from now on, connected or not.
    agent.start_devices();
    let result = stay_connected(&config, &mut agent, &shutdown).await;
    agent.stop().await;
    result
}

/// Keeps a Sync stream open until `shutdown`, reconnecting with jittered backoff.
async fn stay_connected(
    config: &AgentConfig,
    agent: &mut Agent,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    // Set when keyplaned refused the agent's credentials: the next attempt enrolls
    // with the code file, if there is one, instead of presenting them again.
    let mut refused = false;
    loop {
        let mut healthy = false;
        let result = session(config, agent, shutdown, &mut healthy, refused).await;
        agent.stream_ended();
        refused = matches!(&result, Err(SessionError::Status(s)) if s.code() == tonic::Code::Unauthenticated)
            || (refused && result.is_err() && !healthy);
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if healthy {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        match result {
            Ok(()) => tracing::info!(
                retry_in = ?delay,
                "keyplaned at {} closed the stream; reconnecting in {}",
                config.server,
                seconds(delay)
            ),
            Err(e) => {
                let (error, text) = describe(&e, config, delay);
                if error {
                    tracing::error!("{text}");
                } else {
                    tracing::warn!("{text}");
                }
            }
        }
        // Offline, the journal still rules: schedules open and close on time.
        let wake = tokio::time::Instant::now() + delay;
        let mut tick = tokio::time::interval(config.reconcile_every);
        loop {
            tokio::select! {
                // cancel-safe: a token.
                _ = shutdown.cancelled() => return Ok(()),
                // cancel-safe: a timer.
                _ = tokio::time::sleep_until(wake) => break,
                // cancel-safe: interval ticks.
                _ = tick.tick() => agent.tick(),
            }
        }
    }
}

/// The key the journal is sealed under (see [`seal`]): `--journal-key-file`; else
/// the enrollment key's; else, for an agent about to enroll, the enrollment key's once
/// it has enrolled (there is nothing to enforce before: the journal is empty until
/// keyplaned sends the site's table); else, with a loopback keyplaned only, the
/// development key beside the journal. None when shut down while enrolling.
async fn journal_key(
    config: &AgentConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<seal::JournalKey>> {
    if let Some(file) = &config.journal_key_file {
        return Ok(Some(seal::JournalKey::from_key_file(file)?));
    }
    if let Some(id) = identity::load(&config.state_dir)? {
        return Ok(Some(seal::JournalKey::from_identity(
            &config.state_dir,
            &id.key_pem,
        )?));
    }
    if let Some(file) = &config.enrollment_code_file {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            match enroll(config, file).await {
                Ok(id) => {
                    return Ok(Some(seal::JournalKey::from_identity(
                        &config.state_dir,
                        &id.key_pem,
                    )?));
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    let (_, text) = describe(&e, config, delay);
                    tracing::error!("enrolling before the journal is opened: {text}");
                    tokio::select! {
                        // cancel-safe: a token.
                        _ = shutdown.cancelled() => return Ok(None),
                        // cancel-safe: a timer.
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
    if config::is_loopback_url(&config.server) {
        tracing::warn!(
            "the journal's key is kept beside it ({}): development only; pass --journal-key-file or enroll the agent",
            config.state_dir.join(seal::DEV_KEY_FILE).display()
        );
        return Ok(Some(seal::JournalKey::development(&config.state_dir)?));
    }
    Err(seal::SealError::NoKey.into())
}

/// Why a session ended, sorted by what the operator has to do about it.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// No connection to keyplaned.
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// keyplaned answered with an error status (refused, or ended the stream).
    #[error("keyplaned: {0}")]
    Status(#[from] tonic::Status),
    /// Something local (the journal, the outbound queue).
    #[error(transparent)]
    Local(#[from] anyhow::Error),
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The innermost I/O error of a connection failure, said the way people say it.
fn io_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return Some(match io.kind() {
                K::ConnectionRefused => "connection refused".to_owned(),
                K::TimedOut => "connection timed out".to_owned(),
                K::ConnectionReset => "connection reset".to_owned(),
                K::HostUnreachable => "host unreachable".to_owned(),
                K::NetworkUnreachable => "network unreachable".to_owned(),
                _ => io.to_string(),
            });
        }
        cause = c.source();
    }
    None
}

/// Every message of an error's chain, outermost first.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = c.source();
    }
    parts.join(": ")
}

/// The log line for a failed session, and whether it needs a person (ERROR) rather
/// than time (WARN). Names the server, the cause and what to do; never a PIN.
fn describe(e: &SessionError, config: &AgentConfig, retry: Duration) -> (bool, String) {
    let server = &config.server;
    let site = &config.site;
    let retry = seconds(retry);
    match e {
        SessionError::Connect(e) => {
            let cause = io_cause(e).unwrap_or_else(|| chain(e));
            (
                false,
                format!("cannot reach keyplaned at {server}: {cause}, retrying in {retry}"),
            )
        }
        SessionError::Status(s) => match s.code() {
            tonic::Code::Unauthenticated => (
                true,
                format!(
                    "the server refused this agent's certificate or token (UNAUTHENTICATED: {}): \
                     enroll it again with a new code from AdminService/CreateEnrollmentCode in \
                     --enrollment-code-file (read at the next attempt), or issue a new token for {site} \
                     with AdminService/IssueAgentToken and restart the agent with it \
                     (--token-file or KEYPLANE_AGENT_TOKEN); retrying in {retry}",
                    s.message()
                ),
            ),
            tonic::Code::PermissionDenied => (
                true,
                format!(
                    "the server refused this agent for {site} (PERMISSION_DENIED: {}): the token \
                     was issued for another site; pass that site as --site, or issue a token for \
                     {site} with AdminService/IssueAgentToken; retrying in {retry}",
                    s.message()
                ),
            ),
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => (
                true,
                format!(
                    "the server refused the agent's request ({:?}: {}); check --site and that \
                     agent and keyplaned versions match; retrying in {retry}",
                    s.code(),
                    s.message()
                ),
            ),
            tonic::Code::Unimplemented => (
                true,
                format!(
                    "{server} does not serve keyplane.v1.AgentService ({}); is --server the \
                     keyplaned gRPC address?; retrying in {retry}",
                    s.message()
                ),
            ),
            code => {
                let cause = io_cause(s).map(|c| format!(" ({c})")).unwrap_or_default();
                (
                    false,
                    format!(
                        "sync stream with keyplaned at {server} ended: {code:?}: {}{cause}; \
                         retrying in {retry}",
                        s.message()
                    ),
                )
            }
        },
        SessionError::Local(e) => (
            true,
            format!("agent error: {e:#}; reconnecting to {server} in {retry}"),
        ),
    }
}

/// How the agent reaches keyplaned: the URL, timeouts, and for https the TLS settings
/// (only the configured CA is trusted). The caller connects.
/// With `identity`, the agent presents its client certificate (mutual TLS).
pub fn endpoint(config: &AgentConfig, identity: Option<&Identity>) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(config.server.clone())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(mut tls) = client_tls(config)? {
        if let Some(id) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &id.cert_pem,
                &id.key_pem,
            ));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Stores the certificate keyplaned issued for `key_pem`.
fn keep_certificate(
    config: &AgentConfig,
    key_pem: String,
    cert: pb::AgentCertificate,
) -> anyhow::Result<Identity> {
    let expire_unix = cert
        .expire_time
        .and_then(|t| u64::try_from(t.seconds).ok())
        .ok_or_else(|| anyhow::anyhow!("keyplaned returned a certificate without expire_time"))?;
    let id = Identity {
        key_pem,
        cert_pem: cert.certificate_pem,
        meta: identity::IdentityMeta {
            agent: cert.agent,
            site: cert.site,
            issue_unix: unix_now(),
            expire_unix,
        },
    };
    identity::save(&config.state_dir, &id)?;
    Ok(id)
}

/// Enrolls with the code in `code_file`: a new key, a CSR, a certificate.
async fn enroll(
    config: &AgentConfig,
    code_file: &std::path::Path,
) -> Result<Identity, SessionError> {
    let code = std::fs::read_to_string(code_file)
        .map_err(|e| anyhow::anyhow!("reading the enrollment code {}: {e}", code_file.display()))?;
    let (key_pem, csr_der) = identity::new_key_and_csr().map_err(anyhow::Error::from)?;
    let channel = endpoint(config, None)?.connect().await?;
    let cert = AgentServiceClient::new(channel)
        .enroll(pb::EnrollRequest {
            enrollment_code: code.trim().to_owned(),
            csr_der,
        })
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "enrollment with the code in {} was refused ({:?}: {}): put a new code from \
                 AdminService/CreateEnrollmentCode there; the devices keep following the journal meanwhile",
                code_file.display(),
                status.code(),
                status.message()
            )
        })?
        .into_inner();
    let id = keep_certificate(config, key_pem, cert)?;
    tracing::info!(agent = %id.meta.agent, site = %id.meta.site, expires = id.meta.expire_unix, "enrolled");
    Ok(id)
}

/// Renews the certificate over mutual TLS with a new key.
async fn renew(config: &AgentConfig, current: &Identity) -> anyhow::Result<Identity> {
    let (key_pem, csr_der) = identity::new_key_and_csr()?;
    let channel = endpoint(config, Some(current))?.connect().await?;
    let cert = AgentServiceClient::new(channel)
        .renew_certificate(pb::RenewCertificateRequest { csr_der })
        .await?
        .into_inner();
    let id = keep_certificate(config, key_pem, cert)?;
    tracing::info!(agent = %id.meta.agent, expires = id.meta.expire_unix, "certificate renewed");
    Ok(id)
}

/// The identity to connect with: the stored certificate (renewed when two thirds of
/// its life have passed), a new one from the enrollment code when there is none or
/// it expired, or None to use the bearer token.
/// With `refused` (keyplaned refused the stored certificate: revoked, or replaced
/// by another enrollment) and a code file, it enrolls again.
async fn current_identity(
    config: &AgentConfig,
    refused: bool,
) -> Result<Option<Identity>, SessionError> {
    let now = std::time::SystemTime::now();
    let stored = identity::load(&config.state_dir).map_err(anyhow::Error::from)?;
    if let Some(id) = &stored
        && !id.meta.expired(now)
        && !(refused && config.enrollment_code_file.is_some())
    {
        if id.meta.site != config.site {
            return Err(anyhow::anyhow!(
                "this agent's certificate is for {} but --site is {}: pass {} or enroll anew in another --state-dir",
                id.meta.site,
                config.site,
                id.meta.site
            )
            .into());
        }
        if id.meta.due_for_renewal(now) {
            match renew(config, id).await {
                Ok(renewed) => return Ok(Some(renewed)),
                Err(e) => tracing::warn!(
                    "renewing the agent certificate failed ({e:#}); using the current one until it expires"
                ),
            }
        }
        return Ok(Some(id.clone()));
    }
    match (&config.enrollment_code_file, stored) {
        (Some(file), _) => enroll(config, file).await.map(Some),
        (None, _) if !config.token.is_empty() => Ok(None),
        (None, Some(_)) => Err(anyhow::anyhow!(
            "this agent's certificate expired: give it a new enrollment code (AdminService/CreateEnrollmentCode) with --enrollment-code-file; the devices keep following the journal meanwhile"
        )
        .into()),
        (None, None) => Err(anyhow::Error::from(config::ConfigError::NoIdentity).into()),
    }
}

/// The TLS settings for an `https` server: only the configured CA is trusted.
fn client_tls(config: &AgentConfig) -> anyhow::Result<Option<ClientTlsConfig>> {
    if !config.server.starts_with("https://") {
        return Ok(None);
    }
    let ca_file = config
        .server_ca_file
        .as_ref()
        .ok_or(config::ConfigError::ServerCa)?;
    let ca = std::fs::read(ca_file)
        .map_err(|e| anyhow::anyhow!("reading the server CA {}: {e}", ca_file.display()))?;
    Ok(Some(
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
    ))
}

/// One stream: Hello, then apply what the server sends until it ends.
async fn session(
    config: &AgentConfig,
    agent: &mut Agent,
    shutdown: &CancellationToken,
    healthy: &mut bool,
    refused: bool,
) -> Result<(), SessionError> {
    let mut identity = current_identity(config, refused).await?;
    let channel = endpoint(config, identity.as_ref())?.connect().await?;
    let mut client = AgentServiceClient::new(channel);
    // Two queues into one stream: urgent (Hello, then duress) always goes first.
    let (urgent, urgent_rx) = mpsc::channel(16);
    let (tx, rx) = mpsc::channel(64);
    urgent
        .send(agent.hello(&config.site))
        .await
        .map_err(|_| anyhow::anyhow!("outbound queue closed"))?;
    agent.stream_started(urgent.clone(), tx.clone());
    let mut request = tonic::Request::new(Prioritized {
        urgent: urgent_rx,
        routine: rx,
    });
    // A certificate says who the agent is; the token is only for agents not enrolled.
    if identity.is_none() {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {}", config.token))
                .map_err(|_| anyhow::anyhow!("the agent token is not valid header text"))?,
        );
    }
    let response = client.sync(request).await?;
    // Only a keyplaned that says it takes clock reports is sent them: an older one
    // ends the stream on a message it does not know.
    let clock_reports = response
        .metadata()
        .contains_key(CLOCK_REPORTS_HEADER)
        .then_some(tx);
    let mut inbound = response.into_inner();
    metrics::metrics().connected.set(1);
    let result = stream(
        config,
        agent,
        shutdown,
        healthy,
        &mut identity,
        &mut inbound,
        clock_reports,
    )
    .await;
    metrics::metrics().connected.set(0);
    result
}

/// The open stream: applies what the server sends until it ends.
async fn stream(
    config: &AgentConfig,
    agent: &mut Agent,
    shutdown: &CancellationToken,
    healthy: &mut bool,
    identity: &mut Option<Identity>,
    inbound: &mut tonic::Streaming<pb::ServerMessage>,
    clock_reports: Option<mpsc::Sender<pb::AgentMessage>>,
) -> Result<(), SessionError> {
    tracing::info!(
        server = %config.server,
        site = %config.site,
        journal_revision = agent.revision(),
        "connected to keyplaned"
    );
    let mut tick = tokio::time::interval(config.reconcile_every);
    tick.reset();
    let mut clock_tick = tokio::time::interval(config.clock_report_every);
    clock_tick.reset();
    // A stream may outlive its certificate: renew while connected, at 2/3 of its life.
    let mut renew_at = identity.as_ref().map(|id| renewal_instant(&id.meta));
    loop {
        tokio::select! {
            // cancel-safe: a token.
            _ = shutdown.cancelled() => return Ok(()),
            // cancel-safe: a timer; renewal runs to completion in this branch.
            _ = sleep_until_some(renew_at) => {
                let Some(current) = identity.as_ref() else { renew_at = None; continue; };
                match renew(config, current).await {
                    Ok(renewed) => {
                        renew_at = Some(renewal_instant(&renewed.meta));
                        *identity = Some(renewed);
                    }
                    Err(e) => {
                        tracing::warn!("renewing the agent certificate failed ({e:#}); retrying in 10 minutes");
                        renew_at = Some(tokio::time::Instant::now() + RENEW_RETRY);
                    }
                }
            }
            // cancel-safe: Streaming::message buffers partial frames internally.
            msg = inbound.message() => match msg? {
                Some(pb::ServerMessage { msg: Some(msg) }) => {
                    *healthy = true;
                    agent.accept(msg)?;
                }
                Some(pb::ServerMessage { msg: None }) => tracing::warn!("empty server message ignored"),
                None => return Ok(()),
            },
            // cancel-safe: interval ticks.
            _ = tick.tick() => agent.tick(),
            // cancel-safe: interval ticks.
            _ = clock_tick.tick(), if clock_reports.is_some() => {
                if let Some(tx) = &clock_reports {
                    // Never waits: with the queue full, the next report says it.
                    let _ = tx.try_send(agent.clock_report());
                }
            }
        }
    }
}

/// Response header by which keyplaned says it takes clock reports on the stream.
const CLOCK_REPORTS_HEADER: &str = "keyplane-clock-reports";

/// How long after a failed renewal the agent tries again while connected.
const RENEW_RETRY: Duration = Duration::from_secs(600);

/// When (on the tokio clock) a certificate is due for renewal.
fn renewal_instant(meta: &identity::IdentityMeta) -> tokio::time::Instant {
    let life = meta.expire_unix.saturating_sub(meta.issue_unix);
    let due = meta.issue_unix + life * 2 / 3;
    let wait = due.saturating_sub(unix_now());
    tokio::time::Instant::now() + Duration::from_secs(wait)
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
                traceparent: String::new(),
            })),
        }
    }

    fn config() -> AgentConfig {
        AgentConfig::new(
            "127.0.0.1:50051",
            "sites/6f1c2b9e-2d4a-4b8e-9a57-1f0d3c5e7a21",
            "kpa_token",
            "/nonexistent",
        )
    }

    #[test]
    fn check_accepts_host_port_and_refuses_what_never_works() {
        let mut c = config();
        assert_eq!(c.check(), Ok(()));
        assert_eq!(c.server, "http://127.0.0.1:50051");
        let mut bare_site = config();
        bare_site.site = "6f1c2b9e-2d4a-4b8e-9a57-1f0d3c5e7a21".into();
        let mut dealer_token = config();
        dealer_token.token = "kpd_token".into();
        let mut https = config();
        https.server = "https://127.0.0.1:50051".into();
        for mut c in [bare_site, dealer_token, https] {
            assert!(c.check().is_err());
        }
    }

    #[test]
    fn a_remote_agent_needs_a_journal_key_that_is_not_beside_the_journal() {
        let mut remote = config();
        remote.server = "https://keyplaned.example:50051".into();
        remote.server_ca_file = Some("/nonexistent/ca.crt".into());
        assert_eq!(remote.check(), Err(config::ConfigError::NoJournalKey));
        let msg = config::ConfigError::NoJournalKey.to_string();
        assert!(msg.contains("--journal-key-file"), "{msg}");
        let mut keyed = remote.clone();
        keyed.journal_key_file = Some("/etc/keyplane/journal.key".into());
        assert_eq!(keyed.check(), Ok(()));
        let mut enrolling = remote;
        enrolling.enrollment_code_file = Some("/nonexistent/code".into());
        assert_eq!(enrolling.check(), Ok(()));
        // Development: a keyplaned on this machine.
        assert_eq!(config().check(), Ok(()));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let shown = format!("{:?}", config());
        assert!(!shown.contains("kpa_token"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[tokio::test]
    async fn run_ends_at_once_on_arguments_that_never_work() {
        let mut c = config();
        c.site = "site-1".into();
        let e = run(
            c,
            Box::new(SimulatorFactory::new("/nonexistent")),
            CancellationToken::new(),
        )
        .await
        .expect_err("malformed site");
        assert!(e.to_string().contains("is not a site name"), "{e}");
    }

    #[tokio::test]
    async fn a_server_that_is_down_is_named_with_the_cause() {
        // A port nobody listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let mut c = config();
        c.server = format!("127.0.0.1:{port}");
        c.check().expect("valid");
        let e = Endpoint::from_shared(c.server.clone())
            .expect("endpoint")
            .connect()
            .await
            .expect_err("nobody listens");
        let (error, text) = describe(&SessionError::Connect(e), &c, Duration::from_millis(2500));
        assert!(!error, "waiting is enough: WARN");
        assert_eq!(
            text,
            format!(
                "cannot reach keyplaned at http://127.0.0.1:{port}: connection refused, retrying in 2.5s"
            )
        );
    }

    #[test]
    fn refusals_say_what_to_do() {
        let c = config();
        let cases = [
            (
                tonic::Status::unauthenticated("unknown or revoked agent token"),
                true,
                "the server refused this agent's certificate or token (UNAUTHENTICATED: unknown or revoked agent token): enroll it again",
            ),
            (
                tonic::Status::permission_denied(
                    "this agent token belongs to sites/x, not sites/y",
                ),
                true,
                "(PERMISSION_DENIED: this agent token belongs to sites/x, not sites/y): the token was issued for another site",
            ),
            (
                tonic::Status::invalid_argument("hello.site: bad"),
                true,
                "check --site",
            ),
            (
                tonic::Status::unimplemented(""),
                true,
                "does not serve keyplane.v1.AgentService",
            ),
            (
                tonic::Status::unavailable("shutting down"),
                false,
                "sync stream with keyplaned at 127.0.0.1:50051 ended: Unavailable: shutting down",
            ),
        ];
        for (status, error, want) in cases {
            let (is_error, text) =
                describe(&SessionError::Status(status), &c, Duration::from_secs(3));
            assert_eq!(is_error, error, "{text}");
            assert!(text.contains(want), "{text}");
            assert!(text.ends_with("retrying in 3.0s"), "{text}");
        }
        let (is_error, text) = describe(
            &SessionError::Status(tonic::Status::unauthenticated("x")),
            &c,
            Duration::from_secs(1),
        );
        assert!(
            is_error && text.contains("AdminService/IssueAgentToken"),
            "{text}"
        );
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
