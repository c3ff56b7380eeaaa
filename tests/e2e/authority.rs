//! Seed 002 through gRPC: who may add users and change codes, per partition.

use crate::fixture::{Site, create_user_with, lock_scope, panel_scope, slot_on};
use keyplane_core::pin::Pin;
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::Admin;
use tonic::Code;

fn levels(list: &[(i32, pb::Level)]) -> Vec<pb::PartitionAuthority> {
    list.iter()
        .map(|(p, l)| pb::PartitionAuthority {
            partition: *p,
            level: *l as i32,
        })
        .collect()
}

async fn add_user(
    admin: &mut Admin,
    site: &str,
    name: &str,
    list: &[(i32, pb::Level)],
) -> Result<pb::User, tonic::Status> {
    admin
        .create_user(pb::CreateUserRequest {
            parent: site.to_owned(),
            user: Some(pb::User {
                display_name: name.into(),
                authorities: levels(list),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn add_code(
    admin: &mut Admin,
    user: &str,
    pin: &str,
    scope: pb::CredentialScope,
) -> Result<pb::Credential, tonic::Status> {
    admin
        .create_credential(pb::CreateCredentialRequest {
            parent: user.to_owned(),
            credential: Some(pb::Credential {
                pin: pin.into(),
                scope: Some(scope),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: false,
        })
        .await
        .map(|r| r.into_inner())
}

async fn change_pin(
    admin: &mut Admin,
    credential: &str,
    pin: &str,
) -> Result<pb::Credential, tonic::Status> {
    admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: credential.to_owned(),
                pin: pin.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["pin".into()],
            }),
        })
        .await
        .map(|r| r.into_inner())
}

fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, needle: &str) {
    let status = r.expect_err("must be denied");
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains(needle),
        "{:?} should mention {needle:?}",
        status.message()
    );
}

async fn add_partition(s: &mut Site, number: i32) -> anyhow::Result<()> {
    s.admin
        .create_partition(pb::CreatePartitionRequest {
            parent: s.site.clone(),
            partition: Some(pb::Partition {
                number,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn masters_managers_and_operators_follow_seed_002() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let token = s.token.clone();
    let alice = s.alice.clone(); // master in partition 1
    let alice_code = add_code(&mut s.admin, &alice, "4821", panel_scope(&[1])).await?;
    let mut as_master = s.server.admin_as(&token, &alice, None).await?;

    // A master adds a manager and an operator.
    let mia = add_user(&mut as_master, &site, "Mia", &[(1, pb::Level::Manager)]).await?;
    let otto = add_user(&mut as_master, &site, "Otto", &[(1, pb::Level::OperatorA)]).await?;
    assert_eq!(mia.authorities, levels(&[(1, pb::Level::Manager)]));
    let mia_code = add_code(&mut as_master, &mia.name, "5927", panel_scope(&[1])).await?;
    add_code(&mut as_master, &otto.name, "6138", panel_scope(&[1])).await?;
    // A master cannot create another master or an installer.
    denied(
        add_user(&mut as_master, &site, "Max", &[(1, pb::Level::Master)]).await,
        "master (level 1)",
    );
    denied(
        add_user(&mut as_master, &site, "Ian", &[(1, pb::Level::Installer)]).await,
        "installer",
    );

    // A manager tries to add a master, and to change the master's code: denied.
    let mut as_manager = s.server.admin_as(&token, &mia.name, None).await?;
    denied(
        add_user(&mut as_manager, &site, "Max", &[(1, pb::Level::Master)]).await,
        "manager (level 2)",
    );
    denied(
        add_user(&mut as_manager, &site, "Moe", &[(1, pb::Level::Manager)]).await,
        "manager (level 2)",
    );
    denied(
        change_pin(&mut as_manager, &alice_code.name, "7043").await,
        "master (level 1)",
    );
    // A manager changes their own code, and adds an operator below them.
    let changed = change_pin(&mut as_manager, &mia_code.name, "7043").await?;
    assert_eq!(slot_on(&changed, &s.panel), slot_on(&mia_code, &s.panel));
    add_user(&mut as_manager, &site, "Olga", &[(1, pb::Level::OperatorB)]).await?;

    // An operator adds nobody and cannot change even their own code.
    let mut as_operator = s.server.admin_as(&token, &otto.name, None).await?;
    denied(
        add_user(&mut as_operator, &site, "Ola", &[(1, pb::Level::OperatorC)]).await,
        "operator A",
    );
    let otto_codes = s
        .admin
        .list_credentials(pb::ListCredentialsRequest {
            parent: otto.name.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .credentials;
    denied(
        change_pin(&mut as_operator, &otto_codes[0].name, "8254").await,
        "own code",
    );

    // Deleting the master's code as manager is denied too, and changes nothing.
    let err = as_manager
        .delete_credential(pb::DeleteCredentialRequest {
            name: alice_code.name.clone(),
            etag: String::new(),
        })
        .await
        .expect_err("denied");
    assert_eq!(err.code(), Code::PermissionDenied);
    s.admin
        .get_credential(pb::GetCredentialRequest {
            name: alice_code.name.clone(),
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn partitions_bound_what_users_grant_and_change() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    add_partition(&mut s, 2).await?;
    let site = s.site.clone();
    let token = s.token.clone();
    let alice = s.alice.clone(); // master in partition 1 only
    let mut as_alice = s.server.admin_as(&token, &alice, None).await?;
    // A user with partition 1 only grants partition 2: denied.
    denied(
        add_user(&mut as_alice, &site, "Pat", &[(2, pb::Level::OperatorA)]).await,
        "partition 2",
    );
    denied(
        add_user(
            &mut as_alice,
            &site,
            "Pat",
            &[(1, pb::Level::OperatorA), (2, pb::Level::OperatorA)],
        )
        .await,
        "partition 2",
    );

    // A master of both partitions creates a code from partition 1 ...
    let bea = create_user_with(
        &mut s.admin,
        &site,
        "Bea",
        &[(1, pb::Level::Master), (2, pb::Level::Master)],
    )
    .await?;
    let pat = add_user(
        &mut s.admin,
        &site,
        "Pat",
        &[(1, pb::Level::OperatorA), (2, pb::Level::OperatorA)],
    )
    .await?;
    let mut bea_in_1 = s.server.admin_as(&token, &bea, Some(1)).await?;
    let code = add_code(&mut bea_in_1, &pat.name, "3862", panel_scope(&[1, 2])).await?;
    assert_eq!(code.created_partition, 1);
    // ... which cannot be changed or deleted from partition 2.
    let mut bea_in_2 = s.server.admin_as(&token, &bea, Some(2)).await?;
    denied(
        change_pin(&mut bea_in_2, &code.name, "3971").await,
        "partition 1",
    );
    let err = bea_in_2
        .delete_credential(pb::DeleteCredentialRequest {
            name: code.name.clone(),
            etag: String::new(),
        })
        .await
        .expect_err("wrong partition");
    assert_eq!(err.code(), Code::PermissionDenied);
    // From partition 1 it can.
    change_pin(&mut bea_in_1, &code.name, "3971").await?;
    // A user acting for another site's users is refused.
    let mut stranger = s
        .server
        .admin_as(
            &token,
            &format!("{site}/users/00000000-0000-4000-8000-000000000000"),
            None,
        )
        .await?;
    denied(
        add_user(&mut stranger, &site, "Zed", &[]).await,
        "does not exist",
    );
    // Panel codes need a level in the partition.
    let lena = add_user(&mut s.admin, &site, "Lena", &[(1, pb::Level::OperatorB)]).await?;
    let err = add_code(&mut s.admin, &lena.name, "2750", panel_scope(&[2]))
        .await
        .expect_err("no level");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("partition 2"), "{}", err.message());
    // A lock code needs no panel level.
    let lock = s.lock.clone();
    add_code(&mut s.admin, &lena.name, "2750", lock_scope(&[&lock])).await?;
    Ok(())
}

#[tokio::test]
async fn open_close_reporting_is_inherited_from_the_adder() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let token = s.token.clone();
    // The installer (dealer) sets reporting for anyone.
    let mut reporting_master =
        add_user(&mut s.admin, &site, "Rita", &[(1, pb::Level::Master)]).await?;
    assert!(!reporting_master.open_close_reporting);
    reporting_master = s
        .admin
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: reporting_master.name.clone(),
                open_close_reporting: true,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["open_close_reporting".into()],
            }),
        })
        .await?
        .into_inner();
    assert!(reporting_master.open_close_reporting);
    // A user added by that master gets the master's setting, whatever is asked.
    let mut as_rita = s
        .server
        .admin_as(&token, &reporting_master.name, None)
        .await?;
    let added = as_rita
        .create_user(pb::CreateUserRequest {
            parent: site.clone(),
            user: Some(pb::User {
                display_name: "Sam".into(),
                authorities: levels(&[(1, pb::Level::OperatorA)]),
                open_close_reporting: false,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert!(added.open_close_reporting);
    // Users cannot set it themselves.
    let err = as_rita
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: added.name.clone(),
                open_close_reporting: true,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["open_close_reporting".into()],
            }),
        })
        .await
        .expect_err("installer only");
    assert_eq!(err.code(), Code::PermissionDenied);
    Ok(())
}

#[tokio::test]
async fn a_full_panel_refuses_the_149th_code_of_a_master() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let token = s.token.clone();
    let alice = s.alice.clone();
    add_code(&mut s.admin, &alice, "4821", panel_scope(&[1])).await?;
    let mut as_master = s.server.admin_as(&token, &alice, None).await?;
    let staff = add_user(&mut as_master, &site, "Staff", &[(1, pb::Level::OperatorA)]).await?;
    let mut pins = (2000..9999).step_by(7).map(|n| n.to_string()).filter(|p| {
        p != "4821" && Pin::parse(p).is_ok_and(|pin| pin.check_not_guessable().is_ok())
    });
    // Installer (001) and master (002): 148 user numbers are left for the master to hand out.
    for i in 0..148 {
        let pin = pins.next().expect("enough pins");
        let c = add_code(&mut as_master, &staff.name, &pin, panel_scope(&[1]))
            .await
            .map_err(|e| anyhow::anyhow!("code {i}: {e}"))?;
        assert!(
            c.slots[0].display_slot.len() == 3,
            "user numbers are shown with 3 digits"
        );
    }
    let pin = pins.next().expect("enough pins");
    let err = add_code(&mut as_master, &staff.name, &pin, panel_scope(&[1]))
        .await
        .expect_err("panel full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("Panel"), "{}", err.message());
    Ok(())
}

#[tokio::test]
async fn sync_status_says_setup_needs_a_master() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    // The fixture's Alice is a master: setup complete.
    assert!(s.sync_status().await?.setup_issues.is_empty());
    s.admin
        .delete_user(pb::DeleteUserRequest {
            name: s.alice.clone(),
            etag: String::new(),
        })
        .await?;
    let issues = s.sync_status().await?.setup_issues;
    assert_eq!(issues.len(), 1);
    assert!(issues[0].contains("master"), "{issues:?}");
    Ok(())
}

/// A lock in partition 2.
async fn lock_in_partition_2(s: &mut Site) -> anyhow::Result<pb::Device> {
    Ok(s.admin
        .create_device(pb::CreateDeviceRequest {
            parent: s.site.clone(),
            device: Some(pb::Device {
                display_name: "Office door".into(),
                model: "zwave-lock-30".into(),
                partition: 2,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner())
}

/// Calls that change or delete an existing code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CodeCall {
    UpdateCredential,
    DeleteCredential,
    DeleteUser,
}

async fn code_call(
    admin: &mut Admin,
    call: CodeCall,
    user: &str,
    credential: &str,
) -> Result<(), tonic::Status> {
    match call {
        CodeCall::UpdateCredential => change_pin(admin, credential, "6284").await.map(drop),
        CodeCall::DeleteCredential => admin
            .delete_credential(pb::DeleteCredentialRequest {
                name: credential.to_owned(),
                etag: String::new(),
            })
            .await
            .map(drop),
        CodeCall::DeleteUser => admin
            .delete_user(pb::DeleteUserRequest {
                name: user.to_owned(),
                etag: String::new(),
            })
            .await
            .map(drop),
    }
}

#[tokio::test]
async fn deleting_a_user_passes_every_rule_deleting_their_codes() -> anyhow::Result<()> {
    use CodeCall::*;
    let mut s = Site::new().await?;
    add_partition(&mut s, 2).await?;
    let lock2 = lock_in_partition_2(&mut s).await?;
    let site = s.site.clone();
    let token = s.token.clone();
    let bea = create_user_with(
        &mut s.admin,
        &site,
        "Bea",
        &[(1, pb::Level::Master), (2, pb::Level::Master)],
    )
    .await?;
    let alice = s.alice.clone(); // master in partition 1 only
    // Pat's code was created in partition 1; Quinn (partition 1 only) has a code on a
    // lock of partition 2; Rex holds both partitions; Otto is an operator.
    let pat = add_user(
        &mut s.admin,
        &site,
        "Pat",
        &[(1, pb::Level::OperatorA), (2, pb::Level::OperatorA)],
    )
    .await?
    .name;
    let mut bea_in_1 = s.server.admin_as(&token, &bea, Some(1)).await?;
    let pat_code = add_code(&mut bea_in_1, &pat, "3862", panel_scope(&[1])).await?;
    assert_eq!(pat_code.created_partition, 1);
    let quinn = add_user(&mut s.admin, &site, "Quinn", &[(1, pb::Level::OperatorA)])
        .await?
        .name;
    let quinn_code = add_code(&mut s.admin, &quinn, "5917", lock_scope(&[&lock2])).await?;
    let rex = add_user(
        &mut s.admin,
        &site,
        "Rex",
        &[(1, pb::Level::OperatorB), (2, pb::Level::OperatorB)],
    )
    .await?
    .name;
    let rex_code = add_code(&mut s.admin, &rex, "7305", panel_scope(&[1])).await?;
    let otto = add_user(&mut s.admin, &site, "Otto", &[(1, pb::Level::OperatorA)])
        .await?
        .name;

    let bea_in_2 = s.server.admin_as(&token, &bea, Some(2)).await?;
    let dealer_in_2 = s.server.admin_in_partition(&token, 2).await?;
    let as_alice = s.server.admin_as(&token, &alice, None).await?;
    let as_otto = s.server.admin_as(&token, &otto, None).await?;

    // (actor, call, target user, target code, message needles, words it must not use)
    type Row<'a> = (
        &'a str,
        Admin,
        CodeCall,
        &'a str,
        &'a str,
        &'a [&'a str],
        &'a [&'a str],
    );
    let origin: &[&str] = &["partition 1", "keyplane-acting-partition: 1"];
    let names_quinn_code: &[&str] = &["partition 2", "delete", &quinn_code.name];
    let rows: Vec<Row> = vec![
        // The partition of origin, from a partition the actor does hold.
        (
            "master of 1,2 acting from 2",
            bea_in_2.clone(),
            UpdateCredential,
            &pat,
            &pat_code.name,
            origin,
            &[],
        ),
        (
            "master of 1,2 acting from 2",
            bea_in_2.clone(),
            DeleteCredential,
            &pat,
            &pat_code.name,
            origin,
            &[],
        ),
        (
            "master of 1,2 acting from 2",
            bea_in_2.clone(),
            DeleteUser,
            &pat,
            &pat_code.name,
            origin,
            &[],
        ),
        (
            "dealer acting from 2",
            dealer_in_2.clone(),
            UpdateCredential,
            &pat,
            &pat_code.name,
            origin,
            &[],
        ),
        (
            "dealer acting from 2",
            dealer_in_2.clone(),
            DeleteCredential,
            &pat,
            &pat_code.name,
            origin,
            &[],
        ),
        (
            "dealer acting from 2",
            dealer_in_2.clone(),
            DeleteUser,
            &pat,
            &pat_code.name,
            origin,
            &[],
        ),
        // A code on a device of a partition the actor lacks, owned by a user in reach.
        (
            "master of 1",
            as_alice.clone(),
            UpdateCredential,
            &quinn,
            &quinn_code.name,
            &["partition 2"],
            &["grant"],
        ),
        (
            "master of 1",
            as_alice.clone(),
            DeleteCredential,
            &quinn,
            &quinn_code.name,
            &["partition 2", "delete"],
            &["grant"],
        ),
        (
            "master of 1",
            as_alice.clone(),
            DeleteUser,
            &quinn,
            &quinn_code.name,
            names_quinn_code,
            &["grant"],
        ),
        // A user holding a partition the actor lacks.
        (
            "master of 1",
            as_alice.clone(),
            DeleteUser,
            &rex,
            &rex_code.name,
            &["partition 2", "delete"],
            &["grant"],
        ),
        // Operators delete nothing, and are told so.
        (
            "operator",
            as_otto.clone(),
            DeleteCredential,
            &rex,
            &rex_code.name,
            &["operator A", "delete"],
            &[],
        ),
        (
            "operator",
            as_otto.clone(),
            DeleteUser,
            &rex,
            &rex_code.name,
            &["operator A", "delete"],
            &[],
        ),
        (
            "operator",
            as_otto.clone(),
            DeleteUser,
            &quinn,
            &quinn_code.name,
            &["operator A", "delete"],
            &[],
        ),
    ];
    for (who, mut admin, call, user, code, needles, never) in rows {
        let status = code_call(&mut admin, call, user, code)
            .await
            .expect_err(&format!("{who}: {call:?} on {user} must be refused"));
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{who}: {call:?}: {}",
            status.message()
        );
        for n in needles {
            assert!(
                status.message().contains(n),
                "{who}: {call:?}: {:?} should mention {n:?}",
                status.message()
            );
        }
        for n in never {
            assert!(
                !status.message().contains(n),
                "{who}: {call:?}: {:?} must not speak of {n:?}",
                status.message()
            );
        }
        // Nothing was deleted.
        s.admin
            .get_user(pb::GetUserRequest {
                name: user.to_owned(),
            })
            .await?;
        s.admin
            .get_credential(pb::GetCredentialRequest {
                name: code.to_owned(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("{who}: {call:?} deleted {code}: {e}"))?;
    }

    // From the partition of origin, or as the dealer with no partition named, it works.
    code_call(&mut bea_in_1, DeleteUser, &pat, &pat_code.name).await?;
    code_call(&mut s.admin, DeleteUser, &quinn, &quinn_code.name).await?;
    for gone in [&pat_code.name, &quinn_code.name] {
        let err = s
            .admin
            .get_credential(pb::GetCredentialRequest {
                name: gone.to_string(),
            })
            .await
            .expect_err("deleted with its user");
        assert_eq!(err.code(), Code::NotFound);
    }
    Ok(())
}

/// Every call that takes an actor, aimed at real targets.
#[derive(Debug, Clone, Copy)]
enum AnyCall {
    GetSite,
    ListUsers,
    CreateUser,
    UpdateUser,
    DeleteUser,
    CreateCredential,
    UpdateCredential,
    DeleteCredential,
    UpdatePersonalAccessPlan,
    ClearPersonalAccessPlan,
    ClaimLocalCode,
    RemoveLocalCode,
    ResolveDrift,
}

struct Targets {
    site: String,
    user: String,
    code: String,
    lock: String,
}

async fn any_call(admin: &mut Admin, call: AnyCall, t: &Targets) -> Result<(), tonic::Status> {
    use AnyCall::*;
    let plan = format!("{}/personalAccessPlan", t.user);
    let local = format!("{}/localCodes/7", t.lock);
    match call {
        GetSite => admin
            .get_site(pb::GetSiteRequest {
                name: t.site.clone(),
            })
            .await
            .map(drop),
        ListUsers => admin
            .list_users(pb::ListUsersRequest {
                parent: t.site.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        CreateUser => add_user(admin, &t.site, "Nina", &[(1, pb::Level::OperatorA)])
            .await
            .map(drop),
        UpdateUser => admin
            .update_user(pb::UpdateUserRequest {
                user: Some(pb::User {
                    name: t.user.clone(),
                    authorities: levels(&[(1, pb::Level::OperatorB)]),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["authorities".into()],
                }),
            })
            .await
            .map(drop),
        DeleteUser => code_call(admin, CodeCall::DeleteUser, &t.user, &t.code).await,
        CreateCredential => add_code(admin, &t.user, "8163", panel_scope(&[1]))
            .await
            .map(drop),
        UpdateCredential => code_call(admin, CodeCall::UpdateCredential, &t.user, &t.code).await,
        DeleteCredential => code_call(admin, CodeCall::DeleteCredential, &t.user, &t.code).await,
        UpdatePersonalAccessPlan => admin
            .update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
                plan: Some(pb::PersonalAccessPlan {
                    name: plan,
                    access_points: vec![t.lock.clone()],
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["access_points".into()],
                }),
            })
            .await
            .map(drop),
        ClearPersonalAccessPlan => admin
            .clear_personal_access_plan(pb::ClearPersonalAccessPlanRequest {
                name: plan,
                etag: String::new(),
            })
            .await
            .map(drop),
        ClaimLocalCode => admin
            .claim_local_code(pb::ClaimLocalCodeRequest {
                name: local,
                user: t.user.clone(),
                panel_partitions: Vec::new(),
            })
            .await
            .map(drop),
        RemoveLocalCode => admin
            .remove_local_code(pb::RemoveLocalCodeRequest { name: local })
            .await
            .map(drop),
        ResolveDrift => admin
            .resolve_drift(pb::ResolveDriftRequest {
                credential: t.code.clone(),
                device: t.lock.clone(),
                resolution: pb::resolve_drift_request::Resolution::Reapply as i32,
            })
            .await
            .map(drop),
    }
}

#[tokio::test]
async fn users_act_only_from_partitions_they_hold() -> anyhow::Result<()> {
    use AnyCall::*;
    let mut s = Site::new().await?;
    add_partition(&mut s, 2).await?;
    let site = s.site.clone();
    let token = s.token.clone();
    let lock = s.lock.clone();
    let alice = s.alice.clone(); // master in partition 1 only
    let mia = add_user(&mut s.admin, &site, "Mia", &[(1, pb::Level::Manager)])
        .await?
        .name;
    let otto = add_user(&mut s.admin, &site, "Otto", &[(1, pb::Level::OperatorA)])
        .await?
        .name;
    // A code the dealer created from partition 2, on Otto's partition-1 panel code.
    let mut dealer_in_2 = s.server.admin_in_partition(&token, 2).await?;
    let code = add_code(&mut dealer_in_2, &otto, "4729", panel_scope(&[1])).await?;
    assert_eq!(code.created_partition, 2);
    add_code(&mut s.admin, &otto, "5830", lock_scope(&[&lock])).await?;
    let targets = Targets {
        site: site.clone(),
        user: otto.clone(),
        code: code.name.clone(),
        lock: lock.name.clone(),
    };
    let snapshot = |admin: Admin| {
        let otto = otto.clone();
        let site = site.clone();
        async move {
            let mut admin = admin;
            let users = admin
                .list_users(pb::ListUsersRequest {
                    parent: site,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .users;
            let codes = admin
                .list_credentials(pb::ListCredentialsRequest {
                    parent: otto.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .credentials;
            let plan = admin
                .get_personal_access_plan(pb::GetPersonalAccessPlanRequest {
                    name: format!("{otto}/personalAccessPlan"),
                })
                .await?
                .into_inner();
            anyhow::Ok(format!("{users:?} {codes:?} {plan:?}"))
        }
    };
    let before = snapshot(s.admin.clone()).await?;
    let calls = [
        GetSite,
        ListUsers,
        CreateUser,
        UpdateUser,
        DeleteUser,
        CreateCredential,
        UpdateCredential,
        DeleteCredential,
        UpdatePersonalAccessPlan,
        ClearPersonalAccessPlan,
        ClaimLocalCode,
        RemoveLocalCode,
        ResolveDrift,
    ];
    for (who, user) in [("manager of 1", &mia), ("master of 1", &alice)] {
        let mut admin = s.server.admin_as(&token, user, Some(2)).await?;
        for call in calls {
            let status = any_call(&mut admin, call, &targets)
                .await
                .expect_err(&format!("{who} acting from 2: {call:?} must be refused"));
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{who}: {call:?}: {}",
                status.message()
            );
            for needle in ["keyplane-acting-partition", "partition 2", "hold: 1"] {
                assert!(
                    status.message().contains(needle),
                    "{who}: {call:?}: {:?} should mention {needle:?}",
                    status.message()
                );
            }
        }
    }
    assert_eq!(
        snapshot(s.admin.clone()).await?,
        before,
        "refused calls changed something"
    );

    // From the partition they hold, a master's code is recorded as created there.
    let mut alice_in_1 = s.server.admin_as(&token, &alice, Some(1)).await?;
    let made = add_code(&mut alice_in_1, &otto, "6941", panel_scope(&[1])).await?;
    assert_eq!(made.created_partition, 1);
    // With no header, a user holding one partition acts from it.
    let mut as_alice = s.server.admin_as(&token, &alice, None).await?;
    let made = add_code(&mut as_alice, &mia, "7052", lock_scope(&[&lock])).await?;
    assert_eq!(made.created_partition, 1);
    // The dealer names only partitions the site has.
    let mut dealer_in_3 = s.server.admin_in_partition(&token, 3).await?;
    let err = add_code(&mut dealer_in_3, &otto, "8274", panel_scope(&[1]))
        .await
        .expect_err("no partition 3");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("keyplane-acting-partition"),
        "{}",
        err.message()
    );
    Ok(())
}

/// Codes programmed at the device and drift are reached through RemoveLocalCode and
/// ResolveDrift: both pass the same rules as deleting and changing a code.
#[tokio::test]
async fn local_codes_and_drift_follow_the_same_rules() -> anyhow::Result<()> {
    use keyplane_store::{Observed, ObservedState};
    let mut s = Site::new().await?;
    let (site, alice) = (s.site.clone(), s.alice.clone());
    let (panel, lock) = (s.panel.clone(), s.lock.clone());
    let bob = add_user(&mut s.admin, &site, "Bob", &[(1, pb::Level::Manager)])
        .await?
        .name;
    let olga = add_user(&mut s.admin, &site, "Olga", &[(1, pb::Level::OperatorA)])
        .await?
        .name;
    let alices = add_code(&mut s.admin, &alice, "5827", lock_scope(&[&lock])).await?;
    let alice_slot = slot_on(&alices, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    // What the agent reported: a hand-programmed code on each device, and Alice's
    // lock slot changed by hand.
    let id = |name: &str| uuid::Uuid::parse_str(name.rsplit('/').next().unwrap_or_default());
    let site_id = id(&site)?;
    let observe = |slot, state, pin: &str| Observed {
        slot,
        state,
        pin: Pin::parse(pin).ok(),
    };
    s.server
        .store
        .observed_record(
            site_id,
            id(&panel.name)?,
            &[observe(20, ObservedState::Foreign, "3916")],
        )
        .await?;
    s.server
        .store
        .observed_record(
            site_id,
            id(&lock.name)?,
            &[
                observe(20, ObservedState::Foreign, "8452"),
                observe(alice_slot, ObservedState::Drifted, "6071"),
            ],
        )
        .await?;
    let token = s.token.clone();
    let mut as_olga = s.server.admin_as(&token, &olga, Some(1)).await?;
    let mut as_bob = s.server.admin_as(&token, &bob, Some(1)).await?;
    let mut as_alice = s.server.admin_as(&token, &alice, Some(1)).await?;
    let remove = |device: &pb::Device| pb::RemoveLocalCodeRequest {
        name: format!("{}/localCodes/20", device.name),
    };
    let reapply = pb::ResolveDriftRequest {
        credential: alices.name.clone(),
        device: lock.name.clone(),
        resolution: pb::resolve_drift_request::Resolution::Reapply as i32,
    };
    let revision = |s: &Site| {
        let store = s.server.store.clone();
        async move { Ok::<_, anyhow::Error>(store.site_revisions(&[site_id]).await?[0].1) }
    };
    let before = revision(&s).await?;

    denied(
        as_olga.remove_local_code(remove(&lock)).await,
        "only installer, master and manager codes",
    );
    denied(
        as_alice.remove_local_code(remove(&panel)).await,
        "installer",
    );
    denied(as_bob.remove_local_code(remove(&panel)).await, "installer");
    denied(as_olga.resolve_drift(reapply.clone()).await, "operator");
    denied(as_bob.resolve_drift(reapply.clone()).await, "master");
    assert_eq!(revision(&s).await?, before, "refusals change nothing");

    // Within their levels they may.
    as_bob.remove_local_code(remove(&lock)).await?;
    as_alice.resolve_drift(reapply.clone()).await?;
    s.admin.remove_local_code(remove(&panel)).await?;
    assert!(revision(&s).await? > before);
    Ok(())
}

/// Configuring the site is installer work: a site user acting through the back office
/// is refused on every call that does it, and nothing changes.
#[tokio::test]
async fn site_users_do_not_configure_the_site() -> anyhow::Result<()> {
    let s = Site::new().await?;
    let (site, alice, lock) = (s.site.clone(), s.alice.clone(), s.lock.clone());
    let token = s.token.clone();
    let mut a = s.server.admin_as(&token, &alice, Some(1)).await?;
    let client = s.server.db.client().await?;
    let count = |sql: &'static str| {
        let client = &client;
        async move { Ok::<i64, anyhow::Error>(client.query_one(sql, &[]).await?.get(0)) }
    };
    let before = (
        count("SELECT revision FROM site").await?,
        count("SELECT count(*) FROM audit_log").await?,
    );
    let site_pb = || pb::Site {
        name: site.clone(),
        time_zone: "UTC".into(),
        ..Default::default()
    };
    let device_pb = || pb::Device {
        name: lock.name.clone(),
        display_name: "Back door".into(),
        model: "zwave-lock-30".into(),
        partition: 1,
        ..Default::default()
    };
    let refusals: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "CreateSite",
            a.create_site(pb::CreateSiteRequest {
                site: Some(site_pb()),
                request_id: String::new(),
            })
            .await
            .map(drop),
        ),
        (
            "UpdateSite",
            a.update_site(pb::UpdateSiteRequest {
                site: Some(site_pb()),
                update_mask: None,
            })
            .await
            .map(drop),
        ),
        (
            "DeleteSite",
            a.delete_site(pb::DeleteSiteRequest {
                name: site.clone(),
                etag: String::new(),
            })
            .await
            .map(drop),
        ),
        (
            "CreatePartition",
            a.create_partition(pb::CreatePartitionRequest {
                parent: site.clone(),
                partition: Some(pb::Partition {
                    number: 2,
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .map(drop),
        ),
        (
            "UpdatePartition",
            a.update_partition(pb::UpdatePartitionRequest {
                partition: Some(pb::Partition {
                    name: format!("{site}/partitions/1"),
                    display_name: "Upstairs".into(),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await
            .map(drop),
        ),
        (
            "DeletePartition",
            a.delete_partition(pb::DeletePartitionRequest {
                name: format!("{site}/partitions/1"),
                etag: String::new(),
            })
            .await
            .map(drop),
        ),
        (
            "CreateDevice",
            a.create_device(pb::CreateDeviceRequest {
                parent: site.clone(),
                device: Some(device_pb()),
                request_id: String::new(),
            })
            .await
            .map(drop),
        ),
        (
            "UpdateDevice",
            a.update_device(pb::UpdateDeviceRequest {
                device: Some(device_pb()),
                update_mask: None,
            })
            .await
            .map(drop),
        ),
        (
            "DeleteDevice",
            a.delete_device(pb::DeleteDeviceRequest {
                name: lock.name.clone(),
                etag: String::new(),
            })
            .await
            .map(drop),
        ),
        (
            "IssueAgentToken",
            a.issue_agent_token(pb::IssueAgentTokenRequest { site: site.clone() })
                .await
                .map(drop),
        ),
        (
            "CreateAccessPlan",
            a.create_access_plan(pb::CreateAccessPlanRequest {
                parent: site.clone(),
                plan: Some(pb::StandardAccessPlan {
                    display_name: "Staff".into(),
                    devices: vec![lock.name.clone()],
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .map(drop),
        ),
        (
            "PutHoliday",
            a.put_holiday(pb::PutHolidayRequest {
                holiday: Some(pb::Holiday {
                    name: format!("{site}/holidays/2026-12-25"),
                    ..Default::default()
                }),
            })
            .await
            .map(drop),
        ),
        (
            "LockdownDoors",
            a.lockdown_doors(pb::LockdownDoorsRequest { site: site.clone() })
                .await
                .map(drop),
        ),
        (
            "ReleaseLockdown",
            a.release_lockdown(pb::ReleaseLockdownRequest { site: site.clone() })
                .await
                .map(drop),
        ),
    ];
    for (call, result) in refusals {
        let status = result.expect_err(call);
        assert_eq!(status.code(), Code::PermissionDenied, "{call}: {status:?}");
        assert!(
            status.message().contains("installer work"),
            "{call}: {}",
            status.message()
        );
    }
    let after = (
        count("SELECT revision FROM site").await?,
        count("SELECT count(*) FROM audit_log").await?,
    );
    assert_eq!(before, after, "a refused call changes nothing");
    // Reading is not configuring.
    a.get_site(pb::GetSiteRequest { name: site.clone() })
        .await?;
    Ok(())
}
