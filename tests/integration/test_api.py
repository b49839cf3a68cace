"""API source against real HTTP on 127.0.0.1: recorded pages from real APIs and faults."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import asyncpg
import msgspec
import yaml

from tests.conftest import CORPUS, Env, api_source, run_source
from tests.upstream import Reply, Request, Upstream

API = CORPUS / "api"
RETRY_FAST = "[sources.retry]\nbackoff = 0.01\n"


async def keys(pool: asyncpg.Pool, source: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT source_id FROM normalized_data WHERE source = $1 ORDER BY source_id", source
    )
    return [r["source_id"] for r in rows]


async def test_github_link_header_walk(env: Env, pool: asyncpg.Pool, upstream: Upstream) -> None:
    exchanges = json.loads(
        (
            API / "github-octokit-fixtures" / "paginate-issues" / "normalized-fixture.json"
        ).read_text()
    )
    pages = {}
    for ex in exchanges:
        path, _, query = ex["path"].partition("?")
        link = ex["headers"].get("link", "").replace("https://api.github.com", upstream.base)
        pages[path, query] = Reply(ex["status"], ex["response"], {"Link": link} if link else {})
        upstream.route(
            path, lambda r: pages[r.path, "&".join(f"{k}={v}" for k, v in r.query.items())]
        )
    cfg = env.config(
        api_source(
            "gh",
            f"{upstream.base}/repos/octokit-fixture-org/paginate-issues/issues",
            'source_id = "id"\ntitle = "title"\nurl = "html_url"\nevent_time = "created_at"',
            'params = { per_page = "3" }\n[sources.pagination]\nstyle = "link_header"\n',
        )
    )
    run = await run_source(cfg, "gh")
    assert run["status"] == "succeeded", run["error"]
    expected = sorted(str(i["id"]) for ex in exchanges for i in ex["response"])
    assert await keys(pool, "gh") == expected and len(expected) == 13
    assert run["pages_read"] == len(exchanges) == 5
    assert await pool.fetchval("SELECT count(*) FROM raw_api_data") == 13
    titles = await pool.fetch("SELECT title FROM normalized_data ORDER BY source_id")
    assert titles[0]["title"].startswith("Test issue")


async def test_netbox_next_url_walk_stops_at_null_next_despite_count(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    folder = API / "netbox-drf-pynetbox" / "dcim"
    first = json.loads(
        (folder / "interfaces_1.json").read_text().replace("http://localhost:8000", upstream.base)
    )
    second = json.loads((folder / "interfaces_2.json").read_text())
    assert first["count"] == 221 and second["next"] is None
    upstream.route(
        "/api/dcim/interfaces/",
        lambda r: Reply(body=second if r.query.get("offset") == "50" else first),
    )
    cfg = env.config(
        api_source(
            "netbox",
            f"{upstream.base}/api/dcim/interfaces/",
            'source_id = "id"\ntitle = "name"\ncategory = "form_factor.label"\n'
            'description = "device.name"',
            'items_path = "results"\n[sources.pagination]\nstyle = "next_url"\n',
        )
    )
    run = await run_source(cfg, "netbox")
    assert run["status"] == "succeeded", run["error"]
    assert len(upstream.requests) == 2
    assert await keys(pool, "netbox") == sorted(
        str(i["id"]) for i in first["results"] + second["results"]
    )
    assert run["rows_inserted"] == 71
    row = await pool.fetchrow(
        "SELECT category, description FROM normalized_data WHERE source_id = '189'"
    )
    assert (row["category"], row["description"]) == ("QSFP+ (40GE)", "test1-core1")
    raw = await pool.fetchval("SELECT record FROM raw_api_data WHERE source_key = '189'")
    assert raw == first["results"][0]


async def test_notion_cursor_walk_with_has_more(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    cassette = yaml.safe_load(
        (API / "notion-cursor-vcr" / "test_iterate_paginated_api.yaml").read_text()
    )
    walk = []
    for i in cassette["interactions"]:
        if i["request"]["method"] == "DELETE":
            break
        if i["request"]["method"] == "GET":
            walk.append(i)
    by_cursor = {}
    for i in walk:
        query = dict(x.split("=") for x in i["request"]["uri"].split("?")[1].split("&"))
        by_cursor[query.get("start_cursor")] = json.loads(i["response"]["body"]["string"])
    path = walk[0]["request"]["uri"].split("https://api.notion.com")[1].split("?")[0]
    upstream.route(path, lambda r: Reply(body=by_cursor[r.query.get("start_cursor")]))
    cfg = env.config(
        api_source(
            "notion",
            upstream.base + path,
            'source_id = "id"\nevent_time = "created_time"\ncategory = "type"',
            'items_path = "results"\nparams = { page_size = "2" }\n'
            '[sources.pagination]\nstyle = "cursor"\ncursor_param = "start_cursor"\n'
            'cursor_path = "next_cursor"\nhas_more_path = "has_more"\n',
        )
    )
    run = await run_source(cfg, "notion")
    assert run["status"] == "succeeded", run["error"]
    expected = sorted(b["id"] for body in by_cursor.values() for b in body["results"])
    assert await keys(pool, "notion") == expected and len(expected) == 5
    assert run["pages_read"] == len(walk) == 3


def numbered_items(n: int) -> list[dict]:
    return [
        {
            "id": f"item-{i:04d}",
            "name": f"Item {i}",
            "price": i / 4,
            "updated_at": f"2024-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
        }
        for i in range(n)
    ]


async def test_page_number_and_offset_styles(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    items = numbered_items(250)

    def by_page(r: Request) -> Reply:
        page, size = int(r.query["page"]), int(r.query["per_page"])
        return Reply(
            body={"data": items[(page - 1) * size : page * size], "total": 999}
        )  # a wrong total must not matter

    def by_offset(r: Request) -> Reply:
        offset, limit = int(r.query["offset"]), int(r.query["limit"])
        return Reply(body=items[offset : offset + limit])

    upstream.route("/paged", by_page)
    upstream.route("/offset", by_offset)
    fields = 'source_id = "id"\ntitle = "name"\namount = "price"'
    cfg = env.config(
        api_source(
            "paged",
            f"{upstream.base}/paged",
            fields,
            'items_path = "data"\n[sources.pagination]\nstyle = "page"\npage_size = 100\n',
        )
        + api_source(
            "offset",
            f"{upstream.base}/offset",
            fields,
            '[sources.pagination]\nstyle = "offset"\npage_size = 100\n',
        )
    )
    for name in ("paged", "offset"):
        run = await run_source(cfg, name)
        assert run["status"] == "succeeded", run["error"]
        assert run["pages_read"] == 4  # 3 full pages and the empty one
        assert await keys(pool, name) == [i["id"] for i in items]
    assert [r.query["page"] for r in upstream.requests[:4]] == ["1", "2", "3", "4"]
    assert [r.query["offset"] for r in upstream.requests[4:]] == ["0", "100", "200", "250"]
    amount = await pool.fetchval(
        "SELECT amount FROM normalized_data WHERE source_id = 'item-0010' AND source = 'offset'"
    )
    assert str(amount) == "2.5"


async def test_a_burst_of_500s_then_success_loads_once(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    items = numbered_items(30)
    failures = {"left": 3}

    def flaky(r: Request) -> Reply:
        page = int(r.query["page"])
        if page == 2 and failures["left"]:
            failures["left"] -= 1
            return Reply(500, b"oops")
        return Reply(body=items[(page - 1) * 10 : page * 10])

    upstream.route("/flaky", flaky)
    cfg = env.config(
        api_source(
            "flaky",
            f"{upstream.base}/flaky",
            'source_id = "id"',
            '[sources.pagination]\nstyle = "page"\npage_size = 10\n' + RETRY_FAST,
        )
    )
    run = await run_source(cfg, "flaky")
    assert run["status"] == "succeeded", run["error"]
    assert await keys(pool, "flaky") == [i["id"] for i in items]
    assert await pool.fetchval("SELECT count(*) FROM raw_api_data") == 30
    assert [r.query["page"] for r in upstream.requests] == ["1", "2", "2", "2", "2", "3", "4"]


async def test_429_retry_after_is_honoured(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    answered = {"n": 0}

    def limited(r: Request) -> Reply:
        answered["n"] += 1
        if answered["n"] == 1:
            return Reply(429, b"slow down", {"Retry-After": "2"})
        return Reply(body=[{"id": "only"}])

    upstream.route("/limited", limited)
    cfg = env.config(
        api_source("limited", f"{upstream.base}/limited", 'source_id = "id"', RETRY_FAST)
    )
    run = await run_source(cfg, "limited")
    assert run["status"] == "succeeded", run["error"]
    first, second = upstream.requests
    assert second.at - first.at >= 2.0


async def test_retries_give_up_with_a_clear_error(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    upstream.route("/down", lambda r: Reply(503, b"maintenance"))
    cfg = env.config(
        api_source(
            "down",
            f"{upstream.base}/down",
            'source_id = "id"',
            "[sources.retry]\nattempts = 3\nbackoff = 0.01\n",
        )
    )
    run = await run_source(cfg, "down")
    assert run["status"] == "failed"
    assert run["error"] == f"source 'down': GET {upstream.base}/down: HTTP 503 after 3 attempts"
    assert len(upstream.requests) == 3
    upstream.route("/gone", lambda r: Reply(404, b'{"message": "Not Found"}'))
    cfg = env.config(api_source("gone", f"{upstream.base}/gone", 'source_id = "id"'))
    run = await run_source(cfg, "gone")
    assert run["error"] == (
        f'source \'gone\': GET {upstream.base}/gone: HTTP 404: {{"message": "Not Found"}}'
    )


async def test_truncated_page_fails_the_run_there_and_the_next_run_resumes_there(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    items = numbered_items(50)
    broken = {"page": 3}

    def pages(r: Request) -> Reply:
        page = int(r.query["page"])
        body = msgspec.json.encode(items[(page - 1) * 10 : page * 10])
        return Reply(body=body[: len(body) // 2] if page == broken["page"] else body)

    upstream.route("/pages", pages)
    cfg = env.config(
        api_source(
            "pages",
            f"{upstream.base}/pages",
            'source_id = "id"',
            '[sources.pagination]\nstyle = "page"\npage_size = 10\n',
        )
    )
    run = await run_source(cfg, "pages")
    assert run["status"] == "failed"
    assert "page 3 (" in run["error"] and "not valid JSON" in run["error"]
    assert await keys(pool, "pages") == [i["id"] for i in items[:20]]
    broken["page"] = None
    upstream.requests.clear()
    run = await run_source(cfg, "pages")
    assert run["status"] == "succeeded", run["error"]
    assert upstream.requests[0].query["page"] == "3"  # resumed at the failed page
    assert await keys(pool, "pages") == [i["id"] for i in items]
    assert await pool.fetchval("SELECT count(*) FROM raw_api_data") == 50


async def test_auth_secret_comes_from_the_environment_and_is_never_logged(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    def guarded(r: Request) -> Reply:
        if r.headers.get("authorization") != "Bearer s3cr3t-token":
            return Reply(401, b'{"error": "unauthorized"}')
        return Reply(body=[{"id": "a"}])

    upstream.route("/private", guarded)
    env.write_config(
        api_source(
            "private",
            f"{upstream.base}/private",
            'source_id = "id"',
            '[sources.auth]\ntype = "bearer"\nenv = "PRIVATE_TOKEN"\n',
        )
    )
    missing = env.cli("run", "private")
    assert missing.returncode == 1
    assert "environment variable PRIVATE_TOKEN" in missing.stderr + missing.stdout
    ok = env.cli("run", "private", "--full-refresh", PRIVATE_TOKEN="s3cr3t-token")
    assert ok.returncode == 0, ok.stderr
    assert "s3cr3t" not in ok.stdout + ok.stderr
    assert await keys(pool, "private") == ["a"]


async def test_incremental_high_water_mark_neither_loses_nor_duplicates_the_boundary(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    rows = [
        {"id": "a", "updated_at": "2024-01-01T10:00:00Z"},
        {"id": "b", "updated_at": "2024-01-01T11:00:00Z"},
        {"id": "c", "updated_at": "2024-01-01T11:00:00Z"},
    ]

    def changes(r: Request) -> Reply:
        since = r.query.get("updated_since")
        return Reply(body=[x for x in rows if since is None or x["updated_at"] >= since])

    upstream.route("/changes", changes)
    cfg = env.config(
        api_source(
            "inc",
            f"{upstream.base}/changes",
            'source_id = "id"\nevent_time = "updated_at"',
            '[sources.incremental]\nparam = "updated_since"\nfield = "updated_at"\n',
        )
    )
    first = await run_source(cfg, "inc")
    assert (first["rows_read"], first["rows_inserted"]) == (3, 3)
    # Same boundary time, a new key: loaded; the boundary keys already loaded: not again.
    rows.append({"id": "d", "updated_at": "2024-01-01T11:00:00Z"})
    second = await run_source(cfg, "inc")
    assert upstream.requests[-1].query["updated_since"] == "2024-01-01T11:00:00Z"
    assert (second["rows_read"], second["rows_inserted"]) == (1, 1)
    rows.append({"id": "e", "updated_at": "2024-01-01T12:00:00Z"})
    third = await run_source(cfg, "inc")
    assert (third["rows_read"], third["rows_inserted"]) == (1, 1)
    assert await pool.fetchval("SELECT count(*) FROM raw_api_data") == 5
    assert await keys(pool, "inc") == ["a", "b", "c", "d", "e"]


async def test_rate_limit_spaces_requests(env: Env, pool: asyncpg.Pool, upstream: Upstream) -> None:
    items = numbered_items(40)
    upstream.route(
        "/rl",
        lambda r: Reply(body=items[(int(r.query["page"]) - 1) * 10 : int(r.query["page"]) * 10]),
    )
    cfg = env.config(
        api_source(
            "rl",
            f"{upstream.base}/rl",
            'source_id = "id"',
            'rate_limit = 5.0\n[sources.pagination]\nstyle = "page"\npage_size = 10\n',
        )
    )
    started = time.monotonic()
    run = await run_source(cfg, "rl")
    assert run["status"] == "succeeded"
    assert len(upstream.requests) == 5
    assert upstream.requests[-1].at - upstream.requests[0].at >= 0.8 - 0.05
    assert time.monotonic() - started < 10


async def test_sigkill_mid_walk_then_resume_loses_and_duplicates_nothing(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    items = numbered_items(600)
    upstream.route(
        "/slow",
        lambda r: Reply(
            body=items[(int(r.query["page"]) - 1) * 20 : int(r.query["page"]) * 20], delay=0.05
        ),
    )
    env.write_config(
        api_source(
            "slow",
            f"{upstream.base}/slow",
            'source_id = "id"\ntitle = "name"',
            '[sources.pagination]\nstyle = "page"\npage_size = 20\n',
        )
    )
    cmd = [sys.executable, "-m", "etlsvc", "run", "slow", "--config", str(env.dir / "config.toml")]
    environ = {**os.environ, "ETLSVC_DATABASE_URL": env.database_url}

    async def committed_page() -> int:
        state = await pool.fetchval("SELECT state FROM etl_checkpoints WHERE source = 'slow'")
        return state["page"] if state else 0

    kills = 0
    for _ in range(3):
        before = await committed_page()
        proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL)
        while proc.poll() is None and await committed_page() < before + 3:
            time.sleep(0.02)
        time.sleep(random.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        kills += proc.wait() == -signal.SIGKILL
    assert kills == 3
    assert 0 < await committed_page() < 31
    assert subprocess.run(cmd, env=environ, capture_output=True).returncode == 0
    assert await keys(pool, "slow") == [i["id"] for i in items]
    raw = await pool.fetch("SELECT page, item_index, source_key FROM raw_api_data")
    assert len(raw) == 600 == len({(r["page"], r["item_index"]) for r in raw})
    assert len({r["source_key"] for r in raw}) == 600


async def test_json_server_with_page_and_limit_and_link_headers(
    env: Env, pool: asyncpg.Pool, json_server: str
) -> None:
    db = json.loads((API / "json-server" / "db.json").read_text())
    fields = 'source_id = "id"\ntitle = "name"'
    cfg = env.config(
        "".join(
            api_source(
                name,
                f"{json_server}/{name}",
                fields if name != "issues" else 'source_id = "id"\ntitle = "title"',
                '[sources.pagination]\nstyle = "link_header"\npage_param = "_page"\n'
                'size_param = "_limit"\npage_size = 5\n',
            )
            for name in ("issues", "interfaces", "devices")
        )
    )
    for name in ("issues", "interfaces", "devices"):
        run = await run_source(cfg, name)
        assert run["status"] == "succeeded", run["error"]
        assert sorted(await keys(pool, name)) == sorted(str(x["id"]) for x in db[name])
        assert run["pages_read"] == -(-len(db[name]) // 5)


async def test_replay_of_an_api_source_uses_the_new_paths(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    upstream.route("/things", lambda r: Reply(body=numbered_items(30)))
    source = api_source("things", f"{upstream.base}/things", 'source_id = "id"\ntitle = "name"')
    env.write_config(source)
    assert env.cli("run").returncode == 0
    env.write_config(source.replace('title = "name"', 'title = "updated_at"'))
    result = env.cli("replay", "things")
    assert result.returncode == 0, result.stderr
    titles = await pool.fetch("SELECT title FROM normalized_data ORDER BY source_id")
    assert [t["title"] for t in titles] == [i["updated_at"] for i in numbered_items(30)]
    assert len(upstream.requests) == 1  # replay fetched nothing


async def test_check_fetches_the_first_page(env: Env, upstream: Upstream) -> None:
    upstream.route("/ok", lambda r: Reply(body=[]))
    upstream.route("/bad", lambda r: Reply(500, b"boom"))
    env.write_config(
        api_source("ok", f"{upstream.base}/ok", 'source_id = "id"')
        + api_source("bad", f"{upstream.base}/bad", 'source_id = "id"')
    )
    result = env.cli("check")
    assert result.returncode == 1
    assert f"ok   source ok: GET {upstream.base}/ok: HTTP 200" in result.stderr
    assert f"FAIL source 'bad': GET {upstream.base}/bad: HTTP 500 after 1 attempts" in (
        result.stderr
    )


async def test_walks_stop_on_a_loop_and_at_the_page_limit(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    # next always points back to the first page; a cursor that never changes
    upstream.route("/loop", lambda r: Reply(body={"next": "/loop?x=1", "results": [{"id": "a"}]}))
    upstream.route(
        "/stuck", lambda r: Reply(body={"cursor": "same", "items": [{"id": r.query.get("c", "0")}]})
    )
    items = numbered_items(100)
    upstream.route(
        "/long", lambda r: Reply(body=items[int(r.query["page"]) - 1 : int(r.query["page"])])
    )
    cfg = env.config(
        api_source(
            "loop",
            f"{upstream.base}/loop",
            'source_id = "id"',
            'items_path = "results"\n[sources.pagination]\nstyle = "next_url"\n',
        )
        + api_source(
            "stuck",
            f"{upstream.base}/stuck",
            'source_id = "id"',
            'items_path = "items"\n[sources.pagination]\nstyle = "cursor"\ncursor_param = "c"\n'
            'cursor_path = "cursor"\n',
        )
        + api_source(
            "long",
            f"{upstream.base}/long",
            'source_id = "id"',
            '[sources.pagination]\nstyle = "page"\npage_size = 1\nmax_pages = 7\n',
        )
    )
    # loop: the second answer is the first page again (same body): fetched, not loaded
    for name, pages, requests, warning in (
        ("loop", 1, 2, "is the same as a page this walk loaded already"),
        ("stuck", 2, 2, "points to a page this walk requested already"),
        ("long", 7, 7, "stopped at the page limit (max_pages = 7)"),
    ):
        upstream.requests.clear()
        run = await run_source(cfg, name)
        assert run["status"] == "succeeded", run["error"]
        assert run["pages_read"] == pages and len(upstream.requests) == requests, name
        assert run["rows_read"] == pages
        [note] = run["notes"]["warnings"]
        assert warning in note, note
    assert await pool.fetchval("SELECT count(*) FROM raw_api_data WHERE source = 'loop'") == 1


async def test_an_upstream_that_ignores_the_page_parameter_is_walked_once(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    # Before: 10,000 pages (455 s, 100,000 raw rows) and "succeeded".
    page_one = {"data": [{"id": f"k{i}"} for i in range(10)]}
    upstream.route("/same", lambda r: Reply(body=page_one))
    # A Link walk whose next link leads back to page 1 under another URL.
    upstream.route("/linked", lambda r: Reply(body=page_one["data"], headers={
        "Link": f'<{upstream.base}/linked?page=1&again={r.query.get("again", "0")}1>; '
                'rel="next"'}))
    cfg = env.config(
        api_source("same", f"{upstream.base}/same", 'source_id = "id"',
                   'items_path = "data"\n[sources.pagination]\nstyle = "page"\n')
        + api_source("linked", f"{upstream.base}/linked", 'source_id = "id"',
                     '[sources.pagination]\nstyle = "link_header"\n'))
    for name in ("same", "linked"):
        upstream.requests.clear()
        run = await run_source(cfg, name)
        assert run["status"] == "succeeded", run["error"]
        assert (run["pages_read"], run["rows_read"], len(upstream.requests)) == (1, 10, 2)
        assert "the same as a page this walk loaded already" in run["notes"]["warnings"][0]
        raw = await pool.fetchval("SELECT count(*) FROM raw_api_data WHERE source = $1", name)
        assert raw == 10


async def test_a_redirect_loop_is_a_source_error_naming_the_url(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    upstream.route("/a", lambda r: Reply(302, headers={"Location": "/b"}))
    upstream.route("/b", lambda r: Reply(302, headers={"Location": "/a"}))
    cfg = env.config(api_source("loopy", f"{upstream.base}/a", 'source_id = "id"'))
    run = await run_source(cfg, "loopy")
    assert run["status"] == "failed"
    assert run["error"].startswith(f"source 'loopy': GET {upstream.base}/a: TooManyRedirects")
    assert "internal error" not in run["error"]


async def test_size_cap_read_timeout_and_http_date_retry_after(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    upstream.route("/big", lambda r: Reply(body=[{"id": "x" * 5000}]))
    upstream.route("/slowpoke", lambda r: Reply(body=[{"id": "a"}], delay=1.0))
    cfg = env.config(
        api_source("big", f"{upstream.base}/big", 'source_id = "id"', "max_response_bytes = 1000\n")
        + api_source(
            "slowpoke",
            f"{upstream.base}/slowpoke",
            'source_id = "id"',
            "[sources.retry]\nattempts = 2\nbackoff = 0.01\n[sources.timeouts]\nread = 0.3\n",
        )
    )
    big = await run_source(cfg, "big")
    assert big["status"] == "failed"
    assert "larger than max_response_bytes (1000)" in big["error"]
    slow = await run_source(cfg, "slowpoke")
    assert slow["status"] == "failed"
    assert slow["error"].endswith("ReadTimeout after 2 attempts")

    import datetime as dt
    from email.utils import format_datetime

    from etlsvc.extract.http import _retry_after

    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    assert 28 <= _retry_after(format_datetime(soon, usegmt=True)) <= 30
    assert _retry_after("7") == 7.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert _retry_after("soon") is None


def test_auth_header_kinds() -> None:
    import asyncio

    import httpx

    from etlsvc.contract import Fields
    from etlsvc.extract.http import Auth, Fetcher
    from etlsvc.extract.json_api import ApiSource

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200, json=[])

    async def fetch(auth: Auth) -> None:
        src = ApiSource(name="a", url="http://api.test/x", fields=Fields(source_id="id"), auth=auth)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await Fetcher(src, client).get(src.url, {})

    os.environ["ETLSVC_TEST_SECRET"] = "pw"
    try:
        asyncio.run(fetch(Auth(type="header", env="ETLSVC_TEST_SECRET", header="X-API-Key")))
        asyncio.run(fetch(Auth(type="basic", env="ETLSVC_TEST_SECRET", username="etl")))
    finally:
        del os.environ["ETLSVC_TEST_SECRET"]
    assert seen[0]["x-api-key"] == "pw"
    assert seen[1]["authorization"] == "Basic ZXRsOnB3"  # etl:pw


async def test_incremental_lag_window_rereads_late_arrivals(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    rows = [{"id": "a", "updated_at": "2024-01-01T10:00:00Z"}]

    def changes(r: Request) -> Reply:
        since = r.query.get("since")
        return Reply(body=[x for x in rows if since is None or x["updated_at"] >= since])

    upstream.route("/lag", changes)
    cfg = env.config(
        api_source(
            "lag",
            f"{upstream.base}/lag",
            'source_id = "id"',
            '[sources.incremental]\nparam = "since"\nfield = "updated_at"\nlag_seconds = 3600\n',
        )
    )
    await run_source(cfg, "lag")
    # a late arrival, stamped before the mark but within the lag window
    rows.append({"id": "late", "updated_at": "2024-01-01T09:30:00Z"})
    run = await run_source(cfg, "lag")
    assert upstream.requests[-1].query["since"] == "2024-01-01T09:00:00+00:00"
    assert run["rows_inserted"] == 1 and await keys(pool, "lag") == ["a", "late"]


async def test_connection_errors_are_retried_then_reported(env: Env, pool: asyncpg.Pool) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = env.config(
        api_source(
            "nowhere",
            f"http://127.0.0.1:{port}/x",
            'source_id = "id"',
            "[sources.retry]\nattempts = 3\nbackoff = 0.2\n",
        )
    )
    started = time.monotonic()
    run = await run_source(cfg, "nowhere")
    assert run["status"] == "failed"
    assert run["error"].startswith(f"source 'nowhere': GET http://127.0.0.1:{port}/x: ConnectError")
    assert run["error"].endswith("after 3 attempts")
    assert time.monotonic() - started >= 0.2 * 0.5 + 0.4 * 0.5  # backoff, with jitter ≥ 50 %
