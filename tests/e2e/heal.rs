//! Issue 14: the agent heals what was lost on the way. A write the device answered
//! but did not keep is written again and acked only once read back.

use crate::fixture::{SYNC_TIMEOUT, Site, lock_scope, slot_on};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::eventually;

/// The status of `credential` on `device`, once `ready`.
async fn wait_state(
    s: &Site,
    credential: &str,
    device: &pb::Device,
    what: &str,
    ready: impl Fn(&pb::SlotAssignmentStatus) -> bool,
) -> anyhow::Result<pb::SlotAssignmentStatus> {
    eventually(what, SYNC_TIMEOUT, || async {
        let c = s
            .admin
            .clone()
            .get_credential(pb::GetCredentialRequest {
                name: credential.to_owned(),
            })
            .await?
            .into_inner();
        Ok(c.slots
            .iter()
            .find(|a| a.device == device.name)
            .and_then(|a| a.state.clone())
            .filter(|st| ready(st)))
    })
    .await
}

fn is_set(st: &pb::SlotAssignmentStatus) -> bool {
    st.status == pb::SlotStatus::Set as i32 && st.errors.is_empty() && st.warnings.is_empty()
}

#[tokio::test]
async fn a_write_the_lock_answers_but_does_not_keep_is_written_again_then_acked()
-> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    // The lock answers the first write as done and does not keep it.
    s.sim(&lock)?.drop_next_writes(1)?;
    let c = s.credential(&alice, "3719", lock_scope(&[&lock])).await?;
    let slot = slot_on(&c, &lock).expect("a slot on the lock");
    let agent = s.start_agent();
    s.wait_synced().await?;
    assert_eq!(
        s.sim(&lock)?.code_in(slot).as_deref(),
        Some("3719"),
        "acked only once the lock holds it"
    );
    assert_eq!(
        s.sim(&lock)?.writes(slot),
        2,
        "the lost write, then the one that took"
    );
    wait_state(&s, &c.name, &lock, "SET, nothing to report", is_set).await?;
    // Written once more than the lost write, never again.
    crate::fixture::after_a_read_back(&s, &agent, &lock).await?;
    assert_eq!(s.sim(&lock)?.writes(slot), 2);
    agent.stop().await?;
    Ok(())
}
