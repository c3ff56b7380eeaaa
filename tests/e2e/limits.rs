//! Resource limits against a hostile or careless dealer (issue 13): one dealer cannot
//! hold unbounded watches, and oversized requests are refused before decoding.

use crate::fixture::{SYNC_TIMEOUT, Site};
use keyplane_proto::v1 as pb;
use keyplane_server::admin::MAX_WATCHES_PER_DEALER;
use keyplane_testkit::server::eventually;
use tonic::Code;

#[tokio::test]
async fn watches_per_dealer_are_capped_and_freed_when_closed() -> anyhow::Result<()> {
    let s = Site::new().await?;
    let watch = |admin: &mut keyplane_testkit::server::Admin| {
        let mut admin = admin.clone();
        let parent = s.site.clone();
        async move {
            admin
                .watch_events(pb::WatchEventsRequest {
                    parent,
                    ..Default::default()
                })
                .await
        }
    };
    // The cap holds over replicas: half the places on each of two.
    let replica = s.server.replica().await?;
    let mut admin = s.admin.clone();
    let mut on_replica = replica.admin(Some(&s.token)).await?;
    let mut open = Vec::new();
    let mut open_on_replica = Vec::new();
    for _ in 0..MAX_WATCHES_PER_DEALER / 2 {
        open.push(watch(&mut admin).await?.into_inner());
        open_on_replica.push(watch(&mut on_replica).await?.into_inner());
    }
    for client in [&mut admin, &mut on_replica] {
        let err = watch(client).await.expect_err("one watch too many");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message().contains("every keyplaned replica"),
            "{}",
            err.message()
        );
    }
    // Another dealer is not affected.
    let other = s.server.dealer("Dealer Two").await?;
    let mut other = s.server.admin(Some(&other)).await?;
    let err = watch(&mut other).await.expect_err("not its site");
    assert_eq!(err.code(), Code::NotFound);
    other
        .watch_events(pb::WatchEventsRequest {
            parent: "sites/-".into(),
            ..Default::default()
        })
        .await?;
    // Closing one on the replica frees its place for the first server (once the
    // replica sees the stream gone).
    drop(open_on_replica.pop());
    eventually("a freed watch place", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let parent = s.site.clone();
        async move {
            match admin
                .watch_events(pb::WatchEventsRequest {
                    parent,
                    ..Default::default()
                })
                .await
            {
                Ok(stream) => Ok(Some(stream)),
                Err(e) if e.code() == Code::ResourceExhausted => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_oversized_request_is_refused_before_it_is_read() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let err = s
        .admin
        .create_user(pb::CreateUserRequest {
            parent: s.site.clone(),
            user: Some(pb::User {
                display_name: "x".repeat(keyplane_server::MAX_ADMIN_MESSAGE + 1),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    Ok(())
}

/// An agent report with more slots than any device, or a slot twice, ends the stream
/// with INVALID_ARGUMENT and stores nothing.
#[tokio::test]
async fn oversized_or_repeated_observed_slots_are_refused() -> anyhow::Result<()> {
    use tokio_stream::StreamExt;
    // The test kit's agent channel speaks TLS only.
    let s = Site::tls().await?;
    let slot = |n: i32| pb::ObservedSlot {
        slot: n,
        state: pb::ObservedState::Foreign as i32,
        pin: "2718".into(),
    };
    for slots in [
        (1..=(keyplane_server::agent::MAX_OBSERVED_SLOTS as i32 + 1))
            .map(slot)
            .collect::<Vec<_>>(),
        vec![slot(3), slot(3)],
    ] {
        let (mut stream, tx) = s.server.sync(None, Some(&s.agent_token), &s.site).await?;
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Observed(pb::ObservedSlots {
                device: s.lock.name.clone(),
                slots,
            })),
        })
        .await?;
        let err = loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => anyhow::bail!("the stream ended without a status"),
            }
        };
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        drop(tx);
    }
    let stored: i64 = s
        .server
        .db
        .client()
        .await?
        .query_one("SELECT count(*) FROM observed_slot", &[])
        .await?
        .get(0);
    assert_eq!(stored, 0);
    Ok(())
}

#[tokio::test]
async fn every_string_and_list_is_bounded_by_name_and_calls_have_deadlines() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let before = crate::bad_input::fingerprint_with(&s, false).await?;
    let too_many_paths = s
        .admin
        .update_site(pb::UpdateSiteRequest {
            site: Some(pb::Site {
                name: site.clone(),
                display_name: "Renamed".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into(); 17],
            }),
        })
        .await
        .expect_err("17 paths");
    let long_name = s
        .admin
        .create_user(pb::CreateUserRequest {
            parent: site.clone(),
            user: Some(pb::User {
                display_name: "a".repeat(201),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("201 characters");
    let long_parent = s
        .admin
        .list_users(pb::ListUsersRequest {
            parent: format!("{site}{}", "x".repeat(300)),
            ..Default::default()
        })
        .await
        .expect_err("a 300-character parent");
    for (err, want) in [
        (
            too_many_paths,
            "update_mask.paths has too many items: at most 16",
        ),
        (
            long_name,
            "user.display_name is too long: at most 200 characters",
        ),
        (long_parent, "parent is too long: at most 256 characters"),
    ] {
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(want), "{}", err.message());
    }
    // A slot the device does not have.
    let err = s
        .admin
        .remove_local_code(pb::RemoveLocalCodeRequest {
            name: format!("{}/localCodes/9999", s.lock.name),
        })
        .await
        .expect_err("no slot 9999 on a 30-slot lock");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("slot 9999 is not a slot of this device"),
        "{}",
        err.message()
    );
    assert!(
        crate::bad_input::fingerprint_with(&s, false).await? == before,
        "refused requests change nothing"
    );
    // The client's deadline is honoured: one that has passed before the server can
    // answer ends the call.
    let mut late = tonic::Request::new(pb::ListAuditLogRequest {
        parent: "sites/-".into(),
        ..Default::default()
    });
    late.set_timeout(std::time::Duration::from_nanos(1));
    let err = s.admin.list_audit_log(late).await.expect_err("deadline");
    assert!(
        matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{err:?}"
    );
    Ok(())
}
