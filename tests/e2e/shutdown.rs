//! Issue 15: shutdown cannot hang. The real `keyplaned` process, a WatchEvents client
//! that stopped reading (its task blocked on a full channel behind a full HTTP/2
//! window) and SIGTERM: the process exits within its grace period, and a watcher
//! that does read is told UNAVAILABLE.

use crate::fixture::{SYNC_TIMEOUT, create_device};
use keyplane_proto::v1 as pb;
use keyplane_proto::v1::admin_service_client::AdminServiceClient;
use keyplane_store::{PinKey, Store};
use keyplane_testkit::pg::test_database;
use keyplane_testkit::server::{Bearer, TempDir};
use std::time::{Duration, Instant};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// The keyplaned binary next to this test binary (`cargo xtask test` builds it).
pub(crate) fn keyplaned_binary() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("keyplaned"))
        .ok_or_else(|| anyhow::anyhow!("no target directory above {}", exe.display()))?;
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build it (cargo build -p keyplane-server --bin keyplaned) or run cargo xtask test",
        bin.display()
    );
    Ok(bin)
}

/// An AdminService client of a keyplaned process.
pub(crate) type Client =
    AdminServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A client of the keyplaned at `endpoint` once it answers health checks.
pub(crate) async fn client(endpoint: Endpoint, token: &str) -> anyhow::Result<Client> {
    let mut last = None;
    for _ in 0..200 {
        match endpoint.connect().await {
            Ok(channel) => {
                let mut health =
                    tonic_health::pb::health_client::HealthClient::new(channel.clone());
                if health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .is_ok()
                {
                    return Ok(AdminServiceClient::with_interceptor(
                        channel,
                        Bearer::new(vec![(
                            "authorization",
                            MetadataValue::try_from(format!("Bearer {token}"))?,
                        )]),
                    ));
                }
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("keyplaned did not become ready: {last:?}")
}

#[tokio::test]
async fn a_watcher_that_never_reads_does_not_hold_shutdown() -> anyhow::Result<()> {
    const GRACE: Duration = Duration::from_secs(2);
    let db = test_database().await?;
    let dir = TempDir::new("shutdown")?;
    let key = dir.path().join("pin.key");
    let keygen = tokio::process::Command::new(keyplaned_binary()?)
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
    let mut keyplaned = tokio::process::Command::new(keyplaned_binary()?)
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--pin-key-file")
        .arg(&key)
        .arg("--shutdown-grace-secs")
        .arg(GRACE.as_secs().to_string())
        .env("KEYPLANE_DATABASE_URL", &db.url)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("keyplaned.log"))?)
        .kill_on_drop(true)
        .spawn()?;

    let store = Store::connect(&db.url, 2, PinKey::generate()?)?;
    // Ready (migrated) before the dealer is written.
    client(Endpoint::from_shared(url.clone())?, "").await?;
    let token = store.dealer_create("Dealer One").await?.1;
    let mut admin = client(Endpoint::from_shared(url.clone())?, &token).await?;
    let site = admin
        .create_site(pb::CreateSiteRequest {
            site: Some(pb::Site {
                display_name: "Shop".into(),
                time_zone: "Europe/Paris".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .name;
    let panel = create_device(&mut admin, &site, "Panel", "vista-128bpt").await?;

    // The stuck watcher: a 1 KiB HTTP/2 window it never opens again.
    let mut stuck = client(
        Endpoint::from_shared(url.clone())?
            .initial_stream_window_size(Some(1024))
            .initial_connection_window_size(Some(1024)),
        &token,
    )
    .await?;
    let watch = |parent: &str| pb::WatchEventsRequest {
        parent: parent.to_owned(),
        ..Default::default()
    };
    let mut stuck = stuck.watch_events(watch("sites/-")).await?.into_inner();
    let mut reader = admin.watch_events(watch(&site)).await?.into_inner();
    // Far more events than the window, the stream's queue and one read pass hold.
    let site_id = uuid::Uuid::try_parse(site.trim_start_matches("sites/"))?;
    let device = uuid::Uuid::try_parse(panel.name.rsplit('/').next().unwrap_or_default())?;
    store_events(&db, site_id, device, 2000).await?;
    // Its task is running (and, with the rest unread, soon blocked).
    tokio::time::timeout(SYNC_TIMEOUT, stuck.message())
        .await
        .map_err(|_| anyhow::anyhow!("the stuck watcher got nothing"))??;

    let pid = keyplaned
        .id()
        .ok_or_else(|| anyhow::anyhow!("keyplaned already exited"))?;
    let sent = Instant::now();
    let kill = tokio::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await?;
    anyhow::ensure!(kill.success(), "kill -TERM {pid} failed");
    // The bound is on the wait itself: the grace period, plus start-up slack of a
    // loaded machine.
    let status = tokio::time::timeout(GRACE + Duration::from_secs(5), keyplaned.wait())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "keyplaned still running {:?} after SIGTERM (grace {GRACE:?})",
                sent.elapsed()
            )
        })??;
    assert!(status.success(), "keyplaned exited with {status}");

    // The watcher that reads was told why its stream ended.
    let ended = tokio::time::timeout(SYNC_TIMEOUT, async {
        loop {
            match reader.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => anyhow::bail!("the stream ended without a status"),
                Err(status) => return Ok(status),
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the reading watcher was not closed"))??;
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    Ok(())
}

async fn store_events(
    db: &keyplane_testkit::pg::TestDatabase,
    site: uuid::Uuid,
    device: uuid::Uuid,
    n: i64,
) -> anyhow::Result<()> {
    db.client()
        .await?
        .execute(
            "INSERT INTO device_event (site_id, device_id, source_seq, kind, partition, occur_time)
             SELECT $1, $2, g, 'armed', 1, now() FROM generate_series(1, $3::int8) g",
            &[&site, &device, &n],
        )
        .await?;
    Ok(())
}

/// Agents leaving at the moment their replica stops: each stream records its agent
/// disconnected before the replica closes its pool. Before, `serve` returned as
/// soon as the connections were gone and closed the pool under the streams still
/// recording their end, so those sites showed their agents connected until the
/// liveness window ran out (9,415 of 10,000 in a by-hand run).
#[tokio::test]
async fn a_replica_stopping_as_its_agents_leave_records_every_one_gone() -> anyhow::Result<()> {
    const AGENTS: usize = 40;
    // TLS: the test's raw agent streams need it.
    let server = keyplane_testkit::server::TestServer::start_tls().await?;
    let token = server.dealer("Dealer One").await?;
    let mut admin = server.admin(Some(&token)).await?;
    let mut streams = Vec::new();
    for i in 0..AGENTS {
        let site =
            crate::fixture::create_site(&mut admin, &format!("Shop {i}"), "Europe/Paris").await?;
        let agent_token = server.agent_token(&mut admin, &site).await?;
        let (mut stream, tx) = server
            .sync(None, Some(&agent_token), &site)
            .await
            .map_err(|s| anyhow::anyhow!("opening the stream of {site}: {s}"))?;
        // The first update comes after the session is recorded open.
        anyhow::ensure!(stream.message().await?.is_some(), "no first update");
        streams.push((stream, tx));
    }
    let db = server.db.client().await?;
    let connected = "SELECT count(*) FROM site WHERE agent_connected";
    let open: i64 = db.query_one(connected, &[]).await?.get(0);
    assert_eq!(open, AGENTS as i64);

    drop(streams);
    server.stop().await?;
    let still: i64 = db.query_one(connected, &[]).await?.get(0);
    assert_eq!(still, 0, "every agent that left is recorded gone");
    Ok(())
}
