//! `keyplaned` and `keyplane-agent` inside the test process, on real sockets: the
//! server binds 127.0.0.1 port 0 against its own test database; agents run the same
//! code as the binary, with simulated devices kept in a directory that outlives them.

use crate::pg::{TestDatabase, test_database};
use crate::proxy::CountingProxy;
use keyplane_agent::clock::{Clock, SystemClock};
use keyplane_agent::identity::Identity;
use keyplane_agent::{AgentConfig, DriverFactory, SimulatorFactory};
use keyplane_proto::v1 as pb;
use keyplane_proto::v1::admin_service_client::AdminServiceClient;
use keyplane_proto::v1::agent_service_client::AgentServiceClient;
use keyplane_store::{PinKey, Store};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds `authorization: Bearer <token>` (and acting-user headers) to every call.
#[derive(Clone)]
pub struct Bearer(Vec<(&'static str, MetadataValue<tonic::metadata::Ascii>)>);

impl Bearer {
    /// Adds these headers to every call.
    pub fn new(headers: Vec<(&'static str, MetadataValue<tonic::metadata::Ascii>)>) -> Bearer {
        Bearer(headers)
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        for (k, v) in &self.0 {
            request.metadata_mut().insert(*k, v.clone());
        }
        Ok(request)
    }
}

/// The server's side of an agent's Sync stream.
pub type AgentStream = tonic::Streaming<pb::ServerMessage>;

/// An AdminService client that authenticates as a dealer.
pub type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// An OpsService client that authenticates as a dealer.
pub type Ops =
    keyplane_proto::v1::ops_service_client::OpsServiceClient<InterceptedService<Channel, Bearer>>;

/// A running `keyplaned` on its own database.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// Its database.
    pub db: TestDatabase,
    /// A store on the same database with the same key, to inspect state directly.
    pub store: Store,
    key: PinKey,
    /// The CA and server certificate when it serves TLS.
    pub pki: Option<Arc<TestPki>>,
    /// The retention sweep's progress (a pass every 100 ms; none on counted servers).
    pub retention: keyplane_server::retention::RetentionProgress,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

/// A certificate authority made for one test (`keyplaned ca-init` into a temp dir),
/// with a server certificate for 127.0.0.1 and localhost.
pub struct TestPki {
    /// The directory holding ca.key, ca.crt, server.crt, server.key.
    pub dir: TempDir,
    /// The loaded CA.
    pub ca: Arc<keyplane_server::pki::CertAuthority>,
}

impl TestPki {
    /// Makes a new CA and server certificate.
    pub fn new() -> anyhow::Result<TestPki> {
        Self::with_agent_lifetime(keyplane_server::pki::AGENT_CERT_LIFETIME)
    }

    /// Like [`TestPki::new`], issuing agent certificates valid for `lifetime`.
    pub fn with_agent_lifetime(lifetime: Duration) -> anyhow::Result<TestPki> {
        let dir = TempDir::new("pki")?;
        let files = keyplane_server::pki::ca_init(
            &dir.path().join("ca"),
            &["127.0.0.1".to_owned(), "localhost".to_owned()],
        )?;
        let ca = keyplane_server::pki::CertAuthority::load(&files.key, &files.cert)?
            .with_agent_lifetime(lifetime);
        Ok(TestPki {
            dir,
            ca: Arc::new(ca),
        })
    }

    /// The CA certificate file (what agents trust).
    pub fn ca_cert_file(&self) -> PathBuf {
        self.dir.path().join("ca/ca.crt")
    }

    /// The server's TLS identity.
    pub fn server_tls(&self) -> anyhow::Result<keyplane_server::ServerTls> {
        Ok(keyplane_server::ServerTls {
            cert_pem: std::fs::read_to_string(self.dir.path().join("ca/server.crt"))?,
            key_pem: std::fs::read_to_string(self.dir.path().join("ca/server.key"))?,
        })
    }
}

impl TestServer {
    /// Starts a server on a fresh test database.
    pub async fn start() -> anyhow::Result<TestServer> {
        let db = test_database().await?;
        Self::start_on(db, PinKey::generate()?).await
    }

    /// Starts a server on a fresh test database with the PIN keys `key`.
    pub async fn start_with_key(key: PinKey) -> anyhow::Result<TestServer> {
        Self::start_on(test_database().await?, key).await
    }

    /// Starts a server on `db` (e.g. one restored from a dump) with the PIN keys `key`.
    pub async fn start_on_database(db: TestDatabase, key: PinKey) -> anyhow::Result<TestServer> {
        Self::start_on(db, key).await
    }

    /// Starts another server on the same database (and CA) with other PIN keys: a
    /// replica restarted with a new key file.
    pub async fn replica_with_key(&self, key: PinKey) -> anyhow::Result<TestServer> {
        Self::start_inner(self.db.clone(), key, None, 8, self.pki.clone(), &|_| {}).await
    }

    /// Starts another server (a replica) on the same database and key (and CA).
    pub async fn replica(&self) -> anyhow::Result<TestServer> {
        match &self.pki {
            Some(pki) => {
                Self::start_full(self.db.clone(), self.key.clone(), Some(pki.clone())).await
            }
            None => Self::start_on(self.db.clone(), self.key.clone()).await,
        }
    }

    /// Like [`TestServer::start_tls`], with the test config changed by `tweak`.
    pub async fn start_tls_tweaked(
        tweak: &(dyn Fn(&mut keyplane_server::Config) + Sync),
    ) -> anyhow::Result<TestServer> {
        let db = test_database().await?;
        let pki = Some(Arc::new(TestPki::new()?));
        Self::start_inner(db, PinKey::generate()?, None, 8, pki, tweak).await
    }

    /// Starts another server (a replica) on the same database, key and CA, with its
    /// test config changed by `tweak`.
    pub async fn replica_tweaked(
        &self,
        tweak: &(dyn Fn(&mut keyplane_server::Config) + Sync),
    ) -> anyhow::Result<TestServer> {
        Self::start_inner(
            self.db.clone(),
            self.key.clone(),
            None,
            8,
            self.pki.clone(),
            tweak,
        )
        .await
    }

    /// Starts a server serving TLS with a new test CA on a fresh test database.
    pub async fn start_tls() -> anyhow::Result<TestServer> {
        let db = test_database().await?;
        Self::start_full(db, PinKey::generate()?, Some(Arc::new(TestPki::new()?))).await
    }

    /// Starts a server serving TLS with `pki` on `db`.
    pub async fn start_full(
        db: TestDatabase,
        key: PinKey,
        pki: Option<Arc<TestPki>>,
    ) -> anyhow::Result<TestServer> {
        Self::start_inner(db, key, None, 8, pki, &|_| {}).await
    }

    /// Starts a server on a fresh test database with its test config changed by
    /// `tweak` (e.g. a raised minimum agent protocol).
    pub async fn start_tweaked(
        tweak: &(dyn Fn(&mut keyplane_server::Config) + Sync),
    ) -> anyhow::Result<TestServer> {
        let db = test_database().await?;
        Self::start_inner(db, PinKey::generate()?, None, 8, None, tweak).await
    }

    /// Starts a server on a fresh test database that reaches PostgreSQL through a
    /// [`CountingProxy`], with one pooled connection so counts do not depend on which
    /// connection served a call, and dealer tokens trusted once verified (so counts do
    /// not depend on when the 1 s token cache expires). `store` and `db` bypass the
    /// proxy.
    pub async fn start_counted() -> anyhow::Result<(TestServer, CountingProxy)> {
        let db = test_database().await?;
        let config = tokio_postgres::Config::from_str(&db.url)?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => anyhow::bail!("the counting proxy needs a TCP DATABASE_URL"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let mut proxy = CountingProxy::start(format!("{host}:{port}")).await?;
        let user = config.get_user().unwrap_or("postgres");
        let password = config
            .get_password()
            .map(|p| format!(":{}", String::from_utf8_lossy(p)))
            .unwrap_or_default();
        let url = format!(
            "postgres://{user}{password}@127.0.0.1:{}/{}?sslmode=disable",
            proxy.port, db.name
        );
        proxy.database_url = url.clone();
        let server = Self::start_with(db, PinKey::generate()?, Some(url), 1).await?;
        Ok((server, proxy))
    }

    /// Starts a server on `db` that reaches PostgreSQL at `url` (e.g. through a proxy
    /// a test cuts) with `max_connections` pooled connections; `store` and `db` bypass it.
    pub async fn start_via(
        db: TestDatabase,
        url: String,
        max_connections: usize,
    ) -> anyhow::Result<TestServer> {
        Self::start_inner(
            db,
            PinKey::generate()?,
            Some((url, false)),
            max_connections,
            None,
            &|_| {},
        )
        .await
    }

    async fn start_on(db: TestDatabase, key: PinKey) -> anyhow::Result<TestServer> {
        Self::start_with(db, key, None, 8).await
    }

    async fn start_with(
        db: TestDatabase,
        key: PinKey,
        via: Option<String>,
        max_connections: usize,
    ) -> anyhow::Result<TestServer> {
        Self::start_inner(
            db,
            key,
            via.map(|url| (url, true)),
            max_connections,
            None,
            &|_| {},
        )
        .await
    }

    /// `via`: another database URL, and whether the server is counted (see
    /// [`TestServer::start_counted`]).
    async fn start_inner(
        db: TestDatabase,
        key: PinKey,
        via: Option<(String, bool)>,
        max_connections: usize,
        pki: Option<Arc<TestPki>>,
        tweak: &(dyn Fn(&mut keyplane_server::Config) + Sync),
    ) -> anyhow::Result<TestServer> {
        keyplane_telemetry::init("keyplaned-test");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counted = via.as_ref().is_some_and(|(_, counted)| *counted);
        let via = via.map(|(url, _)| url);
        let mut config =
            keyplane_server::Config::new(via.unwrap_or_else(|| db.url.clone()), key.clone());
        config.max_connections = max_connections;
        if counted {
            // Counted servers: counts must not depend on when the token cache expires.
            config.dealer_token_ttl = Duration::from_secs(3600);
        }
        config.poll_interval = Duration::from_millis(100);
        config.agent_seen_interval = Duration::from_millis(300);
        if let Some(pki) = &pki {
            config.tls = Some(pki.server_tls()?);
            config.ca = Some(pki.ca.clone());
        }
        // Counted servers count an RPC's round trips alone: no background evaluation.
        config.status_interval = if counted {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        config.retention_interval = if counted {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        // Nor the NOTIFY a write queues for other replicas: sent after the answer, by
        // a task of its own, it would land in whichever RPC's count is open.
        config.notify = !counted;
        let retention = config.retention_progress.clone();
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(keyplane_server::serve(config, listener, shutdown.clone()));
        let store = Store::connect(&db.url, 4, key.clone())?;
        Ok(TestServer {
            addr,
            url: if pki.is_some() {
                format!("https://{addr}")
            } else {
                format!("http://{addr}")
            },
            db,
            store,
            key,
            pki,
            retention,
            shutdown,
            handle,
        })
    }

    /// Creates a dealer; returns its token.
    pub async fn dealer(&self, name: &str) -> anyhow::Result<String> {
        // The server migrates on start; wait until it answers before writing.
        self.channel().await?;
        Ok(self.store.dealer_create(name).await?.1)
    }

    /// A channel to the server, retried while it starts.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let mut last = None;
        let mut endpoint = Channel::from_shared(self.url.clone())?;
        if let Some(pki) = &self.pki {
            endpoint =
                endpoint.tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(
                    tonic::transport::Certificate::from_pem(std::fs::read(pki.ca_cert_file())?),
                ))?;
        }
        for _ in 0..100 {
            match endpoint.connect().await {
                Ok(ch) => {
                    // Ready once health answers (migrations done).
                    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
                    if health
                        .check(tonic_health::pb::HealthCheckRequest::default())
                        .await
                        .is_ok()
                    {
                        return Ok(ch);
                    }
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("keyplaned at {} did not become ready: {last:?}", self.url)
    }

    /// An AdminService client with `token` (None: no authorization metadata).
    pub async fn admin(&self, token: Option<&str>) -> anyhow::Result<Admin> {
        let mut headers = Vec::new();
        if let Some(t) = token {
            headers.push((
                "authorization",
                MetadataValue::try_from(format!("Bearer {t}"))?,
            ));
        }
        Ok(AdminServiceClient::with_interceptor(
            self.channel().await?,
            Bearer(headers),
        ))
    }

    /// An OpsService client with `token` (None: no authorization metadata).
    pub async fn ops(&self, token: Option<&str>) -> anyhow::Result<Ops> {
        let mut headers = Vec::new();
        if let Some(t) = token {
            headers.push((
                "authorization",
                MetadataValue::try_from(format!("Bearer {t}"))?,
            ));
        }
        Ok(
            keyplane_proto::v1::ops_service_client::OpsServiceClient::with_interceptor(
                self.channel().await?,
                Bearer(headers),
            ),
        )
    }

    /// An AdminService client for the dealer `token`, acting as site user `user`
    /// (from `partition`, when given).
    pub async fn admin_as(
        &self,
        token: &str,
        user: &str,
        partition: Option<u8>,
    ) -> anyhow::Result<Admin> {
        let mut headers = vec![
            (
                "authorization",
                MetadataValue::try_from(format!("Bearer {token}"))?,
            ),
            ("keyplane-acting-user", MetadataValue::try_from(user)?),
        ];
        if let Some(p) = partition {
            headers.push((
                "keyplane-acting-partition",
                MetadataValue::try_from(p.to_string())?,
            ));
        }
        Ok(AdminServiceClient::with_interceptor(
            self.channel().await?,
            Bearer(headers),
        ))
    }

    /// An AdminService client for the dealer `token` itself, acting from `partition`.
    pub async fn admin_in_partition(&self, token: &str, partition: u8) -> anyhow::Result<Admin> {
        let headers = vec![
            (
                "authorization",
                MetadataValue::try_from(format!("Bearer {token}"))?,
            ),
            (
                "keyplane-acting-partition",
                MetadataValue::try_from(partition.to_string())?,
            ),
        ];
        Ok(AdminServiceClient::with_interceptor(
            self.channel().await?,
            Bearer(headers),
        ))
    }

    /// Issues an agent token for `site`.
    pub async fn agent_token(&self, admin: &mut Admin, site: &str) -> anyhow::Result<String> {
        Ok(admin
            .issue_agent_token(pb::IssueAgentTokenRequest {
                site: site.to_owned(),
            })
            .await?
            .into_inner()
            .token)
    }

    /// Creates a one-time enrollment code for `site`.
    pub async fn enrollment_code(&self, admin: &mut Admin, site: &str) -> anyhow::Result<String> {
        Ok(admin
            .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
                site: site.to_owned(),
                ttl_seconds: 0,
            })
            .await?
            .into_inner()
            .code)
    }

    /// A channel presenting `identity` as the client certificate (mutual TLS), or
    /// none; TLS servers only.
    pub async fn agent_channel(&self, identity: Option<&Identity>) -> anyhow::Result<Channel> {
        let pki = self
            .pki
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("agent_channel needs a TLS server"))?;
        let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(pki.ca_cert_file())?),
        );
        if let Some(id) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &id.cert_pem,
                &id.key_pem,
            ));
        }
        Ok(Channel::from_shared(self.url.clone())?
            .tls_config(tls)?
            .connect()
            .await?)
    }

    /// Enrolls with `code` as an agent would (a new key, a CSR); returns its identity.
    pub async fn enroll(&self, code: &str) -> anyhow::Result<Identity> {
        let (key_pem, csr_der) = keyplane_agent::identity::new_key_and_csr()?;
        let channel = self.agent_channel(None).await?;
        let cert = AgentServiceClient::new(channel)
            .enroll(pb::EnrollRequest {
                enrollment_code: code.to_owned(),
                csr_der,
            })
            .await?
            .into_inner();
        Ok(Identity {
            key_pem,
            cert_pem: cert.certificate_pem,
            meta: keyplane_agent::identity::IdentityMeta {
                agent: cert.agent,
                site: cert.site,
                issue_unix: 0,
                expire_unix: cert
                    .expire_time
                    .and_then(|t| u64::try_from(t.seconds).ok())
                    .unwrap_or(0),
            },
        })
    }

    /// Opens a Sync stream presenting `identity` (or nothing) and `token` (or
    /// nothing), saying Hello for `site`. Keep the returned sender: dropping it ends
    /// the agent's side.
    pub async fn sync(
        &self,
        identity: Option<&Identity>,
        token: Option<&str>,
        site: &str,
    ) -> Result<(AgentStream, tokio::sync::mpsc::Sender<pb::AgentMessage>), tonic::Status> {
        let channel = self
            .agent_channel(identity)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                site: site.to_owned(),
                applied_revision: 0,
                inventory: Vec::new(),
                agent_version: "test".into(),
                ..Default::default()
            })),
        })
        .await
        .map_err(|_| tonic::Status::internal("queue"))?;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(token) = token {
            request.metadata_mut().insert(
                "authorization",
                MetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| tonic::Status::internal("token"))?,
            );
        }
        let stream = AgentServiceClient::new(channel)
            .sync(request)
            .await?
            .into_inner();
        Ok((stream, tx))
    }

    /// Stops serving without giving up the handle (the database stays), e.g. to cut
    /// agents off.
    pub fn pause(&self) {
        self.shutdown.cancel();
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await??;
        Ok(())
    }
}

