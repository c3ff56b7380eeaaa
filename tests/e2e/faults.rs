//! Faults injected by the test while events flow (issue 15): the agent's connection
//! cut again and again while it uploads a panel's log, and the panel reset mid-way
//! (its log emptied, numbered from 1 again). Every event is stored exactly once.
//! And the real keyplaned killed (SIGKILL) while agents stream and a back office
//! writes: every agent converges on what was committed, each code exactly once.

use crate::fixture::{
    Site, create_device, create_partition, create_site, create_user_with, id_of, lock_scope,
    panel_scope, slot_on,
};
use keyplane_devices::PanelOutcome;
use keyplane_proto::v1 as pb;
use keyplane_store::{PinKey, Store};
use keyplane_testkit::pg::test_database;
use keyplane_testkit::server::{TestAgent, eventually};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

/// A TCP relay in front of keyplaned whose open connections the test cuts at will;
/// new connections go through.
pub(crate) struct Cutter {
    pub(crate) port: u16,
    cut: Arc<watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cutter {
    pub(crate) async fn start(upstream: u16) -> anyhow::Result<Cutter> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(watch::channel(0u64).0);
        let each = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut cut = each.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Cutter { port, cut, task })
    }

    /// Drops every connection open now.
    pub(crate) fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// The port of a `http://host:port` URL.
