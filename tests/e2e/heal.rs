//! Issue 14: the agent heals what was lost on the way. A write the device answered
//! but did not keep is written again and acked only once read back; a report lost
//! with a cut stream is sent again on the next one.

use crate::fixture::{SYNC_TIMEOUT, Site, lock_scope, slot_on};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::{TestAgent, eventually};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The status of `credential` on `device`, once `ready`.
async fn wait_state(
    s: &Site,
    credential: &str,
    device: &pb::Device,
    what: &str,
    ready: impl Fn(&pb::SlotAssignmentStatus) -> bool,
) -> anyhow::Result<pb::SlotAssignmentStatus> {
    eventually(what, SYNC_TIMEOUT, || async {
        let c = s
            .admin
            .clone()
            .get_credential(pb::GetCredentialRequest {
                name: credential.to_owned(),
            })
            .await?
            .into_inner();
        Ok(c.slots
            .iter()
            .find(|a| a.device == device.name)
            .and_then(|a| a.state.clone())
            .filter(|st| ready(st)))
    })
    .await
}

fn is_set(st: &pb::SlotAssignmentStatus) -> bool {
    st.status == pb::SlotStatus::Set as i32 && st.errors.is_empty() && st.warnings.is_empty()
}

#[tokio::test]
async fn a_write_the_lock_answers_but_does_not_keep_is_written_again_then_acked()
-> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    // The lock answers the first write as done and does not keep it.
    s.sim(&lock)?.drop_next_writes(1)?;
    let c = s.credential(&alice, "3719", lock_scope(&[&lock])).await?;
    let slot = slot_on(&c, &lock).expect("a slot on the lock");
    let agent = s.start_agent();
    s.wait_synced().await?;
    assert_eq!(
        s.sim(&lock)?.code_in(slot).as_deref(),
        Some("3719"),
        "acked only once the lock holds it"
    );
    assert_eq!(
        s.sim(&lock)?.writes(slot),
        2,
        "the lost write, then the one that took"
    );
    wait_state(&s, &c.name, &lock, "SET, nothing to report", is_set).await?;
    // Written once more than the lost write, never again.
    crate::fixture::after_a_read_back(&s, &agent, &lock).await?;
    assert_eq!(s.sim(&lock)?.writes(slot), 2);
    agent.stop().await?;
    Ok(())
}

/// A TCP proxy between agent and keyplaned that can swallow what the agent sends
/// (the stream stays up, keyplaned hears nothing) and cut every connection.
struct MuteProxy {
    port: u16,
    muted: Arc<AtomicBool>,
    swallowed: Arc<AtomicU64>,
    cut: Arc<watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MuteProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MuteProxy {
    async fn start(upstream: std::net::SocketAddr) -> anyhow::Result<MuteProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let muted = Arc::new(AtomicBool::new(false));
        let swallowed = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(watch::channel(0u64).0);
        let (m, sw, c) = (muted.clone(), swallowed.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, m.clone(), sw.clone(), c.subscribe()));
            }
        });
        Ok(MuteProxy {
            port,
            muted,
            swallowed,
            cut,
            task,
        })
    }

    /// Drops every connection open now (both sides see it closed).
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    muted: Arc<AtomicBool>,
    swallowed: Arc<AtomicU64>,
    mut cut: watch::Receiver<u64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if muted.load(Ordering::SeqCst) {
                swallowed.fetch_add(n as u64, Ordering::SeqCst);
            } else {
                sw.write_all(&buf[..n]).await?;
            }
        }
    };
    let down = async { tokio::io::copy(&mut sr, &mut cw).await };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.changed() => {}
    }
}

#[tokio::test]
async fn reports_and_acks_lost_with_a_cut_stream_are_sent_again_and_the_status_converges()
-> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    let proxy = MuteProxy::start(s.server.addr).await?;
    let mut config = s.agent_config();
    config.server = format!("http://127.0.0.1:{}", proxy.port);
    let agent = TestAgent::start_config(
        config,
        s.dir.path(),
        Box::new(keyplane_agent::SimulatorFactory::new(
            s.dir.path().join("devices"),
        )),
    );
    s.wait_synced().await?;
    // From now on, what the agent sends is lost on the way: the lock's write report
    // (a lost write, then the rewrite) and its ack.
    proxy.muted.store(true, Ordering::SeqCst);
    s.sim(&lock)?.drop_next_writes(1)?;
    let c = s.credential(&alice, "3719", lock_scope(&[&lock])).await?;
    let slot = slot_on(&c, &lock).expect("a slot on the lock");
    eventually("the lock holds the code", SYNC_TIMEOUT, || async {
        Ok((s.sim(&lock)?.code_in(slot).as_deref() == Some("3719")).then_some(()))
    })
    .await?;
    agent.passes(2).await?;
    assert!(proxy.swallowed.load(Ordering::SeqCst) > 0);
    let status = s.sync_status().await?;
    let behind = status
        .devices
        .iter()
        .find(|d| d.device == lock.name)
        .expect("the lock's status");
    assert!(
        behind.applied_revision < status.desired_revision,
        "keyplaned heard nothing: {behind:?}"
    );
    // The stream is cut; on the next one the agent says again what was lost.
    proxy.muted.store(false, Ordering::SeqCst);
    proxy.cut();
    s.wait_synced().await?;
    wait_state(&s, &c.name, &lock, "SET, nothing to report", is_set).await?;
    assert_eq!(s.sim(&lock)?.writes(slot), 2, "nothing written again");
    agent.stop().await?;
    Ok(())
}
