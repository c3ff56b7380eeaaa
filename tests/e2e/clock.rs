//! Issue 14, time the agent can trust: an agent whose clock is wrong shows the skew
//! in GetSyncStatus (`clock_skew`, with the measured skew) and as an event; once its
//! clock is right again, the issue clears with an event. Hello also carries the
//! agent's protocol and time-zone database.

use crate::fixture::{SYNC_TIMEOUT, Site};
use keyplane_agent::clock::SteadyClock;
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::{TestAgent, eventually};
use std::sync::{Arc, Mutex};

/// Waits for the next event of `kind` on a live WatchEvents stream.
async fn next_event(
    events: &mut tonic::Streaming<pb::Event>,
    kind: pb::EventKind,
) -> anyhow::Result<pb::Event> {
    tokio::time::timeout(SYNC_TIMEOUT, async {
        loop {
            let event = events
                .message()
                .await?
                .ok_or_else(|| anyhow::anyhow!("the event stream ended"))?;
            if event.kind == kind as i32 {
                return Ok(event);
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no {kind:?} event within {SYNC_TIMEOUT:?}"))?
}

/// GetSyncStatus once the agent's Hello shows `check`.
async fn status_when(
    s: &Site,
    what: &str,
    check: impl Fn(&pb::SyncStatus) -> bool,
) -> anyhow::Result<pb::SyncStatus> {
    let admin = s.admin.clone();
    let name = format!("{}/syncStatus", s.site);
    let check = &check;
    eventually(what, SYNC_TIMEOUT, || {
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
            Ok(check(&status).then_some(status))
        }
    })
    .await
}

fn start_with_offset(s: &Site, offset_secs: i64) -> TestAgent {
    let mut config = s.agent_config();
    config.clock = Arc::new(SteadyClock::with_offset(chrono::TimeDelta::seconds(
        offset_secs,
    )));
    TestAgent::start_config(
        config,
        s.dir.path(),
        Box::new(keyplane_agent::SimulatorFactory::new(
            s.dir.path().join("devices"),
        )),
    )
}

#[tokio::test]
async fn a_skewed_agent_clock_is_flagged_and_clears_when_fixed() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let mut events = s
        .admin
        .watch_events(pb::WatchEventsRequest {
            parent: s.site.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();

    // The site's clock is 2 minutes slow (the default threshold is 30 s).
    let agent = start_with_offset(&s, -120);
    let status = status_when(&s, "clock_skew raised", |st| {
        st.site_issues
            .iter()
            .any(|i| i.code == pb::SiteIssueCode::ClockSkew as i32)
    })
    .await?;
    let issue = &status.site_issues[0];
    assert_eq!(issue.severity, pb::IssueSeverity::Warning as i32);
    // Measured against keyplaned's clock: -120 s, give or take the trip.
    assert!(
        (-125_000..=-115_000).contains(&issue.clock_skew_millis),
        "measured skew {} ms",
        issue.clock_skew_millis
    );
    assert!(issue.create_time.is_some());
    assert!(issue.detail.contains("behind"), "{}", issue.detail);
    let hello = status
        .agent
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the agent's Hello is shown"))?;
    assert_eq!(
        hello.protocol_version,
        keyplane_core::compat::PROTOCOL_VERSION
    );
    assert_eq!(hello.tzdb_version, chrono_tz::IANA_TZDB_VERSION);
    assert_eq!(hello.clock_skew_millis, issue.clock_skew_millis);
    assert_eq!(hello.clock_skew_threshold_millis, 30_000);
    assert!(hello.agent_time.is_some() && hello.receive_time.is_some());
    let raised = next_event(&mut events, pb::EventKind::ClockSkew).await?;
    assert!(raised.device.is_empty(), "a site event names no device");
    assert!(raised.name.starts_with(&s.site));
    // The agent still serves the site: a skewed clock is flagged, not refused.
    s.wait_synced().await?;
    agent.stop().await?;

    // The clock is fixed; the agent reconnects and says Hello with the right time.
    let agent = start_with_offset(&s, 0);
    let status = status_when(&s, "clock_skew cleared", |st| {
        st.site_issues.is_empty()
            && st.agent_connected
            && st
                .agent
                .as_ref()
                .is_some_and(|a| a.clock_skew_millis.abs() < 5_000)
    })
    .await?;
    assert_eq!(
        status.agent.map(|a| a.protocol_version),
        Some(keyplane_core::compat::PROTOCOL_VERSION)
    );
    next_event(&mut events, pb::EventKind::ClockSkewCleared).await?;
    agent.stop().await?;
    Ok(())
}

/// The site's current agent stream (a reconnect opens another).
async fn agent_session(s: &Site) -> anyhow::Result<Option<uuid::Uuid>> {
    let db = s.server.db.client().await?;
    let site = crate::fixture::id_of(&s.site)?;
    Ok(db
        .query_one("SELECT agent_session FROM site WHERE id = $1", &[&site])
        .await?
        .get(0))
}

#[tokio::test]
async fn a_clock_that_goes_wrong_mid_stream_is_flagged_without_a_reconnect() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    // The site's wall clock, as the test moves it while the agent stays connected.
    let shift = Arc::new(Mutex::new(chrono::TimeDelta::zero()));
    let moved = shift.clone();
    let mut config = s.agent_config();
    config.clock = Arc::new(SteadyClock::with_source(
        chrono::TimeDelta::zero(),
        Box::new(move || chrono::Utc::now() + *moved.lock().unwrap_or_else(|e| e.into_inner())),
    ));
    config.clock_report_every = std::time::Duration::from_millis(200);
    let agent = TestAgent::start_config(
        config,
        s.dir.path(),
        Box::new(keyplane_agent::SimulatorFactory::new(
            s.dir.path().join("devices"),
        )),
    );
    s.wait_synced().await?;
    status_when(&s, "the clock measured right", |st| {
        st.site_issues.is_empty() && st.agent.is_some()
    })
    .await?;
    let session = agent_session(&s).await?;
    assert!(session.is_some(), "connected");

    // The site's clock is set 2 minutes back while the stream stays up.
    *shift.lock().unwrap_or_else(|e| e.into_inner()) = chrono::TimeDelta::seconds(-120);
    let status = status_when(&s, "clock_skew raised mid-stream", |st| {
        st.site_issues
            .iter()
            .any(|i| i.code == pb::SiteIssueCode::ClockSkew as i32)
    })
    .await?;
    assert!(
        (-125_000..=-115_000).contains(&status.site_issues[0].clock_skew_millis),
        "measured skew {} ms",
        status.site_issues[0].clock_skew_millis
    );
    assert_eq!(agent_session(&s).await?, session, "without a reconnect");

    // Fixed again: the flag clears, still on the same stream.
    *shift.lock().unwrap_or_else(|e| e.into_inner()) = chrono::TimeDelta::zero();
    status_when(&s, "clock_skew cleared mid-stream", |st| {
        st.site_issues.is_empty()
    })
    .await?;
    assert_eq!(agent_session(&s).await?, session, "without a reconnect");
    agent.stop().await?;
    Ok(())
}

/// The test hook on the binary: `--clock-offset-secs` (hidden) shifts its clock.
#[tokio::test]
async fn the_agent_binary_reports_its_shifted_clock() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    // The agent binary next to this test binary (as restart.rs finds it).
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("keyplane-agent"))
        .ok_or_else(|| anyhow::anyhow!("no target directory above {}", exe.display()))?;
    let mut child = tokio::process::Command::new(&bin)
        .args(["--server", &s.server.url, "--site", &s.site])
        .args(["--state-dir", &s.dir.path().join("state").to_string_lossy()])
        .args(["--sim-dir", &s.dir.path().join("devices").to_string_lossy()])
        .args(["--clock-offset-secs", "3600"])
        .env("KEYPLANE_AGENT_TOKEN", &s.agent_token)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(s.dir.path().join("agent.log"))?)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "starting {} (cargo build -p keyplane-agent): {e}",
                bin.display()
            )
        })?;
    let status = status_when(&s, "clock_skew raised by the binary", |st| {
        !st.site_issues.is_empty()
    })
    .await?;
    assert!(
        (3_595_000..=3_605_000).contains(&status.site_issues[0].clock_skew_millis),
        "{:?}",
        status.site_issues
    );
    assert!(status.site_issues[0].detail.contains("ahead of"));
    s.wait_synced().await?;
    child.kill().await?;
    Ok(())
}
