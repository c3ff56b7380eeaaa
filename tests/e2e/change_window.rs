//! Issue 15: the change log keeps a bounded window per site. An agent whose revision
//! is still in the window catches up from the changes; one behind it gets a snapshot.
//! The same history through either path leaves the devices the same.

use crate::fixture::{Site, create_user, id_of, lock_scope, panel_scope};
use keyplane_proto::v1 as pb;
use keyplane_store::ChangeWindow;
use keyplane_testkit::server::{TestServer, eventually};
use std::collections::BTreeMap;
use std::time::Duration;

/// The site's change floor and the rows its change log holds.
async fn log_of(s: &Site) -> anyhow::Result<(i64, i64)> {
    let db = s.server.db.client().await?;
    let site = id_of(&s.site)?;
    let row = db
        .query_one(
            "SELECT change_floor, (SELECT count(*) FROM site_change WHERE site_id = $1)
             FROM site WHERE id = $1",
            &[&site],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// What the devices hold after this history, with an agent offline through the
/// middle of it, and the site's change floor when the agent came back.
async fn history(window: ChangeWindow) -> anyhow::Result<(Vec<BTreeMap<u16, String>>, i64)> {
    let server = TestServer::start_tweaked(&move |c| c.change_window = window).await?;
    let mut s = Site::on_server(server, "zwave-lock-30").await?;
    let site = s.site.clone();
    let alice = s.alice.clone();
    let both = pb::CredentialScope {
        panel_partitions: vec![1],
        locks: vec![s.lock.name.clone()],
        ..Default::default()
    };
    let kept = s.credential(&alice, "4821", both.clone()).await?;
    let dropped = s.credential(&alice, "5930", lock_scope(&[&s.lock])).await?;
    let agent = s.start_agent();
    let before = s.wait_synced().await?.desired_revision;
    agent.stop().await?;

    // Offline: codes added, one removed, one re-keyed.
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    s.credential(&bob, "6041", both.clone()).await?;
    s.credential(&bob, "7152", panel_scope(&[1])).await?;
    s.admin
        .delete_credential(pb::DeleteCredentialRequest {
            name: dropped.name.clone(),
            ..Default::default()
        })
        .await?;
    s.admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: kept.name.clone(),
                pin: "8263".into(),
                ..Default::default()
            }),
            update_mask: crate::fixture::mask(&["pin"]),
        })
        .await?;
    let passes = s.server.retention.passes();
    // Two passes begun after the last write have looked at the site.
    tokio::time::timeout(
        Duration::from_secs(20),
        s.server.retention.reached(passes + 2),
    )
    .await?;
    let (floor, rows) = log_of(&s).await?;
    assert!(
        rows <= window.rows,
        "{rows} rows kept, window {}",
        window.rows
    );

    let agent = s.start_agent();
    let status = s.wait_synced().await?;
    assert!(status.desired_revision > before);
    let held = vec![s.slots(&s.lock)?, s.slots(&s.panel)?];
    agent.stop().await?;
    Ok((held, floor - before))
}

#[tokio::test]
async fn catching_up_from_the_window_and_from_a_snapshot_leave_the_same_devices()
-> anyhow::Result<()> {
    let (from_changes, behind) = history(ChangeWindow::default()).await?;
    assert!(behind < 0, "the default window kept every change");
    let small = ChangeWindow {
        rows: 2,
        age: Duration::from_secs(86_400),
    };
    let (from_snapshot, behind) = history(small).await?;
    assert!(
        behind > 0,
        "the agent's revision fell behind the window, so it was sent a snapshot"
    );
    assert_eq!(from_changes, from_snapshot);
    // The history itself: Bob's two codes and Alice's re-keyed one, her other gone.
    let codes = |m: &BTreeMap<u16, String>| {
        let mut v: Vec<String> = m.values().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(codes(&from_snapshot[0]), vec!["6041", "8263"]);
    assert_eq!(codes(&from_snapshot[1]), vec!["6041", "7152", "8263"]);
    Ok(())
}

#[tokio::test]
async fn an_idle_site_keeps_its_window_and_a_busy_one_is_pruned_to_it() -> anyhow::Result<()> {
    let window = ChangeWindow {
        rows: 3,
        age: Duration::from_secs(86_400),
    };
    let server = TestServer::start_tweaked(&move |c| c.change_window = window).await?;
    let mut s = Site::on_server(server, "zwave-lock-30").await?;
    let alice = s.alice.clone();
    for pin in ["4821", "5930", "6041", "7152", "8263"] {
        s.credential(&alice, pin, lock_scope(&[&s.lock])).await?;
    }
    eventually(
        "the log pruned to its window",
        Duration::from_secs(20),
        || async {
            let (floor, rows) = log_of(&s).await?;
            Ok((floor > 0 && rows <= window.rows).then_some(()))
        },
    )
    .await?;
    assert!(s.server.retention.changes_pruned() > 0);
    // Nothing written since: further passes leave it alone.
    let kept = log_of(&s).await?;
    let passes = s.server.retention.passes();
    tokio::time::timeout(
        Duration::from_secs(20),
        s.server.retention.reached(passes + 2),
    )
    .await?;
    assert_eq!(log_of(&s).await?, kept);
    // A new agent (revision 0) gets a snapshot and holds all five.
    let agent = s.start_agent();
    s.wait_synced().await?;
    assert_eq!(s.slots(&s.lock)?.len(), 5);
    agent.stop().await?;
    Ok(())
}
