-- Access control an auditor would accept (issue #25): API keys made at run time, an
-- append-only audit log, and what each key was served.

-- A key made by `etlsvc keys create` or POST /admin/keys. Only a keyed hash of its secret
-- is kept (HMAC-SHA256 under the secret etl_secrets.key_hash, or ETLSVC_KEY_HASH_SECRET):
-- the secret is 256 random bits, which no one guesses from its hash, so a slow password
-- hash would only cost every request; the key to the hash keeps a copy of this table from
-- being checked against candidate keys. A rotated key's former secret stays valid until
-- previous_until.
CREATE TABLE etl_api_keys (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant text NOT NULL,
    name text NOT NULL,
    scope text NOT NULL CHECK (scope IN ('read', 'run', 'admin')),
    -- Globs of the sources the key is limited to (empty: every source its tenant reads).
    sources text[] NOT NULL DEFAULT '{}',
    -- Fields left out of every record the key reads (/data, the change feed).
    hidden_fields text[] NOT NULL DEFAULT '{}',
    digest bytea NOT NULL UNIQUE,
    previous_digest bytea UNIQUE,
    previous_until timestamptz,
    expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL,
    rotated_at timestamptz,
    revoked_at timestamptz,
    last_used_at timestamptz
);
CREATE UNIQUE INDEX etl_api_keys_name ON etl_api_keys (tenant, name) WHERE revoked_at IS NULL;

-- Secrets of this database's service (the key to the keys' hash). Never readable by the
-- API's role.
CREATE TABLE etl_secrets (
    name text PRIMARY KEY,
    value bytea NOT NULL
);

-- Every change to a key that decides who gets in, and to a share, bumps this counter, which
-- every replica polls (each second) to reload its keys and shares: a revocation holds
-- everywhere within seconds.
CREATE TABLE etl_key_changes (n bigint NOT NULL);
INSERT INTO etl_key_changes VALUES (0);

CREATE FUNCTION etlsvc_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE etl_key_changes SET n = n + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER etl_api_keys_changed
    AFTER INSERT OR DELETE OR UPDATE OF tenant, scope, sources, hidden_fields, digest,
        previous_digest, previous_until, expires_at, revoked_at
    ON etl_api_keys FOR EACH STATEMENT EXECUTE FUNCTION etlsvc_key_changed();
CREATE TRIGGER etl_shares_changed AFTER INSERT OR DELETE OR UPDATE ON etl_shares
    FOR EACH STATEMENT EXECUTE FUNCTION etlsvc_key_changed();

-- The audit log: every mutating request, admin action and failed authentication. Rows are
-- only ever added: the API's role may insert and (for its tenant) read, never change or
-- remove, and a trigger refuses updates and deletes from anyone.
CREATE TABLE etl_audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Whose action (NULL: the caller could not be told, e.g. an unknown key).
    tenant text,
    -- Who: key:NAME, jwt:SUBJECT, cli:USER, or anonymous.
    actor text NOT NULL,
    action text NOT NULL,
    target text,
    outcome text NOT NULL CHECK (outcome IN ('ok', 'denied', 'failed')),
    status int,
    request_id text,
    client text,
    details jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX etl_audit_tenant ON etl_audit (tenant, id);

CREATE FUNCTION etlsvc_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER etl_audit_append_only BEFORE UPDATE OR DELETE ON etl_audit
    FOR EACH ROW EXECUTE FUNCTION etlsvc_append_only();

-- Rows and requests served, per day, consumer key and dataset (flushed by each replica
-- every few seconds, added up).
CREATE TABLE etl_usage (
    day date NOT NULL,
    tenant text NOT NULL,
    key_name text NOT NULL,
    source text NOT NULL,
    requests bigint NOT NULL DEFAULT 0,
    rows bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, source, tenant, key_name)
);

DO $$
BEGIN
    -- 0017 made every new table readable by etlsvc_api: not these two.
    REVOKE ALL ON etl_api_keys, etl_secrets FROM etlsvc_api;
    GRANT INSERT ON etl_audit TO etlsvc_api;
    ALTER TABLE etl_audit ENABLE ROW LEVEL SECURITY;
    -- An admin reads its tenant's entries; the default tenant's (the operator's) also those
    -- no tenant could be told for.
    CREATE POLICY tenant_audit ON etl_audit FOR SELECT TO etlsvc_api USING (
        tenant = current_setting('etlsvc.tenant', true)
        OR (tenant IS NULL AND current_setting('etlsvc.tenant', true) = 'default'));
    CREATE POLICY audit_insert ON etl_audit FOR INSERT TO etlsvc_api WITH CHECK (true);
    -- A publisher sees who consumes its datasets; a consumer what it consumed.
    ALTER TABLE etl_usage ENABLE ROW LEVEL SECURITY;
    CREATE POLICY tenant_reads ON etl_usage FOR SELECT TO etlsvc_api USING (
        tenant = current_setting('etlsvc.tenant', true)
        OR source IN (SELECT s.source FROM etl_sources s
                      WHERE s.tenant = current_setting('etlsvc.tenant', true)));
END $$;

-- What the catalog says of a dataset the caller reads, its own or shared with it: figures
-- of the publisher's runs, not the runs.
CREATE FUNCTION etlsvc_dataset_figures() RETURNS TABLE (
    source text, last_success timestamptz, reject_rate_7d float8, schema_changes jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT e.source,
           (SELECT max(r.finished_at) FROM etl_runs r
             WHERE r.source = e.source AND r.status = 'succeeded'
               AND r.trigger IN ('manual', 'schedule', 'startup', 'stream')),
           (SELECT sum(r.rows_rejected)::float8 / nullif(sum(r.rows_read), 0) FROM etl_runs r
             WHERE r.source = e.source AND r.started_at > now() - interval '7 days'),
           (SELECT jsonb_agg(jsonb_build_object('run_id', d.id, 'at', d.finished_at,
                                                'changes', d.notes -> 'drift')
                             ORDER BY d.id DESC)
              FROM (SELECT id, finished_at, notes FROM etl_runs
                     WHERE etl_runs.source = e.source AND notes ? 'drift'
                     ORDER BY id DESC LIMIT 10) d)
    FROM etl_sources e
    WHERE e.source = ANY (etlsvc_visible(true))
$$;
REVOKE ALL ON FUNCTION etlsvc_dataset_figures() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION etlsvc_dataset_figures() TO etlsvc_api;

-- A dataset shared with a tenant is its rows: the subscriber reads normalized_data and the
-- versions, tombstones and data versions of the feed and of reads as of a moment; never the
-- publisher's runs, rejects, raw rows, checkpoints, backfills or notifications (which hold
-- what the share may hide: a raw row has every field, a reject its record). Those tables
-- are held to the tenant's own sources.
DO $$
DECLARE
    t regclass;
BEGIN
    FOR t IN
        SELECT c.oid::regclass FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'source' AND NOT a.attisdropped
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
          AND c.relname NOT IN ('normalized_data', 'data_history', 'data_history_settings',
                                'data_tombstones', 'data_versions', 'etl_sources',
                                'etl_shares', 'etl_usage')
    LOOP
        EXECUTE format('ALTER POLICY tenant_reads ON %s '
                       'USING (source = ANY ((SELECT etlsvc_visible(false))::text[]))', t);
    END LOOP;
END $$;
