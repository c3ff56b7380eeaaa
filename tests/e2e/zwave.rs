//! The Z-Wave JS driver against a real Z-Wave JS stack: zwave-js's mock controller
//! with a simulated lock, behind zwave-js-server, from `../shared/zwave-lab/`. Each
//! test starts its own stack on free ports and stops it by PID. Without Node/npm (or
//! the lab) each test prints why it is skipped; with KEYPLANE_ZWAVE_LAB_REQUIRED=1
//! (set by `cargo xtask test` when Node is present) that is a failure instead.
//!
//! What a test checks on the lock it reads through zwave-js-server itself (a raw
//! WebSocket client here), never through the driver under test.

use crate::fixture::{SYNC_TIMEOUT, Site, create_user, lock_scope, mask, panel_scope, slot_on};
use futures_util::{SinkExt, StreamExt};
use keyplane_agent::config::{Drivers, ZwaveNode};
use keyplane_core::DeviceModel;
use keyplane_devices::zwave::{ZwaveOptions, ZwaveServer};
use keyplane_devices::{DeviceDriver, DeviceError};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::{TestAgent, eventually};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// The lab's lock is node 2.
const NODE: u16 = 2;

fn lab_src() -> PathBuf {
    std::env::var_os("KEYPLANE_ZWAVE_LAB").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/zwave-lab"),
        PathBuf::from,
    )
}

/// Where stacks run and the lab's npm packages live: under the workspace's target dir,
/// so the packages are installed once (by `cargo xtask test`, or the first test).
fn lab_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
            PathBuf::from,
        )
        .join("zwave-lab")
}

