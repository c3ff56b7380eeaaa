//! API conventions: health, reflection, pagination, idempotent creates, update masks,
//! preconditions, and changes reaching agents through another replica.

use crate::fixture::{Site, create_user, lock_scope, mask, panel_scope, slot_on};
use keyplane_proto::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn health_and_reflection_answer() -> anyhow::Result<()> {
    let s = Site::new().await?;
    let channel = s.server.channel().await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "keyplane.v1.AdminService".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let reply = replies
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no reflection reply"))?;
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        anyhow::bail!("unexpected reflection reply");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "keyplane.v1.AdminService",
        "keyplane.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    // v1alpha too, for older grpcurl.
    use tonic_reflection::pb::v1alpha as alpha;
    let mut old = alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut replies = old
        .server_reflection_info(tokio_stream::iter(vec![alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "keyplane.v1.AdminService".into(),
                ),
            ),
        }]))
        .await?
        .into_inner();
    let reply = replies
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no v1alpha reply"))?;
    assert!(matches!(
        reply.message_response,
        Some(alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
    Ok(())
}

#[tokio::test]
async fn pages_walk_every_user_once() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    for i in 0..6 {
        create_user(&mut s.admin, &site, &format!("User {i}")).await?;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = s
            .admin
            .list_users(pb::ListUsersRequest {
                parent: site.clone(),
                page_size: 3,
                page_token: token.clone(),
            })
            .await?
            .into_inner();
        pages += 1;
        assert!(page.users.len() <= 3);
        seen.extend(page.users.into_iter().map(|u| u.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 7, "Alice and six more");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 7);
    assert_eq!(pages, 3);
    Ok(())
}

#[tokio::test]
async fn request_ids_make_creates_idempotent() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let create = |pin: &str| pb::CreateCredentialRequest {
        parent: s.alice.clone(),
        credential: Some(pb::Credential {
            pin: pin.into(),
            scope: Some(lock_scope(&[&lock])),
            ..Default::default()
        }),
        request_id: "retry-7f3a".into(),
        generate_pin: false,
    };
    let (first_req, second_req, other_req) = (create("9930"), create("9930"), create("1357"));
    let client = s.server.db.client().await?;
    let revision_before: i64 = client
        .query_one("SELECT revision FROM site", &[])
        .await?
        .get(0);
    let first = s.admin.create_credential(first_req).await?.into_inner();
    let second = s.admin.create_credential(second_req).await?.into_inner();
    assert_eq!(
        first.name, second.name,
        "a retried create returns the same credential"
    );
    assert_eq!(first.slots, second.slots);
    let err = s
        .admin
        .create_credential(other_req)
        .await
        .expect_err("reused id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("request_id"));
    let n: i64 = client
        .query_one("SELECT count(*) FROM credential", &[])
        .await?
        .get(0);
    assert_eq!(n, 1);
    let revision: i64 = client
        .query_one("SELECT revision FROM site", &[])
        .await?
        .get(0);
    assert_eq!(
        revision,
        revision_before + 1,
        "the retry recorded no second change"
    );
    Ok(())
}

#[tokio::test]
async fn update_masks_scope_changes_and_preconditions() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let (lock, panel) = (s.lock.clone(), s.panel.clone());
    let c = s.credential(&alice, "4821", panel_scope(&[1])).await?;
    let panel_slot = slot_on(&c, &panel);
    // Unknown mask path.
    let err = s
        .admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: c.name.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["slots".into()],
            }),
        })
        .await
        .expect_err("bad mask");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Widen the scope to the lock: the panel slot stays, the lock gets one.
    let wide = s
        .admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: c.name.clone(),
                scope: Some(pb::CredentialScope {
                    panel_partitions: vec![1],
                    locks: vec![lock.name.clone()],
                    doors: vec![],
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["scope".into()],
            }),
        })
        .await?
        .into_inner();
    assert_eq!(slot_on(&wide, &panel), panel_slot);
    assert!(slot_on(&wide, &lock).is_some());
    let agent = s.start_agent();
    s.wait_synced().await?;
    assert_eq!(
        s.slots(&lock)?.values().cloned().collect::<Vec<_>>(),
        vec!["4821".to_string()]
    );
    // Narrow it to the lock only: the panel slot is cleared on the panel.
    let narrow = s
        .admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: c.name.clone(),
                scope: Some(lock_scope(&[&lock])),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["scope".into()],
            }),
        })
        .await?
        .into_inner();
    assert_eq!(slot_on(&narrow, &panel), None);
    s.wait_synced().await?;
    assert!(s.slots(&panel)?.is_empty());
    assert_eq!(s.slots(&lock)?.len(), 1);
    // A device still holding codes cannot be deleted.
    let err = s
        .admin
        .delete_device(pb::DeleteDeviceRequest {
            name: lock.name.clone(),
            etag: String::new(),
        })
        .await
        .expect_err("device in use");
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Deleting the user clears their codes everywhere.
    s.admin
        .delete_user(pb::DeleteUserRequest {
            name: alice.clone(),
            etag: String::new(),
        })
        .await?;
    s.wait_synced().await?;
    assert!(s.slots(&lock)?.is_empty());
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_change_on_one_replica_reaches_an_agent_on_another() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let replica = s.server.replica().await?;
    let lock = s.lock.clone();
    // The agent talks to the replica; the dealer writes through the first server.
    let agent = keyplane_testkit::server::TestAgent::start(
        &replica.url,
        &s.site,
        &s.agent_token,
        s.dir.path(),
    );
    s.wait_synced().await?;
    let alice = s.alice.clone();
    let c = s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    s.wait_synced().await?;
    assert_eq!(
        s.slots(&lock)?
            .get(&slot_on(&c, &lock).expect("slot"))
            .map(String::as_str),
        Some("9930")
    );
    assert!(s.sync_status().await?.agent_connected);
    agent.stop().await?;
    replica.stop().await?;
    Ok(())
}

