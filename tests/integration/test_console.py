"""The operator console in a real browser: Playwright driving Debian's Chromium against a
real `etlsvc serve`. Screenshots of every page land in ``build/screenshots/`` (README,
"Console")."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.conftest import Env, csv_source
from tests.integration.test_service import Server, servers

CHROMIUM = os.environ.get("ETLSVC_CHROMIUM", "/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.async_api",
                                     reason="playwright is not installed (the test extra)")
pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")

SHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
SIZES = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
#: The most a console page may weigh: everything it loads, decoded.
PAGE_BUDGET = 300 * 1024
RUN_KEY, READ_KEY = "ops-secret", "viewer-secret"
#: Bytes each view loaded, written beside the screenshots.
WEIGHTS: dict[str, int] = {}


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETLSVC_API_KEYS", f"ops:run:{RUN_KEY},viewer:read:{READ_KEY}")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


class Traffic:
    """Every request a page makes; anything not for 127.0.0.1 is recorded and aborted."""

    def __init__(self) -> None:
        self.foreign: list[str] = []

    async def attach(self, page: Any) -> None:
        async def gate(route: Any) -> None:
            url = route.request.url
            if urlsplit(url).hostname != "127.0.0.1" and not url.startswith("data:"):
                self.foreign.append(url)
                await route.abort()
            else:
                await route.continue_()

        await page.route("**/*", gate)


async def open_page(browser: Any, server: Server, size: str,
                    key: str | None) -> tuple[Any, Traffic]:
    page = await browser.new_page(viewport=SIZES[size])
    traffic = Traffic()
    await traffic.attach(page)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    await page.goto(f"{server.base}/console")
    if key:
        await enter_key(page, key)
    return page, traffic


async def enter_key(page: Any, key: str) -> None:
    await page.click("#key-button")
    await page.fill("#key-input", key)
    await page.click("dialog button[value=save]")
    await playwright_api.expect(page.locator("#key-button")).to_have_text("API key: set")


async def visit(page: Any, hash_: str, ready: str, shot: str) -> None:
    """Go to a view the way a person does (a fresh load), wait for ``ready``, check the
    page fits the viewport and its weight, and take its screenshot."""
    base = page.url.split("/console")[0]
    await page.goto("about:blank")         # a fresh load, not a change of the hash
    await page.goto(f"{base}/console{hash_}")
    await playwright_api.expect(page.locator(ready).first).to_be_visible()
    await page.wait_for_load_state("load")
    await page.wait_for_timeout(300)
    # Everything the page loaded, decoded: the document, scripts, styles, API answers.
    loaded = await page.evaluate(
        "[...performance.getEntriesByType('navigation'), ...performance.getEntriesByType("
        "'resource')].reduce((n, e) => n + e.decodedBodySize, 0)")
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{shot}: the page is {overflow}px wider than the viewport"
    assert 0 < loaded <= PAGE_BUDGET, f"{shot} weighs {loaded} bytes"
    WEIGHTS[shot] = loaded
    assert not page.errors, page.errors
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=SHOTS / f"{shot}.png", full_page=True)
    weights = SHOTS / "weights.json"
    known = json.loads(weights.read_text()) if weights.exists() else {}
    weights.write_text(json.dumps({**known, **WEIGHTS}, indent=1, sort_keys=True))


def console_config(env: Env, path: Path, server: str = "", sources: str = "") -> None:
    env.write_config(csv_source("catalog", path, extra='schedule = "1d"\nbatch_size = 10000')
                     + sources, server)


async def test_console_drives_a_run_rejects_data_and_lineage_in_a_browser(
        env: Env, pool: asyncpg.Pool, gen_csv, browser: Any) -> None:
    # Seconds of loading, so that the page sees the run running.
    big, _ = gen_csv(300_000)
    console_config(env, big, sources=csv_source("broken", big.parent / "missing.csv"))
    expect = playwright_api.expect
    with servers(env) as (server,):
        page, traffic = await open_page(browser, server, "desktop", RUN_KEY)

        # Overview: the source's card, scheduled, with no run yet; start one from it.
        await visit(page, "#/", "article.card[data-source=catalog]", "overview-empty")
        card = page.locator("article.card[data-source=catalog]")
        await expect(card.locator("dd").nth(4)).to_have_text(re.compile(r"^in \d+"))
        await card.get_by_role("button", name="Run now").click()

        # Run detail: live while it runs, then 100 % with its outcome and its log.
        await expect(page).to_have_url(re.compile(r"#/runs/\d+$"))
        run_id = int(page.url.rsplit("/", 1)[1])
        seen, parts_while_running = set(), 0
        for _ in range(600):
            status = await page.locator("h1 .badge").text_content()
            seen.add((status, await page.locator(".percent").text_content()))
            if status != "running":
                break
            parts_while_running += await page.locator("table.parts").count()
            await page.wait_for_timeout(100)
        assert ("succeeded", "100 %") in seen, seen
        assert any(s == "running" and p != "100 %" for s, p in seen), f"never saw it run: {seen}"
        assert parts_while_running, "the file's outcome so far never showed while it ran"
        row = await pool.fetchrow("SELECT * FROM etl_runs WHERE id = $1", run_id)
        counters = dict(zip(await page.locator("dl.counters dt").all_text_contents(),
                            await page.locator("dl.counters dd").all_text_contents()))
        assert counters["Read"] == f"{row['rows_read']:,}"
        assert counters["Lines"] == f"{row['lines_read']:,}" and "Pages" not in counters
        assert counters["Rejected"] == f"{row['rows_rejected']:,}" and row["rows_rejected"] > 0
        await expect(page.locator("table.parts td.part")).to_have_text(str(big))
        await expect(page.locator("pre.log")).to_contain_text("run finished")
        await visit(page, f"#/runs/{run_id}", "table.parts", "run-detail")

        # Runs: the run listed with its figures; the duration trend has its bar.
        await visit(page, "#/runs", "table.runs tbody tr", "runs")
        await expect(page.locator("table.runs tbody tr").first).to_contain_text(f"#{run_id}")
        await expect(page.locator("svg.chart rect.succeeded")).to_have_count(1)

        # A failed run: its reason on the runs page, Re-run on it, then Re-run all failed.
        await visit(page, "#/", "article.card[data-source=broken]", "overview-before-failure")
        broken = page.locator("article.card[data-source=broken]")
        await expect(broken.locator("dd").nth(1)).to_have_text("no runs yet")
        await expect(page.locator("p.summary")).to_contain_text(re.compile(
            r"p99 read latency (—|\d+(\.\d)? ms)$"))
        await page.locator("article.card[data-source=broken]").get_by_role(
            "button", name="Run now").click()
        await expect(page.locator("h1 .badge")).to_have_text("failed")
        await expect(page.locator("p.error")).to_contain_text("missing.csv")
        await visit(page, "#/runs?status=failed", "tr.error-row", "runs-failed")
        await expect(page.locator("tr.error-row td")).to_contain_text("missing.csv")
        await page.locator("table.runs").get_by_role("button", name="Re-run").click()
        await expect(page).to_have_url(re.compile(r"#/runs/\d+$"))
        await expect(page.locator("h1 .badge")).to_have_text("failed")
        await visit(page, "#/runs", "table.runs tbody tr", "runs-with-failures")
        await page.get_by_role("button", name="Re-run all failed (1)").click()
        await expect(page.locator("h1 .badge")).to_have_text("failed")
        assert [r["status"] for r in await pool.fetch(
            "SELECT status FROM etl_runs WHERE source = 'broken'")] == ["failed"] * 3
        await expect(page.locator("#flash")).to_contain_text("(broken)")
        # Never loaded, failing: the overview says so, and does not call the service ok.
        await visit(page, "#/", "article.card[data-source=broken]", "overview-failing")
        await expect(broken.locator("dd").nth(1)).to_have_text("never loaded")
        await expect(broken.locator("header .badge")).to_have_text("failed")
        await expect(page.locator("p.summary .badge")).to_have_text("degraded")
        await expect(page.locator("p.summary")).to_contain_text("1 failing")

        # Rejects: open one, see its original record, retry it (still invalid), ignore it.
        await visit(page, "#/rejects?source=catalog", "tr.reject", "rejects")
        first = await pool.fetchrow(
            "SELECT id, record, reason FROM etl_rejects WHERE run_id = $1 ORDER BY id LIMIT 1",
            run_id)
        reject = page.locator(f"tr.reject[data-id='{first['id']}']")
        await expect(reject).to_contain_text(first["reason"])
        await reject.click()
        detail = page.locator("tr.detail").first
        # A value that reads the same in the page's JSON (no escapes): a generated record
        # need not have one without spaces or punctuation (CI once drew one without).
        shown = next(v for v in first["record"].values()
                     if isinstance(v, str) and v.isascii() and v.isprintable() and v.strip()
                     and '"' not in v and "\\" not in v)
        await expect(detail.locator("pre.json")).to_contain_text(shown)
        await page.screenshot(path=SHOTS / "reject-open.png", full_page=True)
        await detail.get_by_role("button", name="Retry this record").click()
        await expect(page.locator("#flash")).to_contain_text("0 loaded, 1 still open")
        await page.locator(f"tr.reject[data-id='{first['id']}']").click()
        await page.locator("tr.detail").first.get_by_role(
            "button", name="Ignore this record").click()
        await expect(page.locator("#flash")).to_contain_text("rejects ignored: 1")
        assert await pool.fetchval("SELECT status FROM etl_rejects WHERE id = $1",
                                   first["id"]) == "ignored"

        # Data: page forward twice and back, in id order, each row once.
        await visit(page, "#/data?source=catalog", "table.data tbody tr", "data")
        pages = []
        first_id = page.locator("table.data tbody tr td:first-child")
        for _ in range(3):
            await expect(page.locator("table.data tbody tr")).to_have_count(50)
            pages.append([int(t) for t in await first_id.all_text_contents()])
            if len(pages) < 3:
                await page.get_by_role("link", name="Next →").click()
                await expect(first_id.first).not_to_have_text(str(pages[-1][0]))
        ids = [i for p in pages for i in p]
        assert ids == sorted(ids) and len(set(ids)) == 150
        assert ids == [r["id"] for r in await pool.fetch(
            "SELECT id FROM normalized_data WHERE source = 'catalog' ORDER BY id LIMIT 150")]
        third = page.url
        await page.get_by_role("link", name="← Previous").click()
        await expect(first_id.first).to_have_text(str(pages[1][0]))
        # Opened from a link (no history before it), Previous still goes a page back.
        await page.goto("about:blank")
        await page.goto(third)
        await expect(first_id.first).to_have_text(str(pages[2][0]))
        await page.get_by_role("link", name="← Previous").click()
        await expect(first_id.first).to_have_text(str(pages[1][0]))
        await page.get_by_role("link", name="← Previous").click()
        await expect(first_id.first).to_have_text(str(pages[0][0]))
        await expect(page.get_by_role("link", name="← Previous")).to_have_count(0)
        await page.get_by_role("link", name="Next →").click()
        await expect(first_id.first).to_have_text(str(pages[1][0]))

        # Lineage: a record → its raw record → the run that loaded it.
        record_id = pages[1][7]
        await page.get_by_role("link", name=str(record_id), exact=True).click()
        await expect(page.locator("ol.lineage")).to_contain_text("raw_csv_data #")
        raw_id = await pool.fetchval("SELECT raw_id FROM normalized_data WHERE id = $1",
                                     record_id)
        await expect(page.locator("ol.lineage")).to_contain_text(f"raw_csv_data #{raw_id}")
        source_id = await pool.fetchval(
            "SELECT record->>'id' FROM raw_csv_data WHERE id = $1", raw_id)
        await expect(page.locator("pre.json").first).to_contain_text(f'"id": "{source_id}"')
        await visit(page, f"#/data/{record_id}", "ol.lineage", "record")
        await page.locator("ol.lineage").get_by_role("link", name=f"#{run_id}").click()
        await expect(page).to_have_url(re.compile(rf"#/runs/{run_id}$"))
        await expect(page.locator("h1")).to_contain_text(f"Run #{run_id}")

        # The overview again, now with the run's figures: the screenshot the README shows.
        await visit(page, "#/", "article.card svg.chart rect", "overview")
        await expect(card.locator("dd").nth(2)).to_have_text(
            f"{await pool.fetchval('SELECT count(*) FROM normalized_data'):,}")
        assert traffic.foreign == []


async def test_console_fits_a_phone_and_keys_decide_what_it_may_do(
        env: Env, pool: asyncpg.Pool, gen_csv, browser: Any) -> None:
    console_config(env, gen_csv(20_000)[0], "[server]\npublic_read = false")
    expect = playwright_api.expect
    with servers(env) as (server,):
        # No key, reads not public: the page says what it needs, and takes a read key.
        page, traffic = await open_page(browser, server, "phone", None)
        await expect(page.locator(".problem")).to_contain_text("read scope")
        await page.get_by_role("button", name="Enter API key").click()
        await page.fill("#key-input", READ_KEY)
        await page.click("dialog button[value=save]")
        await expect(page.locator("article.card[data-source=catalog]")).to_be_visible()

        # A read key renders every page but cannot start a run: 403, and the key dialog.
        await page.get_by_role("button", name="Run now").click()
        await expect(page.locator("#flash")).to_contain_text("lacks the 'run' scope")
        await expect(page.locator("#key-dialog")).to_be_visible()
        await page.fill("#key-input", RUN_KEY)
        await page.click("dialog button[value=save]")
        await page.get_by_role("button", name="Run now").click()
        await expect(page).to_have_url(re.compile(r"#/runs/\d+$"))
        await expect(page.locator("h1 .badge")).to_have_text("succeeded", timeout=120_000)

        # Every page at 390×844: nothing wider than the screen, and each within budget.
        for hash_, ready, shot in [
                ("#/", "article.card", "phone-overview"),
                ("#/runs", "table.runs tbody tr", "phone-runs"),
                ("#/runs/1", "table.parts", "phone-run-detail"),
                ("#/rejects", "tr.reject", "phone-rejects"),
                ("#/data", "table.data tbody tr", "phone-data"),
                ("#/data/1", "ol.lineage", "phone-record")]:
            await visit(page, hash_, ready, shot)

        # The key lives in this tab only: a new tab starts without one.
        other = await browser.new_page()
        await other.goto(f"{server.base}/console")
        await expect(other.locator("#key-button")).to_have_text("API key: none")

        # The API docs render from local files.
        for path, ready in [("/schema/swagger", ".opblock"), ("/schema/redoc", "h1")]:
            await page.goto(server.base + path)
            await expect(page.locator(ready).first).to_be_visible(timeout=30_000)
        await page.screenshot(path=SHOTS / "phone-swagger.png")
        assert traffic.foreign == []


async def test_a_run_rolls_back_from_its_page_after_a_confirmation_with_the_counts(
        env: Env, pool: asyncpg.Pool, tmp_path: Path, browser: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Run 1 loads three rows, run 2 changes one and adds one. On run 1's page, "Roll back to
    this run…" asks first, saying what would change (a dry run); dismissed, nothing changes;
    accepted, the table is run 1's again and the page is the rollback's run. A key without
    the admin scope is refused and asked for another."""
    monkeypatch.setenv("ETLSVC_API_KEYS", f"ops:run:{RUN_KEY},boss:admin:boss-secret")
    path = tmp_path / "r.csv"
    path.write_text("id,title\n1,a\n2,b\n3,c\n")
    env.write_config(csv_source("r", path, fields='source_id = "id"\ntitle = "title"'))
    assert env.cli("run", "r").returncode == 0
    path.write_text("id,title\n1,a\n2,B\n3,c\n4,d\n")
    assert env.cli("run", "r").returncode == 0
    titles = "SELECT array_agg(title ORDER BY source_id) FROM normalized_data"
    expect = playwright_api.expect
    with servers(env) as (server,):
        page, _ = await open_page(browser, server, "desktop", RUN_KEY)
        await visit(page, "#/runs/1", "h1:has-text('Run #1')", "run-rollback")
        button = page.get_by_role("button", name="Roll back to this run…")
        await button.click()        # a run key: 403, and the key dialog
        await expect(page.locator("#key-dialog")).to_be_visible()
        await page.fill("#key-input", "boss-secret")
        await page.click("dialog button[value=save]")
        asked: list[str] = []

        async def answer(dialog: Any, accept: bool) -> None:
            asked.append(dialog.message)
            await (dialog.accept() if accept else dialog.dismiss())

        page.once("dialog", lambda d: answer(d, False))
        await button.click()
        for _ in range(100):
            if asked:
                break
            await page.wait_for_timeout(50)
        assert "Roll r back to its state right after run #1?" in asked[0]
        assert "1 row(s) deleted, 1 updated, 0 inserted again" in asked[0]
        assert await pool.fetchval(titles) == ["a", "B", "c", "d"]
        page.once("dialog", lambda d: answer(d, True))
        await button.click()
        await expect(page).to_have_url(re.compile(r"#/runs/3$"))
        await expect(page.locator("#flash")).to_contain_text("rolled back as run 3")
        await expect(page.locator("h1")).to_contain_text("Run #3")
        assert await pool.fetchval(titles) == ["a", "b", "c"]
        assert not page.errors, page.errors
        # Leave the run page: its live log is an open event stream, which the server's
        # graceful stop would otherwise wait out.
        await page.goto("about:blank")


