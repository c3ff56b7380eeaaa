//! The live schema, after every migration, against Citus's rules for tables
//! distributed by site (issue 17, docs/SCALING.md): read from pg_catalog, so a new
//! table, key or sequence is checked without anyone listing it.
//!
//! A table is distributed when it has a `site_id` column (and `site` itself, by
//! `id`); every other table must be one of [`REFERENCE_TABLES`]. The gaps the schema
//! still has are [`KNOWN_GAPS`], each described in docs/SCALING.md: the test fails on
//! any other violation, and on a listed gap that no longer exists (strike it off
//! here and in the doc).

use std::collections::{BTreeMap, BTreeSet};
use tokio_postgres::Client;

/// Tables that are not distributed by site: Citus replicates them to every node.
const REFERENCE_TABLES: &[(&str, &str)] = &[
    (
        "dealer",
        "tenants: a few rows per dealer, read by every site's writes",
    ),
    (
        "dealer_token",
        "per dealer, read at authentication, written rarely",
    ),
    ("idempotency_key", "per dealer (request ids of creates)"),
    (
        "dealer_audit_log",
        "per dealer: its dealer-level audit records (tokens, retention policy), keyed (dealer_id, position)",
    ),
    (
        "watch_lease",
        "per dealer: its open WatchEvents streams, counted over replicas",
    ),
    (
        "ca_key_in_use",
        "one row: the agent CA every replica must use",
    ),
    (
        "pin_key_in_use",
        "one row: the PIN key every replica must use",
    ),
    ("schema_migration", "migrations applied (coordinator only)"),
];

/// A rule of Citus's for distributed tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rule {
    /// Every primary key and unique constraint or index holds the distribution column.
    KeyHoldsSite,
    /// The distribution column is NOT NULL.
    SiteNotNull,
    /// A foreign key between distributed tables holds the distribution column on both
    /// sides, at the same position.
    ForeignKeyHoldsSite,
    /// No column takes its values from a sequence (identity or `nextval` default):
    /// each node has its own range, so values are unique but not ordered across nodes.
    NoGlobalSequence,
    /// A reference table has no foreign key to a distributed table.
    ReferenceRefersToReference,
    /// Every table is distributed by site or listed as a reference table.
    Classified,
}

/// Gaps documented in docs/SCALING.md ("Where the schema did not follow the
/// rules"), with the way out of each.
const KNOWN_GAPS: &[(&str, Rule)] = &[];

const SCALING: &str = include_str!("../../docs/SCALING.md");

/// One violation: table, rule, and what exactly.
type Violation = (String, Rule, String);

/// The distribution column of `table`, if it is distributed by site.
fn site_column(table: &str, columns: &BTreeSet<String>) -> Option<&'static str> {
    if table == "site" {
        Some("id")
    } else if columns.contains("site_id") {
        Some("site_id")
    } else {
        None
    }
}

