//! How the agent is started: the server given as `host:port`, as people type it.

use crate::fixture::{Site, lock_scope};
use keyplane_testkit::server::TestAgent;

#[tokio::test]
async fn the_agent_connects_with_a_host_port_server() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    // No scheme: read as http://127.0.0.1:port.
    let bare = s.server.addr.to_string();
    assert!(!bare.contains("://"));
    let agent = TestAgent::start(&bare, &s.site, &s.agent_token, s.dir.path());
    s.wait_synced().await?;
    assert!(s.slots(&lock)?.values().any(|c| c == "9930"));
    agent.stop().await?;
    Ok(())
}

/// An idle agent sends nothing, yet stays connected: the replica holding its stream
/// records it as seen (every 300 ms in tests, 30 s in production, well inside the
/// 90 s after which GetSyncStatus calls an unheard agent disconnected).
#[tokio::test]
async fn an_idle_agent_is_still_seen_while_its_stream_is_held() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let agent = TestAgent::start(
        &s.server.addr.to_string(),
        &s.site,
        &s.agent_token,
        s.dir.path(),
    );
    let synced = s.wait_synced().await?;
    assert!(synced.agent_connected);
    let first = synced
        .agent_last_seen_time
        .ok_or_else(|| anyhow::anyhow!("a connected agent has a last-seen time"))?;
    let first = (first.seconds, first.nanos);
    // Nothing is written: only the held stream can move the last-seen time on.
    let admin = s.admin.clone();
    let name = format!("{}/syncStatus", s.site);
    keyplane_testkit::server::eventually(
        "the idle agent's last-seen time moves on",
        std::time::Duration::from_secs(10),
        || {
            let mut admin = admin.clone();
            let name = name.clone();
            async move {
                let now = admin
                    .get_sync_status(keyplane_proto::v1::GetSyncStatusRequest {
                        name,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let seen = now
                    .agent_last_seen_time
                    .map(|t| (t.seconds, t.nanos))
                    .unwrap_or_default();
                Ok((now.agent_connected && seen > first).then_some(()))
            }
        },
    )
    .await?;
    agent.stop().await?;
    Ok(())
}
