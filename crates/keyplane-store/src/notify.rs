//! Cross-replica wake-ups (issue 15): after a write commits, its replica names the
//! site in a NOTIFY on [`SITES_CHANNEL`], sent in its own short transaction and
//! coalesced with other sites written meanwhile; every replica LISTENs on one
//! dedicated connection ([`SiteListener`]) and re-reads the state of the sites named
//! that it holds streams for ([`Store::site_states`]). The change log stays the
//! truth: a lost notification delays a change until the next poll, never loses it.

use crate::sync::SiteChange;
use crate::{Cached, Store, StoreError};
use futures_util::future::poll_fn;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::AsyncMessage;
use uuid::Uuid;

/// The channel site ids are announced on.
pub const SITES_CHANNEL: &str = "keyplane_sites";

/// The most bytes of one NOTIFY payload: PostgreSQL refuses 8000 and more.
const PAYLOAD_MAX: usize = 7900;

/// Splits `sites` into comma-separated payloads of at most [`PAYLOAD_MAX`] bytes.
fn payloads(sites: &[Uuid]) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for site in sites {
        let id = site.hyphenated().to_string();
        if !cur.is_empty() && cur.len() + 1 + id.len() > PAYLOAD_MAX {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(',');
        }
        cur.push_str(&id);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The site ids of a payload; what does not parse is skipped (another program may
/// share the channel name).
fn parse_payload(payload: &str) -> impl Iterator<Item = Uuid> + '_ {
    payload.split(',').filter_map(|s| s.trim().parse().ok())
}

impl Store {
    /// Names `sites` to every replica listening (one statement, one NOTIFY per
    /// 7900 bytes of ids). Never call it inside a write transaction: a NOTIFY
    /// serializes the commits of every transaction that sends one.
    ///
    /// Its commit does not wait for the WAL flush (`synchronous_commit` off for this
    /// statement's own transaction): it writes nothing but the notification, which
    /// is delivered at commit either way, and a database crash that loses the commit
    /// also ends every listener's connection, and each listener re-reads every site
    /// it holds when it reconnects. Waiting cost one more flush per announcement
    /// (one per write at one client) beside the writes' own.
    pub async fn sites_announce(&self, sites: &[Uuid]) -> Result<(), StoreError> {
        let payloads = payloads(sites);
        if payloads.is_empty() {
            return Ok(());
        }
        let conn = self.conn().await?;
        // set_config(.., true) lasts until the end of the statement's implicit
        // transaction, its commit included.
        conn.query(
            "SELECT pg_notify('keyplane_sites', p) FROM unnest($1::text[]) p
              WHERE set_config('synchronous_commit', 'off', true) IS NOT NULL",
            &[&payloads],
        )
        .await?;
        Ok(())
    }

    /// The current revision, session epoch and resync sequence of `sites`; a site
    /// that no longer exists comes back `gone`. No dealer scoping: wake-ups only.
    pub async fn site_states(&self, sites: &[Uuid]) -> Result<Vec<SiteChange>, StoreError> {
        if sites.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT id, revision, session_epoch, resync_seq FROM site WHERE id = ANY($1)",
                &[&sites],
            )
            .await?;
        let mut found = HashSet::with_capacity(rows.len());
        let mut out: Vec<SiteChange> = rows
            .iter()
            .map(|r| {
                let site: Uuid = r.get(0);
                found.insert(site);
                SiteChange {
                    site,
                    revision: r.get(1),
                    session_epoch: r.get(2),
                    gone: false,
                    resync: r.get(3),
                }
            })
            .collect();
        out.extend(
            sites
                .iter()
                .filter(|s| !found.contains(*s))
                .map(|&site| SiteChange {
                    site,
                    revision: 0,
                    session_epoch: 0,
                    gone: true,
                    resync: 0,
                }),
        );
        Ok(out)
    }
}

#[derive(Default)]
struct Inbox {
    sites: HashSet<Uuid>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    inbox: Mutex<Inbox>,
    bell: tokio::sync::Notify,
}

impl Shared {
    fn close(&self) {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.bell.notify_one();
    }
}

/// A dedicated connection LISTENing on [`SITES_CHANNEL`]. Sites named while nobody
/// reads are coalesced into one set, so a slow reader holds one entry per site at
/// most and never backs up PostgreSQL's notification queue.
pub struct SiteListener {
    client: tokio_postgres::Client,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for SiteListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteListener").finish_non_exhaustive()
    }
}

impl Drop for SiteListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SiteListener {
    /// Opens a connection to `url` (TLS as its `sslmode` says) named
    /// `application_name` (what an operator sees in `pg_stat_activity`), and LISTENs.
    pub async fn connect(url: &str, application_name: &str) -> Result<SiteListener, StoreError> {
        let mut connect = crate::tls::pg_connect(url)?;
        connect.config.application_name(application_name);
        connect.config.connect_timeout(crate::POOL_WAIT);
        // A connection cut without a FIN (a partition) is noticed by the ping of the
        // caller; keepalives also close it at the socket.
        connect
            .config
            .keepalives_idle(std::time::Duration::from_secs(30));
        let shared = Arc::new(Shared::default());
        let (client, task) = match connect.tls {
            Some(tls) => {
                let (client, conn) = connect.config.connect(tls).await?;
                (client, tokio::spawn(drive(conn, shared.clone())))
            }
            None => {
                let (client, conn) = connect.config.connect(tokio_postgres::NoTls).await?;
                (client, tokio::spawn(drive(conn, shared.clone())))
            }
        };
        let listener = SiteListener {
            client,
            shared,
            task,
        };
        listener
            .client
            .batch_execute("LISTEN keyplane_sites")
            .await?;
        Ok(listener)
    }

    /// The sites named since the last call (at least one), waiting for some; None
    /// once the connection is gone.
    pub async fn next(&mut self) -> Option<Vec<Uuid>> {
        loop {
            {
                let mut inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
                if !inbox.sites.is_empty() {
                    return Some(inbox.sites.drain().collect());
                }
                if inbox.closed {
                    return None;
                }
            }
            self.shared.bell.notified().await;
        }
    }

    /// One round trip on the connection: fails when it is gone.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

/// Drives the connection, collecting the sites named, until it ends.
async fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if n.channel() != SITES_CHANNEL {
                    continue;
                }
                let mut inbox = shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
                inbox.sites.extend(parse_payload(n.payload()));
                drop(inbox);
                shared.bell.notify_one();
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the wake-up listener's connection failed");
                break;
            }
            None => break,
        }
    }
    shared.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_notify_limit_and_lose_no_site() {
        for n in [0usize, 1, 2, 213, 214, 215, 1000] {
            let sites: Vec<Uuid> = (0..n).map(|i| Uuid::from_u128(i as u128 + 1)).collect();
            let out = payloads(&sites);
            assert!(out.iter().all(|p| p.len() <= PAYLOAD_MAX), "{n}");
            let back: Vec<Uuid> = out.iter().flat_map(|p| parse_payload(p)).collect();
            assert_eq!(back, sites, "{n}");
            // 213 ids of 36 bytes and their commas fit 7900 bytes.
            assert_eq!(out.len(), n.div_ceil(213), "{n}");
        }
        assert_eq!(parse_payload("x,,").count(), 0);
    }
}
