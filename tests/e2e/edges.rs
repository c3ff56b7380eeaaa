//! Edges of rules found by trying keyplane as a dealer would: reserved slots, a
//! panel's partition, users without a level, one PIN key per database, agent
//! sessions, repeated names in plans, deleting a site whose users hold partitions.

use crate::fixture::{
    Site, create_site, create_user_with, id_of, lock_scope, panel_scope, slot_on,
};
use keyplane_core::pin::Pin;
use keyplane_proto::v1 as pb;
use keyplane_store::{Observed, ObservedState};
use keyplane_testkit::server::TestServer;
use tonic::Code;
use uuid::Uuid;

/// A code the agent found in `slot` that keyplane did not put there.
fn foreign(slot: u16, pin: &str) -> Observed {
    Observed {
        slot,
        state: ObservedState::Foreign,
        pin: Pin::parse(pin).ok(),
    }
}

/// A panel's user 001 (the installer code, a reserved slot) belongs to the panel: an
/// agent reporting it does not make it a LOCAL code, so it is never listed, claimed or
/// cleared, not even under AUTHORITATIVE.
#[tokio::test]
async fn reserved_slots_are_never_local_codes() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    s.set_policy(pb::LocalCodePolicy::Authoritative).await?;
    let (site, panel) = (id_of(&s.site)?, id_of(&s.panel.name)?);
    s.server
        .store
        .observed_record(site, panel, &[foreign(1, "2591"), foreign(20, "3916")])
        .await?;
    let codes = s
        .admin
        .list_local_codes(pb::ListLocalCodesRequest {
            parent: s.site.clone(),
        })
        .await?
        .into_inner()
        .local_codes;
    let slots: Vec<i32> = codes.iter().map(|c| c.slot).collect();
    assert_eq!(slots, vec![20], "only the assignable slot is a local code");
    let claim = s
        .admin
        .claim_local_code(pb::ClaimLocalCodeRequest {
            name: format!("{}/localCodes/1", s.panel.name),
            user: s.alice.clone(),
            panel_partitions: vec![1],
        })
        .await
        .expect_err("the installer code is not claimable");
    assert_eq!(claim.code(), Code::NotFound, "{claim:?}");
    let cleared: i64 = s
        .server
        .db
        .client()
        .await?
        .query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'local_code.clear' AND resource LIKE '%/localCodes/1'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(cleared, 0, "the installer code is never cleared");
    Ok(())
}

