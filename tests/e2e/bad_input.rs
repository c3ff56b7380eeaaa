//! Bad input gets a precise status and changes nothing, in the database or on devices.

use crate::fixture::{Site, create_device, create_user, lock_scope, panel_scope};
use keyplane_proto::v1 as pb;
use std::collections::BTreeMap;
use tonic::Code;

/// Tables only an agent writes, through its own reports (what it observed on the
/// devices, the events it forwarded): they move while an agent runs, whatever the
/// API refuses. Compared only when no agent runs.
const AGENT_WRITTEN: &[&str] = &["observed_slot", "device_event"];
/// Columns tracking an agent's liveness and progress, and keyplaned's own slot-status
/// bookkeeping (evaluated in the background, docs/STATUS.md), never compared.
const LIVENESS: &[&str] = &[
    "agent_connected",
    "agent_last_seen",
    "applied_revision",
    "last_seen_time",
    "reachable",
    "last_contact_time",
    "status_seq",
    "status_evaluated_seq",
    "status_pending",
    "status_evaluated_at",
    // The head of the site's event log also moves with the background evaluation's
    // events (left out below); a refused call's own event would still show as a row.
    "event_seq",
];
/// Tables keyplaned writes in the background from what agents report and the clock
/// (slot-status evaluations), never compared.
const BACKGROUND: &[&str] = &["slot_state_last", "slot_write_report"];
/// Rows raised by the background slot-status evaluation, never compared.
const BACKGROUND_ROWS: &str = "WHERE t.credential_id IS NULL";
/// Tables a refused call could change; the fingerprint must cover each.
const MUST_COVER: &[&str] = &[
    "site",
    "partition",
    "device",
    "site_user",
    "user_authority",
    "credential",
    "credential_partition",
    "credential_device",
    "slot_assignment",
    "site_change",
    "personal_access_plan",
    "personal_access_point",
    "access_plan",
    "holiday",
    "audit_log",
    "dealer_audit_log",
    "idempotency_key",
    "agent_token",
    "dealer",
];

/// Everything a refused request could have changed: every row of every table (but
/// what only an agent writes), and the simulated devices.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    pub(crate) tables: BTreeMap<String, String>,
    panel: BTreeMap<u16, String>,
    lock: BTreeMap<u16, String>,
}

pub(crate) async fn fingerprint_with(s: &Site, agent_runs: bool) -> anyhow::Result<Fingerprint> {
    let client = s.server.db.client().await?;
    let names: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for table in MUST_COVER {
        assert!(
            names.iter().any(|n| n == table),
            "fingerprint lost table {table}"
        );
    }
    let liveness: Vec<String> = LIVENESS.iter().map(|c| c.to_string()).collect();
    let mut tables = BTreeMap::new();
    for name in names {
        if agent_runs && AGENT_WRITTEN.contains(&name.as_str()) {
            continue;
        }
        if BACKGROUND.contains(&name.as_str()) {
            continue;
        }
        let only = if name == "device_event" {
            BACKGROUND_ROWS
        } else {
            ""
        };
        let rows: String = client
            .query_one(
                &format!(
                    "SELECT coalesce(string_agg(r::text, E'\\n' ORDER BY r::text), '')
                     FROM (SELECT to_jsonb(t) - $1::text[] AS r FROM \"{name}\" t {only}) q"
                ),
                &[&liveness],
            )
            .await?
            .get(0);
        tables.insert(name, rows);
    }
    Ok(Fingerprint {
        tables,
        panel: s.slots(&s.panel)?,
        lock: s.slots(&s.lock)?,
    })
}

/// The fingerprint of a site whose agent runs.
async fn fingerprint(s: &Site) -> anyhow::Result<Fingerprint> {
    fingerprint_with(s, true).await
}

/// Asserts nothing changed since `before`, naming the table that did.
async fn assert_unchanged(s: &Site, before: &Fingerprint, what: &str) -> anyhow::Result<()> {
    let agent_runs = !before.tables.contains_key(AGENT_WRITTEN[0]);
    let after = fingerprint_with(s, agent_runs).await?;
    for (table, rows) in &before.tables {
        assert_eq!(
            after.tables.get(table),
            Some(rows),
            "{what}: refused, yet table {table} changed"
        );
    }
    assert_eq!(after, *before, "{what}: refused, yet something changed");
    Ok(())
}

/// Asserts `result` was refused with `code`, a message naming `needles` and not the
/// PIN, and that it changed nothing.
async fn refused<T: std::fmt::Debug>(
    s: &Site,
    before: &Fingerprint,
    result: Result<T, tonic::Status>,
    code: Code,
    needles: &[&str],
    pin: &str,
) -> anyhow::Result<()> {
    let what = format!("{code:?} {needles:?}");
    assert_status(result, code, needles, pin);
    assert_unchanged(s, before, &what).await
}

/// Waits until the agent applied a change made after the refusals, so anything they
/// had sent to the devices would have arrived too, then checks the devices hold
/// what they held before plus that one code.
async fn devices_unchanged_after(
    s: &mut Site,
    before: &Fingerprint,
    user: &str,
    pin: &str,
) -> anyhow::Result<()> {
    s.credential(user, pin, lock_scope(&[&s.lock.clone()]))
        .await?;
    s.wait_synced().await?;
    let mut lock = s.slots(&s.lock)?;
    let added: Vec<u16> = lock
        .iter()
        .filter(|(_, code)| code.as_str() == pin)
        .map(|(slot, _)| *slot)
        .collect();
    assert_eq!(added.len(), 1, "the barrier code reached the lock once");
    lock.remove(&added[0]);
    assert_eq!(lock, before.lock, "refusals changed the lock");
    assert_eq!(
        s.slots(&s.panel)?,
        before.panel,
        "refusals changed the panel"
    );
    Ok(())
}

fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    needles: &[&str],
    pin: &str,
) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{}", status.message());
    for n in needles {
        assert!(
            status.message().contains(n),
            "message {:?} should mention {n:?}",
            status.message()
        );
    }
    assert!(
        pin.is_empty() || !status.message().contains(pin),
        "message leaks the PIN: {:?}",
        status.message()
    );
}

