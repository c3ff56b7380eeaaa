//! What keyplaned's metrics read from the database at each scrape (issue 17): the
//! sites with changes some device has not applied, and duress events no watcher was
//! sent yet. No dealer scoping: the metrics endpoint is the operator's.

use crate::{Cached, Store, StoreError};
use uuid::Uuid;

/// One site with changes not applied by every device.
#[derive(Debug, Clone)]
pub struct SitePending {
    /// The site.
    pub site: Uuid,
    /// Slot changes not applied, summed over its devices.
    pub changes: i64,
    /// Age of the oldest of them, seconds.
    pub oldest_age_secs: f64,
}

/// The gauges of one scrape.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    /// The sites most behind (oldest pending change first).
    pub pending: Vec<SitePending>,
    /// Duress events of the last day not yet sent to any WatchEvents stream.
    pub duress_undelivered: i64,
    /// Age of the oldest of those, seconds (0 when none).
    pub duress_oldest_age_secs: f64,
}

impl Store {
    /// Reads the gauges of a scrape: at most `sites` sites with pending changes.
    pub async fn metrics_snapshot(&self, sites: i64) -> Result<MetricsSnapshot, StoreError> {
        let conn = self.conn().await?;
        // site_change_by_device (site_id, device_id, revision): each device's changes
        // after its ack, as GetSiteOpsStatus reads them, for every site at once.
        let pending = conn
            .query(
                "SELECT d.site_id, sum(p.n)::bigint,
                        extract(epoch FROM now() - min(p.oldest))::float8
                   FROM device d, LATERAL (SELECT count(DISTINCT ch.slot) AS n,
                        min(ch.change_time) AS oldest FROM site_change ch
                     WHERE ch.site_id = d.site_id AND ch.device_id = d.id
                       AND ch.revision > d.applied_revision) p
                  WHERE p.n > 0
                  GROUP BY d.site_id
                  ORDER BY min(p.oldest)
                  LIMIT $1",
                &[&sites],
            )
            .await?
            .iter()
            .map(|r| SitePending {
                site: r.get(0),
                changes: r.get(1),
                oldest_age_secs: r.get::<_, Option<f64>>(2).unwrap_or(0.0).max(0.0),
            })
            .collect();
        // device_event_duress_undelivered: only the few undelivered duress rows.
        let duress = conn
            .query_one(
                "SELECT count(*), coalesce(extract(epoch FROM now() - min(create_time))::float8, 0)
                   FROM device_event
                  WHERE kind = 'duress' AND delivered_time IS NULL
                    AND create_time > now() - interval '1 day'",
                &[],
            )
            .await?;
        Ok(MetricsSnapshot {
            pending,
            duress_undelivered: duress.get(0),
            duress_oldest_age_secs: duress.get::<_, f64>(1).max(0.0),
        })
    }

    /// Records that the event at `position` of `site`'s log was sent to a WatchEvents
    /// stream; returns its occur time the first time (None when it was already
    /// delivered, or is gone).
    pub async fn event_delivered(
        &self,
        site: Uuid,
        position: i64,
    ) -> Result<Option<std::time::SystemTime>, StoreError> {
        let conn = self.conn().await?;
        Ok(conn
            .query_opt(
                "UPDATE device_event SET delivered_time = now()
                  WHERE site_id = $1 AND site_seq = $2 AND delivered_time IS NULL
                 RETURNING occur_time",
                &[&site, &position],
            )
            .await?
            .map(|r| r.get(0)))
    }
}
