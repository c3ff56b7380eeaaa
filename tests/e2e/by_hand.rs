//! Seed 000 by hand: what `keyplane-agent sim` does at the simulated devices of a
//! site whose agent is running, seen through the API.

use crate::fixture::{SYNC_TIMEOUT, Site, lock_scope, panel_scope, slot_on};
use keyplane_agent::hand::{HandAction, act};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::eventually;

#[tokio::test]
async fn a_code_programmed_with_the_sim_command_arrives_as_a_local_code() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    let panel = s.panel.clone();
    let panel_code = s.credential(&alice, "4821", panel_scope(&[1])).await?;
    let lock_code = s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    let sim_dir = agent.sim_dir.clone();

    // Someone programs 3141 into slot 7 at the front-door keypad, agent running.
    let programmed = act(
        &sim_dir,
        &lock.name,
        &HandAction::ProgramSlot {
            slot: 7,
            code: "3141".into(),
        },
    )?;
    assert!(programmed.done);
    assert_eq!(
        programmed.message,
        format!("slot 7 programmed at the keypad of {}", lock.name)
    );
    let admin = s.admin.clone();
    let parent = s.site.clone();
    let local = eventually("the LOCAL code at keyplaned", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let parent = parent.clone();
        let device = lock.name.clone();
        async move {
            let codes = admin
                .list_local_codes(pb::ListLocalCodesRequest { parent })
                .await?
                .into_inner()
                .local_codes;
            Ok(codes.into_iter().find(|c| c.device == device))
        }
    })
    .await?;
    assert_eq!((local.slot, local.display_slot.as_str()), (7, "7"));
    assert!(local.pin_known);
    assert_eq!(local.name, format!("{}/localCodes/7", lock.name));

    // Alice's codes work where they belong, named by device id alone.
    let panel_id = panel.name.rsplit('/').next().unwrap_or_default();
    let lock_id = lock.name.rsplit('/').next().unwrap_or_default();
    let armed = act(
        &sim_dir,
        panel_id,
        &HandAction::Arm {
            partition: 1,
            code: "4821".into(),
        },
    )?;
    let alice_user = slot_on(&panel_code, &panel).expect("panel slot");
    assert_eq!(
        armed.message,
        format!("armed partition 1 with user {alice_user:03}")
    );
    let disarmed = act(
        &sim_dir,
        panel_id,
        &HandAction::Disarm {
            partition: 1,
            code: "4821".into(),
        },
    )?;
    assert_eq!(
        disarmed.message,
        format!("disarmed partition 1 with user {alice_user:03}")
    );
    let lock_slot = slot_on(&lock_code, &lock).expect("lock slot");
    let granted = act(
        &sim_dir,
        lock_id,
        &HandAction::Present {
            code: "9930".into(),
        },
    )?;
    assert_eq!(
        granted.message,
        format!("access granted at {} (slot {lock_slot})", lock.name)
    );
    // The lock code does not open the panel, nor the panel code the lock.
    let refused = act(
        &sim_dir,
        lock_id,
        &HandAction::Present {
            code: "4821".into(),
        },
    )?;
    assert!(!refused.done);
    assert_eq!(refused.message, "access denied: unknown code");
    let refused = act(
        &sim_dir,
        panel_id,
        &HandAction::Arm {
            partition: 1,
            code: "9930".into(),
        },
    )?;
    assert!(!refused.done, "{}", refused.message);
    for m in [&programmed, &armed, &disarmed, &granted, &refused] {
        for pin in ["3141", "4821", "9930"] {
            assert!(!m.message.contains(pin), "{}", m.message);
        }
    }
    agent.stop().await?;
    Ok(())
}
