-- Citus's rule for distributed tables (issue 17, docs/SCALING.md): the distribution
-- column, site_id, in every primary key and unique constraint. The agent identity
-- tables were keyed by a hash alone, because an agent is looked up by its
-- certificate or token hash before its site is known; that lookup keeps a plain
-- index (on Citus a multi-shard index probe, once per stream opening). A SHA-256 of a
-- certificate or of a 256-bit random token does not repeat, so uniqueness within a
-- site loses nothing.
--
-- These tables hold a row or a few per site (one agent certificate, one token, codes
-- that expire), so rebuilding their keys under lock takes milliseconds.
ALTER TABLE agent DROP CONSTRAINT agent_pkey, ADD PRIMARY KEY (site_id, id);
ALTER TABLE agent DROP CONSTRAINT agent_cert_sha256_key,
    ADD CONSTRAINT agent_site_cert_key UNIQUE (site_id, cert_sha256);
CREATE INDEX agent_by_cert ON agent (cert_sha256);
-- The primary key's prefix serves the per-site reads.
DROP INDEX agent_by_site;

ALTER TABLE agent_token DROP CONSTRAINT agent_token_pkey, ADD PRIMARY KEY (site_id, token_hash);
CREATE INDEX agent_token_by_hash ON agent_token (token_hash);
DROP INDEX agent_token_by_site;

ALTER TABLE enrollment_code DROP CONSTRAINT enrollment_code_pkey,
    ADD PRIMARY KEY (site_id, code_hash);
CREATE INDEX enrollment_code_by_hash ON enrollment_code (code_hash);
DROP INDEX enrollment_code_by_site;
