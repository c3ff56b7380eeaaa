//! OpsService (issue 17): an operator sees every connected agent from any replica,
//! with its version, peer, replica and last seen; resends a site in full and closes
//! an agent's stream on whichever replica holds it; and reads a site's pending
//! changes and the oldest one's age.

use crate::enroll::{CLOSE_BOUND, ended_within, snapshot};
use crate::fixture::{Site, lock_scope, slot_on};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::eventually;
use std::time::Duration;
use tonic::Code;

/// A dealer token of `scope` for the site's dealer.
pub(crate) async fn scoped_token(site: &Site, scope: pb::TokenScope) -> anyhow::Result<String> {
    Ok(site
        .admin
        .clone()
        .create_dealer_token(pb::CreateDealerTokenRequest {
            display_name: format!("{scope:?}"),
            scope: scope as i32,
            ttl_seconds: 0,
        })
        .await?
        .into_inner()
        .token)
}

fn list(parent: &str) -> pb::ListAgentConnectionsRequest {
    pb::ListAgentConnectionsRequest {
        parent: parent.to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_operator_lists_resyncs_and_closes_an_agent_held_by_another_replica()
-> anyhow::Result<()> {
    let mut s = Site::tls().await?;
    let replica = s.server.replica().await?;
    let ops_token = scoped_token(&s, pb::TokenScope::Ops).await?;
    // The operator talks to the first server; the agent's stream is on the replica.
    let mut ops = s.server.ops(Some(&ops_token)).await?;
    let none = ops
        .list_agent_connections(list("sites/-"))
        .await?
        .into_inner();
    assert!(none.agent_connections.is_empty(), "{none:?}");

    let (mut stream, _tx) = replica.sync(None, Some(&s.agent_token), &s.site).await?;
    let first = snapshot(&mut stream).await?;
    let listed = ops
        .list_agent_connections(list(&s.site))
        .await?
        .into_inner()
        .agent_connections;
    let [c] = listed.as_slice() else {
        anyhow::bail!("one connection expected: {listed:?}");
    };
    assert_eq!(c.name, format!("{}/agentConnection", s.site));
    assert_eq!(c.site, s.site);
    assert_eq!(c.agent, "", "a token-authenticated agent has no agent name");
    assert_eq!(c.agent_version, "test");
    assert_eq!(
        c.protocol_version, 1,
        "a Hello without protocol_version speaks 1"
    );
    assert!(c.peer.starts_with("127.0.0.1:"), "{c:?}");
    assert!(
        c.replica.ends_with(&format!(":{}", replica.addr.port())),
        "the replica holding the stream: {c:?}"
    );
    assert!(
        c.connect_time.is_some() && c.last_seen_time.is_some(),
        "{c:?}"
    );
    // The replica that holds it lists the same, for every site of the dealer.
    let from_replica = replica
        .ops(Some(&ops_token))
        .await?
        .list_agent_connections(list("sites/-"))
        .await?
        .into_inner()
        .agent_connections;
    let key = |c: &pb::AgentConnection| {
        (
            c.name.clone(),
            c.peer.clone(),
            c.replica.clone(),
            c.connect_time,
        )
    };
    assert_eq!(
        from_replica.iter().map(key).collect::<Vec<_>>(),
        listed.iter().map(key).collect::<Vec<_>>()
    );

    // A change the agent has not acknowledged (this raw stream never acks).
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    let cred = s.credential(&alice, "4821", lock_scope(&[&lock])).await?;
    let slot = slot_on(&cred, &lock).ok_or_else(|| anyhow::anyhow!("no slot on the lock"))?;
    let status = ops
        .get_site_ops_status(pb::GetSiteOpsStatusRequest {
            name: format!("{}/opsStatus", s.site),
        })
        .await?
        .into_inner();
    assert_eq!(status.name, format!("{}/opsStatus", s.site));
    assert!(status.revision > first.revision, "{status:?}");
    assert!(status.agent_connected, "{status:?}");
    assert!(status.pending_changes >= 1, "{status:?}");
    assert!(status.oldest_pending_time.is_some(), "{status:?}");
    assert!(status.oldest_pending_age.is_some(), "{status:?}");
    let on_lock = status
        .devices
        .iter()
        .find(|d| d.device == lock.name)
        .ok_or_else(|| anyhow::anyhow!("the lock has a pending change: {status:?}"))?;
    assert_eq!(on_lock.applied_revision, 0);
    assert!(on_lock.pending_changes >= 1, "{status:?}");

    // Resync through the first server: the stream on the replica sends a snapshot
    // holding the new code (the changes it sent before are skipped over).
    let resync = ops
        .resync_site(pb::ResyncSiteRequest {
            name: s.site.clone(),
        })
        .await?
        .into_inner();
    assert!(resync.agent_connected);
    assert_eq!(resync.revision, status.revision);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let resent = loop {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .map_err(|_| anyhow::anyhow!("no snapshot within 5 s of ResyncSite"))??
            .ok_or_else(|| anyhow::anyhow!("the stream ended"))?;
        if let Some(pb::server_message::Msg::Snapshot(snap)) = msg.msg {
            break snap;
        }
    };
    assert!(resent.revision >= resync.revision, "{}", resent.revision);
    assert!(
        resent.slots.iter().any(|x| x.device == lock.name
            && x.slot == i32::from(slot)
            && x.credential == cred.name),
        "the snapshot holds the code"
    );

    // Close through the first server: the replica ends the stream, saying why.
    ops.close_agent_connection(pb::CloseAgentConnectionRequest {
        name: c.name.clone(),
    })
    .await?;
    let ended = ended_within(&mut stream, CLOSE_BOUND).await?;
    assert_eq!(ended.code(), Code::Unavailable, "{ended}");
    assert!(ended.message().contains("operator"), "{ended}");
    let after = ops
        .list_agent_connections(list("sites/-"))
        .await?
        .into_inner();
    assert!(after.agent_connections.is_empty(), "{after:?}");
    let e = ops
        .close_agent_connection(pb::CloseAgentConnectionRequest {
            name: c.name.clone(),
        })
        .await
        .expect_err("nothing left to close");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.message().contains("no agent is connected"), "{e}");

    // Both remedies are in the audit log, under the ops token.
    let audit = s
        .admin
        .list_audit_log(pb::ListAuditLogRequest {
            parent: s.site.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    for action in ["site.resync", "agent_connection.close"] {
        assert!(
            audit.records.iter().any(|r| r.action == action),
            "{action} audited"
        );
    }
    replica.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_closed_agent_reconnects_after_its_backoff() -> anyhow::Result<()> {
    let s = Site::new().await?;
    let ops_token = scoped_token(&s, pb::TokenScope::Ops).await?;
    let mut ops = s.server.ops(Some(&ops_token)).await?;
    let agent = s.start_agent();
    let connected = |ops: pb::ListAgentConnectionsResponse| ops.agent_connections.first().cloned();
    let first = eventually("the agent is listed", Duration::from_secs(10), || {
        let mut ops = ops.clone();
        async move {
            Ok(connected(
                ops.list_agent_connections(list("sites/-"))
                    .await?
                    .into_inner(),
            ))
        }
    })
    .await?;
    assert!(!first.agent_version.is_empty(), "{first:?}");
    ops.close_agent_connection(pb::CloseAgentConnectionRequest {
        name: first.name.clone(),
    })
    .await?;
    let again = eventually("the agent reconnected", Duration::from_secs(10), || {
        let mut ops = ops.clone();
        let before = first.connect_time;
        async move {
            Ok(connected(
                ops.list_agent_connections(list("sites/-"))
                    .await?
                    .into_inner(),
            )
            .filter(|c| c.connect_time != before))
        }
    })
    .await?;
    assert_eq!(again.site, first.site);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn ops_calls_refuse_malformed_names_and_unknown_sites() -> anyhow::Result<()> {
    let s = Site::new().await?;
    let mut ops = s.server.ops(Some(&s.token)).await?;
    let unknown = format!("sites/{}", uuid::Uuid::new_v4());
    let e = ops
        .list_agent_connections(list("sites/x"))
        .await
        .expect_err("bad parent");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = ops
        .list_agent_connections(list(&unknown))
        .await
        .expect_err("unknown site");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = ops
        .get_site_ops_status(pb::GetSiteOpsStatusRequest {
            name: s.site.clone(),
        })
        .await
        .expect_err("the site is not its ops status");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = ops
        .close_agent_connection(pb::CloseAgentConnectionRequest {
            name: format!("{}/agentConnection", s.site),
        })
        .await
        .expect_err("no agent connected");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    // A resync with no agent connected is remembered by no one and harms nothing.
    let r = ops
        .resync_site(pb::ResyncSiteRequest {
            name: s.site.clone(),
        })
        .await?
        .into_inner();
    assert!(!r.agent_connected);
    // Nothing pending on a site whose devices were never written.
    let status = ops
        .get_site_ops_status(pb::GetSiteOpsStatusRequest {
            name: format!("{}/opsStatus", s.site),
        })
        .await?
        .into_inner();
    assert_eq!(status.pending_changes, 0, "{status:?}");
    assert!(status.oldest_pending_age.is_none() && status.devices.is_empty());
    Ok(())
}
