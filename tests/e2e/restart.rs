//! An agent restarted mid-way resumes from its journal: nothing is written twice.

use crate::fixture::{Site, create_user, lock_scope, panel_scope, slot_on};
use keyplane_proto::v1 as pb;

#[tokio::test]
async fn restarted_agent_resumes_without_rewriting() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    let panel = s.panel.clone();
    let a1 = s.credential(&alice, "4821", panel_scope(&[1])).await?;
    let a2 = s.credential(&alice, "9930", lock_scope(&[&lock])).await?;

    let agent = s.start_agent();
    let first = s.wait_synced().await?;
    agent.stop().await?;
    let journal = std::fs::read_to_string(s.dir.path().join("state/journal.json"))?;
    assert!(journal.contains(&format!("\"revision\":{}", first.desired_revision)));

    // While the agent is down: one more code, one changed, one untouched.
    let bob = create_user(&mut s.admin, &s.site.clone(), "Bob").await?;
    let b1 = s.credential(&bob, "5566", lock_scope(&[&lock])).await?;
    s.admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: a1.name.clone(),
                pin: "1357".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["pin".into()],
            }),
        })
        .await?;
    let status = s.sync_status().await?;
    assert!(status.desired_revision > first.desired_revision);
    assert!(status.devices.iter().any(|d| d.pending_changes > 0));
    assert!(!status.agent_connected);

    let agent = s.start_agent();
    s.wait_synced().await?;
    let lock_sim = s.sim(&lock)?;
    let panel_sim = s.sim(&panel)?;
    // Each slot was written exactly as often as its code changed, never re-applied.
    assert_eq!(
        lock_sim.writes(slot_on(&a2, &lock).expect("slot")),
        1,
        "untouched slot written once"
    );
    assert_eq!(lock_sim.writes(slot_on(&b1, &lock).expect("slot")), 1);
    assert_eq!(
        panel_sim.writes(slot_on(&a1, &panel).expect("slot")),
        2,
        "set, then the changed PIN"
    );
    assert_eq!(lock_sim.total_writes(), 2);
    assert_eq!(panel_sim.total_writes(), 2);

    // A restart with nothing new writes nothing at all.
    agent.stop().await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(s.sim(&lock)?.total_writes(), 2);
    assert_eq!(s.sim(&panel)?.total_writes(), 2);
    assert_eq!(
        s.slots(&panel)?
            .get(&slot_on(&a1, &panel).expect("slot"))
            .map(String::as_str),
        Some("1357")
    );
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn fresh_agent_gets_a_snapshot_and_devices_outlive_it() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    let a = s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    agent.stop().await?;
    // Programming at the keypad while the agent is down stays on the device.
    let mut sim = s.sim(&lock)?;
    sim.program_at_keypad(20, "3141")?;
    assert_eq!(s.slots(&lock)?.get(&20).map(String::as_str), Some("3141"));
    let agent = s.start_agent();
    s.wait_synced().await?;
    let slots = s.slots(&lock)?;
    assert_eq!(
        slots.get(&20).map(String::as_str),
        Some("3141"),
        "hand-programmed code kept"
    );
    assert_eq!(
        slots
            .get(&slot_on(&a, &lock).expect("slot"))
            .map(String::as_str),
        Some("9930")
    );
    agent.stop().await?;
    Ok(())
}
