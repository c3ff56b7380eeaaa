//! Tenant isolation as a table over the AdminService: dealer B's token against every
//! kind of dealer A's resources is NOT_FOUND, and nothing changes (issue 13).

use crate::bad_input::fingerprint_with;
use crate::fixture::{Site, lock_scope, mask};
use keyplane_proto::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn another_dealers_token_finds_nothing_and_changes_nothing() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (site, lock, panel, alice) = (
        s.site.clone(),
        s.lock.clone(),
        s.panel.clone(),
        s.alice.clone(),
    );
    let cred = s.credential(&alice, "4821", lock_scope(&[&lock])).await?;
    let a_token = s
        .admin
        .list_dealer_tokens(pb::ListDealerTokensRequest {})
        .await?
        .into_inner()
        .dealer_tokens
        .first()
        .map(|t| t.name.clone())
        .unwrap_or_default();
    let plan = format!("{site}/accessPlans/{}", uuid::Uuid::new_v4());
    let partition = format!("{site}/partitions/1");
    let personal = format!("{alice}/personalAccessPlan");
    let holiday = format!("{site}/holidays/2026-12-25");
    let local = format!("{}/localCodes/7", lock.name);
    let before = fingerprint_with(&s, false).await?;

    let b_token = s.server.dealer("Dealer B").await?;
    let mut b = s.server.admin(Some(&b_token)).await?;
    let named = |name: &str| name.to_owned();
    let mut results: Vec<(&str, Result<(), tonic::Status>)> = Vec::new();
    macro_rules! call {
        ($name:literal, $call:expr) => {
            results.push(($name, $call.await.map(|_| ())));
        };
    }
    call!(
        "GetSite",
        b.get_site(pb::GetSiteRequest { name: named(&site) })
    );
    call!(
        "UpdateSite",
        b.update_site(pb::UpdateSiteRequest {
            site: Some(pb::Site {
                name: named(&site),
                display_name: "B was here".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
    );
    call!(
        "DeleteSite",
        b.delete_site(pb::DeleteSiteRequest {
            name: named(&site),
            etag: String::new()
        })
    );
    call!(
        "CreatePartition",
        b.create_partition(pb::CreatePartitionRequest {
            parent: named(&site),
            partition: Some(pb::Partition {
                number: 2,
                display_name: "B".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
    );
    call!(
        "GetPartition",
        b.get_partition(pb::GetPartitionRequest {
            name: named(&partition)
        })
    );
    call!(
        "ListPartitions",
        b.list_partitions(pb::ListPartitionsRequest {
            parent: named(&site),
            ..Default::default()
        })
    );
    call!(
        "UpdatePartition",
        b.update_partition(pb::UpdatePartitionRequest {
            partition: Some(pb::Partition {
                name: named(&partition),
                display_name: "B".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
    );
    call!(
        "DeletePartition",
        b.delete_partition(pb::DeletePartitionRequest {
            name: named(&partition),
            etag: String::new()
        })
    );
    call!(
        "CreateDevice",
        b.create_device(pb::CreateDeviceRequest {
            parent: named(&site),
            device: Some(pb::Device {
                display_name: "B".into(),
                model: "zwave-lock-30".into(),
                partition: 1,
                ..Default::default()
            }),
            request_id: String::new(),
        })
    );
    call!(
        "GetDevice",
        b.get_device(pb::GetDeviceRequest {
            name: lock.name.clone()
        })
    );
    call!(
        "ListDevices",
        b.list_devices(pb::ListDevicesRequest {
            parent: named(&site),
            ..Default::default()
        })
    );
    call!(
        "UpdateDevice",
        b.update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                name: lock.name.clone(),
                display_name: "B".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
    );
    call!(
        "DeleteDevice",
        b.delete_device(pb::DeleteDeviceRequest {
            name: panel.name.clone(),
            etag: String::new()
        })
    );
    call!(
        "CreateUser",
        b.create_user(pb::CreateUserRequest {
            parent: named(&site),
            user: Some(pb::User {
                display_name: "B".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
    );
    call!(
        "GetUser",
        b.get_user(pb::GetUserRequest {
            name: named(&alice)
        })
    );
    call!(
        "ListUsers",
        b.list_users(pb::ListUsersRequest {
            parent: named(&site),
            ..Default::default()
        })
    );
    call!(
        "UpdateUser",
        b.update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: named(&alice),
                display_name: "B".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
    );
    call!(
        "DeleteUser",
        b.delete_user(pb::DeleteUserRequest {
            name: named(&alice),
            etag: String::new()
        })
    );
    call!(
        "EraseUser",
        b.erase_user(pb::EraseUserRequest {
            name: named(&alice)
        })
    );
    call!(
        "CreateCredential",
        b.create_credential(pb::CreateCredentialRequest {
            parent: named(&alice),
            credential: Some(pb::Credential {
                display_name: "B".into(),
                pin: "5927".into(),
                scope: Some(lock_scope(&[&lock])),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: false,
        })
    );
    call!(
        "GetCredential",
        b.get_credential(pb::GetCredentialRequest {
            name: cred.name.clone()
        })
    );
    call!(
        "ListCredentials",
        b.list_credentials(pb::ListCredentialsRequest {
            parent: named(&alice),
            ..Default::default()
        })
    );
    call!(
        "UpdateCredential",
        b.update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: cred.name.clone(),
                display_name: "B".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
    );
    call!(
        "DeleteCredential",
        b.delete_credential(pb::DeleteCredentialRequest {
            name: cred.name.clone(),
            etag: String::new()
        })
    );
    call!(
        "GetSyncStatus",
        b.get_sync_status(pb::GetSyncStatusRequest {
            name: format!("{site}/syncStatus"),
            ..Default::default()
        })
    );
    call!(
        "IssueAgentToken",
        b.issue_agent_token(pb::IssueAgentTokenRequest { site: named(&site) })
    );
    call!(
        "CreateEnrollmentCode",
        b.create_enrollment_code(pb::CreateEnrollmentCodeRequest {
            site: named(&site),
            ttl_seconds: 600
        })
    );
    call!(
        "RevokeAgents",
        b.revoke_agents(pb::RevokeAgentsRequest { site: named(&site) })
    );
    call!(
        "RevokeDealerToken",
        b.revoke_dealer_token(pb::RevokeDealerTokenRequest {
            name: a_token.clone()
        })
    );
    call!(
        "GetPersonalAccessPlan",
        b.get_personal_access_plan(pb::GetPersonalAccessPlanRequest {
            name: named(&personal)
        })
    );
    call!(
        "UpdatePersonalAccessPlan",
        b.update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
            plan: Some(pb::PersonalAccessPlan {
                name: named(&personal),
                access_points: vec![lock.name.clone()],
                ..Default::default()
            }),
            update_mask: mask(&["access_points"]),
        })
    );
    call!(
        "ClearPersonalAccessPlan",
        b.clear_personal_access_plan(pb::ClearPersonalAccessPlanRequest {
            name: named(&personal),
            etag: String::new()
        })
    );
    call!(
        "CreateAccessPlan",
        b.create_access_plan(pb::CreateAccessPlanRequest {
            parent: named(&site),
            plan: Some(pb::StandardAccessPlan {
                display_name: "B".into(),
                devices: vec![lock.name.clone()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
    );
    call!(
        "GetAccessPlan",
        b.get_access_plan(pb::GetAccessPlanRequest { name: named(&plan) })
    );
    call!(
        "ListAccessPlans",
        b.list_access_plans(pb::ListAccessPlansRequest {
            parent: named(&site),
            ..Default::default()
        })
    );
    call!(
        "UpdateAccessPlan",
        b.update_access_plan(pb::UpdateAccessPlanRequest {
            plan: Some(pb::StandardAccessPlan {
                name: named(&plan),
                display_name: "B".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
    );
    call!(
        "DeleteAccessPlan",
        b.delete_access_plan(pb::DeleteAccessPlanRequest {
            name: named(&plan),
            etag: String::new()
        })
    );
    call!(
        "PutHoliday",
        b.put_holiday(pb::PutHolidayRequest {
            holiday: Some(pb::Holiday {
                name: named(&holiday),
                display_name: "B".into(),
                ..Default::default()
            }),
        })
    );
    call!(
        "ListHolidays",
        b.list_holidays(pb::ListHolidaysRequest {
            parent: named(&site)
        })
    );
    call!(
        "DeleteHoliday",
        b.delete_holiday(pb::DeleteHolidayRequest {
            name: named(&holiday)
        })
    );
    call!(
        "LockdownDoors",
        b.lockdown_doors(pb::LockdownDoorsRequest { site: named(&site) })
    );
    call!(
        "ReleaseLockdown",
        b.release_lockdown(pb::ReleaseLockdownRequest { site: named(&site) })
    );
    call!(
        "ListLocalCodes",
        b.list_local_codes(pb::ListLocalCodesRequest {
            parent: named(&site)
        })
    );
    call!(
        "ClaimLocalCode",
        b.claim_local_code(pb::ClaimLocalCodeRequest {
            name: named(&local),
            user: named(&alice),
            panel_partitions: vec![]
        })
    );
    call!(
        "RemoveLocalCode",
        b.remove_local_code(pb::RemoveLocalCodeRequest {
            name: named(&local)
        })
    );
    call!(
        "ResolveDrift",
        b.resolve_drift(pb::ResolveDriftRequest {
            credential: cred.name.clone(),
            device: lock.name.clone(),
            resolution: pb::resolve_drift_request::Resolution::Reapply as i32,
        })
    );
    call!(
        "ListEvents",
        b.list_events(pb::ListEventsRequest {
            parent: named(&site),
            ..Default::default()
        })
    );
    call!(
        "WatchEvents",
        b.watch_events(pb::WatchEventsRequest {
            parent: named(&site),
            ..Default::default()
        })
    );
    call!(
        "ListAuditLog",
        b.list_audit_log(pb::ListAuditLogRequest {
            parent: named(&site),
            ..Default::default()
        })
    );
    call!(
        "ConfigureBackupCodes",
        b.configure_backup_codes(pb::ConfigureBackupCodesRequest {
            site: named(&site),
            devices: vec![lock.name.clone()],
            size: 1
        })
    );
    call!(
        "PullBackupCode",
        b.pull_backup_code(pb::PullBackupCodeRequest {
            user: named(&alice),
            display_name: "B".into()
        })
    );

    // OpsService, with B's ops token (an admin token may call it too).
    let b_ops_token = {
        let made = b
            .create_dealer_token(pb::CreateDealerTokenRequest {
                display_name: "B ops".into(),
                scope: pb::TokenScope::Ops as i32,
                ttl_seconds: 0,
            })
            .await?
            .into_inner();
        made.token
    };
    for token in [&b_token, &b_ops_token] {
        let mut ops = s.server.ops(Some(token)).await?;
        call!(
            "ListAgentConnections",
            ops.list_agent_connections(pb::ListAgentConnectionsRequest {
                parent: named(&site),
                ..Default::default()
            })
        );
        call!(
            "ResyncSite",
            ops.resync_site(pb::ResyncSiteRequest { name: named(&site) })
        );
        call!(
            "CloseAgentConnection",
            ops.close_agent_connection(pb::CloseAgentConnectionRequest {
                name: format!("{site}/agentConnection")
            })
        );
        call!(
            "GetSiteOpsStatus",
            ops.get_site_ops_status(pb::GetSiteOpsStatusRequest {
                name: format!("{site}/opsStatus")
            })
        );
    }

    let wrong: Vec<String> = results
        .iter()
        .filter(|(_, r)| !matches!(r, Err(e) if e.code() == Code::NotFound))
        .map(|(name, r)| {
            format!(
                "{name}: {:?}",
                r.as_ref().map_err(|e| (e.code(), e.message().to_owned()))
            )
        })
        .collect();
    assert!(wrong.is_empty(), "not NOT_FOUND:\n{}", wrong.join("\n"));
    // Lists and dealer-level calls of B see none of A's.
    let sites = b
        .list_sites(pb::ListSitesRequest::default())
        .await?
        .into_inner()
        .sites;
    assert!(sites.iter().all(|x| x.name != site));
    let tokens = b
        .list_dealer_tokens(pb::ListDealerTokensRequest {})
        .await?
        .into_inner()
        .dealer_tokens;
    assert!(tokens.iter().all(|t| t.name != a_token));
    let audit = b
        .list_audit_log(pb::ListAuditLogRequest {
            parent: "sites/-".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(audit.records.iter().all(|r| r.site != site));

    // Nothing of A changed. B's own rows (its dealer and token, made after `before`)
    // and the per-address auth bookkeeping are not A's: left out of the comparison.
    let mut after = fingerprint_with(&s, false).await?;
    let mut before = before;
    for t in [
        "dealer",
        "dealer_token",
        "audit_log",
        "dealer_audit_log",
        "auth_failure",
    ] {
        before.tables.remove(t);
        after.tables.remove(t);
    }
    assert_eq!(
        before, after,
        "a refused call of another dealer changed something"
    );
    // B's every-site listing of connections holds none of A's, while A's agent is
    // connected and listed for A.
    let agent = s.start_agent();
    let mut a_ops = s.server.ops(Some(&s.token)).await?;
    keyplane_testkit::server::eventually(
        "A's agent is listed for A",
        std::time::Duration::from_secs(10),
        || {
            let mut a_ops = a_ops.clone();
            async move {
                let listed = a_ops
                    .list_agent_connections(pb::ListAgentConnectionsRequest {
                        parent: "sites/-".into(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok((listed.agent_connections.len() == 1).then_some(()))
            }
        },
    )
    .await?;
    a_ops
        .get_site_ops_status(pb::GetSiteOpsStatusRequest {
            name: format!("{site}/opsStatus"),
        })
        .await?;
    let b_listed = s
        .server
        .ops(Some(&b_ops_token))
        .await?
        .list_agent_connections(pb::ListAgentConnectionsRequest {
            parent: "sites/-".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(b_listed.agent_connections.is_empty(), "{b_listed:?}");
    agent.stop().await?;
    Ok(())
}
