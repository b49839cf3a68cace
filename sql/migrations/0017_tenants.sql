-- Tenants (issue #25). Every source belongs to one tenant, and so do its rows, raw rows,
-- rejects, runs, versions, tombstones, checkpoints and changes: each of those tables has a
-- source column, and etl_sources says whose each source is. A source's tenant is one row
-- here, not a column written with every row: the write path stays as it is, and moving a
-- source to another tenant moves everything of it at once.
--
-- What a request reads, it reads as the role etlsvc_api, which row-level security holds to
-- the sources of the tenant its transaction names (SET LOCAL etlsvc.tenant) and to those
-- shared with that tenant, narrowed by the key's grants (etlsvc.sources: LIKE patterns). The
-- role owns nothing and has no BYPASSRLS, so it cannot get round the policies; the ETL writes
-- as the owner of the tables, whom they do not hold. A query that forgets its tenant filter,
-- or runs with no tenant set, still sees only what the policies let through: nothing, for
-- no tenant.

CREATE TABLE etl_sources (
    source text PRIMARY KEY,
    tenant text NOT NULL,
    description text,
    tags text[] NOT NULL DEFAULT '{}',
    -- When the config last named the source (a source dropped from the config keeps its
    -- tenant: its rows stay its tenant's).
    configured_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX etl_sources_tenant ON etl_sources (tenant);

-- What was loaded before tenants is the default tenant's.
INSERT INTO etl_sources (source, tenant)
SELECT source, 'default' FROM data_versions
UNION SELECT source, 'default' FROM etl_runs
UNION SELECT source, 'default' FROM etl_checkpoints
ON CONFLICT DO NOTHING;

-- A dataset published by its tenant to another (config [sources.share] or POST
-- /admin/shares): the subscriber reads it, read-only, with the fields listed (NULL: all).
CREATE TABLE etl_shares (
    source text NOT NULL,
    subscriber text NOT NULL,
    fields text[],
    origin text NOT NULL CHECK (origin IN ('config', 'api')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, subscriber)
);
CREATE INDEX etl_shares_subscriber ON etl_shares (subscriber);

DO $$
BEGIN
    CREATE ROLE etlsvc_api NOLOGIN NOINHERIT NOBYPASSRLS;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;       -- another database of this cluster made it (roles are the cluster's)
END $$;

DO $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT etlsvc_api TO %I', current_user);
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'etlsvc cannot give its role % the role etlsvc_api', current_user
        USING HINT = 'as a superuser: CREATE ROLE etlsvc_api NOLOGIN NOINHERIT; '
                     'GRANT etlsvc_api TO ' || quote_ident(current_user) || ';';
END $$;

-- The sources the transaction's caller may read. Rows of a source that no config has named
-- (written by hand) are the default tenant's, as all rows were before tenants.
CREATE FUNCTION etlsvc_readable() RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT coalesce(array_agg(s.source), '{}')
    FROM (SELECT source, tenant FROM etl_sources
          UNION ALL
          SELECT DISTINCT v.source, 'default' FROM data_versions v
          WHERE NOT EXISTS (SELECT 1 FROM etl_sources e WHERE e.source = v.source)) s
    WHERE (s.tenant = current_setting('etlsvc.tenant', true)
           OR s.source IN (SELECT h.source FROM etl_shares h
                           WHERE h.subscriber = current_setting('etlsvc.tenant', true)))
      AND (coalesce(current_setting('etlsvc.sources', true), '') = ''
           OR s.source LIKE ANY (string_to_array(current_setting('etlsvc.sources', true),
                                                 E'\n')))
$$;
REVOKE ALL ON FUNCTION etlsvc_readable() FROM PUBLIC;

-- The service's status over every tenant's sources, for /health and /metrics, which read on
-- the read pool (never starved by runs) as etlsvc_api: per source, its latest load and
-- latest successful load, whether that was anomalous, the run of any kind running now, and
-- the database's clock. Only these columns pass; the API shows a caller only its sources'.
CREATE FUNCTION etlsvc_source_states() RETURNS TABLE (
    source text, id bigint, status text, started_at timestamptz, finished_at timestamptz,
    error text, last_success timestamptz, anomaly jsonb, running_run bigint, now timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT DISTINCT ON (source) source, id, status, started_at, finished_at, error,
           (SELECT max(finished_at) FROM etl_runs s
             WHERE s.source = r.source AND s.status = 'succeeded'
               AND s.trigger IN ('manual', 'schedule', 'startup', 'stream')),
           (SELECT a.anomaly FROM etl_runs a
             WHERE a.source = r.source AND a.status = 'succeeded'
               AND a.trigger IN ('manual', 'schedule', 'startup', 'stream')
             ORDER BY a.id DESC LIMIT 1),
           (SELECT max(g.id) FROM etl_runs g
             WHERE g.source = r.source AND g.status = 'running'),
           statement_timestamp()
    FROM etl_runs r
    WHERE r.trigger IN ('manual', 'schedule', 'startup', 'stream')
    ORDER BY source, id DESC
$$;
REVOKE ALL ON FUNCTION etlsvc_source_states() FROM PUBLIC;

DO $$
DECLARE
    t regclass;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO etlsvc_api', current_schema());
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO etlsvc_api', current_schema());
    GRANT EXECUTE ON FUNCTION etlsvc_readable(), etlsvc_source_states() TO etlsvc_api;
    -- Tables later migrations make: readable too, and tests/integration/test_tenants.py
    -- checks that each one with a source column has the policy.
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES TO etlsvc_api',
                   current_schema());
    FOR t IN
        SELECT c.oid::regclass FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'source' AND NOT a.attisdropped
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
        -- (SELECT …): evaluated once per query, not once per row.
        EXECUTE format('CREATE POLICY tenant_reads ON %s FOR SELECT TO etlsvc_api '
                       'USING (source = ANY ((SELECT etlsvc_readable())::text[]))', t);
    END LOOP;
END $$;