/// Checks the tables of `schema`; `reference` lists its reference tables.
async fn violations(
    db: &Client,
    schema: &str,
    reference: &[&str],
) -> anyhow::Result<Vec<Violation>> {
    let mut columns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut nullable: BTreeSet<(String, String)> = BTreeSet::new();
    let mut sequenced: Vec<(String, String, String)> = Vec::new();
    for r in db
        .query(
            "SELECT c.relname, a.attname, NOT a.attnotnull, a.attidentity <> '',
                    coalesce(pg_get_expr(d.adbin, d.adrelid), '')
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
              WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')",
            &[&schema],
        )
        .await?
    {
        let (table, column): (String, String) = (r.get(0), r.get(1));
        if r.get::<_, bool>(2) {
            nullable.insert((table.clone(), column.clone()));
        }
        let default: String = r.get(4);
        if r.get::<_, bool>(3) || default.contains("nextval(") {
            let how = if r.get::<_, bool>(3) {
                "identity".to_owned()
            } else {
                default
            };
            sequenced.push((table.clone(), column.clone(), how));
        }
        columns.entry(table).or_default().insert(column);
    }
    let dist: BTreeMap<&str, &str> = columns
        .iter()
        .filter_map(|(t, cols)| site_column(t, cols).map(|c| (t.as_str(), c)))
        .collect();
    let mut out: Vec<Violation> = Vec::new();
    for table in columns.keys() {
        let is_ref = reference.contains(&table.as_str());
        match (dist.get(table.as_str()), is_ref) {
            (None, false) => out.push((
                table.clone(),
                Rule::Classified,
                "no site_id and not a listed reference table".into(),
            )),
            (Some(col), true) => out.push((
                table.clone(),
                Rule::Classified,
                format!("listed as a reference table but distributed by {col}"),
            )),
            (Some(col), false) if nullable.contains(&(table.clone(), (*col).to_owned())) => out
                .push((
                    table.clone(),
                    Rule::SiteNotNull,
                    format!("{col} is nullable"),
                )),
            _ => {}
        }
    }
    for (table, column, how) in &sequenced {
        if dist.contains_key(table.as_str()) {
            out.push((
                table.clone(),
                Rule::NoGlobalSequence,
                format!("{column} takes {how}"),
            ));
        }
    }
    // Primary keys, unique constraints and unique indexes (partial ones too).
    for r in db
        .query(
            "SELECT c.relname, i.relname,
                    array(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY k(attnum, ord)
                            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                           ORDER BY k.ord)::text[]
               FROM pg_index x
               JOIN pg_class c ON c.oid = x.indrelid
               JOIN pg_class i ON i.oid = x.indexrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND x.indisunique",
            &[&schema],
        )
        .await?
    {
        let (table, index, cols): (String, String, Vec<String>) = (r.get(0), r.get(1), r.get(2));
        if let Some(col) = dist.get(table.as_str())
            && !cols.iter().any(|c| c == col)
        {
            out.push((
                table,
                Rule::KeyHoldsSite,
                format!("{index} ({}) lacks {col}", cols.join(", ")),
            ));
        }
    }
    for r in db
        .query(
            "SELECT c.relname, con.conname, f.relname,
                    array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
                            JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
                           ORDER BY k.ord)::text[],
                    array(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
                            JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum
                           ORDER BY k.ord)::text[]
               FROM pg_constraint con
               JOIN pg_class c ON c.oid = con.conrelid
               JOIN pg_class f ON f.oid = con.confrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND con.contype = 'f'",
            &[&schema],
        )
        .await?
    {
        let (table, name, target): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let (cols, target_cols): (Vec<String>, Vec<String>) = (r.get(3), r.get(4));
        match (dist.get(table.as_str()), dist.get(target.as_str())) {
            (Some(col), Some(target_col)) => {
                let paired = cols
                    .iter()
                    .zip(&target_cols)
                    .any(|(c, t)| c == col && t == target_col);
                if !paired {
                    out.push((
                        table,
                        Rule::ForeignKeyHoldsSite,
                        format!(
                            "{name} ({}) -> {target} ({}) does not pair {col} with {target_col}",
                            cols.join(", "),
                            target_cols.join(", ")
                        ),
                    ));
                }
            }
            (None, Some(_)) => out.push((
                table,
                Rule::ReferenceRefersToReference,
                format!("{name} refers to the distributed table {target}"),
            )),
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[tokio::test]
async fn the_schema_follows_citus_rules_for_tables_distributed_by_site() -> anyhow::Result<()> {
    let db = keyplane_testkit::pg::test_database().await?;
    let client = db.client().await?;
    let reference: Vec<&str> = REFERENCE_TABLES.iter().map(|(t, _)| *t).collect();
    let found = violations(&client, "public", &reference).await?;
    let gaps: BTreeSet<(&str, Rule)> = KNOWN_GAPS.iter().copied().collect();
    let unexpected: Vec<String> = found
        .iter()
        .filter(|(t, rule, _)| !gaps.contains(&(t.as_str(), *rule)))
        .map(|(t, rule, what)| format!("{t}: {rule:?}: {what}"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the schema breaks Citus's rules for tables distributed by site (docs/SCALING.md); \
         fix it with a migration:\n{}",
        unexpected.join("\n")
    );
    let found_gaps: BTreeSet<(&str, Rule)> = found
        .iter()
        .map(|(t, rule, _)| (t.as_str(), *rule))
        .collect();
    let closed: Vec<String> = gaps
        .difference(&found_gaps)
        .map(|(t, rule)| format!("{t}: {rule:?}"))
        .collect();
    assert!(
        closed.is_empty(),
        "these gaps are closed: strike them off KNOWN_GAPS and docs/SCALING.md:\n{}",
        closed.join("\n")
    );
    for (table, _) in KNOWN_GAPS {
        assert!(
            SCALING.contains(&format!("| `{table}` |")),
            "docs/SCALING.md describes the gap of {table}"
        );
    }
    // The agent identity tables follow the rules since migration 0018; their
    // lookups by hash alone keep an index.
    let plain: BTreeSet<String> = client
        .query(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'
               AND indexname IN ('agent_by_cert', 'agent_token_by_hash', 'enrollment_code_by_hash')",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(plain.len(), 3, "{plain:?}");
    // And the store's lookups use them (the planner is kept off sequential scans,
    // which it prefers on the empty tables of a test database).
    client.batch_execute("SET enable_seqscan = off").await?;
    for (query, index) in [
        (
            "SELECT id, site_id, not_after FROM agent
              WHERE cert_sha256 = '\\x00' AND revoke_time IS NULL AND not_after > now()",
            "agent_by_cert",
        ),
        (
            "SELECT site_id FROM agent_token WHERE token_hash = '\\x00'",
            "agent_token_by_hash",
        ),
        (
            "DELETE FROM enrollment_code WHERE code_hash = '\\x00' AND expire_time > now()",
            "enrollment_code_by_hash",
        ),
        (
            "SELECT 1 FROM agent_token WHERE site_id = gen_random_uuid()",
            "agent_token_pkey",
        ),
    ] {
        let plan: Vec<String> = client
            .query(&format!("EXPLAIN {query}"), &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains(index), "{query}\n{plan}");
    }
    Ok(())
}

#[tokio::test]
async fn the_checker_finds_each_kind_of_violation() -> anyhow::Result<()> {
    let db = keyplane_testkit::pg::test_database().await?;
    let client = db.client().await?;
    client
        .batch_execute(
            "CREATE SCHEMA scratch;
             CREATE TABLE scratch.site (id uuid PRIMARY KEY);
             CREATE TABLE scratch.ok_ref (id int PRIMARY KEY);
             CREATE TABLE scratch.good (site_id uuid NOT NULL REFERENCES scratch.site (id),
                 id uuid, ref int REFERENCES scratch.ok_ref (id), PRIMARY KEY (site_id, id));
             CREATE TABLE scratch.bad_key (site_id uuid NOT NULL, id uuid PRIMARY KEY,
                 code text UNIQUE);
             CREATE TABLE scratch.bad_fk (site_id uuid NOT NULL, id uuid, other uuid,
                 PRIMARY KEY (site_id, id),
                 FOREIGN KEY (other, site_id) REFERENCES scratch.good (site_id, id));
             CREATE TABLE scratch.bad_seq (site_id uuid NOT NULL, n bigserial,
                 PRIMARY KEY (site_id, n));
             CREATE TABLE scratch.bad_null (site_id uuid, id uuid);
             CREATE UNIQUE INDEX ON scratch.good (id, site_id);
             CREATE TABLE scratch.bad_ref (id int PRIMARY KEY, site uuid REFERENCES scratch.site (id));
             CREATE TABLE scratch.unlisted (id int PRIMARY KEY);",
        )
        .await?;
    let found = violations(&client, "scratch", &["ok_ref", "bad_ref"]).await?;
    let got: BTreeSet<(&str, Rule)> = found.iter().map(|(t, r, _)| (t.as_str(), *r)).collect();
    let want: BTreeSet<(&str, Rule)> = [
        ("bad_key", Rule::KeyHoldsSite),
        ("bad_fk", Rule::ForeignKeyHoldsSite),
        ("bad_seq", Rule::NoGlobalSequence),
        ("bad_null", Rule::SiteNotNull),
        ("bad_ref", Rule::ReferenceRefersToReference),
        ("unlisted", Rule::Classified),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want, "{found:#?}");
    // bad_key fails twice: its primary key and its unique column.
    assert_eq!(
        found
            .iter()
            .filter(|(t, r, _)| t == "bad_key" && *r == Rule::KeyHoldsSite)
            .count(),
        2,
        "{found:#?}"
    );
    Ok(())
}