pub(crate) fn port_of(url: &str) -> anyhow::Result<u16> {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no port in {url}"))
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The events the panel logged, as stored (keyplaned's own events have no sequence
/// number): epoch -> sequence number -> kind.
async fn stored(
    db: &tokio_postgres::Client,
    site: uuid::Uuid,
    device: uuid::Uuid,
) -> anyhow::Result<BTreeMap<i64, BTreeMap<i64, String>>> {
    let rows = db
        .query(
            "SELECT source_epoch, source_seq, kind FROM device_event
             WHERE site_id = $1 AND device_id = $2 AND source_seq > 0",
            &[&site, &device],
        )
        .await?;
    let mut logs: BTreeMap<i64, BTreeMap<i64, String>> = BTreeMap::new();
    for row in rows {
        let previous = logs
            .entry(row.get(0))
            .or_default()
            .insert(row.get(1), row.get(2));
        anyhow::ensure!(previous.is_none(), "an event stored twice");
    }
    Ok(logs)
}

fn count(logs: &BTreeMap<i64, BTreeMap<i64, String>>) -> usize {
    logs.values().map(BTreeMap::len).sum()
}

/// Cuts the agent's connection each time `step` more events were stored, until
/// `total` are; returns how many cuts landed during the upload.
async fn upload_with_cuts(
    proxy: &Cutter,
    db: &tokio_postgres::Client,
    (site, device): (uuid::Uuid, uuid::Uuid),
    total: usize,
    step: usize,
) -> anyhow::Result<u64> {
    let mut cuts = 0;
    let mut last_cut_at = count(&stored(db, site, device).await?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let now = count(&stored(db, site, device).await?);
        if now >= total {
            return Ok(cuts);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{now} of {total} events stored after 120 s"
        );
        if now >= last_cut_at + step {
            proxy.cut();
            cuts += 1;
            last_cut_at = now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Arms and disarms partition 1 `times` times with the master code.
fn arm_and_disarm(sim: &mut keyplane_devices::SimulatedDevice, times: usize) -> anyhow::Result<()> {
    for _ in 0..times {
        anyhow::ensure!(sim.arm(1, "4821")? == PanelOutcome::Armed);
        anyhow::ensure!(sim.disarm(1, "4821")? == PanelOutcome::Disarmed);
    }
    Ok(())
}

#[tokio::test]
async fn events_survive_cut_connections_and_a_panel_reset_exactly_once() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    s.credential(&alice, "4821", panel_scope(&[1])).await?;
    let proxy = Cutter::start(port_of(&s.server.url)?).await?;
    let mut config = s.agent_config();
    config.server = format!("http://127.0.0.1:{}", proxy.port);
    let agent = TestAgent::start_config(
        config,
        s.dir.path(),
        Box::new(keyplane_agent::SimulatorFactory::new(
            s.dir.path().join("devices"),
        )),
    );
    s.wait_synced().await?;
    let panel = s.panel.clone();
    let mut sim = s.sim(&panel)?;
    let db = s.server.db.client().await?;
    let place = (id_of(&s.site)?, id_of(&panel.name)?);

    // The panel's first log: 300 events, the stream cut every 40 stored.
    arm_and_disarm(&mut sim, 150)?;
    let first_cuts = upload_with_cuts(&proxy, &db, place, 300, 40).await?;
    // The panel is reset: its new log numbers from 1 again, and is cut as well.
    sim.reset_event_log()?;
    arm_and_disarm(&mut sim, 100)?;
    let second_cuts = upload_with_cuts(&proxy, &db, place, 500, 30).await?;
    assert!(
        first_cuts >= 3 && second_cuts >= 3,
        "cuts landed during the uploads: {first_cuts}, {second_cuts}"
    );

    // Polls that began after the last event was stored re-read the log (the stream
    // was cut, so nothing counts as sent): still each event once.
    agent.event_polls(3).await?;
    let logs = stored(&db, place.0, place.1).await?;
    assert_eq!(logs.len(), 2, "two logs, each under its own epoch");
    assert!(logs.keys().all(|epoch| *epoch > 0));
    let mut sizes: Vec<usize> = logs.values().map(BTreeMap::len).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [200, 300]);
    for log in logs.values() {
        let n = i64::try_from(log.len())?;
        assert_eq!(
            log.keys().copied().collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "every event of the log, none skipped"
        );
        for (seq, kind) in log {
            let want = if seq % 2 == 1 { "armed" } else { "disarmed" };
            assert_eq!(kind, want, "event {seq}");
        }
    }
    agent.stop().await?;
    Ok(())
}

/// Starts the real keyplaned on `port` (its log in `log`).
fn spawn_keyplaned(
    key: &std::path::Path,
    database_url: &str,
    port: u16,
    log: &std::path::Path,
) -> anyhow::Result<tokio::process::Child> {
    Ok(
        tokio::process::Command::new(crate::shutdown::keyplaned_binary()?)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--pin-key-file")
            .arg(key)
            .env("KEYPLANE_DATABASE_URL", database_url)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .kill_on_drop(true)
            .spawn()?,
    )
}

/// The PIN of the `n`th code of a site: five digits, none guessable.
fn pin_of(n: usize) -> String {
    (40_013 + n * 97).to_string()
}

/// One site of the kill test, with its agent.
struct KillSite {
    site: String,
    user: String,
    lock: pb::Device,
    dir: keyplane_testkit::server::TempDir,
    agent: TestAgent,
}

/// Creates code `n` of `s` with a request id of its own, retried (same id) while
/// keyplaned is away, so it is created exactly once whatever the outcome of an
/// attempt the kill cut short.
async fn create_exactly_once(
    admin: &mut keyplane_testkit::server::Admin,
    s: &KillSite,
    n: usize,
) -> anyhow::Result<()> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = admin.create_credential(pb::CreateCredentialRequest {
            parent: s.user.clone(),
            credential: Some(pb::Credential {
                display_name: format!("code {n}"),
                pin: pin_of(n),
                scope: Some(lock_scope(&[&s.lock])),
                ..Default::default()
            }),
            request_id: request_id.clone(),
            generate_pin: false,
        });
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(status))
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) => {}
            Ok(Err(status)) => anyhow::bail!("code {n}: {status:?}"),
            Err(_) => {}
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "code {n} not created within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn keyplaned_killed_while_agents_stream_loses_no_change() -> anyhow::Result<()> {
    const SITES: usize = 3;
    const CODES: usize = 20;
    let db = test_database().await?;
    let dir = keyplane_testkit::server::TempDir::new("killed")?;
    let key = dir.path().join("pin.key");
    let keygen = tokio::process::Command::new(crate::shutdown::keyplaned_binary()?)
        .arg("keygen")
        .arg("--out")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(keygen.success(), "keyplaned keygen failed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut keyplaned = spawn_keyplaned(&key, &db.url, port, &dir.path().join("first.log"))?;
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone())?;
    crate::shutdown::client(endpoint.clone(), "").await?;
    let store = Store::connect(&db.url, 2, PinKey::generate()?)?;
    let token = store.dealer_create("Dealer One").await?.1;
    let mut admin = crate::shutdown::client(endpoint.clone(), &token).await?;

    let mut sites = Vec::new();
    for n in 0..SITES {
        let site = create_site(&mut admin, &format!("Shop {n}"), "Europe/Paris").await?;
        create_partition(&mut admin, &site, 1, "Shop").await?;
        let lock = create_device(&mut admin, &site, "Front door", "zwave-lock-30").await?;
        let user = create_user_with(&mut admin, &site, "Ann", &[(1, pb::Level::Master)]).await?;
        let agent_token = admin
            .issue_agent_token(pb::IssueAgentTokenRequest { site: site.clone() })
            .await?
            .into_inner()
            .token;
        let dir = keyplane_testkit::server::TempDir::new("killed-site")?;
        let agent = TestAgent::start(&url, &site, &agent_token, dir.path());
        sites.push(KillSite {
            site,
            user,
            lock,
            dir,
            agent,
        });
    }
    let sites = Arc::new(sites);

    // Every site's writer creates its codes one after another while keyplaned is
    // killed (SIGKILL: no shutdown, streams and transactions cut) and started again.
    let created = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..SITES {
        let (sites, created, mut admin) = (sites.clone(), created.clone(), admin.clone());
        writers.spawn(async move {
            for n in 0..CODES {
                create_exactly_once(&mut admin, &sites[i], n).await?;
                created.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            anyhow::Ok(())
        });
    }
    let halfway = SITES * CODES / 3;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while created.load(std::sync::atomic::Ordering::SeqCst) < halfway {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "writers stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    keyplaned.start_kill()?;
    keyplaned.wait().await?;
    let before_restart = created.load(std::sync::atomic::Ordering::SeqCst);
    let mut keyplaned = spawn_keyplaned(&key, &db.url, port, &dir.path().join("second.log"))?;
    while let Some(writer) = writers.join_next().await {
        writer??;
    }
    assert!(
        before_restart < SITES * CODES,
        "the kill landed before the writers were done"
    );

    // Every agent converges on what was committed: each code once, on its lock.
    for s in sites.iter() {
        let name = format!("{}/syncStatus", s.site);
        eventually(
            "the site applied at head",
            crate::fixture::SYNC_TIMEOUT * 3,
            || {
                let mut admin = admin.clone();
                let name = name.clone();
                async move {
                    let status = admin
                        .get_sync_status(pb::GetSyncStatusRequest {
                            name,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    Ok(status
                        .devices
                        .iter()
                        .all(|d| d.in_sync && d.applied_revision == status.desired_revision)
                        .then_some(()))
                }
            },
        )
        .await?;
        let credentials = admin
            .list_credentials(pb::ListCredentialsRequest {
                parent: s.user.clone(),
                page_size: 100,
                ..Default::default()
            })
            .await?
            .into_inner()
            .credentials;
        let mut names: Vec<&str> = credentials
            .iter()
            .map(|c| c.display_name.as_str())
            .collect();
        names.sort_unstable();
        let mut want: Vec<String> = (0..CODES).map(|n| format!("code {n}")).collect();
        want.sort_unstable();
        assert_eq!(names, want, "each code created once");
        let model = keyplane_core::DeviceModel::find(&s.lock.model)
            .ok_or_else(|| anyhow::anyhow!("model {}", s.lock.model))?;
        let held = keyplane_devices::SimulatedDevice::open(
            &s.dir.path().join("devices"),
            &s.lock.name,
            model,
        )?
        .slots();
        let expected: BTreeMap<u16, String> = credentials
            .iter()
            .map(|c| {
                let n: usize = c
                    .display_name
                    .trim_start_matches("code ")
                    .parse()
                    .unwrap_or(usize::MAX);
                let slot = slot_on(c, &s.lock).unwrap_or(0);
                (slot, pin_of(n))
            })
            .collect();
        assert_eq!(held, expected, "the lock holds every code, in its slot");
    }
    let sites = Arc::into_inner(sites).ok_or_else(|| anyhow::anyhow!("writers hold sites"))?;
    for s in sites {
        s.agent.stop().await?;
    }
    keyplaned.start_kill()?;
    keyplaned.wait().await?;
    Ok(())
}

/// Opens an agent's Sync stream to the plaintext keyplaned at `url` with a Hello for
/// `site` (the Hello's sender is kept open by the returned stream's request).
async fn hello(
    url: &str,
    site: &str,
    token: &str,
) -> Result<tonic::Streaming<pb::ServerMessage>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            site: site.to_owned(),
            agent_version: "test".into(),
            ..Default::default()
        })),
    };
    // A stream that ends after the Hello would end the session; this one stays open.
    let outbound = tokio_stream::iter([hello]).chain(tokio_stream::pending());
    let mut request = tonic::Request::new(outbound);
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| tonic::Status::internal("token"))?;
    request.metadata_mut().insert("authorization", bearer);
    Ok(pb::agent_service_client::AgentServiceClient::new(channel)
        .sync(request)
        .await?
        .into_inner())
}