/// A running agent with simulated devices.
pub struct TestAgent {
    /// Journal directory.
    pub state_dir: PathBuf,
    /// Simulated devices directory.
    pub sim_dir: PathBuf,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
    passes: keyplane_agent::PassCounter,
    event_polls: keyplane_agent::PassCounter,
}

impl TestAgent {
    /// Waits until the agent has completed `more` reconcile passes after now: every
    /// pass that began after the call has finished, so what it would do is done
    /// (bounded by a generous timeout, not a measure).
    pub async fn passes(&self, more: u64) -> anyhow::Result<()> {
        let target = self.passes.get() + more;
        tokio::time::timeout(Duration::from_secs(30), self.passes.reached(target))
            .await
            .map_err(|_| anyhow::anyhow!("the agent did not complete {more} passes"))
    }

    /// Waits until the agent has completed `more` event polls after now.
    pub async fn event_polls(&self, more: u64) -> anyhow::Result<()> {
        let target = self.event_polls.get() + more;
        tokio::time::timeout(Duration::from_secs(30), self.event_polls.reached(target))
            .await
            .map_err(|_| anyhow::anyhow!("the agent did not complete {more} event polls"))
    }

    /// Starts an agent for `site` with state in `dir/state` and devices in `dir/devices`.
    pub fn start(server: &str, site: &str, token: &str, dir: &Path) -> TestAgent {
        let factory = Box::new(SimulatorFactory::new(dir.join("devices")));
        Self::start_with(server, site, token, dir, factory)
    }

