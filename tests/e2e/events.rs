//! Issue 15: the event cursor follows each site's commit order. An event that took
//! its place and committed late still reaches a live watcher; a watch without a
//! token starts at now; a watch of every site resumes per site.

use crate::fixture::{SYNC_TIMEOUT, Site};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::eventually;

fn uuid_of(name: &str) -> anyhow::Result<uuid::Uuid> {
    Ok(uuid::Uuid::try_parse(
        name.rsplit('/').next().unwrap_or_default(),
    )?)
}

fn event(device: uuid::Uuid, seq: i64) -> keyplane_store::NewEvent {
    keyplane_store::NewEvent {
        device,
        epoch: 0,
        seq,
        kind: keyplane_store::EventKind::Armed,
        partition: Some(1),
        user_number: Some(2),
        occur_time: std::time::SystemTime::now(),
    }
}

async fn next(watch: &mut tonic::Streaming<pb::Event>) -> anyhow::Result<pb::Event> {
    tokio::time::timeout(SYNC_TIMEOUT, watch.message())
        .await
        .map_err(|_| anyhow::anyhow!("no event within {SYNC_TIMEOUT:?}"))??
        .ok_or_else(|| anyhow::anyhow!("watch ended"))
}

async fn watch(
    s: &mut Site,
    parent: &str,
    token: &str,
) -> anyhow::Result<tonic::Streaming<pb::Event>> {
    Ok(s.admin
        .watch_events(pb::WatchEventsRequest {
            parent: parent.to_owned(),
            resume_token: token.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// A duress event inserted in a transaction held open on purpose, then another event
/// stored while it is still open: with the global id as cursor, the watcher got the
/// second, moved past the first's id and never delivered it.
#[tokio::test]
async fn an_event_that_commits_late_still_reaches_a_live_watcher() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = uuid_of(&s.site)?;
    let panel = uuid_of(&s.panel.name)?;
    let name = s.site.clone();
    let mut one = watch(&mut s, &name, "").await?;
    let mut all = watch(&mut s, "sites/-", "").await?;

    let mut late = s.server.db.client().await?;
    let tx = late.transaction().await?;
    tx.execute(
        "INSERT INTO device_event (site_id, device_id, source_seq, kind, partition, user_number,
            silent_alarm, occur_time)
         VALUES ($1, $2, 100, 'duress', 1, 7, true, now())",
        &[&site, &panel],
    )
    .await?;
    // The second event, while the first is uncommitted: it waits for the first (the
    // site's event log is in commit order), or, as before, commits ahead of it.
    let store = s.server.store.clone();
    let second = tokio::spawn(async move { store.event_record(site, &event(panel, 101)).await });
    let db = s.server.db.client().await?;
    eventually(
        "the second event is stored or waits behind the first",
        SYNC_TIMEOUT,
        || async {
            let waiting: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await?
                .get(0);
            Ok((waiting > 0 || second.is_finished()).then_some(()))
        },
    )
    .await?;
    tx.commit().await?;
    assert!(second.await??, "the second event is new");

    for watch in [&mut one, &mut all] {
        let first = next(watch).await?;
        assert_eq!(first.kind, pb::EventKind::Duress as i32, "{first:?}");
        assert!(first.silent_alarm);
        let then = next(watch).await?;
        assert_eq!(then.kind, pb::EventKind::Armed as i32, "{then:?}");
        assert!(then.site_sequence > first.site_sequence);
    }
    Ok(())
}

#[tokio::test]
async fn a_watch_starts_at_now_and_resumes_each_site_from_its_token() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = uuid_of(&s.site)?;
    let panel = uuid_of(&s.panel.name)?;
    // A second site of the same dealer, with its own panel.
    let other = crate::fixture::create_site(&mut s.admin, "Shop", "Europe/Paris").await?;
    let other_panel =
        crate::fixture::create_device(&mut s.admin, &other, "Panel", "vista-128bpt").await?;
    let other_site = uuid_of(&other)?;
    let other_panel = uuid_of(&other_panel.name)?;
    let store = s.server.store.clone();

    // Stored before the watch: not replayed.
    assert!(store.event_record(site, &event(panel, 1)).await?);
    let mut all = watch(&mut s, "sites/-", "").await?;
    assert!(
        store
            .event_record(other_site, &event(other_panel, 1))
            .await?
    );
    let first = next(&mut all).await?;
    assert!(first.name.starts_with(&other), "{first:?}");
    assert!(store.event_record(site, &event(panel, 2)).await?);
    let second = next(&mut all).await?;
    assert!(second.name.starts_with(&s.site), "{second:?}");
    drop(all);

    // Stored while nobody watched: a watch resumed from the last token gets exactly
    // those, each site in its order.
    assert!(store.event_record(site, &event(panel, 3)).await?);
    assert!(
        store
            .event_record(other_site, &event(other_panel, 2))
            .await?
    );
    assert!(store.event_record(site, &event(panel, 4)).await?);
    let mut resumed = watch(&mut s, "sites/-", &second.resume_token).await?;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next(&mut resumed).await?);
    }
    let seqs = |prefix: &str| -> Vec<i64> {
        got.iter()
            .filter(|e| e.name.starts_with(prefix))
            .map(|e| e.site_sequence)
            .collect()
    };
    let here = seqs(&format!("{}/", s.site));
    assert_eq!(here.len(), 2, "{got:?}");
    assert!(here[0] < here[1]);
    assert_eq!(seqs(&format!("{other}/")).len(), 1, "{got:?}");
    // And the same token resumes one of its sites alone.
    let mut one = watch(&mut s, &other, &second.resume_token).await?;
    let e = next(&mut one).await?;
    assert!(e.name.starts_with(&other), "{e:?}");
    assert_eq!(e.site_sequence, seqs(&format!("{other}/"))[0]);

    // A token that is not one is refused, saying what to pass.
    let err = s
        .admin
        .watch_events(pb::WatchEventsRequest {
            parent: "sites/-".into(),
            resume_token: "nonsense".into(),
            ..Default::default()
        })
        .await
        .expect_err("malformed");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("resume_token"), "{err:?}");
    Ok(())
}
