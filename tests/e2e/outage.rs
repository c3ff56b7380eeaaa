//! Issue 15: PostgreSQL going away under load. A TCP proxy between keyplaned and the
//! database cuts every connection and refuses new ones (what clients see of a
//! restart), then lets them through again: calls fail with UNAVAILABLE meanwhile
//! (not INTERNAL, and none hangs), succeed after without restarting keyplaned, and
//! nothing is half-written or written twice.

use crate::fixture::SYNC_TIMEOUT;
use keyplane_proto::v1 as pb;
use keyplane_testkit::pg::test_database;
use keyplane_testkit::server::{TestServer, eventually};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy to PostgreSQL that can be taken down (every connection cut, new ones
/// closed at once) and brought back.
struct CutProxy {
    port: u16,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CutProxy {
    async fn start(upstream: String) -> anyhow::Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (up, state) = watch::channel(true);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut state = state.clone();
                if !*state.borrow_and_update() {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Down: both sockets are dropped mid-whatever.
                        _ = state.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(CutProxy { port, up, task })
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

#[derive(Default)]
struct Outcomes {
    /// request_id -> the last outcome (None: OK).
    calls: BTreeMap<String, Option<tonic::Code>>,
    ok: usize,
    unavailable: usize,
    /// Any other failure, with its message.
    other: Vec<String>,
}

#[tokio::test]
async fn database_restart_under_load_is_unavailable_then_recovers() -> anyhow::Result<()> {
    let db = test_database().await?;
    let config = tokio_postgres::Config::from_str(&db.url)?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => anyhow::bail!("this test needs a TCP DATABASE_URL"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let proxy = CutProxy::start(format!("{host}:{port}")).await?;
    let user = config.get_user().unwrap_or("postgres");
    let password = config
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    let via = format!(
        "postgres://{user}{password}@127.0.0.1:{}/{}?sslmode=disable",
        proxy.port, db.name
    );
    let server = TestServer::start_via(db, via, 4).await?;
    let token = server.dealer("Dealer One").await?;
    let mut admin = server.admin(Some(&token)).await?;
    let site = crate::fixture::create_site(&mut admin, "Shop", "Europe/Paris").await?;

    // Load: four clients creating users back to back, each with its own request_id.
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for client in 0..4 {
        let (mut admin, site, outcomes, stop) =
            (admin.clone(), site.clone(), outcomes.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let request_id = format!("c{client}-{n}");
                let call = admin.create_user(pb::CreateUserRequest {
                    parent: site.clone(),
                    user: Some(pb::User {
                        display_name: format!("User {request_id}"),
                        ..Default::default()
                    }),
                    request_id: request_id.clone(),
                });
                // Not a hang: every call is answered within the pool's bounds.
                let outcome = tokio::time::timeout(Duration::from_secs(15), call).await;
                let mut o = outcomes.lock().unwrap_or_else(|p| p.into_inner());
                match outcome {
                    Ok(Ok(_)) => {
                        o.ok += 1;
                        o.calls.insert(request_id, None);
                    }
                    Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                        o.unavailable += 1;
                        o.calls.insert(request_id, Some(status.code()));
                    }
                    Ok(Err(status)) => o.other.push(format!("{status:?}")),
                    Err(_) => o.other.push(format!("{request_id}: no answer within 15 s")),
                }
            }
        }));
    }
    let count = |f: fn(&Outcomes) -> usize| {
        let o = outcomes.lock().unwrap_or_else(|p| p.into_inner());
        f(&o)
    };
    let until = |what: &'static str, f: fn(&Outcomes) -> usize, n: usize| {
        let outcomes = outcomes.clone();
        async move {
            eventually(what, SYNC_TIMEOUT, || {
                let o = outcomes.lock().unwrap_or_else(|p| p.into_inner());
                let done = f(&o) >= n;
                async move { Ok(done.then_some(())) }
            })
            .await
        }
    };
    let ok = |o: &Outcomes| o.ok;
    let unavailable = |o: &Outcomes| o.unavailable;
    until("calls succeed before the outage", ok, count(ok) + 20).await?;

    proxy.set_up(false);
    until(
        "calls fail with UNAVAILABLE during the outage",
        unavailable,
        count(unavailable) + 20,
    )
    .await?;
    assert_eq!(count(|o| o.other.len()), 0, "only UNAVAILABLE");

    proxy.set_up(true);
    until(
        "calls succeed again once the database is back",
        ok,
        count(ok) + 20,
    )
    .await?;
    stop.cancel();
    for task in load {
        task.await?;
    }
    let outcomes = Arc::try_unwrap(outcomes)
        .map_err(|_| anyhow::anyhow!("load still running"))?
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    assert!(outcomes.other.is_empty(), "{:?}", outcomes.other);

    // Nothing half-written or doubled: each failed call, retried with its request_id,
    // succeeds; then every call made exactly one user with exactly one audit record.
    for (request_id, outcome) in &outcomes.calls {
        if outcome.is_some() {
            admin
                .create_user(pb::CreateUserRequest {
                    parent: site.clone(),
                    user: Some(pb::User {
                        display_name: format!("User {request_id}"),
                        ..Default::default()
                    }),
                    request_id: request_id.clone(),
                })
                .await?;
        }
    }
    let db = server.db.client().await?;
    let site_id = uuid::Uuid::try_parse(site.trim_start_matches("sites/"))?;
    let users: i64 = db
        .query_one(
            "SELECT count(*) FROM site_user WHERE site_id = $1",
            &[&site_id],
        )
        .await?
        .get(0);
    let distinct: i64 = db
        .query_one(
            "SELECT count(DISTINCT display_name) FROM site_user WHERE site_id = $1",
            &[&site_id],
        )
        .await?
        .get(0);
    let audited: i64 = db
        .query_one(
            "SELECT count(*) FROM audit_log WHERE site_id = $1 AND action = 'user.create'",
            &[&site_id],
        )
        .await?
        .get(0);
    let calls = i64::try_from(outcomes.calls.len())?;
    assert_eq!(users, calls, "one user per call");
    assert_eq!(distinct, calls, "no call made two users");
    assert_eq!(audited, calls, "one audit record per user");
    server.stop().await?;
    Ok(())
}
