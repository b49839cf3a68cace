-- etlsvc_readable() (0017_tenants.sql) in PL/pgSQL, same answer. A SQL function that is
-- not inlined (a SECURITY DEFINER one never is) has its query planned again at every call
-- before PostgreSQL 18: ~0.5 ms of every read the API makes. PL/pgSQL keeps the plan for
-- the session (the query has no parameters, so it is the generic plan even under the read
-- pool's plan_cache_mode = force_custom_plan).
CREATE OR REPLACE FUNCTION etlsvc_readable() RETURNS text[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    RETURN (
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
                                                     E'\n'))));
END
$$;
