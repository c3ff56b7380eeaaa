//! No PIN in any log line (server and agent at debug level, as text and as JSON),
//! error, Debug output or file of the agent's state directory, over a full scenario
//! (issue 13); every JSON line of a dealer call names its request, dealer and site
//! (issue 17).

use crate::fixture::{SYNC_TIMEOUT, Site, create_user, lock_scope};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::eventually;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Log lines of this test, whatever thread of its runtime wrote them.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Eight digits: long enough never to appear by chance in ids and timestamps.
const PINS: [&str; 4] = ["73194682", "58203917", "64920531", "81736250"];

fn assert_no_pin(what: &str, text: &str) {
    for pin in PINS {
        assert!(!text.contains(pin), "PIN {pin} appears in {what}");
    }
}

// A current-thread runtime (tokio::test's default): the thread-local subscriber sees
// the server's and the agent's tasks alike.
#[tokio::test]
async fn no_pin_in_logs_errors_debug_output_or_agent_files() -> anyhow::Result<()> {
    use keyplane_telemetry::{LogFormat, fmt_layer};
    use tracing_subscriber::layer::SubscriberExt;
    let capture = Capture::default();
    let json = Capture::default();
    let (text_writer, json_writer) = (capture.clone(), json.clone());
    // Both formats at once, as the binaries write them: one scenario covers both.
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("debug"))
        .with(fmt_layer(
            LogFormat::Text,
            move || text_writer.clone(),
            false,
        ))
        .with(fmt_layer(
            LogFormat::Json,
            move || json_writer.clone(),
            false,
        ));
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    let bob = create_user(&mut s.admin, &s.site.clone(), "Bob").await?;
    // As installed: the journal's key in a private file outside the state directory.
    let key_file = s.dir.path().join("journal.key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&key_file)?
            .write_all(b"5f0c6a1e9b2d4c7f8a3e6b1d0c9f2a4e7b5d8c1f0a3e6b9d2c5f8a1e4b7d0c3f\n")?;
    }
    let mut config = s.agent_config();
    config.journal_key_file = Some(key_file);
    let agent = keyplane_testkit::server::TestAgent::start_config(
        config,
        s.dir.path(),
        Box::new(keyplane_agent::SimulatorFactory::new(
            s.dir.path().join("devices"),
        )),
    );
    let created = s.credential(&alice, PINS[0], lock_scope(&[&lock])).await?;
    assert_no_pin(
        "a CreateCredential response's Debug",
        &format!("{:?}", {
            let mut c = created.clone();
            c.pin.clear();
            c
        }),
    );
    // A refused duplicate: the error names the device, never the PIN.
    let err = s
        .credential(&bob, PINS[0], lock_scope(&[&lock]))
        .await
        .expect_err("duplicate");
    assert_no_pin("a refusal", &format!("{err:?}"));
    s.admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: created.name.clone(),
                pin: PINS[1].into(),
                ..Default::default()
            }),
            update_mask: crate::fixture::mask(&["pin"]),
        })
        .await?;
    s.wait_synced().await?;
    // A code programmed at the keypad: the agent reads it, reports it, the dealer claims it.
    s.sim(&lock)?.program_at_keypad(20, PINS[2])?;
    let admin = s.admin.clone();
    let parent = s.site.clone();
    let local = eventually("the local code reported", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let parent = parent.clone();
        async move {
            let codes = admin
                .list_local_codes(pb::ListLocalCodesRequest { parent })
                .await?
                .into_inner()
                .local_codes;
            Ok(codes.into_iter().next())
        }
    })
    .await?;
    assert_no_pin("a LocalCode's Debug", &format!("{local:?}"));
    let claimed = s
        .admin
        .claim_local_code(pb::ClaimLocalCodeRequest {
            name: local.name.clone(),
            user: bob.clone(),
            panel_partitions: vec![],
        })
        .await?
        .into_inner();
    assert_no_pin("a claimed credential's Debug", &format!("{claimed:?}"));
    let refused = s
        .credential(&alice, PINS[2], lock_scope(&[&lock]))
        .await
        .expect_err("taken by the claimed code");
    assert_no_pin("a refusal", &format!("{refused:?}"));
    s.credential(&bob, PINS[3], lock_scope(&[&lock])).await?;
    s.wait_synced().await?;
    let listed = s
        .admin
        .list_credentials(pb::ListCredentialsRequest {
            parent: bob.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_no_pin("ListCredentials", &format!("{listed:?}"));
    assert_no_pin("the store's Debug", &format!("{:?}", s.server.store));
    let state_dir = agent.state_dir.clone();
    agent.stop().await?;

    let logs =
        String::from_utf8_lossy(&capture.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert!(logs.contains("DEBUG"), "debug lines were captured");
    assert_no_pin("the server's and agent's debug log", &logs);
    let json =
        String::from_utf8_lossy(&json.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert_no_pin("the server's and agent's JSON log", &json);
    let site_id = s.site.trim_start_matches("sites/").to_owned();
    let mut call_lines = 0;
    for line in json.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("a JSON log line that does not parse ({e}): {line}"))?;
        let Some(rpc) = value["spans"]
            .as_array()
            .and_then(|spans| spans.iter().find(|s| s["name"] == "rpc"))
        else {
            continue;
        };
        // A credential write names its site in the request: the line that ends the
        // call knows it; the request id and dealer are known from authentication.
        if rpc["rpc.method"] == "keyplane.v1.AdminService/CreateCredential"
            && value["message"] == "call answered"
        {
            call_lines += 1;
            assert!(
                rpc["request_id"].as_str().is_some_and(|r| !r.is_empty()),
                "{line}"
            );
            assert!(
                rpc["dealer"].as_str().is_some_and(|d| !d.is_empty()),
                "{line}"
            );
            assert_eq!(rpc["site"], site_id.as_str(), "{line}");
        }
    }
    assert!(
        call_lines >= 4,
        "each CreateCredential logged its answer: {call_lines}"
    );

    // Every file the agent keeps, the journal included.
    let mut files = vec![state_dir.clone()];
    let mut journal = false;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path)?.flatten().map(|e| e.path()));
            continue;
        }
        // The journal too: its codes are sealed (issue 13).
        if path.file_name().is_some_and(|n| n == "journal.redb") {
            journal = true;
        }
        let bytes = std::fs::read(&path)?;
        assert_no_pin(
            &path.display().to_string(),
            &String::from_utf8_lossy(&bytes),
        );
    }
    assert!(journal, "the walk found the agent's state directory");
    assert!(
        !state_dir.join(keyplane_agent::seal::DEV_KEY_FILE).exists(),
        "with a key file, no key is kept beside the journal"
    );
    Ok(())
}