#[tokio::test]
async fn refused_requests_change_nothing() -> anyhow::Result<()> {
    let mut s = Site::with_lock_model("zwave-lock-30-fixed4").await?;
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    let site = s.site.clone();
    s.credential(&alice, "4821", panel_scope(&[1])).await?;
    s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    let before = fingerprint(&s).await?;

    // Letters in a PIN.
    let r = s.credential(&alice, "48a1", lock_scope(&[&lock])).await;
    refused(&s, &before, r, Code::InvalidArgument, &["digits"], "48a1").await?;
    // Too long for a scoped device: names the device and its range.
    let r = s.credential(&alice, "918273", lock_scope(&[&lock])).await;
    let needles = ["Front door", lock.name.as_str(), "4 digits"];
    refused(&s, &before, r, Code::InvalidArgument, &needles, "918273").await?;
    let r = s.credential(&alice, "51273", panel_scope(&[1])).await;
    let needles = ["Panel", "4 digits"];
    refused(&s, &before, r, Code::InvalidArgument, &needles, "51273").await?;
    // Guessable codes, and the installer's factory default.
    for guessable in ["1111", "1234", "9876", "4140"] {
        let r = s.credential(&alice, guessable, lock_scope(&[&lock])).await;
        refused(&s, &before, r, Code::InvalidArgument, &["guess"], guessable).await?;
    }
    // Duplicate PIN on one device.
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    let before = fingerprint(&s).await?;
    let r = s.credential(&bob, "9930", lock_scope(&[&lock])).await;
    refused(&s, &before, r, Code::AlreadyExists, &["Front door"], "9930").await?;
    // Unknown ids.
    let ghost_user = format!("{site}/users/00000000-0000-4000-8000-000000000000");
    let r = s
        .credential(&ghost_user, "2468", lock_scope(&[&lock]))
        .await;
    refused(&s, &before, r, Code::NotFound, &["user"], "2468").await?;
    let ghost_lock = pb::CredentialScope {
        locks: vec![format!(
            "{site}/devices/00000000-0000-4000-8000-000000000000"
        )],
        ..Default::default()
    };
    let r = s.credential(&bob, "2468", ghost_lock).await;
    refused(&s, &before, r, Code::NotFound, &["device"], "2468").await?;
    let r = s.credential(&bob, "2468", panel_scope(&[5])).await;
    refused(&s, &before, r, Code::NotFound, &["partition"], "2468").await?;
    // A partition number no panel has.
    let r = s.credential(&bob, "2468", panel_scope(&[9])).await;
    refused(&s, &before, r, Code::InvalidArgument, &["1..8"], "2468").await?;
    // A lock listed as a door.
    let r = s
        .credential(
            &bob,
            "2468",
            pb::CredentialScope {
                doors: vec![lock.name.clone()],
                ..Default::default()
            },
        )
        .await;
    refused(&s, &before, r, Code::InvalidArgument, &["lock"], "2468").await?;
    // No scope at all.
    let r = s
        .credential(&bob, "2468", pb::CredentialScope::default())
        .await;
    refused(&s, &before, r, Code::InvalidArgument, &["scope"], "2468").await?;
    // Malformed names.
    let r = s
        .credential("sites/nope/users/x", "2468", lock_scope(&[&lock]))
        .await;
    refused(&s, &before, r, Code::InvalidArgument, &["parent"], "2468").await?;
    // Malformed page tokens.
    let r = s
        .admin
        .list_users(pb::ListUsersRequest {
            parent: site.clone(),
            page_size: 1,
            page_token: "not-a-token".into(),
        })
        .await;
    refused(&s, &before, r, Code::InvalidArgument, &["page_token"], "").await?;
    // None of it reached the devices.
    devices_unchanged_after(&mut s, &before, &bob, "2468").await?;
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_full_device_is_resource_exhausted() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let site = s.site.clone();
    let user = create_user(&mut s.admin, &site, "Tenants").await?;
    for i in 0..30 {
        s.credential(&user, &format!("{:04}", 1000 + i * 7), lock_scope(&[&lock]))
            .await?;
    }
    let agent = s.start_agent();
    s.wait_synced().await?;
    assert_eq!(s.slots(&lock)?.len(), 30);
    let before = fingerprint(&s).await?;
    let r = s.credential(&user, "9817", lock_scope(&[&lock])).await;
    let needles = ["Front door", "no free slot"];
    refused(&s, &before, r, Code::ResourceExhausted, &needles, "9817").await?;
    // The panel has room: a code there is the barrier the agent applies.
    let barrier = s.credential(&user, "9817", panel_scope(&[1])).await?;
    s.wait_synced().await?;
    assert_eq!(s.slots(&lock)?, before.lock, "the refusal changed the lock");
    let panel: Vec<String> = s.slots(&s.panel)?.into_values().collect();
    assert_eq!(panel, vec!["9817".to_owned()], "only the barrier code");
    // Widening a code's scope to the full lock is refused the same way, and the
    // code keeps its scope, its version and its panel slot.
    let before = fingerprint(&s).await?;
    let r = s
        .admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: barrier.name.clone(),
                scope: Some(pb::CredentialScope {
                    panel_partitions: vec![1],
                    locks: vec![lock.name.clone()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["scope".into()],
            }),
        })
        .await;
    refused(&s, &before, r, Code::ResourceExhausted, &needles, "9817").await?;
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn tokens_and_tenancy() -> anyhow::Result<()> {
    let s = Site::new().await?;
    let site = s.site.clone();
    let lock = s.lock.clone();
    // Another dealer sees nothing of this one and cannot touch it.
    let other_token = s.server.dealer("Dealer Two").await?;
    let mut other = s.server.admin(Some(&other_token)).await?;
    // No agent runs: every table is compared.
    let before = fingerprint_with(&s, false).await?;
    // No token.
    let mut anonymous = s.server.admin(None).await?;
    let r = anonymous.list_sites(pb::ListSitesRequest::default()).await;
    refused(
        &s,
        &before,
        r,
        Code::Unauthenticated,
        &["authorization"],
        "",
    )
    .await?;
    // Unknown token.
    let mut forged = s.server.admin(Some("kpd_forged")).await?;
    let r = forged
        .get_site(pb::GetSiteRequest { name: site.clone() })
        .await;
    refused(&s, &before, r, Code::Unauthenticated, &["token"], "").await?;
    let r = other
        .get_site(pb::GetSiteRequest { name: site.clone() })
        .await;
    refused(&s, &before, r, Code::NotFound, &[], "").await?;
    assert!(
        other
            .list_sites(pb::ListSitesRequest::default())
            .await?
            .into_inner()
            .sites
            .is_empty()
    );
    let r = other
        .create_credential(pb::CreateCredentialRequest {
            parent: s.alice.clone(),
            credential: Some(pb::Credential {
                pin: "2468".into(),
                scope: Some(lock_scope(&[&lock])),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: false,
        })
        .await;
    refused(&s, &before, r, Code::NotFound, &[], "2468").await?;
    let r = other
        .delete_device(pb::DeleteDeviceRequest {
            name: lock.name.clone(),
            etag: String::new(),
        })
        .await;
    refused(&s, &before, r, Code::NotFound, &[], "").await?;
    let err = create_device(&mut other, &site, "Sneaky", "zwave-lock-30")
        .await
        .expect_err("other dealer device");
    assert!(err.to_string().contains("not found"), "{err}");
    assert_unchanged(&s, &before, "another dealer's CreateDevice").await?;
    let r = other
        .issue_agent_token(pb::IssueAgentTokenRequest { site: site.clone() })
        .await;
    refused(&s, &before, r, Code::NotFound, &[], "").await?;
    Ok(())
}
