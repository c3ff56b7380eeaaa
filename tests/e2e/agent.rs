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
