//! Retention of events and audit records per dealer, enforced by keyplaned's sweep;
//! erasure of a person; audit records carrying acting user, request id and
//! before/after (issue 13).

use crate::fixture::{Site, create_user, id_of, lock_scope, mask};
use keyplane_proto::v1 as pb;
use tonic::Code;

const DAY: i64 = 86_400;

fn days(d: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d * DAY,
        nanos: 0,
    })
}

async fn audit(s: &mut Site) -> anyhow::Result<Vec<pb::AuditRecord>> {
    let mut out = Vec::new();
    let mut req = pb::ListAuditLogRequest {
        parent: "sites/-".into(),
        page_size: 500,
        ..Default::default()
    };
    loop {
        let page = s.admin.list_audit_log(req.clone()).await?.into_inner();
        out.extend(page.records);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        req.page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn old_events_and_audit_records_are_swept_per_the_dealers_policy() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let policy = s
        .admin
        .get_retention_policy(pb::GetRetentionPolicyRequest {
            name: "retentionPolicy".into(),
        })
        .await?
        .into_inner();
    assert_eq!(policy.event_retention, days(400));
    assert_eq!(
        policy.audit_retention.map(|d| d.seconds),
        Some(220_903_200),
        "7 years"
    );
    // Out of range: refused, naming the field and the bounds; nothing changes.
    let err = s
        .admin
        .update_retention_policy(pb::UpdateRetentionPolicyRequest {
            retention_policy: Some(pb::RetentionPolicy {
                name: "retentionPolicy".into(),
                event_retention: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect_err("an hour is below the minimum");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("retention_policy.event_retention")
            && err.message().contains("1 day"),
        "{}",
        err.message()
    );
    let updated = s
        .admin
        .update_retention_policy(pb::UpdateRetentionPolicyRequest {
            retention_policy: Some(pb::RetentionPolicy {
                name: "retentionPolicy".into(),
                event_retention: days(2),
                audit_retention: days(30),
            }),
            update_mask: mask(&["event_retention", "audit_retention"]),
        })
        .await?
        .into_inner();
    assert_eq!(updated.event_retention, days(2));
    assert_eq!(updated.audit_retention, days(30));
    let record = audit(&mut s)
        .await?
        .into_iter()
        .find(|r| r.action == "retention.update")
        .ok_or_else(|| anyhow::anyhow!("the update is audited"))?;
    assert!(record.before_json.contains("34560000"), "{record:?}");
    assert!(record.after_json.contains("172800"), "{record:?}");
    assert!(!record.request_id.is_empty());

    // Rows of every age: three days old (past 2 days), and fresh ones.
    let db = s.server.db.client().await?;
    let site = id_of(&s.site)?;
    let device = id_of(&s.lock.name)?;
    for (seq, age_days) in [(1_i64, 3_i32), (2, 3), (3, 3), (4, 0), (5, 0)] {
        db.execute(
            "INSERT INTO device_event (site_id, device_id, source_seq, kind, occur_time, create_time)
             VALUES ($1, $2, $3, 'armed', now(), now() - make_interval(days => $4))",
            &[&site, &device, &(seq + 9_000_000), &age_days],
        )
        .await?;
    }
    let dealer: uuid::Uuid = db
        .query_one("SELECT dealer_id FROM site WHERE id = $1", &[&site])
        .await?
        .get(0);
    for age_days in [40_i32, 40, 1] {
        db.execute(
            "INSERT INTO audit_log (dealer_id, site_id, actor, action, resource, create_time)
             VALUES ($1, $2, 'test', 'test.old', 'sites/x', now() - make_interval(days => $3))",
            &[&dealer, &site, &age_days],
        )
        .await?;
    }
    // Two more passes of the server's sweep: one begun after the rows were written.
    let progress = s.server.retention.clone();
    let passes = progress.passes();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        progress.reached(passes + 2),
    )
    .await?;
    let count = |sql: &'static str| {
        let db = &db;
        async move {
            db.query_one(sql, &[&site])
                .await
                .map(|r| r.get::<_, i64>(0))
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM device_event WHERE site_id = $1 AND source_seq > 9000000 AND create_time < now() - interval '2 days'").await?,
        0,
        "old events deleted"
    );
    assert_eq!(
        count("SELECT count(*) FROM device_event WHERE site_id = $1 AND source_seq > 9000000")
            .await?,
        2,
        "fresh events kept"
    );
    assert_eq!(
        count("SELECT count(*) FROM audit_log WHERE site_id = $1 AND action = 'test.old'").await?,
        1,
        "old audit records deleted, the fresh one kept"
    );
    assert!(progress.events_deleted() >= 3, "{progress:?}");
    assert!(progress.audit_deleted() >= 2, "{progress:?}");
    // Still append-only for everyone else.
    assert!(db.execute("DELETE FROM audit_log", &[]).await.is_err());
    assert!(
        db.execute("UPDATE audit_log SET after = '{}'::jsonb", &[])
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn erasing_a_person_removes_them_everywhere_and_is_audited() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let site = s.site.clone();
    let bob = create_user(&mut s.admin, &site, "Bob Erasmus").await?;
    let code = s.credential(&bob, "9930", lock_scope(&[&lock])).await?;
    s.admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: code.name.clone(),
                display_name: "Erasmus back door".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await?;
    s.admin
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: bob.clone(),
                display_name: "Robert Erasmus".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await?;
    let db = s.server.db.client().await?;
    let (site_id, bob_id, device) = (id_of(&site)?, id_of(&bob)?, id_of(&lock.name)?);
    db.execute(
        "INSERT INTO device_event (site_id, device_id, source_seq, kind, user_id, occur_time)
         VALUES ($1, $2, 9000001, 'armed', $3, now())",
        &[&site_id, &device, &bob_id],
    )
    .await?;
    let updated = audit(&mut s)
        .await?
        .into_iter()
        .find(|r| r.action == "user.update" && r.resource == bob)
        .ok_or_else(|| anyhow::anyhow!("the update is audited"))?;
    assert!(updated.before_json.contains("Bob Erasmus"), "{updated:?}");
    assert!(updated.after_json.contains("Robert Erasmus"), "{updated:?}");
    // A credential's records carry it before and after too: names and scope,
    // never the PIN.
    let records = audit(&mut s).await?;
    let of_code = |action: &str| {
        records
            .iter()
            .find(|r| r.action == action && r.resource == code.name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{action} is audited"))
    };
    let (created, renamed) = (of_code("credential.create")?, of_code("credential.update")?);
    let lock_id = id_of(&lock.name)?.to_string();
    assert!(created.before_json.is_empty(), "{created:?}");
    assert!(created.after_json.contains(&lock_id), "{created:?}");
    assert!(
        renamed.before_json.contains(&code.display_name),
        "{renamed:?}"
    );
    assert!(
        renamed.after_json.contains("Erasmus back door"),
        "{renamed:?}"
    );
    for r in [&created, &renamed] {
        // Text fields only: ids and times may hold the digits by chance.
        let text = format!("{} {} {}", r.detail_json, r.before_json, r.after_json);
        assert!(!text.contains("9930"), "a PIN in the audit log: {text}");
    }

    // Another dealer cannot erase Bob.
    let other = s.server.dealer("Dealer Two").await?;
    let mut other = s.server.admin(Some(&other)).await?;
    let err = other
        .erase_user(pb::EraseUserRequest { name: bob.clone() })
        .await
        .expect_err("not theirs");
    assert_eq!(err.code(), Code::NotFound);

    let erased = s
        .admin
        .erase_user(pb::EraseUserRequest { name: bob.clone() })
        .await?
        .into_inner();
    assert_eq!(erased.credentials_deleted, 1);
    // The event above, and any status event of Bob's credential.
    assert!(erased.events_redacted >= 1, "{erased:?}");
    assert!(erased.audit_records_redacted >= 1, "{erased:?}");
    let err = s
        .admin
        .get_user(pb::GetUserRequest { name: bob.clone() })
        .await
        .expect_err("erased");
    assert_eq!(err.code(), Code::NotFound);
    let linked: i64 = db
        .query_one(
            "SELECT count(*) FROM device_event WHERE site_id = $1 AND user_id = $2",
            &[&site_id, &bob_id],
        )
        .await?
        .get(0);
    assert_eq!(linked, 0, "the events no longer name Bob");
    let records = audit(&mut s).await?;
    let text = format!("{records:?}");
    assert!(
        !text.contains("Erasmus"),
        "no audit record keeps Bob's name"
    );
    let erase = records
        .iter()
        .find(|r| r.action == "user.erase" && r.resource == bob)
        .ok_or_else(|| anyhow::anyhow!("the erasure is audited"))?;
    assert!(
        erase.detail_json.contains("credentials_deleted"),
        "{erase:?}"
    );
    // Erasing again: nothing left to erase.
    let again = s
        .admin
        .erase_user(pb::EraseUserRequest { name: bob.clone() })
        .await
        .expect_err("gone");
    assert_eq!(again.code(), Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn audit_records_carry_acting_user_request_id_and_peer() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let alice = s.alice.clone();
    let mut as_alice = s.server.admin_as(&s.token, &alice, None).await?;
    let mut req = tonic::Request::new(pb::CreateUserRequest {
        parent: site.clone(),
        user: Some(pb::User {
            display_name: "Carol".into(),
            authorities: vec![pb::PartitionAuthority {
                partition: 1,
                level: pb::Level::OperatorA.into(),
            }],
            ..Default::default()
        }),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-request-id", "req-4242".parse()?);
    let carol = as_alice.create_user(req).await?.into_inner();
    let records = audit(&mut s).await?;
    let created = records
        .iter()
        .find(|r| r.action == "user.create" && r.resource == carol.name)
        .ok_or_else(|| anyhow::anyhow!("audited"))?;
    assert_eq!(created.acting_user, alice);
    assert_eq!(created.request_id, "req-4242");
    assert!(created.peer.starts_with("127.0.0.1:"), "{created:?}");
    // Every record of a call names it (the dealer's bootstrap record was no call).
    assert!(
        records
            .iter()
            .filter(|r| r.actor.starts_with("dealer:"))
            .all(|r| !r.request_id.is_empty()),
        "{records:?}"
    );
    // A request id that is not a short visible string is refused.
    let mut bad = tonic::Request::new(pb::GetSiteRequest { name: site.clone() });
    bad.metadata_mut()
        .insert("x-request-id", "x".repeat(200).parse()?);
    let err = s.admin.get_site(bad).await.expect_err("too long");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("x-request-id"), "{}", err.message());
    Ok(())
}
