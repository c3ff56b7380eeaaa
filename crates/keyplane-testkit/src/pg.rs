//! Test databases: each test gets its own database, cloned from a template that has
//! the migrations applied, on the server named by `DATABASE_URL` (which
//! `cargo xtask test` points at a private cluster). Tests run in parallel processes,
//! so creating the template is serialized with an advisory lock.

use anyhow::Context;
use std::str::FromStr;
use tokio_postgres::{Client, Config, NoTls};

/// A database of one test.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// Connection URL of the database.
    pub url: String,
    /// Its name.
    pub name: String,
}

impl TestDatabase {
    /// A new connection to the database.
    pub async fn client(&self) -> anyhow::Result<Client> {
        connect(&self.url).await
    }
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "test database connection ended");
        }
    });
    Ok(client)
}

fn redact(url: &str) -> String {
    Config::from_str(url)
        .map(|c| format!("{:?}/{:?}", c.get_hosts(), c.get_dbname()))
        .unwrap_or_else(|_| "an unparsable DATABASE_URL".into())
}

fn url_for(base: &str, dbname: &str) -> anyhow::Result<String> {
    // Replace the path (database) of a postgres:// URL, keeping any query.
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (base, None),
    };
    let scheme_end = head
        .find("://")
        .context("DATABASE_URL must be a postgres:// URL")?
        + 3;
    let authority_end = head[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(head.len());
    let mut url = format!("{}/{dbname}", &head[..authority_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    Ok(url)
}

// Arbitrary constant shared by every test process.
const TEMPLATE_LOCK: i64 = 0x6b70_7465_6d70;

/// Creates a fresh database for one test, migrated, from the shared template.
pub async fn test_database() -> anyhow::Result<TestDatabase> {
    let base = std::env::var("DATABASE_URL").context(
        "DATABASE_URL is not set: run the suite with `cargo xtask test`, or point DATABASE_URL at a PostgreSQL server",
    )?;
    let admin_url = url_for(&base, "postgres")?;
    let admin = connect(&admin_url).await?;
    let template = format!("keyplane_tpl_{}", keyplane_store::migrations_fingerprint());

    admin
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK])
        .await?;
    let ready = template_ensure(&admin, &base, &template).await;
    admin
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK])
        .await?;
    ready?;

    let mut random = [0u8; 6];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let name = format!("keyplane_test_{}", hex::encode(random));
    // CREATE DATABASE ... TEMPLATE fails while anyone is connected to the template;
    // only the template builder ever is, briefly, under the lock above.
    let mut attempt = 0;
    loop {
        match admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
        {
            Ok(()) => break,
            Err(e) if attempt < 20 && e.to_string().contains("being accessed by other users") => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("creating the test database"),
        }
    }
    Ok(TestDatabase {
        url: url_for(&base, &name)?,
        name,
    })
}

async fn template_ensure(admin: &Client, base: &str, template: &str) -> anyhow::Result<()> {
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await?
        .is_some();
    if exists {
        return Ok(());
    }
    // Build under a temporary name and rename at the end, so a half-built template
    // left by a killed process is never used.
    let building = format!("{template}_building");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {building}"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {building}"))
        .await?;
    {
        let mut client = connect(&url_for(base, &building)?).await?;
        keyplane_store::migrate(&mut client).await?;
    }
    // The connection above closes asynchronously; retry the rename until it has.
    for attempt in 0.. {
        match admin
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {template}"))
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 50 && e.to_string().contains("being accessed by other users") => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context("finishing the template database"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        let cases = [
            (
                "postgres://u@127.0.0.1:5432/postgres",
                "postgres://u@127.0.0.1:5432/x",
            ),
            (
                "postgres://u@127.0.0.1:5432",
                "postgres://u@127.0.0.1:5432/x",
            ),
            (
                "postgresql://u:p@h/db?sslmode=disable",
                "postgresql://u:p@h/x?sslmode=disable",
            ),
        ];
        for (base, want) in cases {
            assert_eq!(url_for(base, "x").expect("url"), want);
        }
        assert!(url_for("host=localhost", "x").is_err());
    }

    #[tokio::test]
    async fn parallel_test_databases_are_distinct_and_migrated() -> anyhow::Result<()> {
        let (a, b) = tokio::try_join!(test_database(), test_database())?;
        assert_ne!(a.name, b.name);
        for db in [&a, &b] {
            let client = db.client().await?;
            let n: i64 = client
                .query_one("SELECT count(*) FROM schema_migration", &[])
                .await?
                .get(0);
            assert_eq!(n, keyplane_store::MIGRATIONS.len() as i64);
        }
        // Writes in one are invisible in the other.
        a.client()
            .await?
            .execute(
                "INSERT INTO dealer (display_name) VALUES ('only in a')",
                &[],
            )
            .await?;
        let n: i64 = b
            .client()
            .await?
            .query_one("SELECT count(*) FROM dealer", &[])
            .await?
            .get(0);
        assert_eq!(n, 0);
        Ok(())
    }
}
