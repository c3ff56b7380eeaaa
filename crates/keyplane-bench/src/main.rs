//! `keyplane-load`: the load generator of `cargo xtask bench`.
//!
//! - `echo-serve`: the plain tonic bidirectional-streaming harness (default settings,
//!   no keyplane logic) that the agent figures are compared with.
//! - `seed`: creates sites (and agent tokens) through AdminService.
//! - `seed-sql`: bulk sites for the site-count figures, inserted straight into
//!   PostgreSQL (bypassing the API: for volume only; measured writes still go
//!   through the gRPC API).
//! - `codes`: one site whose door holds N codes (through AdminService); optionally
//!   times the real agent applying that snapshot to a simulated door.
//! - `drive`: holds agent streams (each on its own connection) and runs the commands
//!   it reads on stdin, printing `figure`/`info` lines for the results file.
//! - `report`: turns a results file into report.json and report.md.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use keyplane_bench::report;
use keyplane_proto::v1 as pb;
use keyplane_proto::v1::admin_service_client::AdminServiceClient;
use keyplane_proto::v1::agent_service_client::AgentServiceClient;
use keyplane_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

#[derive(Parser)]
#[command(name = "keyplane-load", about = "keyplane benchmark load generator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the plain echo harness: Hello -> empty snapshot, Event -> EventAck.
    EchoServe {
        /// Address to listen on.
        #[arg(long)]
        listen: String,
    },
    /// Create sites through AdminService; writes one line per site to --out.
    Seed {
        /// keyplaned URL.
        #[arg(long)]
        server: String,
        /// Dealer token: `KEYPLANE_DEALER_TOKEN` (never an argument, which `ps`
        /// shows to every user of the machine).
        #[arg(skip = dealer_token())]
        token: String,
        /// Sites with a partition, a 1,000-slot door and a user (they take writes).
        #[arg(long)]
        full: usize,
        /// Sites with only an agent token (idle agents).
        #[arg(long)]
        bare: usize,
        /// Calls in flight.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Insert dealer-owned sites (a partition, a door-1000, an agent token each)
    /// straight into PostgreSQL until the database holds --total sites. This
    /// bypasses the API and exists only to give the database volume.
    SeedSql {
        /// keyplaned's database.
        #[arg(long)]
        database_url: String,
        /// Sites the database must hold afterwards.
        #[arg(long)]
        total: i64,
    },
    /// Create one site whose door holds --codes codes (through AdminService).
    Codes {
        /// keyplaned URL.
        #[arg(long)]
        server: String,
        /// Dealer token: `KEYPLANE_DEALER_TOKEN` (never an argument, which `ps`
        /// shows to every user of the machine).
        #[arg(skip = dealer_token())]
        token: String,
        /// Codes to create on the door.
        #[arg(long)]
        codes: usize,
        /// Figure id: time the real agent (empty journal, simulated door) until
        /// GetSyncStatus shows the door applied at the head revision.
        #[arg(long)]
        snapshot: Option<String>,
        /// Then delete codes until this many remain.
        #[arg(long)]
        hold: Option<usize>,
        /// Output sites file (one line).
        #[arg(long)]
        out: PathBuf,
    },
    /// Hold agent streams and run the commands read on stdin.
    Drive {
        /// Where agents connect.
        #[arg(long)]
        agents: String,
        /// Where writes go (AdminService).
        #[arg(long, default_value = "")]
        admin: String,
        /// Dealer token: `KEYPLANE_DEALER_TOKEN`.
        #[arg(skip = dealer_token())]
        token: String,
        /// Sites file from `seed` (without it: made-up sites, for the echo harness).
        #[arg(long)]
        sites: Option<PathBuf>,
    },
    /// Build report.json and report.md from a results file.
    Report {
        /// Results file.
        #[arg(long)]
        results: PathBuf,
        /// Output directory.
        #[arg(long)]
        out_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if matches!(cli.command, Cmd::Seed { .. } | Cmd::Codes { .. }) && dealer_token().is_empty() {
        anyhow::bail!("set KEYPLANE_DEALER_TOKEN to the dealer token the calls run as");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::EchoServe { listen } => rt.block_on(echo_serve(listen)),
        Cmd::Seed {
            server,
            token,
            full,
            bare,
            concurrency,
            out,
        } => rt.block_on(seed(server, token, full, bare, concurrency, out)),
        Cmd::SeedSql {
            database_url,
            total,
        } => rt.block_on(seed_sql(database_url, total)),
        Cmd::Codes {
            server,
            token,
            codes,
            snapshot,
            hold,
            out,
        } => rt.block_on(codes_site(server, token, codes, snapshot, hold, out)),
        Cmd::Drive {
            agents,
            admin,
            token,
            sites,
        } => rt.block_on(drive(agents, admin, token, sites)),
        Cmd::Report { results, out_dir } => write_report(&results, &out_dir),
    }
}

fn write_report(results: &std::path::Path, out_dir: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(results)
        .with_context(|| format!("reading {}", results.display()))?;
    let parsed = report::Results::parse(&text).map_err(anyhow::Error::msg)?;
    let json = report::build(report::ROWS, &parsed)?;
    report::validate(report::ROWS, &json).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let md = report::markdown(&json);
    std::fs::write(out_dir.join("report.md"), &md)?;
    print!("{md}");
    Ok(())
}

// ---------------------------------------------------------------------------
// The plain harness.

struct Echo;

type EchoStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Echo {
    type SyncStream = EchoStream;

    async fn sync(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let reply = match msg.msg {
                    Some(pb::agent_message::Msg::Hello(_)) => {
                        pb::server_message::Msg::Snapshot(pb::DesiredSnapshot::default())
                    }
                    Some(pb::agent_message::Msg::Event(e)) => {
                        pb::server_message::Msg::EventAck(pb::EventAck {
                            device: e.device,
                            seq: e.seq,
                            epoch: e.epoch,
                        })
                    }
                    _ => continue,
                };
                let msg = pb::ServerMessage { msg: Some(reply) };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn enroll(
        &self,
        _: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::AgentCertificate>, Status> {
        Err(Status::unimplemented("the echo harness enrolls no one"))
    }

    async fn renew_certificate(
        &self,
        _: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::AgentCertificate>, Status> {
        Err(Status::unimplemented("the echo harness enrolls no one"))
    }
}

async fn echo_serve(listen: String) -> anyhow::Result<()> {
    let addr = listen.parse()?;
    tonic::transport::Server::builder()
        .add_service(AgentServiceServer::new(Echo))
        .serve(addr)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Helpers.

/// `KEYPLANE_DEALER_TOKEN`, empty when unset (calls then fail UNAUTHENTICATED).
fn dealer_token() -> String {
    std::env::var("KEYPLANE_DEALER_TOKEN").unwrap_or_default()
}

fn authed<T>(token: &str, msg: T) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    if !token.is_empty() {
        req.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}"))?,
        );
    }
    Ok(req)
}

/// A small xorshift generator seeded from the OS.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        Rng(u64::from_le_bytes(b) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// A random 7-digit PIN (door-1000 takes 4..8 digits).
    fn pin(&mut self) -> String {
        format!("{:07}", 1_000_000 + self.next() % 8_999_999)
    }
}

/// A `figure` line, or `missing` when the run produced no sample for it.
fn figure(id: &str, value: f64) {
    if value.is_finite() {
        println!("figure {id} {value:.3}");
    } else {
        println!("missing {id} no samples: nothing completed in the measured window");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    report::quantile(samples, q).unwrap_or(f64::NAN)
}

async fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await?)
}

