//! Faults injected by the test while events flow (issue 15): the agent's connection
//! cut again and again while it uploads a panel's log, and the panel reset mid-way
//! (its log emptied, numbered from 1 again). Every event is stored exactly once.

use crate::fixture::{Site, id_of, panel_scope};
use keyplane_devices::PanelOutcome;
use keyplane_testkit::server::TestAgent;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP relay in front of keyplaned whose open connections the test cuts at will;
/// new connections go through.
struct Cutter {
    port: u16,
    cut: Arc<watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cutter {
    async fn start(upstream: u16) -> anyhow::Result<Cutter> {
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
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
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
    let upstream: u16 = s
        .server
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no port in {}", s.server.url))?;
    let proxy = Cutter::start(upstream).await?;
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