async def test_each_tenant_sees_its_own_console_and_admins_manage_keys_and_read_the_audit(
        env: Env, pool: asyncpg.Pool, tmp_path: Path, browser: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #25, point 5: the console shows the key's tenant, only its sources and
    datasets, and to an admin its audit log and key management; a second tenant's key sees
    nothing of the first's."""
    monkeypatch.setenv("ETLSVC_API_KEYS", "acme-admin@acme:admin:acme-a,"
                       "globex-reader@globex:read:globex-r")
    (tmp_path / "a.csv").write_text("id,title\n1,acme first\n2,acme second\n")
    (tmp_path / "g.csv").write_text("id,title\n1,globex only\n")
    fields = 'source_id = "id"\ntitle = "title"'
    env.write_config(
        csv_source("a", tmp_path / "a.csv", fields=fields,
                   extra='tenant = "acme"\ndescription = "acme\'s products"') +
        csv_source("g", tmp_path / "g.csv", fields=fields, extra='tenant = "globex"'),
        "[server]\npublic_read = false")
    for name in ("a", "g"):
        assert env.cli("run", name).returncode == 0
    expect = playwright_api.expect
    with servers(env) as (server,):
        page, traffic = await open_page(browser, server, "desktop", "acme-a")
        await expect(page.locator("#who")).to_have_text("tenant acme · acme-admin (admin)")
        await expect(page.locator("article.card[data-source=a]")).to_be_visible()
        assert await page.locator("article.card[data-source=g]").count() == 0
        await visit(page, "#/catalog", "article.dataset[data-dataset=a]", "tenant-catalog")
        await expect(page.locator("article.dataset")).to_have_count(1)
        await expect(page.locator("article.dataset")).to_contain_text("acme's products")
        # Keys: make one; its secret is shown once, and it reads as acme.
        await visit(page, "#/keys", "form.filters", "tenant-keys")
        await page.fill("form.filters input[name=name]", "dash")
        await page.click("form.filters button[type=submit]")
        secret = (await page.locator("code.secret").text_content()).strip()
        assert secret.startswith("etlsvc_")
        await visit(page, "#/keys", "tr[data-key=dash]", "tenant-keys-listed")
        await expect(page.locator("tr[data-key=dash]")).to_contain_text("active")
        assert secret not in await page.content()
        await visit(page, "#/audit", "table.audit tbody tr", "tenant-audit")
        await expect(page.locator("table.audit tbody tr").first).to_contain_text("key.create")
        # globex's reader: its tenant, its source, no admin views, nothing of acme's.
        other, _ = await open_page(browser, server, "desktop", "globex-r")
        await expect(other.locator("#who")).to_have_text("tenant globex · globex-reader (read)")
        await expect(other.locator("article.card[data-source=g]")).to_be_visible()
        assert await other.locator("article.card[data-source=a]").count() == 0
        assert not await other.locator("nav a[data-view=audit]").is_visible()
        assert not await other.locator("nav a[data-view=keys]").is_visible()
        for hash_, ready in (("#/data", "table.data tbody tr"), ("#/runs", "table.runs tbody tr"),
                             ("#/catalog", "article.dataset")):
            await visit(other, hash_, ready, f"tenant-other-{hash_[2:]}")
            text = await other.locator("main").inner_text()
            assert "acme" not in text, (hash_, text)
        await visit(other, "#/audit", ".problem", "tenant-other-audit")
        await expect(other.locator(".problem")).to_contain_text("lacks the 'admin' scope")
        # The key made above reads acme's rows, in its own tab.
        third, _ = await open_page(browser, server, "desktop", secret)
        await visit(third, "#/data", "table.data tbody tr", "tenant-new-key-data")
        await expect(third.locator("table.data tbody tr")).to_have_count(2)
        assert traffic.foreign == []
