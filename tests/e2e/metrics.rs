//! Issue 17: the Prometheus endpoints, scraped during a scripted scenario: a change
//! pending while no agent is connected, the agent connecting and applying it, gRPC
//! calls counted by method and status, a duress event stored with no watcher and
//! then delivered. Each named series is checked to move.

use crate::fixture::{SYNC_TIMEOUT, Site, create_user_with, lock_scope, panel_scope};
use keyplane_devices::PanelOutcome;
use keyplane_proto::v1 as pb;
use keyplane_telemetry::metrics::{sample, scrape};
use keyplane_testkit::server::{TestServer, eventually};
use std::net::SocketAddr;

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Scrapes `addr` until `series` satisfies `ok`; returns the scrape.
async fn until(
    addr: SocketAddr,
    what: &str,
    series: &str,
    ok: impl Fn(Option<f64>) -> bool + Clone,
) -> anyhow::Result<String> {
    let series = series.to_owned();
    eventually(what, SYNC_TIMEOUT, || {
        let series = series.clone();
        let ok = ok.clone();
        async move {
            let text = scrape(addr).await?;
            Ok(ok(sample(&text, &series)).then_some(text))
        }
    })
    .await
}

#[tokio::test]
async fn named_series_move_through_a_scripted_scenario() -> anyhow::Result<()> {
    let addr = free_addr()?;
    let server =
        TestServer::start_tweaked(&move |c| c.metrics_listen = Some(addr.to_string())).await?;
    let mut s = Site::on_server(server, "zwave-lock-30").await?;
    let site_id = s.site.trim_start_matches("sites/").to_owned();
    let (site, alice, lock) = (s.site.clone(), s.alice.clone(), s.lock.clone());

    // A change no agent has applied: pending for the site, its age growing.
    s.credential(&alice, "4821", lock_scope(&[&lock])).await?;
    let pending = format!("keyplane_site_pending_changes{{site=\"{site_id}\"}}");
    let text = until(addr, "pending changes", &pending, |v| {
        v.is_some_and(|n| n >= 1.0)
    })
    .await?;
    let age = format!("keyplane_site_oldest_pending_age_seconds{{site=\"{site_id}\"}}");
    assert!(sample(&text, &age).is_some_and(|a| a >= 0.0), "{text}");
    assert_eq!(
        sample(&text, "keyplane_agents_connected"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "keyplane_grpc_calls_total{method=\"keyplane.v1.AdminService/CreateCredential\",code=\"OK\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "keyplane_db_pool_max"), Some(8.0), "{text}");
    assert!(
        sample(&text, "keyplane_db_pool_wait_seconds_count").is_some_and(|n| n > 0.0),
        "{text}"
    );
    assert!(
        sample(&text, "keyplane_db_pool_connections").is_some_and(|n| n > 0.0),
        "{text}"
    );

    // A refused call is counted under its status.
    let dup = s.credential(&alice, "4821", lock_scope(&[&lock])).await;
    assert!(dup.is_err(), "a duplicate code is refused");
    let text = scrape(addr).await?;
    assert_eq!(
        sample(
            &text,
            "keyplane_grpc_calls_total{method=\"keyplane.v1.AdminService/CreateCredential\",code=\"ALREADY_EXISTS\"}"
        ),
        Some(1.0),
        "{text}"
    );

    // The agent connects and applies: nothing pending, one ack timed from the commit.
    let agent_addr = free_addr()?;
    let agent_listener = tokio::net::TcpListener::bind(agent_addr).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let agent_metrics = tokio::spawn(keyplane_telemetry::metrics::serve(
        agent_listener,
        keyplane_agent::metrics::metrics().registry(),
        None,
        stop.clone().cancelled_owned(),
    ));
    let agent = s.start_agent();
    s.wait_synced().await?;
    until(addr, "the pending change gone", &pending, |v| v.is_none()).await?;
    let text = until(
        addr,
        "an ack timed",
        "keyplane_commit_to_ack_seconds_count",
        |v| v.is_some_and(|n| n >= 1.0),
    )
    .await?;
    assert_eq!(
        sample(&text, "keyplane_agents_connected"),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "keyplane_grpc_calls_total{method=\"keyplane.v1.AgentService/Sync\",code=\"OK\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    let agent_text = scrape(agent_addr).await?;
    assert_eq!(
        sample(&agent_text, "keyplane_agent_devices"),
        Some(2.0),
        "{agent_text}"
    );
    assert_eq!(
        sample(&agent_text, "keyplane_agent_connected"),
        Some(1.0),
        "{agent_text}"
    );
    assert!(
        sample(&agent_text, "keyplane_agent_last_apply_timestamp_seconds")
            .is_some_and(|t| t > 1.0e9),
        "{agent_text}"
    );
    assert!(
        sample(&agent_text, "keyplane_agent_queue_depth").is_some(),
        "{agent_text}"
    );

    // Duress at the panel with nobody watching: stored, counted, undelivered.
    s.credential(&alice, "5930", panel_scope(&[1])).await?;
    let dora = create_user_with(&mut s.admin, &site, "Dora", &[(1, pb::Level::Duress)]).await?;
    s.credential(&dora, "7043", panel_scope(&[1])).await?;
    s.wait_synced().await?;
    let panel = s.panel.clone();
    let mut sim = s.sim(&panel)?;
    assert_eq!(sim.arm(1, "5930")?, PanelOutcome::Armed);
    // The arming is stored: a watch resuming after it replays what follows.
    let admin = s.admin.clone();
    let parent = site.clone();
    let armed = eventually("the arming stored", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let parent = parent.clone();
        async move {
            let events = admin
                .list_events(pb::ListEventsRequest {
                    parent,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .events;
            Ok(events
                .into_iter()
                .find(|e| e.kind == pb::EventKind::Armed as i32))
        }
    })
    .await?;
    assert_eq!(sim.disarm(1, "7043")?, PanelOutcome::Disarmed);
    let text = until(
        addr,
        "the duress event stored",
        "keyplane_duress_stored_total",
        |v| v == Some(1.0),
    )
    .await?;
    assert_eq!(
        sample(&text, "keyplane_events_stored_total{kind=\"duress\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "keyplane_duress_undelivered"),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "keyplane_duress_undelivered_oldest_age_seconds").is_some_and(|a| a >= 0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "keyplane_duress_to_watch_seconds_count"),
        Some(0.0),
        "{text}"
    );

    // A watcher resumes from before it: the event is delivered and timed.
    let mut watch = s
        .admin
        .watch_events(pb::WatchEventsRequest {
            parent: site.clone(),
            resume_token: armed.resume_token.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    tokio::time::timeout(SYNC_TIMEOUT, async {
        loop {
            match watch.message().await? {
                Some(e) if e.kind == pb::EventKind::Duress as i32 => return anyhow::Ok(()),
                Some(_) => continue,
                None => anyhow::bail!("watch ended"),
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the resumed watch did not replay the duress event"))??;
    let text = until(
        addr,
        "the duress delivery timed",
        "keyplane_duress_to_watch_seconds_count",
        |v| v == Some(1.0),
    )
    .await?;
    assert_eq!(
        sample(&text, "keyplane_duress_undelivered"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "keyplane_duress_undelivered_oldest_age_seconds"),
        Some(0.0),
        "{text}"
    );
    agent.stop().await?;
    stop.cancel();
    agent_metrics.await?;
    Ok(())
}
