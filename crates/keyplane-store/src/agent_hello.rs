//! What a site's agent said about itself in its last Hello (issue 14): version,
//! protocol, time-zone database and clock, with the skew keyplaned measured. Whether
//! the skew is flagged is `keyplane_core::clock`; its changes are stored as events.

use crate::{Cached, Store, StoreError, in_txn};
use keyplane_core::EventKind;
use keyplane_core::clock::{self, ClockCheck, ClockTransition};
use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// The parts of a Hello keyplaned keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHello {
    /// As the agent reported it.
    pub agent_version: String,
    /// The protocol it speaks (`keyplane_core::compat::hello_protocol`).
    pub protocol_version: i32,
    /// Its IANA time-zone database release; empty when not reported.
    pub tzdb_version: String,
    /// Its wall clock when it sent the Hello; None when not reported.
    pub agent_time: Option<SystemTime>,
}

/// The last Hello of a site's agent as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHelloInfo {
    /// What the agent said.
    pub hello: AgentHello,
    /// keyplaned's clock when it arrived.
    pub receive_time: SystemTime,
    /// Agent clock minus keyplaned's, milliseconds; None when not reported.
    pub clock_skew_ms: Option<i64>,
    /// Since when the skew is beyond the threshold; None while it is not.
    pub clock_skew_since: Option<SystemTime>,
    /// The threshold the skew was classified against, milliseconds.
    pub clock_skew_threshold_ms: i64,
}

fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// Stores a change of a site's clock flag as a site event (no device).
async fn clock_event(
    tx: &crate::Transaction<'_>,
    site: Uuid,
    change: ClockTransition,
    at: SystemTime,
) -> Result<(), StoreError> {
    let kind = match change {
        ClockTransition::SkewRaised => EventKind::ClockSkew,
        ClockTransition::SkewCleared => EventKind::ClockSkewCleared,
    };
    tx.execute(
        "INSERT INTO device_event (site_id, source_seq, kind, occur_time)
         VALUES ($1, 0, $2, $3)",
        &[&site, &kind.as_str(), &at],
    )
    .await?;
    Ok(())
}

impl Store {
    /// Records the Hello of `site`'s agent, received at `receive_time` by keyplaned's
    /// clock, and classifies its clock against `threshold`; a change of the flag is
    /// stored as an event (`clock_skew` / `clock_skew_cleared`), returned so the
    /// caller can wake event watchers. One transaction.
    pub async fn agent_hello_record(
        &self,
        site: Uuid,
        hello: &AgentHello,
        receive_time: SystemTime,
        threshold: Duration,
    ) -> Result<(ClockCheck, Option<ClockTransition>), StoreError> {
        let check = clock::classify(
            hello.agent_time.map(unix_ms),
            unix_ms(receive_time),
            threshold,
        );
        let threshold_ms = i64::try_from(threshold.as_millis()).unwrap_or(i64::MAX);
        in_txn!(self, "agent_hello_record", |tx| {
            // The site row serializes two Hellos of one site (a takeover): one event
            // each way. The agent_hello row lock orders this Hello with the stream's
            // clock reports. Both in one round trip, the site row locked first.
            let read = crate::batch_in_txn(
                &tx,
                &[
                    (
                        "SELECT 1 FROM site WHERE id = $1 FOR NO KEY UPDATE",
                        crate::params![&site],
                    ),
                    (
                        "SELECT clock_skew_since FROM agent_hello WHERE site_id = $1 FOR UPDATE",
                        crate::params![&site],
                    ),
                ],
            )
            .await?;
            let since: Option<SystemTime> = read
                .get(1)
                .and_then(|rows| rows.first())
                .and_then(|r| r.get(0));
            let change = clock::transition(since.is_some(), check);
            let since = check.skewed().then(|| since.unwrap_or(receive_time));
            tx.execute(
                "INSERT INTO agent_hello (site_id, agent_version, protocol_version, tzdb_version,
                    agent_time, receive_time, clock_skew_ms, clock_skew_since,
                    clock_skew_threshold_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (site_id) DO UPDATE SET agent_version = $2, protocol_version = $3,
                    tzdb_version = $4, agent_time = $5, receive_time = $6, clock_skew_ms = $7,
                    clock_skew_since = $8, clock_skew_threshold_ms = $9",
                &[
                    &site,
                    &hello.agent_version,
                    &hello.protocol_version,
                    &hello.tzdb_version,
                    &hello.agent_time,
                    &receive_time,
                    &check.skew_ms(),
                    &since,
                    &threshold_ms,
                ],
            )
            .await?;
            if let Some(change) = change {
                clock_event(&tx, site, change, receive_time).await?;
            }
            Ok((check, change))
        })
    }

    /// Records the wall clock `site`'s agent reported on its stream (a clock
    /// report, between Hellos), received at `receive_time`: the skew is measured and
    /// flagged as at Hello, a change of the flag stored as an event and returned.
    /// The rest of the last Hello stays; a site whose agent never said Hello records
    /// nothing. One transaction, one row (the site row is not locked: reports come
    /// every minute from every agent).
    pub async fn agent_clock_record(
        &self,
        site: Uuid,
        agent_time: SystemTime,
        receive_time: SystemTime,
        threshold: Duration,
    ) -> Result<(ClockCheck, Option<ClockTransition>), StoreError> {
        let check = clock::classify(Some(unix_ms(agent_time)), unix_ms(receive_time), threshold);
        let threshold_ms = i64::try_from(threshold.as_millis()).unwrap_or(i64::MAX);
        in_txn!(self, "agent_clock_record", |tx| {
            let Some(row) = tx
                .query_opt(
                    "SELECT clock_skew_since FROM agent_hello WHERE site_id = $1 FOR UPDATE",
                    &[&site],
                )
                .await?
            else {
                return Ok((check, None));
            };
            let since: Option<SystemTime> = row.get(0);
            let change = clock::transition(since.is_some(), check);
            let since = check.skewed().then(|| since.unwrap_or(receive_time));
            tx.execute(
                "UPDATE agent_hello SET agent_time = $2, receive_time = $3, clock_skew_ms = $4,
                    clock_skew_since = $5, clock_skew_threshold_ms = $6
                 WHERE site_id = $1",
                &[
                    &site,
                    &agent_time,
                    &receive_time,
                    &check.skew_ms(),
                    &since,
                    &threshold_ms,
                ],
            )
            .await?;
            if let Some(change) = change {
                clock_event(&tx, site, change, receive_time).await?;
            }
            Ok((check, change))
        })
    }

    /// The last Hello of `site`'s agent (a site of `dealer`); None if it never said one.
    pub async fn agent_hello_get(
        &self,
        dealer: Uuid,
        site: Uuid,
    ) -> Result<Option<AgentHelloInfo>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT h.agent_version, h.protocol_version, h.tzdb_version, h.agent_time,
                    h.receive_time, h.clock_skew_ms, h.clock_skew_since, h.clock_skew_threshold_ms
                 FROM agent_hello h JOIN site s ON s.id = h.site_id
                 WHERE h.site_id = $1 AND s.dealer_id = $2",
                &[&site, &dealer],
            )
            .await?;
        Ok(row.map(|r| AgentHelloInfo {
            hello: AgentHello {
                agent_version: r.get(0),
                protocol_version: r.get(1),
                tzdb_version: r.get(2),
                agent_time: r.get(3),
            },
            receive_time: r.get(4),
            clock_skew_ms: r.get(5),
            clock_skew_since: r.get(6),
            clock_skew_threshold_ms: r.get(7),
        }))
    }
}
