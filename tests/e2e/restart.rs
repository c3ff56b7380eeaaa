//! An agent restarted mid-way resumes from its journal: nothing is written twice.

use crate::fixture::{
    SYNC_TIMEOUT, Site, after_a_read_back, create_user, lock_scope, panel_scope, slot_on,
};
use keyplane_core::DeviceModel;
use keyplane_devices::{DeviceDriver, DeviceError};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::{TestAgent, eventually};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

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
    let journal = keyplane_agent::journal::Journal::open(&s.dir.path().join("state"))?;
    assert_eq!(journal.revision, first.desired_revision);
    drop(journal);

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
    after_a_read_back(&s, &agent, &lock).await?;
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

/// Simulated devices that stop answering after a number of writes, as a lock does
/// when its radio link drops in the middle of a batch.
struct FlakyFactory {
    inner: keyplane_agent::SimulatorFactory,
    writes_left: Arc<AtomicU32>,
}

struct FlakyDriver {
    inner: Box<dyn DeviceDriver>,
    writes_left: Arc<AtomicU32>,
}

impl keyplane_agent::DriverFactory for FlakyFactory {
    fn open(
        &self,
        device: &str,
        model: &'static DeviceModel,
    ) -> Result<Box<dyn DeviceDriver>, DeviceError> {
        Ok(Box::new(FlakyDriver {
            inner: self.inner.open(device, model)?,
            writes_left: self.writes_left.clone(),
        }))
    }
}

impl FlakyDriver {
    fn spend(&self) -> Result<(), DeviceError> {
        self.writes_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .map(|_| ())
            .map_err(|_| DeviceError::Unreachable("link lost".into()))
    }
}

#[async_trait::async_trait]
impl DeviceDriver for FlakyDriver {
    fn device(&self) -> &str {
        self.inner.device()
    }
    fn model(&self) -> &'static DeviceModel {
        self.inner.model()
    }
    async fn read_slots(&mut self) -> Result<Vec<keyplane_devices::ObservedSlot>, DeviceError> {
        self.inner.read_slots().await
    }
    async fn set_slot(&mut self, slot: u16, code: &str) -> Result<(), DeviceError> {
        self.spend()?;
        self.inner.set_slot(slot, code).await
    }
    async fn clear_slot(&mut self, slot: u16) -> Result<(), DeviceError> {
        self.spend()?;
        self.inner.clear_slot(slot).await
    }
}

#[tokio::test]
async fn agent_stopped_in_the_middle_of_a_batch_resumes_where_it_left_off() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let site = s.site.clone();
    let tenants = create_user(&mut s.admin, &site, "Tenants").await?;
    let mut creds = Vec::new();
    for i in 0..10 {
        creds.push(
            s.credential(
                &tenants,
                &format!("{}", 3000 + i * 11),
                lock_scope(&[&lock]),
            )
            .await?,
        );
    }
    // The first agent gets through 4 writes, then the lock stops answering.
    let writes_left = Arc::new(AtomicU32::new(4));
    let flaky = FlakyFactory {
        inner: keyplane_agent::SimulatorFactory::new(s.dir.path().join("devices")),
        writes_left: writes_left.clone(),
    };
    let agent = TestAgent::start_with(
        &s.server.url,
        &site,
        &s.agent_token,
        s.dir.path(),
        Box::new(flaky),
    );
    let sim_dir = s.dir.path().join("devices");
    let model = DeviceModel::find(&lock.model).expect("model");
    eventually("four slots written", SYNC_TIMEOUT, || {
        let sim_dir = sim_dir.clone();
        let name = lock.name.clone();
        async move {
            let sim = keyplane_devices::SimulatedDevice::open(&sim_dir, &name, model)?;
            Ok((sim.total_writes() == 4).then_some(()))
        }
    })
    .await?;
    let status = s.sync_status().await?;
    let lock_status = status
        .devices
        .iter()
        .find(|d| d.device == lock.name)
        .expect("lock status");
    assert!(
        !lock_status.in_sync,
        "a half-programmed lock is not reported in sync"
    );
    agent.stop().await?;

    // A healthy agent finishes the batch without touching the four written slots again.
    let agent = s.start_agent();
    s.wait_synced().await?;
    let sim = s.sim(&lock)?;
    assert_eq!(sim.total_writes(), 10, "every slot written exactly once");
    for c in &creds {
        assert_eq!(
            sim.writes(slot_on(c, &lock).expect("slot")),
            1,
            "{}",
            c.name
        );
    }
    assert_eq!(sim.slots().len(), 10);
    agent.stop().await?;
    Ok(())
}

/// A removal and an addition pending together on one device: the removal reaches the
/// device first, and the device is read back before the addition (and so before
/// the ack that covers both).
#[tokio::test]
async fn a_pending_removal_is_applied_and_read_back_before_an_addition() -> anyhow::Result<()> {
    use keyplane_devices::DriverOp;
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    let old = s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    agent.stop().await?;
    let old_slot = slot_on(&old, &lock).expect("slot");

    // While the agent is down: the old code revoked, a new one added.
    let bob = create_user(&mut s.admin, &s.site.clone(), "Bob").await?;
    let new = s.credential(&bob, "5566", lock_scope(&[&lock])).await?;
    s.admin
        .delete_credential(pb::DeleteCredentialRequest {
            name: old.name.clone(),
            etag: String::new(),
        })
        .await?;
    let new_slot = slot_on(&new, &lock).expect("slot");
    let mark = s.sim(&lock)?.driver_history().len();

    let agent = s.start_agent();
    s.wait_synced().await?;
    let history = s.sim(&lock)?.driver_history().split_off(mark);
    let at = |op: DriverOp| history.iter().position(|o| *o == op);
    let cleared = at(DriverOp::Clear(old_slot)).expect("the old code was cleared");
    let set = at(DriverOp::Set(new_slot)).expect("the new code was written");
    let read_back = history[cleared..]
        .iter()
        .position(|o| *o == DriverOp::ReadTable)
        .map(|i| i + cleared)
        .expect("read back after the clear");
    assert!(
        cleared < read_back && read_back < set,
        "removal, read-back, then addition: {history:?}"
    );
    assert_eq!(s.sim(&lock)?.code_in(old_slot), None);
    assert_eq!(s.sim(&lock)?.code_in(new_slot).as_deref(), Some("5566"));
    agent.stop().await?;
    Ok(())
}

