//! Agent enrollment and mutual TLS end to end, with certificates made in the test:
//! the certificate alone decides the site an agent receives, revocation and a new
//! session close a live stream within a second (on whichever replica holds it), and
//! an agent whose certificate expired enrolls again with a new code.

use crate::fixture::{Site, create_device, lock_scope, slot_on};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::{AgentStream, TestAgent, eventually};
use std::time::Duration;
use tonic::Code;

/// How long a revoked or replaced stream may live on (the documented bound).
pub(crate) const CLOSE_BOUND: Duration = Duration::from_secs(1);

/// Reads the stream until it ends; fails when that takes longer than `bound`.
pub(crate) async fn ended_within(
    stream: &mut AgentStream,
    bound: Duration,
) -> anyhow::Result<tonic::Status> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => anyhow::bail!("the stream was still open {bound:?} later"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return Ok(tonic::Status::ok("ended")),
            Ok(Err(status)) => return Ok(status),
        }
    }
}

/// The first message: the snapshot the server sends after Hello.
pub(crate) async fn snapshot(stream: &mut AgentStream) -> anyhow::Result<pb::DesiredSnapshot> {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await?? {
        Some(pb::ServerMessage {
            msg: Some(pb::server_message::Msg::Snapshot(s)),
        }) => Ok(s),
        other => anyhow::bail!("expected a snapshot, got {other:?}"),
    }
}