/// A panel spans partitions: it takes none of its own, so a master of partition 2
/// alone manages panel codes of partition 2.
#[tokio::test]
async fn a_panel_has_no_partition_of_its_own() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let refused = s
        .admin
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                name: s.panel.name.clone(),
                partition: 1,
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect_err("a panel takes no partition");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("panel"), "{}", refused.message());
    s.admin
        .create_partition(pb::CreatePartitionRequest {
            parent: site.clone(),
            partition: Some(pb::Partition {
                number: 2,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    let m2 = create_user_with(&mut s.admin, &site, "M2", &[(2, pb::Level::Master)]).await?;
    let op2 = create_user_with(&mut s.admin, &site, "Op2", &[(2, pb::Level::OperatorB)]).await?;
    let token = s.token.clone();
    let mut as_m2 = s.server.admin_as(&token, &m2, Some(2)).await?;
    let created = as_m2
        .create_credential(pb::CreateCredentialRequest {
            parent: op2,
            credential: Some(pb::Credential {
                pin: "5173".into(),
                scope: Some(panel_scope(&[2])),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: false,
        })
        .await?
        .into_inner();
    assert_eq!(created.created_partition, 2);
    Ok(())
}

/// Only levels 0-2 add users, also when the new user gets no level yet.
#[tokio::test]
async fn users_without_a_managing_level_add_nobody() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let nobody = create_user_with(&mut s.admin, &site, "Nobody", &[]).await?;
    let duress = create_user_with(&mut s.admin, &site, "Duress", &[(1, pb::Level::Duress)]).await?;
    let token = s.token.clone();
    for (who, actor) in [("no level", nobody), ("duress", duress)] {
        let mut a = s.server.admin_as(&token, &actor, None).await?;
        let status = a
            .create_user(pb::CreateUserRequest {
                parent: site.clone(),
                user: Some(pb::User {
                    display_name: "Spawned".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .expect_err(who);
        assert_eq!(status.code(), Code::PermissionDenied, "{who}: {status:?}");
        assert!(
            !status.message().contains("partition 0"),
            "{who}: {}",
            status.message()
        );
    }
    let users = s
        .admin
        .list_users(pb::ListUsersRequest {
            parent: site.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .users;
    assert!(users.iter().all(|u| u.display_name != "Spawned"));
    Ok(())
}

/// The first replica records its PIN key; a replica with another key is refused even
/// on a database that holds no PIN yet, so the same PIN can never be accepted twice
/// on one lock through two keys.
#[tokio::test]
async fn a_database_keeps_one_pin_key_from_the_start() -> anyhow::Result<()> {
    let s = Site::new().await?;
    let needed = s.server.store.key().id().to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let config =
        keyplane_server::Config::new(s.server.db.url.clone(), keyplane_store::PinKey::generate()?);
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        keyplane_server::serve(config, listener, tokio_util::sync::CancellationToken::new()),
    )
    .await?;
    let text = format!("{:#}", result.expect_err("another key is refused"));
    assert!(text.contains(&needed), "{text}");
    Ok(())
}

/// Only the newest stream of a site marks it disconnected when it ends.
#[tokio::test]
async fn a_replaced_agent_stream_does_not_mark_the_site_disconnected() -> anyhow::Result<()> {
    let s = Site::new().await?;
    let store = &s.server.store;
    let site = id_of(&s.site)?;
    let dealer: Uuid = s
        .server
        .db
        .client()
        .await?
        .query_one("SELECT dealer_id FROM site WHERE id = $1", &[&site])
        .await?
        .get(0);
    let (old, new) = (Uuid::new_v4(), Uuid::new_v4());
    store.agent_session_open(site, old).await?;
    store.agent_session_open(site, new).await?;
    store.agent_session_close(site, old).await?;
    assert!(
        store.sync_status(dealer, site).await?.agent_connected,
        "the newer stream is still open"
    );
    store.agent_session_close(site, new).await?;
    assert!(!store.sync_status(dealer, site).await?.agent_connected);
    Ok(())
}

/// A device or member named twice in a plan means it once, not INTERNAL.
#[tokio::test]
async fn repeated_names_in_plans_mean_them_once() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (site, alice, lock) = (s.site.clone(), s.alice.clone(), s.lock.clone());
    s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    let plan = s
        .admin
        .create_access_plan(pb::CreateAccessPlanRequest {
            parent: site.clone(),
            plan: Some(pb::StandardAccessPlan {
                display_name: "Twice".into(),
                devices: vec![lock.name.clone(), lock.name.clone()],
                members: vec![alice.clone(), alice.clone()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(plan.devices, vec![lock.name.clone()]);
    assert_eq!(plan.members, vec![alice.clone()]);
    let personal = s
        .admin
        .update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
            plan: Some(pb::PersonalAccessPlan {
                name: format!("{alice}/personalAccessPlan"),
                access_points: vec![lock.name.clone(), lock.name.clone()],
                ..Default::default()
            }),
            update_mask: None,
        })
        .await?
        .into_inner();
    assert_eq!(personal.access_points, vec![lock.name.clone()]);
    Ok(())
}

/// A site whose users hold authority in its partitions is deleted whole (was:
/// INTERNAL, a foreign key from a user's level to its partition checked mid-cascade).
#[tokio::test]
async fn a_site_whose_users_hold_partitions_deletes_cleanly() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let token = server.dealer("Dealer One").await?;
    let mut admin = server.admin(Some(&token)).await?;
    let site = create_site(&mut admin, "Sold house", "UTC").await?;
    for number in [1, 2] {
        admin
            .create_partition(pb::CreatePartitionRequest {
                parent: site.clone(),
                partition: Some(pb::Partition {
                    number,
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await?;
    }
    create_user_with(
        &mut admin,
        &site,
        "Owner",
        &[(1, pb::Level::Master), (2, pb::Level::Master)],
    )
    .await?;
    admin
        .delete_site(pb::DeleteSiteRequest {
            name: site.clone(),
            etag: String::new(),
        })
        .await?;
    let gone = admin
        .get_site(pb::GetSiteRequest { name: site.clone() })
        .await
        .expect_err("the site is gone");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    Ok(())
}

/// A new code takes the lowest slot of its lock that no code, reserved slot or local
/// code holds: through the holes deletions leave, past local codes, up to the lock's
/// last slot, and a full lock refuses the code (the allocation is one ordered pass
/// over the taken slots: its gaps, its floor and its end are each met here).
#[tokio::test]
async fn a_new_code_takes_the_lowest_slot_no_code_or_local_code_holds() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (site, lock_id) = (id_of(&s.site)?, id_of(&s.lock.name)?);
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    // Local codes programmed at the lock in slots 5 and 6.
    s.server
        .store
        .observed_record(site, lock_id, &[foreign(5, "71946"), foreign(6, "71953")])
        .await?;
    let pin = |n: usize| (40_013 + n * 97).to_string();
    let mut next = 0;
    let mut create = async |s: &mut Site| -> Result<pb::Credential, tonic::Status> {
        next += 1;
        s.credential(&alice, &pin(next), lock_scope(&[&lock])).await
    };
    let slot_of = |c: &pb::Credential| {
        slot_on(c, &lock).ok_or_else(|| anyhow::anyhow!("{} has no slot on the lock", c.name))
    };
    let mut held = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let c = create(&mut s).await?;
        held.insert(slot_of(&c)?, c.name);
    }
    assert_eq!(
        held.keys().copied().collect::<Vec<_>>(),
        [1, 2, 3, 4, 7, 8, 9, 10, 11, 12],
        "lowest first, past the local codes"
    );
    for slot in [2, 8, 11] {
        s.admin
            .delete_credential(pb::DeleteCredentialRequest {
                name: held[&slot].clone(),
                etag: String::new(),
            })
            .await?;
    }
    let mut refilled = Vec::new();
    for _ in 0..4 {
        refilled.push(slot_of(&create(&mut s).await?)?);
    }
    assert_eq!(
        refilled,
        [2, 8, 11, 13],
        "holes first, lowest first, then above"
    );
    // zwave-lock-30: slots 14..=30 left.
    for want in 14..=30 {
        assert_eq!(slot_of(&create(&mut s).await?)?, want);
    }
    let full = create(&mut s).await.expect_err("the lock is full");
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    Ok(())
}

/// Acks recorded in one batch (keyplaned's ack recorder) mean what each would alone:
/// a device moves to the acked revision but never past the site's head, never back,
/// two acks of one device count as the highest, an ack of a device that is not at
/// the site records nothing, and every ack gets its own answer in order.
#[tokio::test]
async fn acks_recorded_together_mean_what_each_means_alone() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    s.credential(&alice, "4711", crate::fixture::lock_scope(&[&lock]))
        .await?;
    let store = &s.server.store;
    let site = crate::fixture::id_of(&s.site)?;
    let (panel, lock) = (
        crate::fixture::id_of(&s.panel.name)?,
        crate::fixture::id_of(&s.lock.name)?,
    );
    let head = store.site_revisions(&[site]).await?[0].1;
    assert!(head >= 1);
    let db = s.server.db.client().await?;
    let applied = |device: Uuid| {
        let db = &db;
        async move {
            let row = db
                .query_one(
                    "SELECT applied_revision FROM device WHERE site_id = $1 AND id = $2",
                    &[&site, &device],
                )
                .await?;
            anyhow::Ok(row.get::<_, i64>(0))
        }
    };
    let stranger = Uuid::new_v4();
    let got = store
        .device_acks(&[
            (site, lock, head - 1),
            (site, panel, head + 100),
            (site, stranger, head),
            (site, lock, head),
        ])
        .await?;
    assert_eq!(got.len(), 4);
    assert!(got[0].is_some() && got[1].is_some() && got[3].is_some());
    assert!(got[2].is_none(), "a device not at the site records nothing");
    assert_eq!(
        applied(lock).await?,
        head,
        "the higher of the lock's two acks"
    );
    assert_eq!(applied(panel).await?, head, "never past the head");
    // Never back.
    store.device_acks(&[(site, lock, 0)]).await?;
    assert_eq!(applied(lock).await?, head);
    Ok(())
}