/// A reconnect storm is shed, not queued without bound: with one session opening at
/// a time and 300 ms to wait for it, a Hello arriving while another session is stuck
/// opening is refused with RESOURCE_EXHAUSTED, and gets in once that one is through.
#[tokio::test]
async fn agents_beyond_the_sessions_being_opened_are_shed_then_admitted() -> anyhow::Result<()> {
    let server = keyplane_testkit::server::TestServer::start_tweaked(&|c| {
        c.agent_opens = (1, Duration::from_millis(300));
    })
    .await?;
    let mut s = Site::on_server(server, "zwave-lock-30").await?;
    let other = create_site(&mut s.admin, "Shop", "Europe/Paris").await?;
    let other_token = s.server.agent_token(&mut s.admin, &other).await?;

    // The first agent's session gets stuck opening: its site row is locked.
    let mut blocker = s.server.db.client().await?;
    let tx = blocker.transaction().await?;
    tx.execute(
        "SELECT 1 FROM site WHERE id = $1 FOR UPDATE",
        &[&id_of(&s.site)?],
    )
    .await?;
    let first = {
        let (url, site, token) = (s.server.url.clone(), s.site.clone(), s.agent_token.clone());
        tokio::spawn(async move {
            let mut stream = hello(&url, &site, &token).await?;
            anyhow::Ok(stream.message().await?.is_some())
        })
    };
    let watcher = s.server.db.client().await?;
    eventually(
        "the first session waits on the site lock",
        Duration::from_secs(20),
        || async {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await?
                .get(0);
            Ok((waiting > 0).then_some(()))
        },
    )
    .await?;

    // Another agent finds no place: shed, with a status that says why.
    let shed = match hello(&s.server.url, &other, &other_token).await {
        Ok(_) => anyhow::bail!("a second session opened while the first held the only place"),
        Err(status) => status,
    };
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    assert!(
        shed.message().contains("retries after its backoff"),
        "{shed:?}"
    );

    // Once the first is through, the shed agent gets in.
    tx.rollback().await?;
    assert!(first.await??, "the first agent got its snapshot");
    let mut stream = hello(&s.server.url, &other, &other_token)
        .await
        .map_err(|e| anyhow::anyhow!("admitted after the storm: {e:?}"))?;
    assert!(
        stream.message().await?.is_some(),
        "the shed agent's snapshot"
    );
    Ok(())
}
