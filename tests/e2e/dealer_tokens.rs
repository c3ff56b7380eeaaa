//! Dealer tokens with scopes, expiry and revocation through the API, and the
//! per-address limit on failed authentications.

use crate::fixture::{Site, lock_scope};
use keyplane_proto::v1 as pb;
use std::time::{Duration, Instant};
use tonic::Code;

async fn token(
    site: &Site,
    scope: pb::TokenScope,
    ttl_seconds: i64,
) -> anyhow::Result<(String, String)> {
    let made = site
        .admin
        .clone()
        .create_dealer_token(pb::CreateDealerTokenRequest {
            display_name: format!("{scope:?}"),
            scope: scope as i32,
            ttl_seconds,
        })
        .await?
        .into_inner();
    let name = made
        .dealer_token
        .ok_or_else(|| anyhow::anyhow!("no dealer_token"))?
        .name;
    Ok((made.token, name))
}

fn new_site() -> pb::CreateSiteRequest {
    pb::CreateSiteRequest {
        site: Some(pb::Site {
            display_name: "Another".into(),
            time_zone: "Europe/Paris".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

#[tokio::test]
async fn a_read_only_token_reads_and_cannot_change_anything() -> anyhow::Result<()> {
    let site = Site::new().await?;
    let (read_only, _) = token(&site, pb::TokenScope::ReadOnly, 0).await?;
    let mut ro = site.server.admin(Some(&read_only)).await?;
    let before = ro
        .list_sites(pb::ListSitesRequest::default())
        .await?
        .into_inner();
    ro.get_site(pb::GetSiteRequest {
        name: site.site.clone(),
    })
    .await?;

    let denied = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e}");
        assert!(e.message().contains("read_only"), "{what}: {e}");
    };
    denied(ro.create_site(new_site()).await.map(|_| ()), "CreateSite");
    denied(
        ro.create_credential(pb::CreateCredentialRequest {
            parent: site.alice.clone(),
            credential: Some(pb::Credential {
                display_name: "x".into(),
                pin: "4821".into(),
                scope: Some(lock_scope(&[&site.lock])),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: false,
        })
        .await
        .map(|_| ()),
        "CreateCredential",
    );
    denied(
        ro.lockdown_doors(pb::LockdownDoorsRequest {
            site: site.site.clone(),
        })
        .await
        .map(|_| ()),
        "LockdownDoors",
    );
    denied(
        ro.issue_agent_token(pb::IssueAgentTokenRequest {
            site: site.site.clone(),
        })
        .await
        .map(|_| ()),
        "IssueAgentToken",
    );
    denied(
        ro.create_dealer_token(pb::CreateDealerTokenRequest {
            display_name: "escalate".into(),
            scope: pb::TokenScope::Admin as i32,
            ttl_seconds: 0,
        })
        .await
        .map(|_| ()),
        "CreateDealerToken",
    );
    denied(
        ro.list_dealer_tokens(pb::ListDealerTokensRequest {})
            .await
            .map(|_| ()),
        "ListDealerTokens",
    );
    // OpsService is for ops and admin tokens: every call of it is refused, reads too.
    let mut ro_ops = site.server.ops(Some(&read_only)).await?;
    denied(
        ro_ops
            .list_agent_connections(pb::ListAgentConnectionsRequest {
                parent: "sites/-".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "ListAgentConnections",
    );
    denied(
        ro_ops
            .get_site_ops_status(pb::GetSiteOpsStatusRequest {
                name: format!("{}/opsStatus", site.site),
            })
            .await
            .map(|_| ()),
        "GetSiteOpsStatus",
    );
    denied(
        ro_ops
            .resync_site(pb::ResyncSiteRequest {
                name: site.site.clone(),
            })
            .await
            .map(|_| ()),
        "ResyncSite",
    );
    denied(
        ro_ops
            .close_agent_connection(pb::CloseAgentConnectionRequest {
                name: format!("{}/agentConnection", site.site),
            })
            .await
            .map(|_| ()),
        "CloseAgentConnection",
    );
    // Nothing changed.
    let after = ro
        .list_sites(pb::ListSitesRequest::default())
        .await?
        .into_inner();
    assert_eq!(before.sites.len(), after.sites.len());
    let creds = ro
        .list_credentials(pb::ListCredentialsRequest {
            parent: site.alice.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(creds.credentials.is_empty(), "{creds:?}");
    Ok(())
}

#[tokio::test]
async fn an_ops_token_locks_down_but_does_not_touch_codes() -> anyhow::Result<()> {
    let site = Site::new().await?;
    let (ops_token, _) = token(&site, pb::TokenScope::Ops, 0).await?;
    let mut ops = site.server.admin(Some(&ops_token)).await?;
    ops.lockdown_doors(pb::LockdownDoorsRequest {
        site: site.site.clone(),
    })
    .await?;
    ops.release_lockdown(pb::ReleaseLockdownRequest {
        site: site.site.clone(),
    })
    .await?;
    let e = ops
        .create_site(new_site())
        .await
        .expect_err("ops creates no site");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // The ops surface is its own: reads and remedies.
    let mut desk = site.server.ops(Some(&ops_token)).await?;
    desk.list_agent_connections(pb::ListAgentConnectionsRequest {
        parent: "sites/-".into(),
        ..Default::default()
    })
    .await?;
    desk.get_site_ops_status(pb::GetSiteOpsStatusRequest {
        name: format!("{}/opsStatus", site.site),
    })
    .await?;
    desk.resync_site(pb::ResyncSiteRequest {
        name: site.site.clone(),
    })
    .await?;
    // Nothing connected: the call was allowed and found no stream.
    let e = desk
        .close_agent_connection(pb::CloseAgentConnectionRequest {
            name: format!("{}/agentConnection", site.site),
        })
        .await
        .expect_err("no agent connected");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    Ok(())
}

#[tokio::test]
async fn a_revoked_dealer_token_stops_within_a_second_on_every_replica() -> anyhow::Result<()> {
    let site = Site::new().await?;
    let replica = site.server.replica().await?;
    let (doomed, name) = token(&site, pb::TokenScope::Admin, 0).await?;
    let mut here = site.server.admin(Some(&doomed)).await?;
    let mut there = replica.admin(Some(&doomed)).await?;
    // Both replicas have verified (and cached) it.
    here.list_sites(pb::ListSitesRequest::default()).await?;
    there.list_sites(pb::ListSitesRequest::default()).await?;
    let listed = site
        .admin
        .clone()
        .list_dealer_tokens(pb::ListDealerTokensRequest {})
        .await?
        .into_inner();
    assert!(listed.dealer_tokens.iter().any(|t| t.name == name));
    site.admin
        .clone()
        .revoke_dealer_token(pb::RevokeDealerTokenRequest { name: name.clone() })
        .await?;
    let revoked = Instant::now();
    // The documented bound (1 s), plus the time one call takes on a loaded machine.
    let bound = keyplane_store::DEALER_TOKEN_TTL + Duration::from_millis(500);
    for admin in [&mut here, &mut there] {
        loop {
            match admin.list_sites(pb::ListSitesRequest::default()).await {
                Err(e) if e.code() == Code::Unauthenticated => break,
                Err(e) => anyhow::bail!("unexpected {e}"),
                Ok(_) => assert!(
                    revoked.elapsed() < bound,
                    "the revoked token still worked {:?} after revocation",
                    revoked.elapsed()
                ),
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    Ok(())
}

#[tokio::test]
async fn an_expired_dealer_token_stops_working() -> anyhow::Result<()> {
    let site = Site::new().await?;
    let (brief, _) = token(&site, pb::TokenScope::Admin, 1).await?;
    let mut admin = site.server.admin(Some(&brief)).await?;
    admin.list_sites(pb::ListSitesRequest::default()).await?;
    let made = Instant::now();
    loop {
        match admin.list_sites(pb::ListSitesRequest::default()).await {
            Err(e) if e.code() == Code::Unauthenticated => break,
            Err(e) => anyhow::bail!("unexpected {e}"),
            Ok(_) => assert!(made.elapsed() < Duration::from_secs(3), "still works"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn repeated_failed_authentications_from_one_address_are_limited() -> anyhow::Result<()> {
    let site = Site::new().await?;
    let mut forged = site.server.admin(Some("kpd_forged")).await?;
    for _ in 0..keyplane_server::auth::AUTH_FAILURES_MAX {
        let e = forged
            .list_sites(pb::ListSitesRequest::default())
            .await
            .expect_err("forged");
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    }
    // From the same address even a good token waits out the window.
    let e = site
        .admin
        .clone()
        .list_sites(pb::ListSitesRequest::default())
        .await
        .expect_err("limited");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("retry in"), "{e}");
    Ok(())
}
