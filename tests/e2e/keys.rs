//! PIN key rotation under a running agent, and the backup/restore drill (issue 13).

use crate::fixture::{SYNC_TIMEOUT, Site, create_user, lock_scope, panel_scope};
use keyplane_proto::v1 as pb;
use keyplane_store::{PinKey, Store};
use keyplane_testkit::pg::TestDatabase;
use keyplane_testkit::server::{TempDir, TestServer, eventually};
use tonic::Code;

/// 64 hex digits of fresh randomness: a key file's content, as an operator backs it up.
fn key_hex() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Creates a code, retrying once when the server's guess at the site's hash key was
/// stale (ABORTED, the documented rotation behaviour).
async fn create(
    s: &mut Site,
    user: &str,
    pin: &str,
    scope: pb::CredentialScope,
) -> Result<pb::Credential, tonic::Status> {
    match s.credential(user, pin, scope.clone()).await {
        Err(e) if e.code() == Code::Aborted => s.credential(user, pin, scope).await,
        other => other,
    }
}

/// A copy of a PIN the lock already holds is refused, whichever key hashed the original.
async fn duplicate_refused(s: &mut Site, user: &str, pin: &str, lock: &pb::Device) {
    let err = create(s, user, pin, lock_scope(&[lock]))
        .await
        .expect_err("a PIN already on the lock must be refused");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
}

/// Replaces the site's server by a new one on `db` (same database: a restart with a
/// new key file; another: a restore) and reconnects the admin client.
async fn swap_server(s: &mut Site, server: TestServer) -> anyhow::Result<()> {
    let old = std::mem::replace(&mut s.server, server);
    if old.db.name == s.server.db.name {
        old.stop().await?;
    } else {
        old.pause();
    }
    s.admin = s.server.admin(Some(&s.token)).await?;
    Ok(())
}

#[tokio::test]
async fn rotation_under_a_running_agent_keeps_codes_deliverable_and_unique() -> anyhow::Result<()> {
    let k1 = key_hex();
    let server = TestServer::start_with_key(PinKey::from_hex(&k1)?).await?;
    let mut s = Site::on_server(server, "zwave-lock-30").await?;
    let (alice, lock, panel) = (s.alice.clone(), s.lock.clone(), s.panel.clone());
    let bob = create_user(&mut s.admin, &s.site.clone(), "Bob").await?;
    let mut lock_pins = vec!["9930".to_owned(), "5566".to_owned()];
    s.credential(&alice, "4821", panel_scope(&[1])).await?;
    s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    s.credential(&bob, "5566", lock_scope(&[&lock])).await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    agent.stop().await?;

    // Step 1: keyplaned restarts with the new key file (new key first, old one readable).
    let k2 = key_hex();
    let ring = PinKey::from_hex(&format!("{k2}\n{k1}\n"))?;
    let (old_id, new_id) = (ring.ids()[1].clone(), ring.id().to_owned());
    let replica = s.server.replica_with_key(ring.clone()).await?;
    swap_server(&mut s, replica).await?;
    let agent = s.start_agent();
    s.wait_synced().await?;

    // Step 2: `keyplaned rotate-keys` (its own process: here its own store) runs while
    // the agent is connected and the dealer keeps writing.
    let rotator = Store::connect(&s.server.db.url, 2, ring.clone())?;
    rotator.key_check().await?;
    let rotation = tokio::spawn(async move { rotator.rotate_pin_keys(1).await });
    for i in 0..3 {
        let pin = format!("70{i}1");
        create(&mut s, &bob, &pin, lock_scope(&[&lock])).await?;
        lock_pins.push(pin);
        duplicate_refused(&mut s, &alice, "5566", &lock).await;
    }
    let report = rotation.await??;
    assert!(report.sites >= 1 && report.credentials >= 3, "{report:?}");
    // After it: the serving replica learns the site's new hash key (at most one ABORTED,
    // retried), and PINs hashed under the old key still collide with new copies.
    for i in 0..3 {
        duplicate_refused(&mut s, &bob, "9930", &lock).await;
        let pin = format!("80{i}2");
        create(&mut s, &alice, &pin, lock_scope(&[&lock])).await?;
        lock_pins.push(pin);
    }
    duplicate_refused(&mut s, &alice, "7001", &lock).await;

    let db = s.server.db.client().await?;
    let left: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM credential WHERE pin_key_id <> $1 OR substring(pin_hash FROM 1 FOR 4) <> decode(substring($1 FROM 2), 'hex'))
                  + (SELECT count(*) FROM slot_assignment WHERE length(pin_hash) <> 36)
                  + (SELECT count(*) FROM site WHERE pin_hash_key IS DISTINCT FROM $1)
                  + (SELECT count(*) FROM pin_key_in_use WHERE key_id <> $1)",
            &[&new_id],
        )
        .await?
        .get(0);
    assert_eq!(left, 0, "rows still under the old key {old_id}");
    s.wait_synced().await?;
    let on_lock: Vec<String> = s.slots(&lock)?.into_values().collect();
    for pin in &lock_pins {
        assert!(on_lock.contains(pin), "{pin} not on the lock: {on_lock:?}");
    }
    assert!(s.slots(&panel)?.values().any(|p| p == "4821"));
    agent.stop().await?;

    // Step 3: the old key is dropped from the key file; the backup of the new key file
    // and a dump of the database are all a restore needs.
    let only_new = PinKey::from_hex(&k2)?;
    let replica = s.server.replica_with_key(only_new.clone()).await?;
    swap_server(&mut s, replica).await?;
    let agent = s.start_agent();
    duplicate_refused(&mut s, &bob, "8002", &lock).await;
    s.wait_synced().await?;
    agent.stop().await?;

    let Some(bin) = pg_bin() else {
        eprintln!("pg_dump/pg_restore not found: the restore drill did not run");
        return Ok(());
    };
    let restored = restore_drill(&bin, &s.server.db).await?;
    let server = TestServer::start_on_database(restored, PinKey::from_hex(&k2)?).await?;
    swap_server(&mut s, server).await?;
    // A replacement agent box: no journal, blank devices.
    s.dir = TempDir::new("e2e-restored")?;
    let agent = s.start_agent();
    // The restored sync state says "applied" for the old devices: wait on the new ones.
    let expected = lock_pins.len();
    eventually("every code on the blank devices", SYNC_TIMEOUT, || {
        let got = s.sim(&lock).map(|d| d.slots().len()).unwrap_or(0)
            + s.sim(&panel).map(|d| d.slots().len()).unwrap_or(0);
        async move { Ok((got == expected + 1).then_some(())) }
    })
    .await?;
    let on_lock: Vec<String> = s.slots(&lock)?.into_values().collect();
    for pin in &lock_pins {
        assert!(on_lock.contains(pin), "{pin} not restored: {on_lock:?}");
    }
    assert!(s.slots(&panel)?.values().any(|p| p == "4821"));
    duplicate_refused(&mut s, &alice, "9930", &lock).await;
    agent.stop().await?;
    Ok(())
}

