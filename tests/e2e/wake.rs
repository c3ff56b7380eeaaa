//! Cross-replica wake-ups (issue 15): a change committed through one replica reaches
//! an agent stream held by another through NOTIFY after commit, not the poll. Both
//! replicas here poll once an hour, so only a notification (or the listener's
//! re-check when it reconnects) can deliver anything within the test; the last test
//! sends no notification and shows the held-site check delivering alone.

use crate::enroll::{ended_within, snapshot};
use crate::fixture::{Site, lock_scope};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::{AgentStream, TestServer, eventually};
use std::time::Duration;
use tonic::Code;

/// Far longer than the test: a poll never delivers.
const NEVER: Duration = Duration::from_secs(3600);

/// How long the listener waits before reconnecting: the change written while it is
/// away commits well within it.
const LISTEN_RETRY: Duration = Duration::from_secs(4);

/// Well under the poll period; generous for a loaded 2-core machine.
const DELIVERY_BOUND: Duration = Duration::from_secs(10);

fn quiet(c: &mut keyplane_server::Config, name: &str) {
    c.poll_interval = NEVER;
    c.poll_interval_listening = NEVER;
    c.held_check_interval = NEVER;
    c.listen_retry = LISTEN_RETRY;
    c.replica_name = Some(name.to_owned());
}

/// Replica A (the site's admin talks to it) and replica B, both polling never.
async fn two_replicas() -> anyhow::Result<(Site, TestServer)> {
    let a = TestServer::start_tls_tweaked(&|c| quiet(c, "wake-a")).await?;
    let s = Site::on_server(a, "zwave-lock-30").await?;
    let b = s.server.replica_tweaked(&|c| quiet(c, "wake-b")).await?;
    Ok((s, b))
}

/// The backend pid of `replica`'s listener, once it listens.
async fn listener_pid(server: &TestServer, replica: &str) -> anyhow::Result<Option<i32>> {
    let db = server.db.client().await?;
    let row = db
        .query_opt(
            "SELECT pid FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = $1",
            &[&format!("keyplaned-listen {replica}")],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

async fn wait_listening(server: &TestServer, replica: &str) -> anyhow::Result<i32> {
    eventually(
        &format!("{replica} listening"),
        Duration::from_secs(20),
        || listener_pid(server, replica),
    )
    .await
}

/// Reads the stream until a change set with slots at `revision` or later.
async fn change_reaching(stream: &mut AgentStream, revision: i64) -> anyhow::Result<i64> {
    let deadline = tokio::time::Instant::now() + DELIVERY_BOUND;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => {
                anyhow::bail!("no change reached revision {revision} within {DELIVERY_BOUND:?}")
            }
            Ok(msg) => match msg? {
                Some(pb::ServerMessage {
                    msg: Some(pb::server_message::Msg::Changes(c)),
                }) if c.revision >= revision && !c.more_parts => return Ok(c.revision),
                Some(_) => continue,
                None => anyhow::bail!("the stream ended"),
            },
        }
    }
}

async fn site_revision(s: &Site) -> anyhow::Result<i64> {
    let site = crate::fixture::id_of(&s.site)?;
    let revisions = s.server.store.site_revisions(&[site]).await?;
    revisions
        .first()
        .map(|(_, r)| *r)
        .ok_or_else(|| anyhow::anyhow!("no site"))
}

#[tokio::test]
async fn a_change_through_one_replica_reaches_a_stream_on_another_at_once() -> anyhow::Result<()> {
    let (mut s, b) = two_replicas().await?;
    wait_listening(&b, "wake-b").await?;
    let (mut stream, _tx) = b.sync(None, Some(&s.agent_token), &s.site).await?;
    let first = snapshot(&mut stream).await?;

    // Two writes through A, each reaching B's stream in order.
    let (alice, lock) = (s.alice.clone(), s.lock.clone());
    let mut last = first.revision;
    for pin in ["4821", "5930"] {
        s.credential(&alice, pin, lock_scope(&[&lock])).await?;
        let written = site_revision(&s).await?;
        assert!(written > last, "{written} after {last}");
        let got = change_reaching(&mut stream, written).await?;
        assert_eq!(got, written, "changes arrive one by one, in order");
        last = got;
    }

    // A takeover on A (a new session: only the epoch moves) ends B's stream too.
    let (mut second, _tx2) = s.server.sync(None, Some(&s.agent_token), &s.site).await?;
    snapshot(&mut second).await?;
    let status = ended_within(&mut stream, DELIVERY_BOUND).await?;
    assert_eq!(status.code(), Code::Aborted, "{status}");
    Ok(())
}

#[tokio::test]
async fn a_change_made_while_the_listener_is_cut_still_arrives() -> anyhow::Result<()> {
    let (mut s, b) = two_replicas().await?;
    let pid = wait_listening(&b, "wake-b").await?;
    let (mut stream, _tx) = b.sync(None, Some(&s.agent_token), &s.site).await?;
    snapshot(&mut stream).await?;

    let db = s.server.db.client().await?;
    let killed: bool = db
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await?
        .get(0);
    assert!(killed);
    eventually(
        "the listener's backend gone",
        Duration::from_secs(10),
        || {
            let b = &b;
            async move { Ok(listener_pid(b, "wake-b").await?.is_none().then_some(())) }
        },
    )
    .await?;

    // Written while B listens to nothing: its NOTIFY reaches A alone.
    let (alice, lock) = (s.alice.clone(), s.lock.clone());
    s.credential(&alice, "4821", lock_scope(&[&lock])).await?;
    let during = site_revision(&s).await?;
    assert_eq!(
        listener_pid(&b, "wake-b").await?,
        None,
        "the write committed before B listened again (the listener waits {LISTEN_RETRY:?})"
    );
    // Delivered by the re-check of every held site when the listener is back.
    let got = change_reaching(&mut stream, during).await?;
    assert_eq!(got, during);
    let back = wait_listening(&b, "wake-b").await?;
    assert_ne!(back, pid, "a new connection");

    // And once it is back, by NOTIFY again.
    s.credential(&alice, "5930", lock_scope(&[&lock])).await?;
    let after = site_revision(&s).await?;
    assert_eq!(change_reaching(&mut stream, after).await?, after);
    Ok(())
}

/// The safety net under every wake-up: no replica sends a notification and none
/// polls, so only B's periodic re-read of the sites it holds can tell its stream of
/// a change written through A (a lost notification, a wake-up a stream took while
/// reading: each ends the same way).
#[tokio::test]
async fn a_change_nobody_announced_reaches_the_stream_by_the_held_site_check() -> anyhow::Result<()>
{
    let a = TestServer::start_tls_tweaked(&|c| {
        quiet(c, "check-a");
        c.notify = false;
    })
    .await?;
    let mut s = Site::on_server(a, "zwave-lock-30").await?;
    let b = s
        .server
        .replica_tweaked(&|c| {
            quiet(c, "check-b");
            c.notify = false;
            c.held_check_interval = Duration::from_millis(300);
        })
        .await?;
    let (mut stream, _tx) = b.sync(None, Some(&s.agent_token), &s.site).await?;
    let first = snapshot(&mut stream).await?;
    let (alice, lock) = (s.alice.clone(), s.lock.clone());
    s.credential(&alice, "4821", lock_scope(&[&lock])).await?;
    let written = site_revision(&s).await?;
    assert!(
        written > first.revision,
        "{written} after {}",
        first.revision
    );
    assert_eq!(change_reaching(&mut stream, written).await?, written);
    Ok(())
}
