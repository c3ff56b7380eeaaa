//! Issue 13: the agent's side of the stream under hostile input. Arbitrary bytes
//! and arbitrary server messages (built from the API's descriptor,
//! keyplane_proto::fuzz) are decoded and applied to a running agent with simulated
//! devices: it never panics, a device never holds a code keyplane did not send,
//! and the journal opens again afterwards. 12 cases in CI (each starts an agent: about 2 s); `PROPTEST_CASES` by hand.

use crate::clock::SystemClock;
use crate::device::Pacing;
use crate::journal::Journal;
use crate::reconcile::tests::{TempDir, code, snapshot};
use crate::reconcile::{Agent, Settings, SimulatorFactory};
use keyplane_proto::fuzz::{Entropy, Schema};
use keyplane_proto::v1 as pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const DOOR: &str = "sites/s/devices/door";
const PANEL: &str = "sites/s/devices/panel";
const LOCK: &str = "sites/s/devices/lock";
const DEVICES: [(&str, &str); 3] = [
    (DOOR, "door-1000"),
    (PANEL, "vista-128bpt"),
    (LOCK, "zwave-lock-30"),
];

fn words() -> Vec<String> {
    let mut words: Vec<String> = DEVICES
        .iter()
        .flat_map(|(name, model)| [(*name).to_owned(), (*model).to_owned()])
        .collect();
    words.extend(
        [
            "sites/s",
            "sites/s/users/u/credentials/c3",
            "Europe/Paris",
            "4821",
            "7391",
            "08:00",
            "18:00",
        ]
        .map(str::to_owned),
    );
    words
}

/// Every PIN that appears in `bytes` as a string field could be a code keyplane
/// sent; a device may hold only those (or the simulator's own starting codes).
fn sent_pins(msg: &pb::ServerMessage, into: &mut BTreeSet<String>) {
    let slots = match &msg.msg {
        Some(pb::server_message::Msg::Snapshot(s)) => &s.slots,
        Some(pb::server_message::Msg::Changes(c)) => &c.slots,
        _ => return,
    };
    into.extend(slots.iter().map(|s| s.pin.clone()));
}

#[test]
fn arbitrary_server_messages_never_crash_the_agent_nor_put_unsent_codes_on_devices() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let schema = Schema::keyplane().expect("descriptor set");
    let words = words();
    let mut runner = TestRunner::new(Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(12),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = proptest::collection::vec(
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..500),
        ),
        1..5,
    );
    let result = runner.run(&strategy, |messages| {
        rt.block_on(async {
            let dir = TempDir::new();
            let devices_dir = dir.0.join("devices");
            let journal =
                Journal::open(&dir.0).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            let settings = Settings {
                pacing: Pacing {
                    panel: Duration::ZERO,
                    lock: Duration::ZERO,
                    door: Duration::ZERO,
                },
                ..Settings::default()
            };
            let mut agent = Agent::open_with(
                journal,
                Box::new(SimulatorFactory::new(&devices_dir)),
                Arc::new(SystemClock),
                settings,
                crate::PassCounter::default(),
                crate::PassCounter::default(),
            );
            let (tx, mut rx) = mpsc::channel(100_000);
            let first = snapshot(1, false, &DEVICES, vec![code(DOOR, 3, "4821", false)]);
            let mut sent = BTreeSet::from(["4821".to_owned()]);
            agent
                .apply(first, &tx)
                .await
                .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            for (garbage, entropy) in &messages {
                let bytes = if *garbage {
                    entropy.clone()
                } else {
                    schema.arbitrary(
                        "keyplane.v1.ServerMessage",
                        &words,
                        &mut Entropy::new(entropy),
                    )
                };
                // What the agent's decoder refuses never reaches it.
                let Ok(msg) = pb::ServerMessage::decode(bytes.as_slice()) else {
                    continue;
                };
                sent_pins(&msg, &mut sent);
                if let Some(m) = msg.msg {
                    // Refusing a message is allowed; crashing is not.
                    let _ = agent.apply(m, &tx).await;
                }
                while rx.try_recv().is_ok() {}
            }
            agent.stop().await;
            for (name, model) in DEVICES {
                let model = keyplane_core::DeviceModel::find(model).expect("model");
                let mut driver = keyplane_devices::open_driver(&devices_dir, name, model)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let held = driver
                    .read_slots()
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                for slot in held {
                    if let Some(pin) = slot.code.as_deref() {
                        prop_assert!(
                            sent.contains(pin) || model.is_reserved(slot.slot),
                            "{name} slot {} holds a code keyplane never sent",
                            slot.slot
                        );
                    }
                }
            }
            Journal::open(&dir.0).map_err(|e| TestCaseError::fail(format!("journal: {e:#}")))?;
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