/// The PostgreSQL client binaries: `KEYPLANE_PG_BIN`, else the newest under
/// /usr/lib/postgresql.
fn pg_bin() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("KEYPLANE_PG_BIN") {
        return Some(dir.into());
    }
    let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("pg_dump").exists() && b.join("pg_restore").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// `pg_dump -Fc` of `db`, restored with `pg_restore` into a new empty database.
async fn restore_drill(bin: &std::path::Path, db: &TestDatabase) -> anyhow::Result<TestDatabase> {
    let dir = TempDir::new("dump")?;
    let dump = dir.path().join("keyplane.dump");
    let out = std::process::Command::new(bin.join("pg_dump"))
        .args(["-Fc", "--no-owner", "-f"])
        .arg(&dump)
        .arg(&db.url)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = format!("{}_restored", db.name);
    let url = db.url.replacen(&db.name, &name, 1);
    let admin = db.client().await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let out = std::process::Command::new(bin.join("pg_restore"))
        .args(["--no-owner", "--exit-on-error", "-d"])
        .arg(&url)
        .arg(&dump)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(TestDatabase { url, name })
}

/// An observed code's sealed value is bound to its slot: copied into another slot of
/// the same device (by someone with write access to the database), it no longer opens.
#[tokio::test]
async fn a_sealed_code_moved_to_another_slot_does_not_open() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let bob = create_user(&mut s.admin, &s.site.clone(), "Bob").await?;
    s.sim(&lock)?.program_at_keypad(4, "6138")?;
    s.sim(&lock)?.program_at_keypad(9, "2718")?;
    let agent = s.start_agent();
    let admin = s.admin.clone();
    let parent = s.site.clone();
    let locals = eventually("both local codes reported", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let parent = parent.clone();
        async move {
            let codes = admin
                .list_local_codes(pb::ListLocalCodesRequest { parent })
                .await?
                .into_inner()
                .local_codes;
            Ok((codes.len() == 2).then_some(codes))
        }
    })
    .await?;
    // Stopped, so no report rewrites the rows under the test.
    agent.stop().await?;
    let device = crate::fixture::id_of(&lock.name)?;
    let db = s.server.db.client().await?;
    // keyplaned's background status evaluation still writes beside these rows: a
    // deadlock with it is retried, as PostgreSQL asks.
    let mut attempts = 0;
    let moved = loop {
        attempts += 1;
        match db
            .execute(
                "UPDATE observed_slot SET pin_sealed = (SELECT pin_sealed FROM observed_slot WHERE device_id = $1 AND slot = 9)
                 WHERE device_id = $1 AND slot = 4",
                &[&device],
            )
            .await
        {
            Err(e)
                if attempts < 5
                    && e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => {}
            other => break other?,
        }
    };
    assert_eq!(moved, 1);
    let claim = |slot: i32| pb::ClaimLocalCodeRequest {
        name: locals
            .iter()
            .find(|l| l.slot == slot)
            .map(|l| l.name.clone())
            .unwrap_or_default(),
        user: bob.clone(),
        panel_partitions: vec![],
    };
    let err = s
        .admin
        .claim_local_code(claim(4))
        .await
        .expect_err("a moved sealed value must not open");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(!err.message().contains("2718") && !err.message().contains("6138"));
    // The value left in its own slot still opens.
    s.admin.claim_local_code(claim(9)).await?;
    Ok(())
}