#[tokio::test]
async fn an_enrolled_agent_syncs_over_mutual_tls_and_a_code_works_once() -> anyhow::Result<()> {
    let mut site = Site::tls().await?;
    let mut admin = site.admin.clone();
    let code = site.server.enrollment_code(&mut admin, &site.site).await?;
    let code_file = site.dir.path().join("enrollment.code");
    std::fs::write(&code_file, &code)?;
    let mut config = site.agent_config();
    config.token = String::new();
    config.enrollment_code_file = Some(code_file);
    let agent = TestAgent::start_config(
        config,
        site.dir.path(),
        Box::new(keyplane_agent::SimulatorFactory::new(
            site.dir.path().join("devices"),
        )),
    );
    let lock = site.lock.clone();
    let alice = site.alice.clone();
    let cred = site
        .credential(&alice, "9930", lock_scope(&[&lock]))
        .await?;
    let slot = slot_on(&cred, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    eventually("the lock holds the code", Duration::from_secs(20), || {
        let slots = site.slots(&lock);
        async move { Ok(slots?.get(&slot).filter(|c| *c == "9930").map(|_| ())) }
    })
    .await?;
    let identity = keyplane_agent::identity::load(&site.dir.path().join("state"))?
        .ok_or_else(|| anyhow::anyhow!("no identity stored"))?;
    assert_eq!(identity.meta.site, site.site);
    assert!(identity.meta.agent.starts_with("agents/"));
    // Used up.
    let again = site
        .server
        .enroll(&code)
        .await
        .expect_err("a code works once");
    let status = again
        .downcast_ref::<tonic::Status>()
        .ok_or_else(|| anyhow::anyhow!("{again:#}"))?;
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    agent.stop().await
}

#[tokio::test]
async fn an_agent_with_another_sites_certificate_receives_nothing_of_this_site()
-> anyhow::Result<()> {
    let site = Site::tls().await?;
    let mut admin = site.admin.clone();
    // A second site of the same dealer, with one device of its own.
    let other = admin
        .create_site(pb::CreateSiteRequest {
            site: Some(pb::Site {
                display_name: "Bob's shop".into(),
                time_zone: "Europe/Paris".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .name;
    let panel = create_device(&mut admin, &other, "Panel", "vista-128bpt").await?;
    let code = site.server.enrollment_code(&mut admin, &other).await?;
    let bob = site.server.enroll(&code).await?;
    assert_eq!(bob.meta.site, other);

    // Naming this site in Hello is refused: the certificate decides.
    let refused = match site.server.sync(Some(&bob), None, &site.site).await {
        Err(status) => status,
        Ok((mut stream, _tx)) => ended_within(&mut stream, Duration::from_secs(10)).await?,
    };
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");

    // Naming its own site, it receives its own devices and nothing of this site.
    let (mut stream, _tx) = site.server.sync(Some(&bob), None, &other).await?;
    let snap = snapshot(&mut stream).await?;
    let devices: Vec<&str> = snap.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(devices, vec![panel.name.as_str()]);
    assert!(
        snap.slots.iter().all(|s| s.device.starts_with(&other)),
        "only its own site's slots"
    );
    Ok(())
}

#[tokio::test]
async fn a_tls_client_without_certificate_or_token_is_refused() -> anyhow::Result<()> {
    let site = Site::tls().await?;
    let status = match site.server.sync(None, None, &site.site).await {
        Err(status) => status,
        Ok((mut stream, _tx)) => ended_within(&mut stream, Duration::from_secs(10)).await?,
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    Ok(())
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_and_its_stream_closed_within_a_second_on_another_replica()
-> anyhow::Result<()> {
    let site = Site::tls().await?;
    let replica = site.server.replica().await?;
    let mut admin = site.admin.clone();
    let code = site.server.enrollment_code(&mut admin, &site.site).await?;
    let identity = site.server.enroll(&code).await?;
    // The stream is held by the replica; the revocation goes through the first server.
    let (mut stream, _tx) = replica.sync(Some(&identity), None, &site.site).await?;
    snapshot(&mut stream).await?;
    admin
        .revoke_agents(pb::RevokeAgentsRequest {
            site: site.site.clone(),
        })
        .await?;
    let status = ended_within(&mut stream, CLOSE_BOUND).await?;
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    assert!(status.message().contains("revoked"), "{status}");

    // And it cannot come back, on either server.
    for server in [&site.server, &replica] {
        let status = match server.sync(Some(&identity), None, &site.site).await {
            Err(status) => status,
            Ok((mut stream, _tx)) => ended_within(&mut stream, Duration::from_secs(10)).await?,
        };
        assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    }
    Ok(())
}

#[tokio::test]
async fn enrolling_again_closes_the_earlier_agents_stream_within_a_second() -> anyhow::Result<()> {
    let site = Site::tls().await?;
    let replica = site.server.replica().await?;
    let mut admin = site.admin.clone();
    let code = site.server.enrollment_code(&mut admin, &site.site).await?;
    let first = site.server.enroll(&code).await?;
    let (mut stream, _tx) = replica.sync(Some(&first), None, &site.site).await?;
    snapshot(&mut stream).await?;
    let code = site.server.enrollment_code(&mut admin, &site.site).await?;
    let second = site.server.enroll(&code).await?;
    let status = ended_within(&mut stream, CLOSE_BOUND).await?;
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    let (mut stream, _tx) = site.server.sync(Some(&second), None, &site.site).await?;
    snapshot(&mut stream).await?;
    Ok(())
}

#[tokio::test]
async fn a_reissued_token_closes_the_stream_it_opened_within_a_second() -> anyhow::Result<()> {
    let site = Site::tls().await?;
    let mut admin = site.admin.clone();
    let (mut stream, _tx) = site
        .server
        .sync(None, Some(&site.agent_token), &site.site)
        .await?;
    snapshot(&mut stream).await?;
    // Issuing a new token revokes the one the stream was opened with.
    site.server.agent_token(&mut admin, &site.site).await?;
    let status = ended_within(&mut stream, CLOSE_BOUND).await?;
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    Ok(())
}

#[tokio::test]
async fn a_deleted_site_closes_its_stream_within_a_second() -> anyhow::Result<()> {
    let site = Site::tls().await?;
    let replica = site.server.replica().await?;
    let mut admin = site.admin.clone();
    // A site with nothing in it yet (a site is deleted once emptied).
    let empty = admin
        .create_site(pb::CreateSiteRequest {
            site: Some(pb::Site {
                display_name: "Empty".into(),
                time_zone: "Europe/Paris".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    let code = site.server.enrollment_code(&mut admin, &empty.name).await?;
    let identity = site.server.enroll(&code).await?;
    let (mut stream, _tx) = replica.sync(Some(&identity), None, &empty.name).await?;
    snapshot(&mut stream).await?;
    admin
        .delete_site(pb::DeleteSiteRequest {
            name: empty.name.clone(),
            etag: empty.etag,
        })
        .await?;
    let status = ended_within(&mut stream, CLOSE_BOUND).await?;
    assert_eq!(status.code(), Code::NotFound, "{status}");
    Ok(())
}

#[tokio::test]
async fn a_second_session_takes_over_and_the_first_teardown_leaves_the_site_connected()
-> anyhow::Result<()> {
    let mut site = Site::tls().await?;
    let replica = site.server.replica().await?;
    let mut admin = site.admin.clone();
    let code = site.server.enrollment_code(&mut admin, &site.site).await?;
    let identity = site.server.enroll(&code).await?;
    let (mut first, _tx1) = site.server.sync(Some(&identity), None, &site.site).await?;
    snapshot(&mut first).await?;
    // The second session opens on the other replica.
    let (mut second, _tx2) = replica.sync(Some(&identity), None, &site.site).await?;
    snapshot(&mut second).await?;
    let status = ended_within(&mut first, CLOSE_BOUND).await?;
    assert_eq!(status.code(), Code::Aborted, "{status}");
    assert!(status.message().contains("took over"), "{status}");
    // The second stream goes on: a change reaches it (by then the first stream's
    // teardown has run, and must not have marked the site disconnected).
    let lock = site.lock.clone();
    let alice = site.alice.clone();
    site.credential(&alice, "9930", lock_scope(&[&lock]))
        .await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), second.message()).await?? {
            Some(pb::ServerMessage {
                msg: Some(pb::server_message::Msg::Changes(c)),
            }) if !c.slots.is_empty() => break,
            Some(_) => continue,
            None => anyhow::bail!("the second stream ended"),
        }
    }
    let status = site.sync_status().await?;
    assert!(status.agent_connected, "{status:?}");
    drop(second);
    Ok(())
}

#[tokio::test]
async fn an_expired_certificate_is_refused_and_the_agent_enrolls_again_with_a_new_code()
-> anyhow::Result<()> {
    let mut site = Site::tls().await?;
    let mut admin = site.admin.clone();
    let pki = site
        .server
        .pki
        .clone()
        .ok_or_else(|| anyhow::anyhow!("tls server"))?;
    // An agent enrolled 31 days ago and offline since: its certificate expired.
    let code = site.server.enrollment_code(&mut admin, &site.site).await?;
    let (key_pem, csr) = keyplane_agent::identity::new_key_and_csr()?;
    let agent_id = uuid::Uuid::new_v4();
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(31 * 24 * 3600);
    let old = pki.ca.sign_agent(&csr, agent_id, long_ago)?;
    site.server
        .store
        .agent_enroll(&code, agent_id, &old.sha256, old.not_after)
        .await?
        .ok_or_else(|| anyhow::anyhow!("code refused"))?;
    let expired = keyplane_agent::identity::Identity {
        key_pem,
        cert_pem: old.pem,
        meta: keyplane_agent::identity::IdentityMeta {
            agent: format!("agents/{agent_id}"),
            site: site.site.clone(),
            issue_unix: 0,
            expire_unix: old
                .not_after
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
        },
    };
    // The server refuses it (the TLS handshake or the call fails).
    assert!(
        site.server
            .sync(Some(&expired), None, &site.site)
            .await
            .is_err(),
        "an expired certificate is refused"
    );
    // The agent finds it expired and enrolls with the new code it was given.
    let state = site.dir.path().join("state");
    keyplane_agent::identity::save(&state, &expired)?;
    let fresh = site.server.enrollment_code(&mut admin, &site.site).await?;
    let code_file = site.dir.path().join("enrollment.code");
    std::fs::write(&code_file, &fresh)?;
    let mut config = site.agent_config();
    config.token = String::new();
    config.enrollment_code_file = Some(code_file);
    let agent = TestAgent::start_config(
        config,
        site.dir.path(),
        Box::new(keyplane_agent::SimulatorFactory::new(
            site.dir.path().join("devices"),
        )),
    );
    let lock = site.lock.clone();
    let alice = site.alice.clone();
    let cred = site
        .credential(&alice, "9930", lock_scope(&[&lock]))
        .await?;
    let slot = slot_on(&cred, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    eventually("the lock holds the code", Duration::from_secs(20), || {
        let slots = site.slots(&lock);
        async move { Ok(slots?.get(&slot).filter(|c| *c == "9930").map(|_| ())) }
    })
    .await?;
    let renewed =
        keyplane_agent::identity::load(&state)?.ok_or_else(|| anyhow::anyhow!("no identity"))?;
    assert_ne!(renewed.meta.agent, expired.meta.agent, "a new enrollment");
    assert!(!renewed.meta.expired(std::time::SystemTime::now()));
    agent.stop().await
}

#[tokio::test]
async fn an_agent_renews_its_certificate_over_mutual_tls() -> anyhow::Result<()> {
    let site = Site::tls().await?;
    let mut admin = site.admin.clone();
    let code = site.server.enrollment_code(&mut admin, &site.site).await?;
    let identity = site.server.enroll(&code).await?;
    let channel = site.server.agent_channel(Some(&identity)).await?;
    let (key_pem, csr_der) = keyplane_agent::identity::new_key_and_csr()?;
    let renewed = keyplane_proto::v1::agent_service_client::AgentServiceClient::new(channel)
        .renew_certificate(pb::RenewCertificateRequest { csr_der })
        .await?
        .into_inner();
    assert_eq!(renewed.agent, identity.meta.agent, "same agent");
    let mut next = identity.clone();
    next.key_pem = key_pem;
    next.cert_pem = renewed.certificate_pem;
    let (mut stream, _tx) = site.server.sync(Some(&next), None, &site.site).await?;
    snapshot(&mut stream).await?;
    // The renewed-away certificate no longer authenticates.
    let status = match site.server.sync(Some(&identity), None, &site.site).await {
        Err(status) => status,
        Ok((mut stream, _tx)) => ended_within(&mut stream, Duration::from_secs(10)).await?,
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    Ok(())
}

#[tokio::test]
async fn a_revoked_agent_enrolls_again_from_a_new_code_without_a_restart() -> anyhow::Result<()> {
    let mut site = Site::tls().await?;
    let mut admin = site.admin.clone();
    let code = site.server.enrollment_code(&mut admin, &site.site).await?;
    let code_file = site.dir.path().join("enrollment.code");
    std::fs::write(&code_file, &code)?;
    let mut config = site.agent_config();
    config.token = String::new();
    config.enrollment_code_file = Some(code_file.clone());
    let agent = TestAgent::start_config(
        config,
        site.dir.path(),
        Box::new(keyplane_agent::SimulatorFactory::new(
            site.dir.path().join("devices"),
        )),
    );
    let state = site.dir.path().join("state");
    let first = eventually("the agent enrolled", Duration::from_secs(20), || {
        let id = keyplane_agent::identity::load(&state);
        async move { Ok(id?.map(|i| i.meta.agent)) }
    })
    .await?;
    site.wait_synced().await?;
    admin
        .revoke_agents(pb::RevokeAgentsRequest {
            site: site.site.clone(),
        })
        .await?;
    std::fs::write(
        &code_file,
        site.server.enrollment_code(&mut admin, &site.site).await?,
    )?;
    eventually("the agent enrolled again", Duration::from_secs(30), || {
        let id = keyplane_agent::identity::load(&state);
        let first = first.clone();
        async move { Ok(id?.filter(|i| i.meta.agent != first).map(|_| ())) }
    })
    .await?;
    let lock = site.lock.clone();
    let alice = site.alice.clone();
    let cred = site
        .credential(&alice, "9930", lock_scope(&[&lock]))
        .await?;
    let slot = slot_on(&cred, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    eventually("the lock holds the code", Duration::from_secs(20), || {
        let slots = site.slots(&lock);
        async move { Ok(slots?.get(&slot).filter(|c| *c == "9930").map(|_| ())) }
    })
    .await?;
    agent.stop().await
}

#[tokio::test]
async fn a_connected_agent_renews_its_certificate_before_it_expires() -> anyhow::Result<()> {
    // Certificates of 6 s: renewed at 4 s, while the stream is up.
    let pki = std::sync::Arc::new(keyplane_testkit::server::TestPki::with_agent_lifetime(
        Duration::from_secs(6),
    )?);
    let db = keyplane_testkit::pg::test_database().await?;
    let server = keyplane_testkit::server::TestServer::start_full(
        db,
        keyplane_store::PinKey::generate()?,
        Some(pki),
    )
    .await?;
    let mut site = Site::on_server(server, "zwave-lock-30").await?;
    let mut admin = site.admin.clone();
    let code = site.server.enrollment_code(&mut admin, &site.site).await?;
    let code_file = site.dir.path().join("enrollment.code");
    std::fs::write(&code_file, &code)?;
    let mut config = site.agent_config();
    config.token = String::new();
    config.enrollment_code_file = Some(code_file);
    let agent = TestAgent::start_config(
        config,
        site.dir.path(),
        Box::new(keyplane_agent::SimulatorFactory::new(
            site.dir.path().join("devices"),
        )),
    );
    let state = site.dir.path().join("state");
    let first = eventually("the agent enrolled", Duration::from_secs(20), || {
        let id = keyplane_agent::identity::load(&state);
        async move { Ok(id?) }
    })
    .await?;
    site.wait_synced().await?;
    let renewed = eventually("a renewed certificate", Duration::from_secs(20), || {
        let id = keyplane_agent::identity::load(&state);
        let first = first.cert_pem.clone();
        async move { Ok(id?.filter(|i| i.cert_pem != first)) }
    })
    .await?;
    assert_eq!(renewed.meta.agent, first.meta.agent, "the same agent");
    // Past the first certificate's expiry, changes still reach the site.
    eventually(
        "the first certificate expired",
        Duration::from_secs(20),
        || {
            let expired = first.meta.expired(std::time::SystemTime::now());
            async move { Ok(expired.then_some(())) }
        },
    )
    .await?;
    let lock = site.lock.clone();
    let alice = site.alice.clone();
    let cred = site
        .credential(&alice, "9930", lock_scope(&[&lock]))
        .await?;
    let slot = slot_on(&cred, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    eventually("the lock holds the code", Duration::from_secs(20), || {
        let slots = site.slots(&lock);
        async move { Ok(slots?.get(&slot).filter(|c| *c == "9930").map(|_| ())) }
    })
    .await?;
    agent.stop().await
}