fn found(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Which mock lock to start.
#[derive(Clone, Copy)]
enum LockKind {
    /// User Code CC v1, 30 slots, no Notification CC.
    V1,
    /// User Code CC v2 (checksum), 30 slots, Notification CC v8.
    V2,
}

/// One running stack: the mock (with its lock) and zwave-js-server, by PID.
struct Lab {
    url: String,
    dir: PathBuf,
    mock_port: u16,
    ws_port: u16,
    mock: u32,
    server: u32,
}

impl Lab {
    /// Starts a stack, or says why it cannot (None: the test is skipped).
    async fn start(kind: LockKind, test: &str) -> anyhow::Result<Option<Lab>> {
        let src = lab_src();
        let missing = if !src.join("start.sh").exists() {
            Some(format!("no zwave lab at {}", src.display()))
        } else if !found("node") || !found("npm") {
            Some("Node.js and npm are not installed".to_owned())
        } else {
            None
        };
        if let Some(why) = missing {
            if std::env::var("KEYPLANE_ZWAVE_LAB_REQUIRED").is_ok_and(|v| v == "1") {
                anyhow::bail!("{test}: the Z-Wave lab is required but unusable: {why}");
            }
            println!("SKIPPED {test}: {why} (the Z-Wave JS tests need the zwave lab)");
            eprintln!("SKIPPED {test}: {why} (the Z-Wave JS tests need the zwave lab)");
            return Ok(None);
        }
        let target = lab_target();
        std::fs::create_dir_all(&target)?;
        // Stacks start one at a time: start.sh refreshes the shared package folder's
        // files and may install the packages, which must not race another start.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target.join("start.lock"))?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock)).await??;
        let (mock_port, ws_port) = (free_port()?, free_port()?);
        let dir = target.join(format!("run-{ws_port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(src.join("start.sh"))
            .arg(&dir)
            .arg(mock_port.to_string())
            .arg(ws_port.to_string())
            .env("ZWAVE_LAB_HOME", target.join("npm"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let LockKind::V2 = kind {
            cmd.env("ZWAVE_LAB_CONFIG", src.join("lock-mock-v2.json"));
        }
        let out = tokio::time::timeout(Duration::from_secs(300), cmd.output()).await??;
        drop(lock);
        let pids = std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
        let pids: Vec<u32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        let lab = match pids.as_slice() {
            [mock, server] => Lab {
                url: format!("ws://127.0.0.1:{ws_port}"),
                dir: dir.clone(),
                mock_port,
                ws_port,
                mock: *mock,
                server: *server,
            },
            _ => anyhow::bail!(
                "zwave lab did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        };
        if !out.status.success() {
            anyhow::bail!(
                "zwave lab did not start ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Some(lab))
    }

    /// Stops zwave-js-server (the mock and its lock keep running) and waits until
    /// it is gone.
    async fn stop_server(&mut self) -> anyhow::Result<()> {
        kill(self.server);
        eventually("zwave-js-server gone", SYNC_TIMEOUT, || async {
            Ok((!alive(self.server)).then_some(()))
        })
        .await
    }

    /// Starts zwave-js-server again on the same port and cache (no new interview: the
    /// lock keeps its codes), as start.sh does, and waits until it is ready.
    async fn restart_server(&mut self) -> anyhow::Result<()> {
        let home = lab_target().join("npm");
        let log = self.dir.join("server-restarted.log");
        let child = std::process::Command::new("node")
            .arg(home.join("node_modules/@zwave-js/server/dist-esm/bin/server.js"))
            .arg(format!("tcp://127.0.0.1:{}", self.mock_port))
            .arg("--config")
            .arg(home.join("server-config.js"))
            .args(["--host", "127.0.0.1", "--port"])
            .arg(self.ws_port.to_string())
            .arg("--disable-dns-sd")
            .env("ZWAVE_LAB_CACHE", self.dir.join("cache"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()?;
        self.server = child.id();
        eventually(
            "zwave-js-server ready again",
            Duration::from_secs(60),
            || {
                let log = log.clone();
                async move {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    Ok(text.contains("All nodes are ready").then_some(()))
                }
            },
        )
        .await
        .map_err(|e| {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            anyhow::anyhow!("{e}; its log ends: {}", tail.join(" | "))
        })
    }
}

fn kill(pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for Lab {
    fn drop(&mut self) {
        kill(self.server);
        kill(self.mock);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain zwave-js-server client, apart from the driver: greets, agrees on the
/// server's highest schema, sends `commands` one after the other and returns each
/// answer (`result` on success, the whole message otherwise).
type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_message(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str())?),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("closed"),
        }
    }
}

async fn zwjs(url: &str, commands: &[Value]) -> anyhow::Result<Vec<Value>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let greeting = next_message(&mut ws).await?;
    let schema = greeting["maxSchemaVersion"].clone();
    let mut out = Vec::new();
    let all = std::iter::once(json!({"command": "set_api_schema", "schemaVersion": schema}))
        .chain(commands.iter().cloned());
    for (i, mut command) in all.enumerate() {
        let id = format!("t{i}");
        command["messageId"] = json!(id);
        ws.send(Message::text(command.to_string())).await?;
        loop {
            let msg = next_message(&mut ws).await?;
            if msg["type"] == json!("result") && msg["messageId"] == json!(id) {
                if i > 0 {
                    out.push(if msg["success"] == json!(true) {
                        msg["result"].clone()
                    } else {
                        msg
                    });
                }
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(out)
}

/// What the lock holds in `slot`, asked of the lock through zwave-js-server.
async fn lock_slot(url: &str, slot: u16) -> anyhow::Result<Option<String>> {
    let got = zwjs(
        url,
        &[
            json!({"command": "endpoint.invoke_cc_api", "nodeId": NODE, "endpoint": 0,
            "commandClass": 99, "methodName": "get", "args": [slot]}),
        ],
    )
    .await?;
    let r = &got[0]["response"];
    let code = r["userCode"].as_str().unwrap_or_default();
    Ok((r["userIdStatus"].as_u64().unwrap_or(0) != 0 && !code.is_empty()).then(|| code.to_owned()))
}

/// Programs `code` into `slot` as a person at the lock would (not through keyplane).
async fn program_by_hand(url: &str, slots: &[(u16, &str)]) -> anyhow::Result<()> {
    let commands: Vec<Value> = slots
        .iter()
        .map(|(slot, code)| {
            json!({"command": "node.set_value", "nodeId": NODE,
                "valueId": {"commandClass": 99, "endpoint": 0, "property": "userCode", "propertyKey": slot},
                "value": code})
        })
        .collect();
    for answer in zwjs(url, &commands).await? {
        let status = answer["result"]["status"].as_u64();
        anyhow::ensure!(
            matches!(status, Some(254 | 255)),
            "hand programming refused: {answer}"
        );
    }
    Ok(())
}

fn model() -> &'static DeviceModel {
    DeviceModel::find("zwave-js-lock").expect("zwave-js-lock profile")
}

fn test_options() -> ZwaveOptions {
    ZwaveOptions {
        command_timeout: Duration::from_secs(10),
        write_gap: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        ..ZwaveOptions::default()
    }
}

/// An agent whose site lock is the lab's node 2 and whose other devices are simulated.
fn start_agent(s: &Site, lab: &Lab) -> anyhow::Result<(TestAgent, ZwaveServer)> {
    let drivers = Drivers::new(
        Some(s.dir.path().join("devices")),
        Some(&lab.url),
        vec![ZwaveNode {
            node: NODE,
            device: s.lock.name.clone(),
        }],
        test_options(),
    )
    .map_err(anyhow::Error::msg)?;
    let server = drivers
        .zwave()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no zwave server"))?;
    let agent = TestAgent::start_with(
        &s.server.url,
        &s.site,
        &s.agent_token,
        s.dir.path(),
        Box::new(drivers),
    );
    Ok((agent, server))
}

async fn wait_slot(url: &str, slot: u16, want: Option<&str>) -> anyhow::Result<()> {
    eventually("the lock's slot as wanted", SYNC_TIMEOUT, || async move {
        Ok((lock_slot(url, slot).await?.as_deref() == want).then_some(()))
    })
    .await
}

#[tokio::test]
async fn zwave_driver_writes_confirmed_codes_and_reports_refusals() -> anyhow::Result<()> {
    let Some(lab) = Lab::start(LockKind::V1, "zwave_driver_writes_confirmed_codes").await? else {
        return Ok(());
    };
    let server = ZwaveServer::connect(&lab.url, test_options());
    let mut lock = server.lock(NODE, "sites/s/devices/front", model());
    let cap = lock.capacity().await?;
    assert_eq!(
        (cap.slots, cap.min_code_length, cap.max_code_length),
        (30, 4, 10)
    );
    assert_eq!(server.schema(), 50);
    // What the agent puts in its inventory for keyplaned.
    let reported = lock.reported_constraints().await?.expect("a report");
    assert_eq!(
        (reported.first_slot, reported.last_slot),
        (Some(1), Some(30))
    );
    assert_eq!(
        (reported.min_code_length, reported.max_code_length),
        (Some(4), Some(10))
    );
    assert_eq!(
        (reported.reads_back, reported.keeps_schedules),
        (Some(true), Some(false))
    );
    // What `keyplane-agent zwave-discover` lists.
    let found = keyplane_devices::zwave::discover(&lab.url, Duration::from_secs(10)).await?;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].node, found[0].user_code_version), (NODE, 1));
    assert_eq!(found[0].capacity.map(|c| c.slots), Some(30));
    assert!(!found[0].keypad_events);

    lock.set_slot(3, "2580").await?;
    assert_eq!(lock_slot(&lab.url, 3).await?.as_deref(), Some("2580"));
    let held = lock.read_slots().await?;
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].slot, held[0].code.as_deref()), (3, Some("2580")));

    // Too short for the lock: its own refusal, with its reason, and never the code.
    let writes = server.stats().writes.load(Ordering::Relaxed);
    let e = lock.set_slot(4, "258").await.expect_err("too short");
    assert!(matches!(e, DeviceError::Refused { slot: 4, .. }), "{e}");
    assert!(e.to_string().contains("length of 4 to 10"), "{e}");
    assert!(!e.to_string().contains("258"), "{e}");
    assert!(e.is_refusal());
    // The same code again is refused without another radio command.
    assert_eq!(lock.set_slot(4, "258").await, Err(e));
    assert_eq!(server.stats().writes.load(Ordering::Relaxed), writes + 1);
    assert_eq!(lock_slot(&lab.url, 4).await?, None);

    // Past the lock's 30 slots (keyplaned allocates within them once told; the
    // driver still refuses on its own, without radio traffic).
    let e = lock.set_slot(31, "2580").await.expect_err("past capacity");
    assert_eq!(
        e,
        DeviceError::SlotOutOfRange {
            slot: 31,
            first: 1,
            last: 30
        }
    );

    lock.clear_slot(3).await?;
    assert_eq!(lock_slot(&lab.url, 3).await?, None);
    assert!(lock.read_slots().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn zwave_end_to_end_a_dealer_pin_lands_changes_and_goes() -> anyhow::Result<()> {
    let Some(lab) = Lab::start(LockKind::V1, "zwave_end_to_end").await? else {
        return Ok(());
    };
    let mut s = Site::with_lock_model("zwave-js-lock").await?;
    let (agent, _server) = start_agent(&s, &lab)?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    let credential = s.credential(&alice, "2580", lock_scope(&[&lock])).await?;
    let slot = slot_on(&credential, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    s.wait_synced().await?;
    assert_eq!(lock_slot(&lab.url, slot).await?.as_deref(), Some("2580"));

    s.admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: credential.name.clone(),
                pin: "3691".into(),
                ..Default::default()
            }),
            update_mask: mask(&["pin"]),
        })
        .await?;
    s.wait_synced().await?;
    assert_eq!(lock_slot(&lab.url, slot).await?.as_deref(), Some("3691"));

    s.admin
        .delete_credential(pb::DeleteCredentialRequest {
            name: credential.name.clone(),
            etag: String::new(),
        })
        .await?;
    s.wait_synced().await?;
    assert_eq!(lock_slot(&lab.url, slot).await?, None);
    agent.stop().await
}

/// Waits until the agent has read `lock` back and reported keyplane's code on it.
async fn managed_reported(s: &Site, lock: &pb::Device) -> anyhow::Result<()> {
    let admin = s.admin.clone();
    let name = format!("{}/syncStatus", s.site);
    eventually("the lock read back", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let name = name.clone();
        async move {
            let st = admin
                .get_sync_status(pb::GetSyncStatusRequest {
                    name,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(st
                .devices
                .iter()
                .any(|d| d.device == lock.name && d.managed_slots == 1)
                .then_some(()))
        }
    })
    .await
}

async fn local_codes(s: &Site, at_least: usize) -> anyhow::Result<Vec<pb::LocalCode>> {
    let admin = s.admin.clone();
    let parent = s.site.clone();
    eventually("local codes reported", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let parent = parent.clone();
        async move {
            let codes = admin
                .list_local_codes(pb::ListLocalCodesRequest { parent })
                .await?
                .into_inner()
                .local_codes;
            Ok((codes.len() >= at_least).then_some(codes))
        }
    })
    .await
}

#[tokio::test]
async fn zwave_v2_a_code_set_at_the_lock_is_found_by_checksum_and_kept_as_local()
-> anyhow::Result<()> {
    let Some(lab) = Lab::start(LockKind::V2, "zwave_v2_local_code").await? else {
        return Ok(());
    };
    let mut s = Site::with_lock_model("zwave-js-lock").await?;
    s.set_policy(pb::LocalCodePolicy::Preserve).await?;
    let (agent, server) = start_agent(&s, &lab)?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    let credential = s.credential(&alice, "2580", lock_scope(&[&lock])).await?;
    let slot = slot_on(&credential, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    s.wait_synced().await?;
    assert_eq!(lock_slot(&lab.url, slot).await?.as_deref(), Some("2580"));
    // The first read of the lock knew nothing yet (all its slots were read); once the
    // agent has reported that read, the checksum says when to look, and value events
    // say where.
    managed_reported(&s, &lock).await?;
    let reads_before = server.stats().slot_reads.load(Ordering::Relaxed);
    let checksums_before = server.stats().checksum_reads.load(Ordering::Relaxed);
    program_by_hand(&lab.url, &[(7, "4826")]).await?;
    let locals = local_codes(&s, 1).await?;
    assert_eq!(locals.len(), 1);
    assert_eq!(
        (locals[0].device.as_str(), locals[0].slot),
        (lock.name.as_str(), 7)
    );
    assert!(locals[0].pin_known);
    let slot_reads = server.stats().slot_reads.load(Ordering::Relaxed) - reads_before;
    let checksum_reads = server.stats().checksum_reads.load(Ordering::Relaxed) - checksums_before;
    println!(
        "slot reads to find the hand-programmed code: {slot_reads}; checksum reads: {checksum_reads}"
    );
    // At most the slots value events named since the cache last matched: the new
    // one, and keyplane's own slot, whose confirming events can still be arriving.
    // Never the lock's 30.
    assert!(slot_reads <= 2, "{slot_reads} slot reads, not every slot");
    assert!(checksum_reads >= 1);
    // PRESERVE: kept, and keyplane's own code is untouched.
    assert_eq!(lock_slot(&lab.url, 7).await?.as_deref(), Some("4826"));
    assert_eq!(lock_slot(&lab.url, slot).await?.as_deref(), Some("2580"));
    agent.stop().await
}

/// The lock's constraints as keyplaned publishes them, once it has them from the
/// agent (source REPORTED).
async fn reported_constraints(
    s: &Site,
    lock: &pb::Device,
) -> anyhow::Result<pb::DeviceConstraints> {
    let admin = s.admin.clone();
    let name = lock.name.clone();
    eventually("the lock's own constraints published", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let name = name.clone();
        async move {
            let c = admin
                .get_device(pb::GetDeviceRequest { name })
                .await?
                .into_inner()
                .constraints
                .unwrap_or_default();
            let reported = c
                .capacity
                .as_ref()
                .is_some_and(|k| k.source == pb::ConstraintSource::Reported as i32);
            Ok(reported.then_some(c))
        }
    })
    .await
}

#[tokio::test]
async fn zwave_the_locks_own_slots_reach_keyplaned_and_a_full_lock_is_refused_at_request_time()
-> anyhow::Result<()> {
    let Some(mut lab) = Lab::start(LockKind::V1, "zwave_past_capacity").await? else {
        return Ok(());
    };
    let mut s = Site::with_lock_model("zwave-js-lock").await?;
    s.set_policy(pb::LocalCodePolicy::Preserve).await?;
    let lock = s.lock.clone();
    // The agent starts while zwave-js-server is away: its Hello cannot say what the
    // lock has, and the profile (1..250) is in force.
    lab.stop_server().await?;
    let (agent, server) = start_agent(&s, &lab)?;
    let tenants = create_user(&mut s.admin, &s.site.clone(), "Tenants").await?;
    s.credential(&tenants, "7391", panel_scope(&[1])).await?;
    let admin = s.admin.clone();
    let name = format!("{}/syncStatus", s.site);
    let panel = s.panel.name.clone();
    eventually(
        "the panel acked (the agent's stream is up)",
        SYNC_TIMEOUT,
        || {
            let mut admin = admin.clone();
            let name = name.clone();
            let panel = panel.clone();
            async move {
                let st = admin
                    .get_sync_status(pb::GetSyncStatusRequest {
                        name,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let done = st
                    .devices
                    .iter()
                    .any(|d| d.device == panel && d.applied_revision == st.desired_revision);
                Ok(done.then_some(()))
            }
        },
    )
    .await?;
    let before = s
        .admin
        .get_device(pb::GetDeviceRequest {
            name: lock.name.clone(),
        })
        .await?
        .into_inner()
        .constraints
        .unwrap_or_default();
    assert_eq!(before.last_slot, 250);
    assert_eq!(
        before.capacity.map(|c| c.source),
        Some(pb::ConstraintSource::Profile as i32)
    );

    // The server back: the driver learns the lock's count and the agent reports it
    // on its open stream.
    lab.restart_server().await?;
    let c = reported_constraints(&s, &lock).await?;
    assert_eq!((c.first_slot, c.last_slot), (1, 30));
    assert_eq!((c.min_code_length, c.max_code_length), (4, 10));
    assert!(c.reserved_slots.is_empty());
    assert!(!c.on_device_schedules);
    let capacity = c.capacity.unwrap_or_default();
    assert_eq!(capacity.slots_total, 30);
    assert!(capacity.reads_back, "Z-Wave User Code reads are in clear");

    // Every one of the lock's 30 slots programmed at the lock, kept as LOCAL codes.
    let codes: Vec<(u16, String)> = (1..=30u16)
        .map(|i| (i, format!("{}", 5000 + i * 7)))
        .collect();
    let hand: Vec<(u16, &str)> = codes.iter().map(|(s, c)| (*s, c.as_str())).collect();
    program_by_hand(&lab.url, &hand).await?;
    // Once the 30 LOCAL codes are reported, a code for the lock has no slot: refused
    // when asked, naming the lock and the constraint, instead of slot 31 failing on it.
    let locals = local_codes(&s, 30).await?;
    assert_eq!(locals.len(), 30);
    let r = s.credential(&tenants, "2580", lock_scope(&[&lock])).await;
    let e = r.expect_err("no slot left on the lock");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let msg = e.message();
    assert!(msg.contains(&lock.name), "{msg}");
    assert!(
        msg.contains("slots_free") && msg.contains("all 30"),
        "{msg}"
    );
    assert!(!msg.contains("2580"), "never the code: {msg}");
    assert_eq!(
        server.stats().writes.load(Ordering::Relaxed),
        0,
        "nothing sent to the lock"
    );
    for (slot, code) in &codes {
        if *slot % 10 == 0 {
            assert_eq!(
                lock_slot(&lab.url, *slot).await?.as_deref(),
                Some(code.as_str())
            );
        }
    }
    agent.stop().await
}

#[tokio::test]
async fn zwave_server_stopped_and_restarted_midway_the_agent_reconnects_and_finishes()
-> anyhow::Result<()> {
    let Some(mut lab) = Lab::start(LockKind::V1, "zwave_server_restart").await? else {
        return Ok(());
    };
    let mut s = Site::with_lock_model("zwave-js-lock").await?;
    let (agent, server) = start_agent(&s, &lab)?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    let first = s.credential(&alice, "2580", lock_scope(&[&lock])).await?;
    s.wait_synced().await?;
    let first_slot = slot_on(&first, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    assert_eq!(
        lock_slot(&lab.url, first_slot).await?.as_deref(),
        Some("2580")
    );

    lab.stop_server().await?;
    let bob = create_user(&mut s.admin, &s.site.clone(), "Bob").await?;
    let second = s.credential(&bob, "3691", lock_scope(&[&lock])).await?;
    let second_slot = slot_on(&second, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    // The agent notices the server is gone before it comes back.
    eventually("driver disconnected", SYNC_TIMEOUT, || async {
        Ok((!server.connected()).then_some(()))
    })
    .await?;
    lab.restart_server().await?;
    s.wait_synced().await?;
    wait_slot(&lab.url, second_slot, Some("3691")).await?;
    assert_eq!(
        lock_slot(&lab.url, first_slot).await?.as_deref(),
        Some("2580")
    );
    assert!(server.stats().connections.load(Ordering::Relaxed) >= 2);
    agent.stop().await
}

/// A WebSocket relay between the agent and the lab's zwave-js-server that can add
/// server events of its own: the mock lock has no keypad, so a keypad notification
/// is injected here, in the exact shape zwave-js-server 3.10.2 forwards one
/// (schema 32 and later), into a session that is otherwise the real stack's.
struct Relay {
    url: String,
    inject: tokio::sync::mpsc::UnboundedSender<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: &str) -> anyhow::Result<Relay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("ws://{}", listener.local_addr()?);
        let (inject, mut injected) = tokio::sync::mpsc::unbounded_channel::<String>();
        let upstream = upstream.to_owned();
        let task = tokio::spawn(async move {
            // One session at a time, as the agent holds one.
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut client) = tokio_tungstenite::accept_async(tcp).await else {
                    continue;
                };
                let Ok((mut server, _)) = tokio_tungstenite::connect_async(&upstream).await else {
                    continue;
                };
                loop {
                    tokio::select! {
                        m = client.next() => match m {
                            Some(Ok(m)) if !m.is_close() => { if server.send(m).await.is_err() { break; } }
                            _ => break,
                        },
                        m = server.next() => match m {
                            Some(Ok(m)) if !m.is_close() => { if client.send(m).await.is_err() { break; } }
                            _ => break,
                        },
                        Some(text) = injected.recv() => {
                            if client.send(Message::text(text)).await.is_err() { break; }
                        }
                    }
                }
            }
        });
        Ok(Relay { url, inject, task })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn zwave_v2_a_keypad_unlock_arrives_as_an_event_naming_the_slot() -> anyhow::Result<()> {
    let Some(lab) = Lab::start(LockKind::V2, "zwave_v2_keypad_event").await? else {
        return Ok(());
    };
    let relay = Relay::start(&lab.url).await?;
    let mut s = Site::with_lock_model("zwave-js-lock").await?;
    let drivers = Drivers::new(
        Some(s.dir.path().join("devices")),
        Some(&relay.url),
        vec![ZwaveNode {
            node: NODE,
            device: s.lock.name.clone(),
        }],
        test_options(),
    )
    .map_err(anyhow::Error::msg)?;
    let agent = TestAgent::start_with(
        &s.server.url,
        &s.site,
        &s.agent_token,
        s.dir.path(),
        Box::new(drivers),
    );
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    let credential = s.credential(&alice, "2580", lock_scope(&[&lock])).await?;
    let slot = slot_on(&credential, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    s.wait_synced().await?;
    assert_eq!(lock_slot(&lab.url, slot).await?.as_deref(), Some("2580"));
    // Alice opens the door at the keypad: Notification CC, Access Control (6),
    // Keypad unlock operation (6), user id = her slot.
    let event = json!({"type": "event", "event": {"source": "node", "event": "notification",
        "nodeId": NODE, "endpointIndex": 0, "ccId": 113, "args": {"type": 6, "event": 6,
        "label": "Access Control", "eventLabel": "Keypad unlock operation",
        "parameters": {"userId": slot}}}});
    relay.inject.send(event.to_string())?;
    let admin = s.admin.clone();
    let parent = s.site.clone();
    let got = eventually("the keypad event stored", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let parent = parent.clone();
        async move {
            let events = admin
                .list_events(pb::ListEventsRequest {
                    parent,
                    page_size: 100,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .events;
            Ok(events
                .into_iter()
                .find(|e| e.kind == pb::EventKind::AccessGranted as i32))
        }
    })
    .await?;
    assert_eq!(got.device, lock.name);
    assert_eq!(got.user_number, i32::from(slot));
    assert_eq!(got.display_user_number, slot.to_string());
    assert_eq!(got.user, alice);
    agent.stop().await
}
