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