#[tokio::test]
async fn the_dev_demo_seeds_a_site_an_agent_can_sync() -> anyhow::Result<()> {
    let server = keyplane_testkit::server::TestServer::start().await?;
    let token = server.dealer("Demo Dealer").await?;
    let demo = keyplane_server::demo::seed(&server.url, &token).await?;
    assert_eq!(demo.devices.len(), 3);
    let dir = keyplane_testkit::server::TempDir::new("demo")?;
    let agent = keyplane_testkit::server::TestAgent::start(
        &server.url,
        &demo.site,
        &demo.agent_token,
        dir.path(),
    );
    let mut admin = server.admin(Some(&token)).await?;
    let status =
        crate::fixture::wait_applied_at_head(&admin, &demo.site, crate::fixture::SYNC_TIMEOUT)
            .await?;
    assert!(status.setup_issues.is_empty(), "{:?}", status.setup_issues);
    let creds = admin
        .list_credentials(pb::ListCredentialsRequest {
            parent: demo.user.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .credentials;
    assert_eq!(creds.len(), 2);
    agent.stop().await?;
    Ok(())
}

fn weekdays() -> pb::Schedule {
    pb::Schedule {
        windows: vec![pb::TimeWindow {
            days: vec![pb::DayOfWeek::Monday as i32, pb::DayOfWeek::Friday as i32],
            start_time: "08:00".into(),
            end_time: "18:00".into(),
        }],
        ..Default::default()
    }
}

/// AIP-134: without `update_mask` every Update* RPC changes the fields the request
/// sets and keeps the others; clearing a field takes a mask naming it.
#[tokio::test]
async fn updates_without_a_mask_change_the_fields_set_and_keep_the_rest() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let (lock, panel) = (s.lock.clone(), s.panel.clone());
    let door = s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    let agent = s.start_agent();
    s.wait_synced().await?;

    // A PIN alone, no mask: the PIN changes (on the lock too), name and scope stay.
    let changed = s
        .admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: door.name.clone(),
                pin: "1357".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await?
        .into_inner();
    assert_eq!(changed.display_name, door.display_name);
    assert_eq!(changed.scope, door.scope);
    assert_eq!(slot_on(&changed, &lock), slot_on(&door, &lock));
    s.wait_synced().await?;
    assert_eq!(
        s.slots(&lock)?.values().cloned().collect::<Vec<_>>(),
        vec!["1357".to_string()]
    );
    // A mask naming only the display name leaves the PIN alone, though one is sent.
    s.admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: door.name.clone(),
                display_name: "Front".into(),
                pin: "2468".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await?;
    s.wait_synced().await?;
    assert_eq!(
        s.slots(&lock)?.values().cloned().collect::<Vec<_>>(),
        vec!["1357".to_string()]
    );

    // A display name alone does not clear the user's levels.
    let user = s
        .admin
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: alice.clone(),
                display_name: "Alice B".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await?
        .into_inner();
    assert_eq!(user.display_name, "Alice B");
    assert_eq!(
        user.authorities,
        vec![pb::PartitionAuthority {
            partition: 1,
            level: pb::Level::Master as i32
        }]
    );
    // Nothing set and no mask: refused, and nothing changed.
    let err = s
        .admin
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: alice.clone(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect_err("nothing to update");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("nothing to update"), "{err:?}");
    let again = s
        .admin
        .get_user(pb::GetUserRequest {
            name: alice.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(again.etag, user.etag);

    // Personal plan: access points and schedule set, no mask: both taken.
    let plan_name = format!("{alice}/personalAccessPlan");
    let plan = s
        .admin
        .update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
            plan: Some(pb::PersonalAccessPlan {
                name: plan_name.clone(),
                access_points: vec![panel.name.clone(), lock.name.clone()],
                schedule: Some(weekdays()),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await?
        .into_inner();
    assert_eq!(plan.access_points.len(), 2);
    assert!(plan.schedule.is_some());
    // Access points alone keep the schedule.
    let plan = s
        .admin
        .update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
            plan: Some(pb::PersonalAccessPlan {
                name: plan_name.clone(),
                access_points: vec![lock.name.clone()],
                ..Default::default()
            }),
            update_mask: None,
        })
        .await?
        .into_inner();
    assert_eq!(plan.access_points, vec![lock.name.clone()]);
    assert_eq!(
        plan.schedule.as_ref().map(|s| s.windows.len()),
        Some(1),
        "the schedule stays"
    );
    // Removing the schedule takes a mask naming it.
    let plan = s
        .admin
        .update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
            plan: Some(pb::PersonalAccessPlan {
                name: plan_name.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["schedule"]),
        })
        .await?
        .into_inner();
    assert!(plan.schedule.is_none());
    assert_eq!(plan.access_points, vec![lock.name.clone()]);

    // Site, partition, device: a display name alone keeps everything else.
    let site = s
        .admin
        .update_site(pb::UpdateSiteRequest {
            site: Some(pb::Site {
                name: s.site.clone(),
                display_name: "Renamed".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await?
        .into_inner();
    assert_eq!(
        (site.display_name.as_str(), site.time_zone.as_str()),
        ("Renamed", "Europe/Paris")
    );
    let partition = s
        .admin
        .update_partition(pb::UpdatePartitionRequest {
            partition: Some(pb::Partition {
                name: format!("{}/partitions/1", s.site),
                display_name: "Ground floor".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await?
        .into_inner();
    assert_eq!(partition.display_name, "Ground floor");
    let device = s
        .admin
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                name: lock.name.clone(),
                display_name: "Front".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await?
        .into_inner();
    assert_eq!(
        (
            device.display_name.as_str(),
            device.partition,
            device.perimeter
        ),
        ("Front", 1, true)
    );

    // Standard plan: a new schedule alone keeps devices and members.
    let created = s
        .admin
        .create_access_plan(pb::CreateAccessPlanRequest {
            parent: s.site.clone(),
            plan: Some(pb::StandardAccessPlan {
                display_name: "Cleaners".into(),
                devices: vec![lock.name.clone()],
                members: vec![alice.clone()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    let updated = s
        .admin
        .update_access_plan(pb::UpdateAccessPlanRequest {
            plan: Some(pb::StandardAccessPlan {
                name: created.name.clone(),
                schedule: Some(weekdays()),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await?
        .into_inner();
    assert_eq!(updated.display_name, "Cleaners");
    assert_eq!(updated.devices, vec![lock.name.clone()]);
    assert_eq!(updated.members, vec![alice.clone()]);
    assert!(updated.schedule.is_some());
    agent.stop().await?;
    Ok(())
}

/// Every paged List call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListCall {
    Sites,
    Partitions,
    Devices,
    Users,
    Credentials,
    Events,
    AccessPlans,
}

/// One page of `call` under `parent`: (items, next_page_token).
async fn list(
    admin: &mut keyplane_testkit::server::Admin,
    call: ListCall,
    parent: &str,
    page_token: &str,
) -> Result<(usize, String), tonic::Status> {
    let (parent, page_token, page_size) = (parent.to_owned(), page_token.to_owned(), 1);
    Ok(match call {
        ListCall::Sites => {
            let r = admin
                .list_sites(pb::ListSitesRequest {
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            (r.sites.len(), r.next_page_token)
        }
        ListCall::Partitions => {
            let r = admin
                .list_partitions(pb::ListPartitionsRequest {
                    parent,
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            (r.partitions.len(), r.next_page_token)
        }
        ListCall::Devices => {
            let r = admin
                .list_devices(pb::ListDevicesRequest {
                    parent,
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            (r.devices.len(), r.next_page_token)
        }
        ListCall::Users => {
            let r = admin
                .list_users(pb::ListUsersRequest {
                    parent,
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            (r.users.len(), r.next_page_token)
        }
        ListCall::Credentials => {
            let r = admin
                .list_credentials(pb::ListCredentialsRequest {
                    parent,
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            (r.credentials.len(), r.next_page_token)
        }
        ListCall::Events => {
            let r = admin
                .list_events(pb::ListEventsRequest {
                    parent,
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            (r.events.len(), r.next_page_token)
        }
        ListCall::AccessPlans => {
            let r = admin
                .list_access_plans(pb::ListAccessPlansRequest {
                    parent,
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            (r.plans.len(), r.next_page_token)
        }
    })
}

#[tokio::test]
async fn page_tokens_are_refused_by_every_other_list() -> anyhow::Result<()> {
    use ListCall::*;
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    // Two of everything, on this site; a second site and user as other parents.
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
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    s.credential(&alice, "4821", panel_scope(&[1])).await?;
    s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    for name in ["Staff", "Cleaners"] {
        s.admin
            .create_access_plan(pb::CreateAccessPlanRequest {
                parent: site.clone(),
                plan: Some(pb::StandardAccessPlan {
                    display_name: name.into(),
                    devices: vec![lock.name.clone()],
                    members: vec![bob.clone()],
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await?;
    }
    // Lockdown and its release are two events.
    s.admin
        .lockdown_doors(pb::LockdownDoorsRequest { site: site.clone() })
        .await?;
    s.admin
        .release_lockdown(pb::ReleaseLockdownRequest { site: site.clone() })
        .await?;
    let other_site = s
        .admin
        .create_site(pb::CreateSiteRequest {
            site: Some(pb::Site {
                display_name: "Second site".into(),
                time_zone: "UTC".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .name;
    // (call, its parent, another parent of the same collection)
    let calls = [
        (Sites, String::new(), None),
        (Partitions, site.clone(), Some(other_site.clone())),
        (Devices, site.clone(), Some(other_site.clone())),
        (Users, site.clone(), Some(other_site.clone())),
        (Credentials, alice.clone(), Some(bob.clone())),
        (Events, site.clone(), Some(other_site.clone())),
        (AccessPlans, site.clone(), Some(other_site.clone())),
    ];
    for (issuer, parent, other_parent) in &calls {
        let (n, token) = list(&mut s.admin, *issuer, parent, "").await?;
        assert_eq!(n, 1, "{issuer:?}: first page");
        assert!(!token.is_empty(), "{issuer:?}: a next page exists");
        // The call that issued it takes it back.
        let (n, _) = list(&mut s.admin, *issuer, parent, &token).await?;
        assert_eq!(n, 1, "{issuer:?}: second page");
        let refused = |status: tonic::Status, by: String| {
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{issuer:?} token given to {by}: {}",
                status.message()
            );
            assert!(
                status.message().contains("another list call"),
                "{issuer:?} token given to {by}: {}",
                status.message()
            );
        };
        for (call, call_parent, _) in &calls {
            if call == issuer {
                continue;
            }
            let r = list(&mut s.admin, *call, call_parent, &token).await;
            refused(
                r.expect_err("another collection's token"),
                format!("{call:?}"),
            );
        }
        if let Some(other) = other_parent {
            let r = list(&mut s.admin, *issuer, other, &token).await;
            refused(
                r.expect_err("another parent's token"),
                format!("{issuer:?} of {other}"),
            );
        }
    }
    Ok(())
}

/// A create or an update answers with the credential as a read finds it right after:
/// the write builds its answer from what it wrote instead of reading it back, so every
/// field (scope split by device kind, slots by device with their display numbers,
/// times, version) is compared here, for every kind of change.
#[tokio::test]
async fn a_write_answers_what_a_read_finds_after_it() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let door =
        crate::fixture::create_device(&mut s.admin, &s.site, "Office door", "door-1000").await?;
    let back_lock =
        crate::fixture::create_device(&mut s.admin, &s.site, "Back door", "zwave-lock-30").await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    let (mut admin, reader) = (s.admin.clone(), s.admin.clone());
    let read = |name: String| {
        let mut admin = reader.clone();
        async move {
            let mut got = admin
                .get_credential(pb::GetCredentialRequest { name })
                .await?
                .into_inner();
            // Only reads carry slot statuses, and the slots the code is leaving.
            got.slot_status = None;
            got.slots.retain(|slot| {
                slot.state
                    .as_ref()
                    .is_none_or(|st| st.status() != pb::SlotStatus::Removing)
            });
            for slot in &mut got.slots {
                slot.state = None;
            }
            anyhow::Ok(got)
        }
    };
    // Devices listed in an order that is not the ids', the door among the locks'
    // neighbours: the answer sorts and splits them as the read does.
    let mut scopes = vec![
        pb::CredentialScope {
            panel_partitions: vec![1],
            locks: vec![back_lock.name.clone(), lock.name.clone()],
            doors: vec![door.name.clone()],
        },
        pb::CredentialScope {
            panel_partitions: vec![],
            locks: vec![lock.name.clone()],
            doors: vec![door.name.clone()],
        },
    ];
    scopes[0].locks.sort_by(|a, b| b.cmp(a));
    for scope in scopes {
        let created = s.credential(&alice, "4711", scope).await?;
        assert!(!created.slots.is_empty());
        assert_eq!(created, read(created.name.clone()).await?, "create");
        let name = created.name.clone();
        let updates: Vec<(pb::Credential, &[&str])> = vec![
            (
                pb::Credential {
                    display_name: "renamed".into(),
                    ..Default::default()
                },
                &["display_name"],
            ),
            (
                pb::Credential {
                    pin: "8642".into(),
                    ..Default::default()
                },
                &["pin"],
            ),
            (
                pb::Credential {
                    scope: Some(pb::CredentialScope {
                        panel_partitions: vec![1],
                        locks: vec![back_lock.name.clone()],
                        doors: vec![],
                    }),
                    ..Default::default()
                },
                &["scope"],
            ),
            (
                pb::Credential {
                    pin: "97531".into(),
                    scope: Some(pb::CredentialScope {
                        panel_partitions: vec![],
                        locks: vec![lock.name.clone(), back_lock.name.clone()],
                        doors: vec![door.name.clone()],
                    }),
                    ..Default::default()
                },
                &["pin", "scope"],
            ),
        ];
        for (change, paths) in updates {
            let updated = admin
                .update_credential(pb::UpdateCredentialRequest {
                    credential: Some(pb::Credential {
                        name: name.clone(),
                        ..change
                    }),
                    update_mask: mask(paths),
                })
                .await?
                .into_inner();
            assert_eq!(updated, read(name.clone()).await?, "update of {paths:?}");
        }
        admin
            .delete_credential(pb::DeleteCredentialRequest {
                name: name.clone(),
                etag: String::new(),
            })
            .await?;
    }
    Ok(())
}