    /// Like [`TestAgent::start`], with drivers from `factory` (e.g. failing ones).
    pub fn start_with(
        server: &str,
        site: &str,
        token: &str,
        dir: &Path,
        factory: Box<dyn DriverFactory>,
    ) -> TestAgent {
        Self::start_full(server, site, token, dir, factory, Arc::new(SystemClock))
    }

    /// Like [`TestAgent::start`], reading time from `clock`.
    pub fn start_with_clock(
        server: &str,
        site: &str,
        token: &str,
        dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> TestAgent {
        let factory = Box::new(SimulatorFactory::new(dir.join("devices")));
        Self::start_full(server, site, token, dir, factory, clock)
    }

    fn start_full(
        server: &str,
        site: &str,
        token: &str,
        dir: &Path,
        factory: Box<dyn DriverFactory>,
        clock: Arc<dyn Clock>,
    ) -> TestAgent {
        let mut config = Self::config(server, site, token, dir);
        config.clock = clock;
        Self::start_config(config, dir, factory)
    }

    /// The config [`TestAgent::start`] uses, with short test periods, to adjust
    /// before [`TestAgent::start_config`].
    pub fn config(server: &str, site: &str, token: &str, dir: &Path) -> AgentConfig {
        let mut config = AgentConfig::new(server, site, token, dir.join("state"));
        config.reconcile_every = Duration::from_millis(100);
        config.event_poll = Duration::from_millis(50);
        config.observe_every = Duration::from_millis(300);
        // Paced like real devices, shorter: tests write dozens of codes.
        config.pacing = keyplane_agent::Pacing {
            panel: Duration::from_millis(10),
            lock: Duration::from_millis(20),
            door: Duration::ZERO,
        };
        config
    }

    /// Starts an agent with `config` and devices from `factory`.
    pub fn start_config(
        config: AgentConfig,
        dir: &Path,
        factory: Box<dyn DriverFactory>,
    ) -> TestAgent {
        let state_dir = config.state_dir.clone();
        let passes = config.passes.clone();
        let event_polls = config.event_polls.clone();
        let sim_dir = dir.join("devices");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(keyplane_agent::run(config, factory, shutdown.clone()));
        TestAgent {
            state_dir,
            sim_dir,
            shutdown,
            handle,
            passes,
            event_polls,
        }
    }

    /// Stops the agent and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await??;
        Ok(())
    }
}

/// A fresh scratch directory under the system temp dir, removed at drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new(label: &str) -> anyhow::Result<TempDir> {
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random: {e}"))?;
        let dir = std::env::temp_dir().join(format!("keyplane-{label}-{}", hex::encode(bytes)));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
