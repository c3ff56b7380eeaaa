//! Bad input gets a precise status and changes nothing, in the database or on devices.

use crate::fixture::{Site, create_device, create_user, lock_scope, panel_scope};
use keyplane_proto::v1 as pb;
use tonic::Code;

/// Everything a refused request could have changed.
async fn fingerprint(s: &mut Site) -> anyhow::Result<String> {
    let client = s.server.db.client().await?;
    let row = client
        .query_one(
            "SELECT (SELECT string_agg(revision::text, ',') FROM site),
                    (SELECT count(*) FROM credential)::text,
                    (SELECT string_agg(device_id::text || ':' || slot::text, ',' ORDER BY device_id, slot) FROM slot_assignment),
                    (SELECT count(*) FROM site_change)::text,
                    (SELECT count(*) FROM site_user)::text,
                    (SELECT count(*) FROM device)::text",
            &[],
        )
        .await?;
    let parts: Vec<Option<String>> = (0..6).map(|i| row.get(i)).collect();
    let panel = s.slots(&s.panel.clone())?;
    let lock = s.slots(&s.lock.clone())?;
    Ok(format!("{parts:?} {panel:?} {lock:?}"))
}

fn assert_status(
    result: Result<pb::Credential, tonic::Status>,
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
        !status.message().contains(pin),
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
    let before = fingerprint(&mut s).await?;

    // Letters in a PIN.
    let r = s.credential(&alice, "48a1", lock_scope(&[&lock])).await;
    assert_status(r, Code::InvalidArgument, &["digits"], "48a1");
    // Too long for a scoped device: names the device and its range.
    let r = s.credential(&alice, "918273", lock_scope(&[&lock])).await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["Front door", &lock.name, "4 digits"],
        "918273",
    );
    let r = s.credential(&alice, "51273", panel_scope(&[1])).await;
    assert_status(r, Code::InvalidArgument, &["Panel", "4 digits"], "51273");
    // Guessable codes, and the installer's factory default.
    for guessable in ["1111", "1234", "9876", "4140"] {
        let r = s.credential(&alice, guessable, lock_scope(&[&lock])).await;
        assert_status(r, Code::InvalidArgument, &["guess"], guessable);
    }
    // Duplicate PIN on one device.
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    let before_bob = fingerprint(&mut s).await?;
    let r = s.credential(&bob, "9930", lock_scope(&[&lock])).await;
    assert_status(r, Code::AlreadyExists, &["Front door"], "9930");
    // Unknown ids.
    let ghost_user = format!("{site}/users/00000000-0000-4000-8000-000000000000");
    let r = s
        .credential(&ghost_user, "2468", lock_scope(&[&lock]))
        .await;
    assert_status(r, Code::NotFound, &["user"], "2468");
    let ghost_lock = pb::CredentialScope {
        locks: vec![format!(
            "{site}/devices/00000000-0000-4000-8000-000000000000"
        )],
        ..Default::default()
    };
    let r = s.credential(&bob, "2468", ghost_lock).await;
    assert_status(r, Code::NotFound, &["device"], "2468");
    let r = s.credential(&bob, "2468", panel_scope(&[5])).await;
    assert_status(r, Code::NotFound, &["partition"], "2468");
    // A partition number no panel has.
    let r = s.credential(&bob, "2468", panel_scope(&[9])).await;
    assert_status(r, Code::InvalidArgument, &["1..8"], "2468");
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
    assert_status(r, Code::InvalidArgument, &["lock"], "2468");
    // No scope at all.
    let r = s
        .credential(&bob, "2468", pb::CredentialScope::default())
        .await;
    assert_status(r, Code::InvalidArgument, &["scope"], "2468");
    // Malformed names.
    let r = s
        .credential("sites/nope/users/x", "2468", lock_scope(&[&lock]))
        .await;
    assert_status(r, Code::InvalidArgument, &["parent"], "2468");
    assert_eq!(
        fingerprint(&mut s).await?,
        before_bob,
        "refusals changed something"
    );

    // Malformed page tokens.
    let err = s
        .admin
        .list_users(pb::ListUsersRequest {
            parent: site.clone(),
            page_size: 1,
            page_token: "not-a-token".into(),
        })
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("page_token"));
    let _ = before;
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
    let before = fingerprint(&mut s).await?;
    let r = s.credential(&user, "9817", lock_scope(&[&lock])).await;
    assert_status(
        r,
        Code::ResourceExhausted,
        &["Front door", "no free slot"],
        "9817",
    );
    assert_eq!(fingerprint(&mut s).await?, before);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn tokens_and_tenancy() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let lock = s.lock.clone();
    // No token.
    let mut anonymous = s.server.admin(None).await?;
    let err = anonymous
        .list_sites(pb::ListSitesRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    // Unknown token.
    let mut forged = s.server.admin(Some("kpd_forged")).await?;
    let err = forged
        .get_site(pb::GetSiteRequest { name: site.clone() })
        .await
        .expect_err("forged");
    assert_eq!(err.code(), Code::Unauthenticated);
    // Another dealer sees nothing of this one and cannot touch it.
    let other_token = s.server.dealer("Dealer Two").await?;
    let mut other = s.server.admin(Some(&other_token)).await?;
    let before = fingerprint(&mut s).await?;
    let err = other
        .get_site(pb::GetSiteRequest { name: site.clone() })
        .await
        .expect_err("other dealer");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        other
            .list_sites(pb::ListSitesRequest::default())
            .await?
            .into_inner()
            .sites
            .is_empty()
    );
    let err = other
        .create_credential(pb::CreateCredentialRequest {
            parent: s.alice.clone(),
            credential: Some(pb::Credential {
                pin: "2468".into(),
                scope: Some(lock_scope(&[&lock])),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect_err("other dealer write");
    assert_eq!(err.code(), Code::NotFound);
    let err = other
        .delete_device(pb::DeleteDeviceRequest {
            name: lock.name.clone(),
            etag: String::new(),
        })
        .await
        .expect_err("other dealer delete");
    assert_eq!(err.code(), Code::NotFound);
    let err = create_device(&mut other, &site, "Sneaky", "zwave-lock-30")
        .await
        .expect_err("other dealer device");
    assert!(err.to_string().contains("not found"), "{err}");
    let err = other
        .issue_agent_token(pb::IssueAgentTokenRequest { site: site.clone() })
        .await
        .expect_err("other dealer agent token");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(fingerprint(&mut s).await?, before);
    Ok(())
}
