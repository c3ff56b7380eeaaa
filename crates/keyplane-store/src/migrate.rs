//! Embedded, versioned SQL migrations, applied in order under an advisory lock.

use crate::StoreError;

/// The migrations, in order: (version, name, SQL).
pub static MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "foundation",
        include_str!("../migrations/0001_foundation.sql"),
    ),
    (
        2,
        "authority",
        include_str!("../migrations/0002_authority.sql"),
    ),
    (3, "events", include_str!("../migrations/0003_events.sql")),
    (
        4,
        "access_plans",
        include_str!("../migrations/0004_access_plans.sql"),
    ),
    (5, "doors", include_str!("../migrations/0005_doors.sql")),
    (
        6,
        "observed",
        include_str!("../migrations/0006_observed.sql"),
    ),
    (
        7,
        "keys_sessions",
        include_str!("../migrations/0007_keys_sessions.sql"),
    ),
    (
        8,
        "change_time",
        include_str!("../migrations/0008_change_time.sql"),
    ),
    (
        9,
        "agent_identity",
        include_str!("../migrations/0009_agent_identity.sql"),
    ),
    (
        10,
        "slot_status",
        include_str!("../migrations/0010_slot_status.sql"),
    ),
    (
        11,
        "pin_hash_keys",
        include_str!("../migrations/0011_pin_hash_keys.sql"),
    ),
    (
        12,
        "observed_seal_slot",
        include_str!("../migrations/0012_observed_seal_slot.sql"),
    ),
    (
        13,
        "slot_status_history",
        include_str!("../migrations/0013_slot_status_history.sql"),
    ),
    (
        14,
        "agent_hello",
        include_str!("../migrations/0014_agent_hello.sql"),
    ),
    (
        15,
        "retention_audit",
        include_str!("../migrations/0015_retention_audit.sql"),
    ),
    (
        16,
        "event_order",
        include_str!("../migrations/0016_event_order.sql"),
    ),
    (
        17,
        "agent_connection",
        include_str!("../migrations/0017_agent_connection.sql"),
    ),
    (
        18,
        "site_keys",
        include_str!("../migrations/0018_site_keys.sql"),
    ),
    (
        19,
        "watch_lease",
        include_str!("../migrations/0019_watch_lease.sql"),
    ),
    (
        20,
        "change_window",
        include_str!("../migrations/0020_change_window.sql"),
    ),
    (
        21,
        "change_trace",
        include_str!("../migrations/0021_change_trace.sql"),
    ),
    (
        22,
        "duress_delivery",
        include_str!("../migrations/0022_duress_delivery.sql"),
    ),
    (
        23,
        "audit_by_site",
        include_str!("../migrations/0023_audit_by_site.sql"),
    ),
    (
        24,
        "event_key",
        include_str!("../migrations/0024_event_key.sql"),
    ),
    (
        25,
        "audit_position_given",
        include_str!("../migrations/0025_audit_position_given.sql"),
    ),
    (
        26,
        "slot_removed_when_any",
        include_str!("../migrations/0026_slot_removed_when_any.sql"),
    ),
    (
        27,
        "site_change_by_slot",
        include_str!("../migrations/0027_site_change_by_slot.sql"),
    ),
    (
        28,
        "slot_given_or_refused",
        include_str!("../migrations/0028_slot_given_or_refused.sql"),
    ),
    (
        29,
        "liveness_refresh_not_news",
        include_str!("../migrations/0029_liveness_refresh_not_news.sql"),
    ),
];

/// Fingerprint of all migrations (changes whenever any SQL changes); test kits name
/// their template databases after it.
pub fn migrations_fingerprint() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (v, name, sql) in MIGRATIONS {
        h.update(v.to_le_bytes());
        h.update(name.as_bytes());
        h.update(sql.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

// Arbitrary constant; serializes concurrent migrators (several keyplaned replicas).
const MIGRATION_LOCK: i64 = 0x6b65_7970_6c61_6e65;

/// Applies every migration not yet applied, each in its own transaction.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migration (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_time timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply_pending(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}

async fn apply_pending(client: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    for (version, name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        let applied = tx
            .query_opt(
                "SELECT 1 FROM schema_migration WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !applied {
            tracing::info!(version, name, "applying migration");
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migration (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await?;
        }
        tx.commit().await?;
    }
    Ok(())
}