/// The agent binary next to this test binary (`cargo nextest run --workspace`
/// builds it).
pub(crate) fn agent_binary() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("keyplane-agent"))
        .ok_or_else(|| anyhow::anyhow!("no target directory above {}", exe.display()))?;
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build it (cargo build -p keyplane-agent) or run the workspace",
        bin.display()
    );
    Ok(bin)
}

/// Starts the real agent process for `s`.
fn spawn_agent(s: &Site) -> anyhow::Result<tokio::process::Child> {
    Ok(tokio::process::Command::new(agent_binary()?)
        .arg("--server")
        .arg(&s.server.url)
        .arg("--site")
        .arg(&s.site)
        .arg("--state-dir")
        .arg(s.dir.path().join("state"))
        .arg("--sim-dir")
        .arg(s.dir.path().join("devices"))
        .env("KEYPLANE_AGENT_TOKEN", &s.agent_token)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(s.dir.path().join("agent.log"))?)
        .kill_on_drop(true)
        .spawn()?)
}

/// kill -9 of the agent process while it applies a 1,000-slot snapshot, then a
/// restart: the device ends equal to the desired table, and no slot is written more
/// than once beyond those whose device value differed from desired at the restart.
#[tokio::test]
async fn agent_killed_mid_snapshot_resumes_without_rewriting() -> anyhow::Result<()> {
    let mut s = Site::with_lock_model("door-1000").await?;
    let alice = s.alice.clone();
    let door = s.lock.clone();
    let mut wanted: std::collections::BTreeMap<u16, String> = Default::default();
    let mut n: u32 = 0;
    while wanted.len() < 1000 {
        n += 1;
        // Spread-out six-digit codes; one the site's rules refuse is skipped.
        let pin = format!("{:06}", 100_000 + (n * 7_919 + 104_729) % 900_000);
        let scope = pb::CredentialScope {
            doors: vec![door.name.clone()],
            ..Default::default()
        };
        match s.credential(&alice, &pin, scope).await {
            Ok(c) => {
                wanted.insert(slot_on(&c, &door).expect("slot"), pin);
            }
            Err(e) => anyhow::ensure!(n < 1500, "too many codes refused, last: {e}"),
        }
    }
    // Slow enough writes that the kill lands mid-way.
    s.sim(&door)?
        .set_write_delay(std::time::Duration::from_millis(5))?;
    let mut agent = spawn_agent(&s)?;
    eventually(
        "the agent is part-way through",
        SYNC_TIMEOUT * 6,
        || async { Ok((s.sim(&door)?.total_writes() >= 300).then_some(())) },
    )
    .await?;
    agent.start_kill()?;
    agent.wait().await?;

    let sim = s.sim(&door)?;
    let held = sim.slots();
    let before: std::collections::BTreeMap<u16, u32> = wanted
        .keys()
        .map(|slot| (*slot, sim.writes(*slot)))
        .collect();
    let differed = wanted
        .iter()
        .filter(|(slot, pin)| held.get(slot) != Some(pin))
        .count();
    assert!(
        differed > 0 && differed < 1000,
        "killed mid-way: {differed}"
    );
    s.sim(&door)?.set_write_delay(std::time::Duration::ZERO)?;
    let agent = spawn_agent(&s)?;
    // Hundreds of writes remain, each journaled (one commit and one simulator file
    // rewrite each): a bound for a machine shared with parallel builds.
    eventually(
        "the door holds the desired table",
        SYNC_TIMEOUT * 25,
        || async { Ok((s.sim(&door)?.slots() == wanted).then_some(())) },
    )
    .await
    .map_err(|e| {
        // The agent's own account is what explains a stall.
        let log = std::fs::read_to_string(s.dir.path().join("agent.log")).unwrap_or_default();
        let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
        e.context(format!("agent log, last lines first:\n{tail}"))
    })?;
    s.wait_synced_within(SYNC_TIMEOUT * 6).await?;
    let sim = s.sim(&door)?;
    assert_eq!(sim.slots(), wanted, "the device equals the desired table");
    // Every slot that differed from desired at the restart is written exactly once;
    // every slot the door already held (a write in flight at the kill that landed
    // included) is never written again: the first pass reads the door and plans
    // against what it holds.
    for (slot, pin) in &wanted {
        let again = sim.writes(*slot) - before[slot];
        if held.get(slot) != Some(pin) {
            assert_eq!(
                again, 1,
                "slot {slot} (differed) written {again} times after the restart"
            );
        } else {
            assert_eq!(
                again, 0,
                "slot {slot} (already held at the restart) written {again} times after the restart"
            );
        }
    }
    drop(agent);
    Ok(())
}
