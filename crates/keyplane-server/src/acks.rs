//! The acks of every agent stream of a replica, recorded together: each ack used to
//! be its own commit, and with agents acking every change the writes and the acks
//! queued on the same WAL flushes (docs/BENCHMARKS.md). An ack waits for the batch
//! before it to finish, then goes with every ack that arrived meanwhile: one
//! statement and one commit for all of them.

use keyplane_store::{Acked, Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most acks in one statement.
const MAX_BATCH: usize = 256;

/// One ack and where its result goes.
struct Job {
    site: Uuid,
    device: Uuid,
    revision: i64,
    reply: oneshot::Sender<Result<Option<Acked>, StoreError>>,
}

/// Records acks in batches (see the module); clones share the batches.
#[derive(Debug, Clone)]
pub struct AckBatcher {
    jobs: mpsc::Sender<Job>,
}

impl AckBatcher {
    /// Starts the task that records the batches; it ends when every clone is gone.
    pub fn start(store: Store) -> AckBatcher {
        let (jobs, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(store, rx));
        AckBatcher { jobs }
    }

    /// Records that the agent applied everything up to `revision` on `device`, as
    /// [`Store::device_ack`] does, in the next batch.
    pub async fn ack(
        &self,
        site: Uuid,
        device: Uuid,
        revision: i64,
    ) -> Result<Option<Acked>, StoreError> {
        let (reply, result) = oneshot::channel();
        let job = Job {
            site,
            device,
            revision,
            reply,
        };
        if self.jobs.send(job).await.is_err() {
            return Err(StoreError::Internal("the ack recorder has stopped".into()));
        }
        result
            .await
            .map_err(|_| StoreError::Internal("the ack recorder has stopped".into()))?
    }
}

async fn run(store: Store, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let keys: Vec<(Uuid, Uuid, i64)> = batch
            .iter()
            .map(|j| (j.site, j.device, j.revision))
            .collect();
        match store.device_acks(&keys).await {
            Ok(results) => {
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(Ok(result));
                }
            }
            // One ack's trouble (a site deleted meanwhile, a lost connection) is not
            // the others': each is tried alone, as before batches.
            Err(e) if batch.len() > 1 => {
                tracing::debug!(error = %e, acks = batch.len(), "a batch of acks failed; recording each alone");
                for job in batch {
                    let result = store.device_ack(job.site, job.device, job.revision).await;
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                if let Some(job) = batch.pop() {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
    }
}
