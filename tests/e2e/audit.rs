//! ListAuditLog: a dealer's changes, filtered by site, actor, user and time, paged;
//! never a PIN; append-only in the database (issue 13).

use crate::fixture::{Site, create_device, create_user, id_of, lock_scope, mask, slot_on};
use keyplane_proto::v1 as pb;
use tonic::Code;

async fn all(s: &mut Site, req: pb::ListAuditLogRequest) -> anyhow::Result<Vec<pb::AuditRecord>> {
    let mut out = Vec::new();
    let mut req = pb::ListAuditLogRequest {
        page_size: 2,
        ..req
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
async fn the_audit_log_is_filtered_paged_pin_free_and_append_only() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let site = s.site.clone();
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    let alices = s
        .credential(&s.alice.clone(), "4821", lock_scope(&[&lock]))
        .await?;
    let bobs = s.credential(&bob, "9930", lock_scope(&[&lock])).await?;
    let every = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            ..Default::default()
        },
    )
    .await?;
    assert!(every.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    for r in &every {
        assert_eq!(r.site, site);
        assert!(r.create_time.is_some());
        // The fields that carry text; ids and times are random digits that may
        // contain a PIN's by chance.
        let text = format!(
            "{} {} {} {}",
            r.action, r.detail_json, r.before_json, r.after_json
        );
        assert!(!text.contains("4821") && !text.contains("9930"), "{text}");
    }
    let created: Vec<&str> = every
        .iter()
        .filter(|r| r.action == "credential.create")
        .map(|r| r.resource.as_str())
        .collect();
    assert_eq!(created, [alices.name.as_str(), bobs.name.as_str()]);

    // By user: Bob's own record and his credential's, nothing of Alice's.
    let of_bob = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            user: bob.clone(),
            ..Default::default()
        },
    )
    .await?;
    assert!(of_bob.iter().any(|r| r.resource == bobs.name));
    assert!(
        of_bob.iter().all(|r| r.resource.starts_with(&bob)),
        "{of_bob:?}"
    );
    // By actor, by time.
    let actor = every[0].actor.clone();
    let by_actor = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            actor: actor.clone(),
            ..Default::default()
        },
    )
    .await?;
    assert!(!by_actor.is_empty() && by_actor.iter().all(|r| r.actor == actor));
    let before_all = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            end_time: every[0].create_time,
            ..Default::default()
        },
    )
    .await?;
    assert!(before_all.is_empty(), "end_time is exclusive");
    let from_last = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            start_time: every.last().and_then(|r| r.create_time),
            ..Default::default()
        },
    )
    .await?;
    assert!(
        from_last
            .iter()
            .any(|r| r.id == every.last().map(|l| l.id).unwrap_or(0))
    );

    // Another dealer sees nothing of it.
    let other = s.server.dealer("Dealer Two").await?;
    let mut other = s.server.admin(Some(&other)).await?;
    let err = other
        .list_audit_log(pb::ListAuditLogRequest {
            parent: site.clone(),
            ..Default::default()
        })
        .await
        .expect_err("not its site");
    assert_eq!(err.code(), Code::NotFound);
    let theirs = other
        .list_audit_log(pb::ListAuditLogRequest {
            parent: "sites/-".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(theirs.records.iter().all(|r| r.site != site));

    // Append-only: the database refuses to rewrite history.
    let db = s.server.db.client().await?;
    assert!(
        db.execute("UPDATE audit_log SET actor = 'nobody'", &[])
            .await
            .is_err()
    );
    assert!(db.execute("DELETE FROM audit_log", &[]).await.is_err());
    Ok(())
}

/// Whether `actual` holds every field of `expected` (recursively), with equal values.
fn holds(actual: &serde_json::Value, expected: &serde_json::Value) -> bool {
    match (actual, expected) {
        (serde_json::Value::Object(a), serde_json::Value::Object(e)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|got| holds(got, v))),
        _ => actual == expected,
    }
}

