//! ListAuditLog: a dealer's changes, filtered by site, actor, user and time, paged;
//! never a PIN; append-only in the database (issue 13).

use crate::fixture::{Site, create_user, lock_scope};
use keyplane_proto::v1 as pb;
use tonic::Code;

async fn all(s: &mut Site, req: pb::ListAuditLogRequest) -> anyhow::Result<Vec<pb::AuditRecord>> {
    let mut out = Vec::new();
    let mut req = pb::ListAuditLogRequest {
        page_size: 2,
        ..req
    };
    loop {
        let page = s.admin.list_audit_log(req.clone()).await?.into_inner();
        out.extend(page.records);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        req.page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn the_audit_log_is_filtered_paged_pin_free_and_append_only() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let site = s.site.clone();
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    let alices = s
        .credential(&s.alice.clone(), "4821", lock_scope(&[&lock]))
        .await?;
    let bobs = s.credential(&bob, "9930", lock_scope(&[&lock])).await?;
    let every = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            ..Default::default()
        },
    )
    .await?;
    assert!(every.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    for r in &every {
        assert_eq!(r.site, site);
        assert!(r.create_time.is_some());
        // The fields that carry text; ids and times are random digits that may
        // contain a PIN's by chance.
        let text = format!(
            "{} {} {} {}",
            r.action, r.detail_json, r.before_json, r.after_json
        );
        assert!(!text.contains("4821") && !text.contains("9930"), "{text}");
    }
    let created: Vec<&str> = every
        .iter()
        .filter(|r| r.action == "credential.create")
        .map(|r| r.resource.as_str())
        .collect();
    assert_eq!(created, [alices.name.as_str(), bobs.name.as_str()]);

    // By user: Bob's own record and his credential's, nothing of Alice's.
    let of_bob = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            user: bob.clone(),
            ..Default::default()
        },
    )
    .await?;
    assert!(of_bob.iter().any(|r| r.resource == bobs.name));
    assert!(
        of_bob.iter().all(|r| r.resource.starts_with(&bob)),
        "{of_bob:?}"
    );
    // By actor, by time.
    let actor = every[0].actor.clone();
    let by_actor = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            actor: actor.clone(),
            ..Default::default()
        },
    )
    .await?;
    assert!(!by_actor.is_empty() && by_actor.iter().all(|r| r.actor == actor));
    let before_all = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            end_time: every[0].create_time,
            ..Default::default()
        },
    )
    .await?;
    assert!(before_all.is_empty(), "end_time is exclusive");
    let from_last = all(
        &mut s,
        pb::ListAuditLogRequest {
            parent: site.clone(),
            start_time: every.last().and_then(|r| r.create_time),
            ..Default::default()
        },
    )
    .await?;
    assert!(
        from_last
            .iter()
            .any(|r| r.id == every.last().map(|l| l.id).unwrap_or(0))
    );

    // Another dealer sees nothing of it.
    let other = s.server.dealer("Dealer Two").await?;
    let mut other = s.server.admin(Some(&other)).await?;
    let err = other
        .list_audit_log(pb::ListAuditLogRequest {
            parent: site.clone(),
            ..Default::default()
        })
        .await
        .expect_err("not its site");
    assert_eq!(err.code(), Code::NotFound);
    let theirs = other
        .list_audit_log(pb::ListAuditLogRequest {
            parent: "sites/-".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(theirs.records.iter().all(|r| r.site != site));

    // Append-only: the database refuses to rewrite history.
    let db = s.server.db.client().await?;
    assert!(
        db.execute("UPDATE audit_log SET actor = 'nobody'", &[])
            .await
            .is_err()
    );
    assert!(db.execute("DELETE FROM audit_log", &[]).await.is_err());
    Ok(())
}