// ---------------------------------------------------------------------------
// Seeding.

#[derive(Debug, Clone)]
struct Site {
    name: String,
    token: String,
    device: Option<String>,
    user: Option<String>,
}

async fn seed_one(
    mut admin: AdminServiceClient<Channel>,
    token: String,
    n: usize,
    full: bool,
) -> anyhow::Result<Site> {
    let site = admin
        .create_site(authed(
            &token,
            pb::CreateSiteRequest {
                site: Some(pb::Site {
                    display_name: format!("bench site {n}"),
                    time_zone: "Europe/Paris".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            },
        )?)
        .await?
        .into_inner();
    let (mut device, mut user) = (None, None);
    if full {
        admin
            .create_partition(authed(
                &token,
                pb::CreatePartitionRequest {
                    parent: site.name.clone(),
                    partition: Some(pb::Partition {
                        number: 1,
                        display_name: "Building".into(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                },
            )?)
            .await?;
        let d = admin
            .create_device(authed(
                &token,
                pb::CreateDeviceRequest {
                    parent: site.name.clone(),
                    device: Some(pb::Device {
                        display_name: "Main door".into(),
                        model: "door-1000".into(),
                        partition: 1,
                        perimeter: true,
                        ..Default::default()
                    }),
                    request_id: String::new(),
                },
            )?)
            .await?
            .into_inner();
        let u = admin
            .create_user(authed(
                &token,
                pb::CreateUserRequest {
                    parent: site.name.clone(),
                    user: Some(pb::User {
                        display_name: "Bench user".into(),
                        authorities: vec![pb::PartitionAuthority {
                            partition: 1,
                            level: pb::Level::Master as i32,
                        }],
                        ..Default::default()
                    }),
                    request_id: String::new(),
                },
            )?)
            .await?
            .into_inner();
        device = Some(d.name);
        user = Some(u.name);
    }
    let agent_token = admin
        .issue_agent_token(authed(
            &token,
            pb::IssueAgentTokenRequest {
                site: site.name.clone(),
            },
        )?)
        .await?
        .into_inner()
        .token;
    Ok(Site {
        name: site.name,
        token: agent_token,
        device,
        user,
    })
}

async fn seed(
    server: String,
    token: String,
    full: usize,
    bare: usize,
    concurrency: usize,
    out: PathBuf,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let channels: Vec<Channel> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(channel(&server).await?);
        }
        v
    };
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..full + bare {
        let permit = limit.clone().acquire_owned().await?;
        let admin = AdminServiceClient::new(channels[n % channels.len()].clone());
        let token = token.clone();
        tasks.spawn(async move {
            let r = seed_one(admin, token, n, n < full).await;
            drop(permit);
            (n, r)
        });
    }
    let mut sites: Vec<Option<Site>> = vec![None; full + bare];
    while let Some(joined) = tasks.join_next().await {
        let (n, r) = joined?;
        sites[n] = Some(r.with_context(|| format!("seeding site {n}"))?);
    }
    let mut text = String::new();
    for s in sites.into_iter().flatten() {
        text.push_str(&site_line(&s));
    }
    std::fs::write(&out, text)?;
    println!(
        "info seed.sites_per_s {:.1}",
        (full + bare) as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn site_line(s: &Site) -> String {
    format!(
        "{} {} {} {}\n",
        s.name,
        s.token,
        s.device.as_deref().unwrap_or("-"),
        s.user.as_deref().unwrap_or("-")
    )
}

/// Bulk sites for volume, in one transaction: a site of the (first) dealer, its
/// partition 1, a door-1000 and an agent token (`kpa_bulk_<site id>`, stored hashed
/// as keyplane stores tokens). Nothing in keyplaned's write path runs: this is only
/// for giving the database as many sites as a fleet would.
const SEED_SQL: &str = r#"
WITH d AS (SELECT id FROM dealer ORDER BY create_time, id LIMIT 1),
s AS (
    INSERT INTO site (dealer_id, display_name, time_zone)
    SELECT d.id, 'bulk site ' || g, 'Europe/Paris'
    FROM d, generate_series(1, $1::bigint) AS g
    RETURNING id
),
p AS (
    INSERT INTO partition (site_id, number, display_name)
    SELECT id, 1, 'Building' FROM s
    RETURNING site_id
),
dev AS (
    INSERT INTO device (site_id, display_name, kind, model, partition, perimeter)
    SELECT site_id, 'Main door', 'door', 'door-1000', 1, true FROM p
)
INSERT INTO agent_token (token_hash, site_id)
SELECT sha256(convert_to('kpa_bulk_' || id::text, 'UTF8')), id FROM s
"#;

async fn seed_sql(url: String, total: i64) -> anyhow::Result<()> {
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let have: i64 = client
        .query_one("SELECT count(*) FROM site", &[])
        .await?
        .get(0);
    let add = (total - have).max(0);
    let started = Instant::now();
    if add > 0 {
        let tx = client.transaction().await?;
        let dealers: i64 = tx
            .query_one("SELECT count(*) FROM dealer", &[])
            .await?
            .get(0);
        if dealers == 0 {
            bail!("no dealer to own the sites: run keyplaned bootstrap-dealer first");
        }
        tx.execute(SEED_SQL, &[&add]).await?;
        tx.commit().await?;
        // The planner must see the new volume, as it would after autovacuum.
        client
            .batch_execute("ANALYZE site, partition, device, agent_token")
            .await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("info seed_sql.added {add}");
    println!("info seed_sql.total {}", have + add);
    if add > 0 {
        println!("info seed_sql.sites_per_s {:.0}", add as f64 / secs);
    }
    Ok(())
}

/// One site whose door holds `codes` codes, created through AdminService; with
/// `snapshot`, the real agent's time to apply them; with `hold`, codes are then
/// deleted until `hold` remain.
async fn codes_site(
    server: String,
    token: String,
    codes: usize,
    snapshot: Option<String>,
    hold: Option<usize>,
    out: PathBuf,
) -> anyhow::Result<()> {
    let ch = channel(&server).await?;
    let site = seed_one(AdminServiceClient::new(ch.clone()), token.clone(), 0, true).await?;
    let (Some(device), Some(user)) = (site.device.clone(), site.user.clone()) else {
        bail!("the codes site has no door");
    };
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..codes {
        let permit = limit.clone().acquire_owned().await?;
        let mut admin = AdminServiceClient::new(ch.clone());
        let (token, device, user) = (token.clone(), device.clone(), user.clone());
        tasks.spawn(async move {
            // Eight digits, distinct, never guessable (no run, no repeated digit),
            // and never equal to the bench writers' seven-digit PINs.
            let pin = (20_000_000 + i * 37).to_string();
            let r = admin
                .create_credential(authed(
                    &token,
                    pb::CreateCredentialRequest {
                        parent: user,
                        credential: Some(pb::Credential {
                            display_name: format!("held {i}"),
                            pin,
                            scope: Some(pb::CredentialScope {
                                doors: vec![device],
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        request_id: String::new(),
                        generate_pin: false,
                    },
                )?)
                .await;
            drop(permit);
            let c = r?.into_inner();
            anyhow::Ok((c.name, c.etag))
        });
    }
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        held.push(r?.context("creating a held code")?);
    }
    println!(
        "info codes_{codes}.create_per_s {:.1}",
        codes as f64 / started.elapsed().as_secs_f64()
    );
    if let Some(id) = snapshot {
        snapshot_apply(&server, &token, &site, &id).await?;
    }
    if let Some(h) = hold {
        let mut admin = AdminServiceClient::new(ch.clone());
        for (name, etag) in held.drain(h.min(codes)..) {
            admin
                .delete_credential(authed(&token, pb::DeleteCredentialRequest { name, etag })?)
                .await?;
        }
    }
    std::fs::write(&out, site_line(&site))?;
    Ok(())
}

/// Starts the real agent (empty journal, simulated devices in a scratch directory)
/// on `site` and reports the time until GetSyncStatus shows every device applied
/// at the head revision: connect, Hello, snapshot, writes to the simulated door,
/// ack, and the ack stored.
async fn snapshot_apply(server: &str, token: &str, site: &Site, id: &str) -> anyhow::Result<()> {
    let mut admin = AdminServiceClient::new(channel(server).await?);
    let status = |admin: &mut AdminServiceClient<Channel>| {
        let req = authed(
            token,
            pb::GetSyncStatusRequest {
                name: site.name.clone(),
                ..Default::default()
            },
        );
        let mut admin = admin.clone();
        async move { anyhow::Ok(admin.get_sync_status(req?).await?.into_inner()) }
    };
    let head = status(&mut admin).await?.desired_revision;
    let mut bytes = [0u8; 6];
    let _ = getrandom::fill(&mut bytes);
    let dir = std::env::temp_dir().join(format!(
        "keyplane-bench-snapshot-{}",
        u64::from_le_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], 0, 0
        ])
    ));
    std::fs::create_dir_all(&dir)?;
    // The real agent's default settings, as `keyplane-agent` runs with.
    let config =
        keyplane_agent::AgentConfig::new(server, &site.name, &site.token, dir.join("state"));
    let factory = Box::new(keyplane_agent::SimulatorFactory::new(dir.join("devices")));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let handle = tokio::spawn(keyplane_agent::run(config, factory, shutdown.clone()));
    let deadline = started + Duration::from_secs(120);
    let result = loop {
        let s = status(&mut admin).await?;
        if !s.devices.is_empty()
            && s.devices
                .iter()
                .all(|d| d.in_sync && d.applied_revision >= head)
        {
            break Ok(started.elapsed());
        }
        if handle.is_finished() {
            break Err(anyhow::anyhow!(
                "the agent stopped before applying the snapshot"
            ));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("the snapshot was not applied within 120 s"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    shutdown.cancel();
    let stopped = handle.await;
    let _ = std::fs::remove_dir_all(&dir);
    let took = result?;
    stopped??;
    println!("figure {id} {:.3}", ms(took));
    println!("info {id}.head_revision {head}");
    Ok(())
}

fn read_sites(path: &std::path::Path) -> anyhow::Result<Vec<Site>> {
    let text = std::fs::read_to_string(path)?;
    let opt = |s: &str| (s != "-").then(|| s.to_owned());
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            if w.len() != 4 {
                bail!("bad sites line {l:?}");
            }
            Ok(Site {
                name: w[0].to_owned(),
                token: w[1].to_owned(),
                device: opt(w[2]),
                user: opt(w[3]),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Agents.

#[derive(Default)]
struct Agent {
    revision: AtomicI64,
    /// Sessions that received their first message.
    sessions: AtomicU64,
    event_acks: AtomicU64,
    notify: Notify,
    tx: Mutex<Option<mpsc::Sender<pb::AgentMessage>>>,
}

/// A write waiting for its agent to receive the change.
struct Pending {
    sent: Instant,
    answered: Option<Instant>,
    received: Option<Instant>,
}

struct Shared {
    sites: Vec<Site>,
    agents_url: String,
    admin_url: String,
    token: String,
    agents: Mutex<Vec<Arc<Agent>>>,
    pending: Mutex<HashMap<usize, Pending>>,
    /// Propagation samples: (ms from the write's answer, ms from its send).
    propagation: Mutex<Vec<(f64, f64)>>,
    connect_gate: Arc<Semaphore>,
}

impl Shared {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn settle(&self, p: &Pending) {
        if let (Some(a), Some(r)) = (p.answered, p.received) {
            let from_answer = r.saturating_duration_since(a);
            self.propagation
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((ms(from_answer), ms(r - p.sent)));
        }
    }

    fn received(&self, site: usize, at: Instant) {
        let mut pending = self.lock_pending();
        if let Some(p) = pending.get_mut(&site)
            && p.received.is_none()
        {
            p.received = Some(at);
            if p.answered.is_some()
                && let Some(p) = pending.remove(&site)
            {
                self.settle(&p);
            }
        }
    }

    fn answered(&self, site: usize, at: Instant) {
        let mut pending = self.lock_pending();
        if let Some(p) = pending.get_mut(&site) {
            p.answered = Some(at);
            if p.received.is_some()
                && let Some(p) = pending.remove(&site)
            {
                self.settle(&p);
            }
        }
    }

    fn agents(&self) -> Vec<Arc<Agent>> {
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn hello(site: &Site, revision: i64) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            site: site.name.clone(),
            applied_revision: revision,
            inventory: Vec::new(),
            agent_version: "keyplane-load".into(),
            ..Default::default()
        })),
    }
}

fn ack(device: &str, revision: i64) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Ack(pb::Ack {
            device: device.to_owned(),
            revision,
            traceparent: String::new(),
        })),
    }
}

/// One stream: Hello, then record and ack what arrives, as an agent does.
async fn agent_session(
    shared: &Shared,
    idx: usize,
    agent: &Agent,
    healthy: &mut bool,
) -> anyhow::Result<()> {
    let site = &shared.sites[idx];
    // Initial connects are paced by the gate; reconnects (after the first session)
    // are not, as a fleet's are not.
    let permit = if agent.sessions.load(Ordering::Relaxed) == 0 {
        Some(shared.connect_gate.clone().acquire_owned().await?)
    } else {
        None
    };
    // The agent's own transport settings (keepalive on): one connection per agent.
    let channel = Endpoint::from_shared(shared.agents_url.clone())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(64);
    tx.send(hello(site, agent.revision.load(Ordering::Relaxed)))
        .await?;
    let request = authed(&site.token, ReceiverStream::new(rx))?;
    let mut inbound = client.sync(request).await?.into_inner();
    let mut permit = permit;
    while let Some(msg) = inbound.message().await? {
        let now = Instant::now();
        match msg.msg {
            Some(pb::server_message::Msg::Snapshot(s)) => {
                agent.revision.store(s.revision, Ordering::Relaxed);
                for d in &s.devices {
                    let _ = tx.try_send(ack(&d.name, s.revision));
                }
            }
            Some(pb::server_message::Msg::Changes(c)) => {
                agent.revision.store(c.revision, Ordering::Relaxed);
                if !c.slots.is_empty() {
                    shared.received(idx, now);
                    let mut devices: Vec<&str> =
                        c.slots.iter().map(|s| s.device.as_str()).collect();
                    devices.sort_unstable();
                    devices.dedup();
                    for d in devices {
                        let _ = tx.try_send(ack(d, c.revision));
                    }
                }
            }
            Some(pb::server_message::Msg::EventAck(_)) => {
                agent.event_acks.fetch_add(1, Ordering::Relaxed);
                agent.notify.notify_one();
            }
            None => {}
        }
        if !*healthy {
            *healthy = true;
            permit.take();
            *agent.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
            agent.sessions.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Keeps one agent connected, reconnecting with the real agent's backoff
/// (200 ms doubling to 30 s, equal jitter, reset after a healthy session).
async fn agent_loop(shared: Arc<Shared>, idx: usize, agent: Arc<Agent>) {
    let mut rng = Rng::new();
    let mut step = Duration::from_millis(200);
    loop {
        let mut healthy = false;
        let _ = agent_session(&shared, idx, &agent, &mut healthy).await;
        *agent.tx.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if healthy {
            step = Duration::from_millis(200);
        }
        let half = step / 2;
        let delay = half + half.mul_f64((rng.next() % 1000) as f64 / 1000.0);
        step = (step * 2).min(Duration::from_secs(30));
        tokio::time::sleep(delay).await;
    }
}

// ---------------------------------------------------------------------------
// Writes.

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Many,
    Busy,
}

/// Per-op latencies (ms) and errors of one writer.
#[derive(Default)]
struct WriteStats {
    ops: Vec<(Instant, f64)>,
    errors: u64,
}

/// Create, update (new PIN), delete one credential: one cycle of three writes.
async fn write_cycle(
    admin: &mut AdminServiceClient<Channel>,
    token: &str,
    site: &Site,
    rng: &mut Rng,
    stats: &mut WriteStats,
) -> anyhow::Result<()> {
    let (Some(device), Some(user)) = (&site.device, &site.user) else {
        bail!("site {} has no device", site.name)
    };
    let t = Instant::now();
    let created = admin
        .create_credential(authed(
            token,
            pb::CreateCredentialRequest {
                parent: user.clone(),
                credential: Some(pb::Credential {
                    display_name: "bench".into(),
                    pin: rng.pin(),
                    scope: Some(pb::CredentialScope {
                        doors: vec![device.clone()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                request_id: String::new(),
                generate_pin: false,
            },
        )?)
        .await?
        .into_inner();
    stats.ops.push((Instant::now(), ms(t.elapsed())));
    let t = Instant::now();
    let updated = admin
        .update_credential(authed(
            token,
            pb::UpdateCredentialRequest {
                credential: Some(pb::Credential {
                    name: created.name.clone(),
                    pin: rng.pin(),
                    etag: created.etag.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["pin".into()],
                }),
            },
        )?)
        .await;
    let etag = match updated {
        Ok(u) => {
            stats.ops.push((Instant::now(), ms(t.elapsed())));
            u.into_inner().etag
        }
        Err(_) => {
            stats.errors += 1;
            String::new()
        }
    };
    let t = Instant::now();
    admin
        .delete_credential(authed(
            token,
            pb::DeleteCredentialRequest {
                name: created.name,
                etag,
            },
        )?)
        .await?;
    stats.ops.push((Instant::now(), ms(t.elapsed())));
    Ok(())
}

async fn writer(
    shared: Arc<Shared>,
    admin_url: String,
    mode: Mode,
    until: Arc<Mutex<Instant>>,
) -> anyhow::Result<WriteStats> {
    let mut admin = AdminServiceClient::new(channel(&admin_url).await?);
    let full = shared.sites.iter().filter(|s| s.device.is_some()).count();
    let mut rng = Rng::new();
    let mut stats = WriteStats::default();
    while Instant::now() < *until.lock().unwrap_or_else(|e| e.into_inner()) {
        let idx = match mode {
            Mode::Busy => 0,
            // Site 0 is the busy site; the others share the rest of the load.
            Mode::Many => 1 + rng.below(full.saturating_sub(1)),
        };
        if write_cycle(
            &mut admin,
            &shared.token,
            &shared.sites[idx],
            &mut rng,
            &mut stats,
        )
        .await
        .is_err()
        {
            stats.errors += 1;
            // A server that is down (the storm) must not turn this into a busy loop.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(stats)
}

async fn run_writers(
    shared: &Arc<Shared>,
    clients: usize,
    mode: Mode,
    until: Arc<Mutex<Instant>>,
) -> anyhow::Result<WriteStats> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        tasks.spawn(writer(
            shared.clone(),
            shared.admin_url.clone(),
            mode,
            until.clone(),
        ));
    }
    let mut all = WriteStats::default();
    while let Some(r) = tasks.join_next().await {
        let s = r??;
        all.ops.extend(s.ops);
        all.errors += s.errors;
    }
    Ok(all)
}

fn print_writes(prefix: &str, stats: &WriteStats, secs: f64) {
    let mut lat: Vec<f64> = stats.ops.iter().map(|(_, l)| *l).collect();
    figure(&format!("{prefix}.tps"), lat.len() as f64 / secs);
    figure(&format!("{prefix}.p50_ms"), pct(&mut lat, 0.5));
    figure(&format!("{prefix}.p99_ms"), pct(&mut lat, 0.99));
    println!("info {prefix}.ops {}", lat.len());
    println!("info {prefix}.errors {}", stats.errors);
}

// ---------------------------------------------------------------------------
// Commands.

async fn drive(
    agents_url: String,
    admin_url: String,
    token: String,
    sites: Option<PathBuf>,
) -> anyhow::Result<()> {
    let sites = match sites {
        Some(p) => read_sites(&p)?,
        None => (0..200_000)
            .map(|n| Site {
                name: format!("sites/00000000-0000-0000-0000-{n:012}"),
                token: String::new(),
                device: Some(format!("sites/00000000-0000-0000-0000-{n:012}/devices/d")),
                user: None,
            })
            .collect(),
    };
    let shared = Arc::new(Shared {
        sites,
        agents_url,
        admin_url,
        token,
        agents: Mutex::new(Vec::new()),
        pending: Mutex::new(HashMap::new()),
        propagation: Mutex::new(Vec::new()),
        connect_gate: Arc::new(Semaphore::new(256)),
    });
    let (line_tx, mut lines) = mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for l in std::io::stdin().lines() {
            let Ok(l) = l else { break };
            if line_tx.blocking_send(l).is_err() {
                break;
            }
        }
    });
    println!("ready");
    while let Some(line) = lines.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let result = match words.as_slice() {
            ["connect", n, prefix] => connect(&shared, n.parse()?, prefix).await,
            ["write", clients, secs, mode, prefix] => {
                let mode = if *mode == "busy" {
                    Mode::Busy
                } else {
                    Mode::Many
                };
                let secs: f64 = secs.parse()?;
                let until = Arc::new(Mutex::new(Instant::now() + Duration::from_secs_f64(secs)));
                let started = Instant::now();
                run_writers(&shared, clients.parse()?, mode, until)
                    .await
                    .map(|s| print_writes(prefix, &s, started.elapsed().as_secs_f64()))
            }
            ["prop", rate, secs, admin, prefix] => {
                propagate(&shared, rate.parse()?, secs.parse()?, admin, prefix).await
            }
            ["ingest", agents, secs, writers, prefix] => {
                ingest(
                    &shared,
                    agents.parse()?,
                    secs.parse()?,
                    writers.parse()?,
                    prefix,
                )
                .await
            }
            ["storm", idle, prefix] => storm(&shared, idle.parse()?, prefix, &mut lines).await,
            ["quit"] => break,
            _ => Err(anyhow::anyhow!("unknown command {line:?}")),
        };
        if let Err(e) = result {
            println!("error {e:#}");
        }
        println!("done");
    }
    Ok(())
}

/// Starts agents until `n` are held; waits until each got its first message.
async fn connect(shared: &Arc<Shared>, n: usize, prefix: &str) -> anyhow::Result<()> {
    if n > shared.sites.len() {
        bail!("{n} agents asked, {} sites seeded", shared.sites.len());
    }
    let started = Instant::now();
    let have = shared.agents().len();
    for idx in have..n {
        let agent = Arc::new(Agent::default());
        shared
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(agent.clone());
        tokio::spawn(agent_loop(shared.clone(), idx, agent));
    }
    let deadline = started + Duration::from_secs(300);
    let agents = shared.agents();
    loop {
        let up = agents
            .iter()
            .filter(|a| a.sessions.load(Ordering::Relaxed) > 0)
            .count();
        if up == agents.len() || Instant::now() > deadline {
            let secs = started.elapsed().as_secs_f64();
            println!("figure {prefix}.connect_s {secs:.3}");
            figure(
                &format!("{prefix}.accept_per_s"),
                (n - have.min(n)) as f64 / secs,
            );
            println!("info {prefix}.connected {up}");
            if up < agents.len() {
                bail!("only {up} of {} agents connected in 300 s", agents.len());
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Open-loop writes at `rate`/s (alternately create and delete a credential on each
/// connected site), measuring when the site's agent receives each change.
async fn propagate(
    shared: &Arc<Shared>,
    rate: f64,
    secs: f64,
    admin_url: &str,
    prefix: &str,
) -> anyhow::Result<()> {
    let held = shared.agents().len();
    let candidates: Vec<usize> = (0..held)
        .filter(|i| shared.sites[*i].device.is_some())
        .collect();
    if candidates.is_empty() {
        bail!("no connected agent holds a site with a device");
    }
    shared
        .propagation
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    shared.lock_pending().clear();
    let admins: Vec<AdminServiceClient<Channel>> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(AdminServiceClient::new(channel(admin_url).await?));
        }
        v
    };
    // Credential held by each site (None: the next write creates one).
    let held_credentials: Arc<Mutex<HashMap<usize, (String, String)>>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(secs);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    let mut next = 0usize;
    let mut tasks = tokio::task::JoinSet::new();
    let mut issued = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        // The next site with nothing in flight.
        let mut idx = None;
        for _ in 0..candidates.len() {
            let c = candidates[next % candidates.len()];
            next += 1;
            if !shared.lock_pending().contains_key(&c) {
                idx = Some(c);
                break;
            }
        }
        let Some(idx) = idx else { continue };
        issued += 1;
        shared.lock_pending().insert(
            idx,
            Pending {
                sent: Instant::now(),
                answered: None,
                received: None,
            },
        );
        let mut admin = admins[issued as usize % admins.len()].clone();
        let shared = shared.clone();
        let held_credentials = held_credentials.clone();
        let errors = errors.clone();
        tasks.spawn(async move {
            let site = &shared.sites[idx];
            let token = shared.token.clone();
            let existing = held_credentials
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&idx);
            let result: anyhow::Result<()> = async {
                match existing {
                    Some((name, etag)) => {
                        admin
                            .delete_credential(authed(
                                &token,
                                pb::DeleteCredentialRequest { name, etag },
                            )?)
                            .await?;
                    }
                    None => {
                        let (Some(device), Some(user)) = (&site.device, &site.user) else {
                            bail!("no device");
                        };
                        let c = admin
                            .create_credential(authed(
                                &token,
                                pb::CreateCredentialRequest {
                                    parent: user.clone(),
                                    credential: Some(pb::Credential {
                                        display_name: "bench".into(),
                                        pin: Rng::new().pin(),
                                        scope: Some(pb::CredentialScope {
                                            doors: vec![device.clone()],
                                            ..Default::default()
                                        }),
                                        ..Default::default()
                                    }),
                                    request_id: String::new(),
                                    generate_pin: false,
                                },
                            )?)
                            .await?
                            .into_inner();
                        held_credentials
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(idx, (c.name, c.etag));
                    }
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => shared.answered(idx, Instant::now()),
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    shared.lock_pending().remove(&idx);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    // Give the last changes time to arrive.
    let settle = Instant::now() + Duration::from_secs(10);
    while !shared.lock_pending().is_empty() && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = shared.lock_pending().len();
    shared.lock_pending().clear();
    let samples =
        std::mem::take(&mut *shared.propagation.lock().unwrap_or_else(|e| e.into_inner()));
    let mut from_answer: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let mut from_send: Vec<f64> = samples.iter().map(|s| s.1).collect();
    figure(&format!("{prefix}.p50_ms"), pct(&mut from_answer, 0.5));
    figure(&format!("{prefix}.p99_ms"), pct(&mut from_answer, 0.99));
    println!(
        "info {prefix}.from_send_p50_ms {:.3}",
        pct(&mut from_send, 0.5)
    );
    println!(
        "info {prefix}.from_send_p99_ms {:.3}",
        pct(&mut from_send, 0.99)
    );
    println!(
        "info {prefix}.writes_per_s {:.1}",
        issued as f64 / started.elapsed().as_secs_f64()
    );
    println!("info {prefix}.samples {}", samples.len());
    println!("info {prefix}.agents {held}");
    println!("info {prefix}.not_received_in_10s {lost}");
    println!("info {prefix}.errors {}", errors.load(Ordering::Relaxed));
    Ok(())
}

/// `agents` agents each send Ack + DeviceEvent pairs, one pair in flight, for `secs`
/// (with `writers` write clients running alongside); rows stored = 2 per EventAck.
async fn ingest(
    shared: &Arc<Shared>,
    agents: usize,
    secs: f64,
    writers: usize,
    prefix: &str,
) -> anyhow::Result<()> {
    let held = shared.agents();
    let chosen: Vec<(usize, Arc<Agent>)> = held
        .iter()
        .enumerate()
        .filter(|(i, _)| shared.sites[*i].device.is_some())
        .take(agents)
        .map(|(i, a)| (i, a.clone()))
        .collect();
    if chosen.is_empty() {
        bail!("no connected agent holds a site with a device");
    }
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64
        * 1000;
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(secs);
    let until = Arc::new(Mutex::new(end));
    let write_task = (writers > 0).then(|| {
        let shared = shared.clone();
        let until = until.clone();
        tokio::spawn(async move { run_writers(&shared, writers, Mode::Many, until).await })
    });
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (idx, agent) in chosen {
        let device = shared.sites[idx].device.clone().unwrap_or_default();
        let acked = acked.clone();
        tasks.spawn(async move {
            let mut rtts = Vec::new();
            let mut seq = base;
            while Instant::now() < end {
                let Some(tx) = agent.tx.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
                    break;
                };
                seq += 1;
                let before = agent.event_acks.load(Ordering::Relaxed);
                let t = Instant::now();
                let revision = agent.revision.load(Ordering::Relaxed);
                let event = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Event(pb::DeviceEvent {
                        device: device.clone(),
                        seq,
                        kind: pb::EventKind::AccessGranted as i32,
                        partition: 1,
                        user_number: 2,
                        occur_time: Some(
                            prost_types::Timestamp::from(std::time::SystemTime::now()),
                        ),
                        epoch: 0,
                    })),
                };
                if tx.send(ack(&device, revision)).await.is_err() || tx.send(event).await.is_err() {
                    break;
                }
                while agent.event_acks.load(Ordering::Relaxed) == before {
                    if tokio::time::timeout(Duration::from_secs(5), agent.notify.notified())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                if agent.event_acks.load(Ordering::Relaxed) > before {
                    rtts.push(ms(t.elapsed()));
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            rtts
        });
    }
    let mut rtts = Vec::new();
    while let Some(r) = tasks.join_next().await {
        rtts.extend(r?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let events = acked.load(Ordering::Relaxed);
    figure(&format!("{prefix}.per_s"), 2.0 * events as f64 / elapsed);
    figure(&format!("{prefix}.rtt_p50_ms"), pct(&mut rtts, 0.5));
    figure(&format!("{prefix}.rtt_p99_ms"), pct(&mut rtts, 0.99));
    println!("info {prefix}.events {events}");
    if let Some(w) = write_task {
        let stats = w.await??;
        print_writes(&format!("{prefix}.writes"), &stats, elapsed);
    }
    Ok(())
}

/// Writes with one client while idle, then asks for a restart ("restart" on stdout,
/// "restarted" expected on stdin once the new server listens) and measures how long
/// every held agent takes to resync, and write latency meanwhile.
async fn storm(
    shared: &Arc<Shared>,
    idle_secs: f64,
    prefix: &str,
    lines: &mut mpsc::Receiver<String>,
) -> anyhow::Result<()> {
    let agents = shared.agents();
    let until = Arc::new(Mutex::new(Instant::now() + Duration::from_secs(3600)));
    let writes = {
        let shared = shared.clone();
        let until = until.clone();
        tokio::spawn(async move { run_writers(&shared, 1, Mode::Many, until).await })
    };
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let before: Vec<u64> = agents
        .iter()
        .map(|a| a.sessions.load(Ordering::Relaxed))
        .collect();
    let killed = Instant::now();
    println!("restart");
    match lines.recv().await.as_deref() {
        Some("restarted") => {}
        Some(other) => bail!("expected \"restarted\", got {other:?}"),
        None => bail!("stdin closed during the storm"),
    }
    let up = Instant::now();
    let deadline = up + Duration::from_secs(300);
    let resynced = loop {
        let n = agents
            .iter()
            .zip(&before)
            .filter(|(a, b)| a.sessions.load(Ordering::Relaxed) > **b)
            .count();
        if n == agents.len() || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let all = Instant::now();
    // At least two seconds of writes after the restart, for a p99 worth the name.
    let stop = all.max(up + Duration::from_secs(2));
    *until.lock().unwrap_or_else(|e| e.into_inner()) = stop;
    let stats = writes.await??;
    let mut idle: Vec<f64> = stats
        .ops
        .iter()
        .filter(|(t, _)| *t < killed)
        .map(|(_, l)| *l)
        .collect();
    let mut during: Vec<f64> = stats
        .ops
        .iter()
        .filter(|(t, l)| *t >= up && *t - Duration::from_secs_f64(l / 1000.0) >= up && *t <= stop)
        .map(|(_, l)| *l)
        .collect();
    println!("figure {prefix}.agents {}", agents.len());
    println!("figure {prefix}.resynced {resynced}");
    figure(&format!("{prefix}.resync_s"), (all - killed).as_secs_f64());
    figure(
        &format!("{prefix}.reconnect_per_s"),
        resynced as f64 / (all - up).as_secs_f64().max(0.001),
    );
    println!("info {prefix}.down_s {:.3}", (up - killed).as_secs_f64());
    figure(&format!("{prefix}.write_p99_idle_ms"), pct(&mut idle, 0.99));
    figure(
        &format!("{prefix}.write_p99_storm_ms"),
        pct(&mut during, 0.99),
    );
    println!("info {prefix}.writes_idle {}", idle.len());
    println!("info {prefix}.writes_storm {}", during.len());
    Ok(())
}