fn parsed(text: &str) -> anyhow::Result<Option<serde_json::Value>> {
    Ok(if text.is_empty() {
        None
    } else {
        Some(serde_json::from_str(text)?)
    })
}

/// `text` with every UUID replaced by `<id>`.
fn without_ids(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        match rest.get(..36).filter(|w| uuid::Uuid::try_parse(w).is_ok()) {
            Some(_) => {
                out.push_str("<id>");
                rest = &rest[36..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// Actions whose records carry neither value, and why.
const NEITHER: &[(&str, &str)] = &[(
    "user.erase",
    "it removes the person: their user.delete record in the same transaction holds the user before, redacted",
)];

#[tokio::test]
async fn every_audited_change_records_the_resource_before_and_after() -> anyhow::Result<()> {
    use keyplane_core::pin::Pin;
    use keyplane_store::{Observed, ObservedState};
    use serde_json::json;
    let mut s = Site::new().await?;
    let (site, lock, alice) = (s.site.clone(), s.lock.clone(), s.alice.clone());
    let site_id = id_of(&site)?;
    let lock_id = id_of(&lock.name)?;
    let lock_ref = lock.name.clone();
    let pins = ["4821", "5927", "2859", "1736", "4705", "3071", "6203"];

    // Site, partition, device.
    s.admin
        .update_site(pb::UpdateSiteRequest {
            site: Some(pb::Site {
                name: site.clone(),
                display_name: "Alice's home".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await?;
    let garage = s
        .admin
        .create_partition(pb::CreatePartitionRequest {
            parent: site.clone(),
            partition: Some(pb::Partition {
                number: 2,
                display_name: "Garage".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    s.admin
        .update_partition(pb::UpdatePartitionRequest {
            partition: Some(pb::Partition {
                name: garage.name.clone(),
                display_name: "Car port".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await?;
    let back = create_device(&mut s.admin, &site, "Back door", "zwave-lock-30").await?;
    s.admin
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                name: back.name.clone(),
                display_name: "Garden door".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await?;
    s.admin
        .delete_device(pb::DeleteDeviceRequest {
            name: back.name.clone(),
            etag: String::new(),
        })
        .await?;
    s.admin
        .delete_partition(pb::DeletePartitionRequest {
            name: garage.name.clone(),
            etag: String::new(),
        })
        .await?;

    // Users, credentials, plans.
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    s.admin
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: bob.clone(),
                display_name: "Robert".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await?;
    let code = s.credential(&alice, pins[0], lock_scope(&[&lock])).await?;
    s.admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: code.name.clone(),
                display_name: "Front door code".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await?;
    let personal = format!("{alice}/personalAccessPlan");
    s.admin
        .update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
            plan: Some(pb::PersonalAccessPlan {
                name: personal.clone(),
                access_points: vec![lock_ref.clone()],
                ..Default::default()
            }),
            update_mask: mask(&["access_points"]),
        })
        .await?;
    s.admin
        .clear_personal_access_plan(pb::ClearPersonalAccessPlanRequest {
            name: personal.clone(),
            etag: String::new(),
        })
        .await?;
    let staff = s
        .admin
        .create_access_plan(pb::CreateAccessPlanRequest {
            parent: site.clone(),
            plan: Some(pb::StandardAccessPlan {
                display_name: "Staff".into(),
                devices: vec![lock_ref.clone()],
                members: vec![alice.clone()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    s.admin
        .update_access_plan(pb::UpdateAccessPlanRequest {
            plan: Some(pb::StandardAccessPlan {
                name: staff.name.clone(),
                display_name: "Cleaners".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await?;
    let holiday = format!("{site}/holidays/2030-12-25");
    for name in ["Christmas", "Noël"] {
        s.admin
            .put_holiday(pb::PutHolidayRequest {
                holiday: Some(pb::Holiday {
                    name: holiday.clone(),
                    display_name: name.into(),
                    plans: vec![staff.name.clone()],
                }),
            })
            .await?;
    }
    s.admin
        .delete_holiday(pb::DeleteHolidayRequest {
            name: holiday.clone(),
        })
        .await?;
    s.admin
        .delete_access_plan(pb::DeleteAccessPlanRequest {
            name: staff.name.clone(),
            etag: String::new(),
        })
        .await?;
    s.admin
        .lockdown_doors(pb::LockdownDoorsRequest { site: site.clone() })
        .await?;
    s.admin
        .release_lockdown(pb::ReleaseLockdownRequest { site: site.clone() })
        .await?;

    // Tokens, enrollment, dealer settings.
    let desk = s
        .admin
        .create_dealer_token(pb::CreateDealerTokenRequest {
            display_name: "Front desk".into(),
            scope: pb::TokenScope::ReadOnly as i32,
            ttl_seconds: 0,
        })
        .await?
        .into_inner();
    let desk_name = desk
        .dealer_token
        .as_ref()
        .map(|t| t.name.clone())
        .unwrap_or_default();
    s.admin
        .revoke_dealer_token(pb::RevokeDealerTokenRequest {
            name: desk_name.clone(),
        })
        .await?;
    let agent_token = s.server.agent_token(&mut s.admin, &site).await?;
    s.agent_token = agent_token.clone();
    let enrollment = s
        .admin
        .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
            site: site.clone(),
            ttl_seconds: 600,
        })
        .await?
        .into_inner();
    s.admin
        .update_site(pb::UpdateSiteRequest {
            site: Some(pb::Site {
                name: site.clone(),
                status_thresholds: Some(pb::SlotStatusThresholds {
                    lock: Some(pb::KindThresholds {
                        device_offline: Some(prost_types::Duration {
                            seconds: 120,
                            nanos: 0,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: mask(&["status_thresholds"]),
        })
        .await?;
    s.admin
        .update_retention_policy(pb::UpdateRetentionPolicyRequest {
            retention_policy: Some(pb::RetentionPolicy {
                name: "retentionPolicy".into(),
                event_retention: Some(prost_types::Duration {
                    seconds: 2 * 86_400,
                    nanos: 0,
                }),
                audit_retention: None,
            }),
            update_mask: mask(&["event_retention"]),
        })
        .await?;

    // Backup codes.
    s.admin
        .configure_backup_codes(pb::ConfigureBackupCodesRequest {
            site: site.clone(),
            devices: vec![lock_ref.clone()],
            size: 1,
        })
        .await?;
    let pulled = s
        .admin
        .pull_backup_code(pb::PullBackupCodeRequest {
            user: bob.clone(),
            display_name: "Bob's spare".into(),
        })
        .await?
        .into_inner();

    // What agents report: local codes and drift, claimed, removed, resolved.
    let observe = |slot, state, pin: &str| Observed {
        slot,
        state,
        pin: Pin::parse(pin).ok(),
    };
    let alice_slot = slot_on(&code, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    s.server
        .store
        .observed_record(
            site_id,
            lock_id,
            &[
                observe(29, ObservedState::Foreign, pins[2]),
                observe(28, ObservedState::Foreign, pins[3]),
                observe(alice_slot, ObservedState::Drifted, pins[4]),
            ],
        )
        .await?;
    let claimed = s
        .admin
        .claim_local_code(pb::ClaimLocalCodeRequest {
            name: format!("{lock_ref}/localCodes/29"),
            user: alice.clone(),
            panel_partitions: vec![],
        })
        .await?
        .into_inner();
    s.admin
        .remove_local_code(pb::RemoveLocalCodeRequest {
            name: format!("{lock_ref}/localCodes/28"),
        })
        .await?;
    for resolution in [
        pb::resolve_drift_request::Resolution::Reapply,
        pb::resolve_drift_request::Resolution::Adopt,
    ] {
        s.admin
            .resolve_drift(pb::ResolveDriftRequest {
                credential: code.name.clone(),
                device: lock_ref.clone(),
                resolution: resolution as i32,
            })
            .await?;
    }
    // AUTHORITATIVE: a local code found by the switch, and one reported after it.
    s.server
        .store
        .observed_record(
            site_id,
            lock_id,
            &[observe(27, ObservedState::Foreign, pins[5])],
        )
        .await?;
    s.set_policy(pb::LocalCodePolicy::Authoritative).await?;
    s.server
        .store
        .observed_record(
            site_id,
            lock_id,
            &[
                observe(27, ObservedState::Foreign, pins[5]),
                observe(26, ObservedState::Foreign, pins[6]),
            ],
        )
        .await?;
    s.set_policy(pb::LocalCodePolicy::Preserve).await?;

    // A limited-use code deleted by its last use.
    let once = s
        .admin
        .create_credential(pb::CreateCredentialRequest {
            parent: alice.clone(),
            credential: Some(pb::Credential {
                display_name: "Plumber".into(),
                pin: pins[1].into(),
                scope: Some(lock_scope(&[&lock])),
                max_uses: 1,
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: false,
        })
        .await?
        .into_inner();
    let once_slot = slot_on(&once, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    s.server
        .store
        .event_record(
            site_id,
            &keyplane_store::NewEvent {
                device: lock_id,
                epoch: 0,
                seq: 1,
                kind: keyplane_store::EventKind::AccessGranted,
                partition: None,
                user_number: Some(once_slot),
                occur_time: std::time::SystemTime::now(),
            },
        )
        .await?;

    // Operations on the live agent, then its revocation.
    let agent = s.start_agent();
    s.wait_synced().await?;
    let mut ops = s.server.ops(Some(&s.token)).await?;
    ops.resync_site(pb::ResyncSiteRequest { name: site.clone() })
        .await?;
    ops.close_agent_connection(pb::CloseAgentConnectionRequest {
        name: format!("{site}/agentConnection"),
    })
    .await?;
    s.admin
        .revoke_agents(pb::RevokeAgentsRequest { site: site.clone() })
        .await?;
    agent.stop().await?;

    // People leave.
    s.admin
        .delete_user(pb::DeleteUserRequest {
            name: bob.clone(),
            etag: String::new(),
        })
        .await?;
    let carol = create_user(&mut s.admin, &site, "Carol").await?;
    s.admin
        .erase_user(pb::EraseUserRequest {
            name: carol.clone(),
        })
        .await?;
    let scratch = crate::fixture::create_site(&mut s.admin, "Scratch", "UTC").await?;
    s.admin
        .delete_site(pb::DeleteSiteRequest {
            name: scratch.clone(),
            etag: String::new(),
        })
        .await?;

    let records = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: "sites/-".into(),
            ..Default::default()
        },
    )
    .await?;

    // Both logs merged by time, each record once (paged two at a time above).
    let time = |r: &pb::AuditRecord| r.create_time.as_ref().map(|t| (t.seconds, t.nanos));
    assert!(records.windows(2).all(|w| time(&w[0]) <= time(&w[1])));
    let distinct: std::collections::BTreeSet<(&str, i64)> =
        records.iter().map(|r| (r.site.as_str(), r.id)).collect();
    assert_eq!(distinct.len(), records.len());
    assert!(records.iter().any(|r| r.site.is_empty()) && records.iter().any(|r| r.site == site));

    // Never a PIN, a token or a token hash.
    let secrets: Vec<String> = pins
        .iter()
        .map(|p| p.to_string())
        .chain([
            pulled.pin.clone(),
            desk.token.clone(),
            agent_token.clone(),
            s.token.clone(),
            enrollment.code.clone(),
        ])
        .chain(
            [&desk.token, &agent_token, &s.token, &enrollment.code]
                .iter()
                .map(|t| {
                    keyplane_store::token_hash(t)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                }),
        )
        .filter(|t| !t.is_empty())
        .collect();
    for r in &records {
        let text = without_ids(&format!("{} {}", r.before_json, r.after_json));
        // A PIN is a run of digits of its own; ids are left out above, whose hex
        // digits may hold a PIN's by chance.
        let runs: Vec<&str> = text
            .split(|c: char| !c.is_ascii_digit())
            .filter(|run| !run.is_empty())
            .collect();
        for secret in &secrets {
            let found = if secret.chars().all(|c| c.is_ascii_digit()) {
                runs.contains(&secret.as_str())
            } else {
                text.contains(secret.as_str())
            };
            assert!(!found, "{} holds a secret: {text}", r.action);
        }
    }

    let lock_json = |slot: u16, removing: bool| json!({ "device": lock_id, "slot": slot, "removing": removing });
    let local = |slot: u16| format!("{lock_ref}/localCodes/{slot}");
    let code_json = |name: &str| json!({ "display_name": name, "locks": [lock_id] });
    let dealer = records
        .iter()
        .find(|r| r.action == "dealer.create")
        .map(|r| r.resource.clone())
        .unwrap_or_default();
    let none = serde_json::Value::Null;
    // (action, resource, before, after): null where the value must be absent.
    let table: Vec<(&str, String, serde_json::Value, serde_json::Value)> = vec![
        (
            "dealer.create",
            dealer,
            none.clone(),
            json!({ "display_name": "Dealer One" }),
        ),
        (
            "site.create",
            site.clone(),
            none.clone(),
            json!({ "display_name": "Alice's house", "time_zone": "Europe/Paris", "local_code_policy": "preserve" }),
        ),
        (
            "site.update",
            site.clone(),
            json!({ "display_name": "Alice's house" }),
            json!({ "display_name": "Alice's home", "time_zone": "Europe/Paris" }),
        ),
        (
            "site.update",
            site.clone(),
            json!({ "local_code_policy": "preserve" }),
            json!({ "local_code_policy": "authoritative" }),
        ),
        (
            "site.status_thresholds",
            site.clone(),
            json!({ "status_thresholds": null }),
            json!({ "status_thresholds": { "lock": {} } }),
        ),
        (
            "site.backup_pool",
            site.clone(),
            json!({ "backup_pool": null }),
            json!({ "backup_pool": { "size": 1, "devices": [lock_id] } }),
        ),
        (
            "site.lockdown",
            site.clone(),
            json!({ "lockdown": false }),
            json!({ "lockdown": true }),
        ),
        (
            "site.lockdown_released",
            site.clone(),
            json!({ "lockdown": true }),
            json!({ "lockdown": false }),
        ),
        (
            "site.resync",
            site.clone(),
            json!({ "resync_seq": 0 }),
            json!({ "resync_seq": 1 }),
        ),
        (
            "site.create",
            scratch.clone(),
            none.clone(),
            json!({ "display_name": "Scratch", "time_zone": "UTC" }),
        ),
        (
            "site.delete",
            scratch.clone(),
            json!({ "display_name": "Scratch" }),
            none.clone(),
        ),
        (
            "partition.create",
            format!("{site}/partitions/1"),
            none.clone(),
            json!({ "display_name": "House" }),
        ),
        (
            "partition.create",
            garage.name.clone(),
            none.clone(),
            json!({ "display_name": "Garage" }),
        ),
        (
            "partition.update",
            garage.name.clone(),
            json!({ "display_name": "Garage" }),
            json!({ "display_name": "Car port" }),
        ),
        (
            "partition.delete",
            garage.name.clone(),
            json!({ "display_name": "Car port" }),
            none.clone(),
        ),
        (
            "device.create",
            back.name.clone(),
            none.clone(),
            json!({ "display_name": "Back door", "model": "zwave-lock-30", "partition": 1, "perimeter": true }),
        ),
        (
            "device.update",
            back.name.clone(),
            json!({ "display_name": "Back door" }),
            json!({ "display_name": "Garden door", "model": "zwave-lock-30" }),
        ),
        (
            "device.delete",
            back.name.clone(),
            json!({ "display_name": "Garden door" }),
            none.clone(),
        ),
        (
            "user.create",
            bob.clone(),
            none.clone(),
            json!({ "display_name": "Bob" }),
        ),
        (
            "user.update",
            bob.clone(),
            json!({ "display_name": "Bob" }),
            json!({ "display_name": "Robert" }),
        ),
        (
            "user.delete",
            bob.clone(),
            json!({ "display_name": "Robert" }),
            none.clone(),
        ),
        (
            "user.delete",
            carol.clone(),
            json!({ "display_name": "(erased)" }),
            none.clone(),
        ),
        (
            "credential.create",
            code.name.clone(),
            none.clone(),
            code_json("code"),
        ),
        (
            "credential.update",
            code.name.clone(),
            code_json("code"),
            code_json("Front door code"),
        ),
        (
            "credential.create",
            once.name.clone(),
            none.clone(),
            json!({ "display_name": "Plumber", "max_uses": 1 }),
        ),
        (
            "credential.delete",
            once.name.clone(),
            json!({ "display_name": "Plumber", "max_uses": 1 }),
            none.clone(),
        ),
        (
            "credential.delete",
            pulled.name.clone(),
            code_json("Bob's spare"),
            none.clone(),
        ),
        (
            "personal_plan.update",
            personal.clone(),
            json!({ "configured": false, "access_points": [] }),
            json!({ "configured": true, "access_points": [lock_id] }),
        ),
        (
            "personal_plan.clear",
            personal.clone(),
            json!({ "configured": true, "access_points": [lock_id] }),
            json!({ "configured": true, "access_points": [] }),
        ),
        (
            "access_plan.create",
            staff.name.clone(),
            none.clone(),
            json!({ "display_name": "Staff", "devices": [lock_id], "members": [id_of(&alice)?] }),
        ),
        (
            "access_plan.update",
            staff.name.clone(),
            json!({ "display_name": "Staff" }),
            json!({ "display_name": "Cleaners", "devices": [lock_id], "members": [id_of(&alice)?] }),
        ),
        (
            "access_plan.delete",
            staff.name.clone(),
            json!({ "display_name": "Cleaners" }),
            none.clone(),
        ),
        (
            "holiday.put",
            holiday.clone(),
            none.clone(),
            json!({ "display_name": "Christmas", "plans": [id_of(&staff.name)?] }),
        ),
        (
            "holiday.put",
            holiday.clone(),
            json!({ "display_name": "Christmas" }),
            json!({ "display_name": "Noël" }),
        ),
        (
            "holiday.delete",
            holiday.clone(),
            json!({ "display_name": "Noël" }),
            none.clone(),
        ),
        (
            "dealer_token.create",
            desk_name.clone(),
            none.clone(),
            json!({ "display_name": "Front desk", "scope": "read_only" }),
        ),
        (
            "dealer_token.revoke",
            desk_name.clone(),
            json!({ "display_name": "Front desk", "scope": "read_only" }),
            none.clone(),
        ),
        (
            "agent_token.issue",
            site.clone(),
            json!({ "agent_tokens": 0 }),
            json!({ "agent_tokens": 1 }),
        ),
        (
            "agent_token.issue",
            site.clone(),
            json!({ "agent_tokens": 1 }),
            json!({ "agent_tokens": 1 }),
        ),
        (
            "enrollment_code.create",
            site.clone(),
            none.clone(),
            json!({ "enrollment_code": {} }),
        ),
        (
            "agent.revoke",
            site.clone(),
            json!({ "agent_tokens": 1 }),
            json!({ "agent_tokens": 0, "agents": 0 }),
        ),
        (
            "agent_connection.close",
            format!("{site}/agentConnection"),
            json!({ "connected": true }),
            json!({ "connected": false }),
        ),
        (
            "retention.update",
            "retentionPolicy".into(),
            json!({ "event_retention_seconds": 400 * 86_400 }),
            json!({ "event_retention_seconds": 2 * 86_400 }),
        ),
        (
            "backup_code.pull",
            pulled.name.clone(),
            json!({ "display_name": "Backup code" }),
            json!({ "display_name": "Bob's spare", "user": bob.clone() }),
        ),
        (
            "local_code.claim",
            local(29),
            lock_json(29, false),
            json!({ "claimed_as": claimed.name.clone() }),
        ),
        (
            "local_code.remove",
            local(28),
            lock_json(28, false),
            lock_json(28, true),
        ),
        (
            "local_code.clear",
            local(27),
            lock_json(27, false),
            lock_json(27, true),
        ),
        (
            "local_code.clear",
            local(26),
            lock_json(26, false),
            lock_json(26, true),
        ),
        (
            "drift.reapply",
            code.name.clone(),
            json!({ "display_name": "Front door code", "drift": { "device": lock_id, "slot": alice_slot } }),
            json!({ "display_name": "Front door code", "drift": null }),
        ),
        (
            "drift.adopt",
            code.name.clone(),
            json!({ "drift": { "device": lock_id, "slot": alice_slot } }),
            json!({ "drift": null }),
        ),
    ];
    let mut missing = Vec::new();
    for (action, resource, before, after) in &table {
        let found = records.iter().any(|r| {
            let (Ok(b), Ok(a)) = (parsed(&r.before_json), parsed(&r.after_json)) else {
                return false;
            };
            let fits = |got: &Option<serde_json::Value>, want: &serde_json::Value| match got {
                None => want.is_null(),
                Some(got) => !want.is_null() && holds(got, want),
            };
            r.action == *action && r.resource == *resource && fits(&b, before) && fits(&a, after)
        });
        if !found {
            let seen: Vec<_> = records
                .iter()
                .filter(|r| r.action == *action)
                .map(|r| (&r.resource, &r.before_json, &r.after_json))
                .collect();
            missing.push(format!(
                "{action} {resource} {before} -> {after}; recorded: {seen:?}"
            ));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));

    // Every action recorded is in the table (a new one must be added there, with what
    // it records), and carries a before or an after value unless it is listed as not.
    let listed: std::collections::BTreeSet<&str> = table.iter().map(|(a, ..)| *a).collect();
    for r in &records {
        let exempt = NEITHER.iter().any(|(a, _)| *a == r.action);
        assert!(
            listed.contains(r.action.as_str()) || exempt,
            "{} is recorded but not in this test's table",
            r.action
        );
        assert!(
            exempt || !r.before_json.is_empty() || !r.after_json.is_empty(),
            "{} {} records neither before nor after",
            r.action,
            r.resource
        );
    }
    let recorded: std::collections::BTreeSet<&str> =
        records.iter().map(|r| r.action.as_str()).collect();
    for (action, _) in NEITHER {
        assert!(recorded.contains(action), "{action} not exercised");
    }
    Ok(())
}

/// Migration 0023 keeps every record of a database that had some, in order: dealer-level
/// ones move to `dealer_audit_log`, site ones are numbered per site in their old order,
/// and records written afterwards continue from there.
#[tokio::test]
async fn the_audit_log_split_keeps_every_record_in_order() -> anyhow::Result<()> {
    let db = keyplane_testkit::pg::test_database().await?;
    let client = db.client().await?;
    client
        .batch_execute("CREATE SCHEMA before_split; SET search_path TO before_split")
        .await?;
    for (_, _, sql) in keyplane_store::MIGRATIONS.iter().filter(|(v, ..)| *v < 23) {
        client.batch_execute(sql).await?;
    }
    let dealer: uuid::Uuid = client
        .query_one(
            "INSERT INTO dealer (display_name) VALUES ('D') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let (one, two) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    for site in [one, two] {
        client
            .execute(
                "INSERT INTO site (id, dealer_id, display_name, time_zone) VALUES ($1, $2, 'S', 'UTC')",
                &[&site, &dealer],
            )
            .await?;
    }
    for (site, action) in [
        (Some(one), "a"),
        (None, "b"),
        (Some(two), "c"),
        (Some(one), "d"),
        (None, "e"),
    ] {
        client
            .execute(
                "INSERT INTO audit_log (dealer_id, site_id, actor, action, resource) VALUES ($1, $2, 'x', $3, 'r')",
                &[&dealer, &site, &action],
            )
            .await?;
    }
    let split = keyplane_store::MIGRATIONS
        .iter()
        .find(|(v, ..)| *v == 23)
        .map(|(_, _, sql)| *sql)
        .ok_or_else(|| anyhow::anyhow!("no migration 23"))?;
    client.batch_execute(split).await?;
    client
        .execute(
            "INSERT INTO audit_log (dealer_id, site_id, actor, action, resource) VALUES ($1, $2, 'x', 'f', 'r')",
            &[&dealer, &one],
        )
        .await?;
    let texts =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
    let of_site = "SELECT action || position FROM audit_log WHERE site_id = $1 ORDER BY position";
    assert_eq!(
        texts(client.query(of_site, &[&one]).await?),
        ["a1", "d2", "f3"]
    );
    assert_eq!(texts(client.query(of_site, &[&two]).await?), ["c1"]);
    assert_eq!(
        texts(
            client
                .query(
                    "SELECT action || position FROM dealer_audit_log ORDER BY position",
                    &[]
                )
                .await?
        ),
        ["b1", "e2"]
    );
    let seq = "SELECT audit_seq::text FROM site WHERE id = $1";
    assert_eq!(texts(client.query(seq, &[&one]).await?), ["3"]);
    assert_eq!(texts(client.query(seq, &[&two]).await?), ["1"]);
    assert_eq!(
        texts(
            client
                .query("SELECT audit_seq::text FROM dealer", &[])
                .await?
        ),
        ["2"]
    );
    assert!(
        client
            .execute("UPDATE dealer_audit_log SET actor = 'y'", &[])
            .await
            .is_err(),
        "append-only"
    );
    client
        .batch_execute("DROP SCHEMA before_split CASCADE")
        .await?;
    Ok(())
}

/// A credential write numbers its audit record in the same update of the site row
/// that advances the revision; every other write is numbered by the trigger. Mixed,
/// a site's records stay numbered 1, 2, 3 ... in the order of the calls, and the
/// site's counter ends at the last one.
#[tokio::test]
async fn audit_records_of_every_kind_of_write_are_numbered_without_gaps() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (site, alice, lock) = (s.site.clone(), s.alice.clone(), s.lock.clone());
    let code = s.credential(&alice, "5150", lock_scope(&[&lock])).await?;
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    // A display name alone changes no slot, so the revision stays where it is.
    s.admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: code.name.clone(),
                display_name: "Side door".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await?;
    let bobs = s.credential(&bob, "6261", lock_scope(&[&lock])).await?;
    s.admin
        .delete_credential(pb::DeleteCredentialRequest {
            name: code.name.clone(),
            etag: String::new(),
        })
        .await?;
    s.admin
        .delete_user(pb::DeleteUserRequest {
            name: bob.clone(),
            etag: String::new(),
        })
        .await?;
    let every = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            ..Default::default()
        },
    )
    .await?;
    let ids: Vec<i64> = every.iter().map(|r| r.id).collect();
    let expected: Vec<i64> = (1..=ids.len() as i64).collect();
    assert_eq!(ids, expected, "positions 1..n without a gap or a repeat");
    let tail: Vec<(&str, &str)> = every[every.len() - 7..]
        .iter()
        .map(|r| (r.action.as_str(), r.resource.as_str()))
        .collect();
    assert_eq!(
        tail,
        [
            ("credential.create", code.name.as_str()),
            ("user.create", bob.as_str()),
            ("credential.update", code.name.as_str()),
            ("credential.create", bobs.name.as_str()),
            ("credential.delete", code.name.as_str()),
            // Deleting a user deletes their codes, each audited.
            ("credential.delete", bobs.name.as_str()),
            ("user.delete", bob.as_str()),
        ]
    );
    let db = s.server.db.client().await?;
    let site_id = id_of(&site)?;
    let counter: i64 = db
        .query_one("SELECT audit_seq FROM site WHERE id = $1", &[&site_id])
        .await?
        .get(0);
    assert_eq!(
        counter,
        ids.len() as i64,
        "the site's counter is at the last record"
    );
    Ok(())
}
