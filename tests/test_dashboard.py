"""`spendstream ui` in a real browser (Debian's chromium driven by playwright, headless) against the
real broker, worker and embedded ClickHouse: totals equal SQL, a `spendstream block` reaches the open
page within a second, drill-down and selectors work. Screenshots of every page go to the module's
tmp dir (printed), to be looked at."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from playwright.sync_api import Browser, Page, sync_playwright

from producers import SyncEmitter
from stream_processors.feeds import publish
from tests.conftest import REPO, Worker, free_port, module_worker

pytestmark = pytest.mark.integration
T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
BUDGETS = """\
budgets:
  project:checkout: {daily: "1000", monthly: "100"}  # warn decided on the month; the day is at 6%
  project:weekend: {monthly: "5"}
  team:data: {monthly: "100000"}  # a forecast at this burn rate falls after the month
"""
# (project, team, user, model, output tokens, tags): the workload. Output token prices per 1M:
# gpt-4o $10, gpt-4o-mini $0.60, claude-sonnet-4 $15.
EVENTS: list[tuple[str, str, str, str, int, dict[str, str]]] = [
    *[("checkout", "web", "ana", "gpt-4o", 1_234_000, {"feature": "chat"}) for _ in range(5)],  # 5 x $12.34
    *[
        ("checkout", "web", "bo", "gpt-4o-mini", 7_000, {"feature": "search"}) for _ in range(3)
    ],  # 3 x $0.0042
    *[("search", "data", "cy", "claude-sonnet-4-20250514", 100_000, {}) for _ in range(4)],  # 4 x $1.50
    *[("weekend", "data", "cy", "gpt-4o", 275_000, {"feature": "backfill"}) for _ in range(3)],  # $8.25 of $5
    ("checkout", "web", "bo", "gpt-4o-mini", 1, {}),  # $0.0000006: the report's last unit
    ("labs", "research", "dee", "gpt-9-preview", 100_000, {}),  # no price, no fallback: cost unknown (NULL)
]
CHECKOUT_USD = Decimal("61.7126006")  # 5 x 12.34 + 3 x 0.0042 + 0.0000006, computed by hand
SENT = len(EVENTS)

worker = module_worker("dashboard", BUDGETS, SPENDSTREAM_UNPRICED_FALLBACK="none")


def _month_sql() -> str:
    return (
        "event_time >= toStartOfMonth(now('UTC')) AND event_time < addMonths(toStartOfMonth(now('UTC')), 1)"
    )


@pytest.fixture(scope="module")
def loaded(kafka: str, worker: Worker) -> Worker:
    """The workload stored: every event in ClickHouse, one garbage message dead-lettered."""
    now = datetime.now(UTC)
    with SyncEmitter(bootstrap_servers=kafka, service="dash", topic=worker.topics.usage_raw) as em:
        for i, (project, team, user, model, output_tokens, tags) in enumerate(EVENTS):
            provider = "anthropic" if model.startswith("claude") else "openai"
            em.emit(
                project=project,
                team=team,
                user=user,
                provider=provider,
                model=model,
                input_tokens=0,
                output_tokens=output_tokens,
                tags=tags,
                event_time=now - timedelta(minutes=i),  # today (or a minute before midnight: still SQL's)
            )
    in_thread(publish(kafka, worker.topics.usage_raw, [(b"labs", b"not avro at all")]))
    rows = worker.wait_rows("SELECT event_id FROM usage_events FINAL", SENT)
    assert len(rows) == SENT
    assert worker.wait_rows("SELECT reason FROM dead_letters FINAL", 1) == [["undecodable"]]
    return worker


@pytest.fixture(scope="module")
def ui(loaded: Worker) -> Iterator[str]:
    """`spendstream ui` as its own process, next to the worker (its /sql and /budgets)."""
    port = free_port()
    log = open(loaded.log.with_name("ui.log"), "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spendstream",
            "ui",
            "--port",
            str(port),
            "--worker",
            f"http://127.0.0.1:{loaded.port}",
        ],
        env={**loaded.env, "COLUMNS": "200"},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, loaded.log.with_name("ui.log").read_text()
            try:
                if httpx.get(url + "control", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the dashboard did not answer in 60 s"
            time.sleep(0.2)
        assert f"dashboard: {url}" in loaded.log.with_name("ui.log").read_text()  # it prints its URL
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {path}", file=sys.stderr)
    return path


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    p = context.new_page()
    yield p
    context.close()


def in_thread(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to the end on a thread of its own (playwright's sync API holds this one's loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def record_time(worker: Worker, topic: str, key: bytes) -> int:
    """The timestamp (ms, the producer's clock) of the last record with `key` on `topic`."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=worker.env["SPENDSTREAM_BOOTSTRAP_SERVERS"],
        group_id=None,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        found = 0
        while batch := await consumer.getmany(timeout_ms=1000):
            found = max([found, *(m.timestamp for ms in batch.values() for m in ms if m.key == key)])
        assert found, f"no record {key!r} on {topic}"
        return found
    finally:
        await consumer.stop()


def usd_of(page: Page, selector: str) -> Decimal:
    value = page.locator(selector).first.get_attribute("data-usd")
    assert value is not None, selector
    return Decimal(value)


def sql_usd(worker: Worker, query: str) -> dict[str, Decimal]:
    return {str(r[0]): Decimal(0 if r[1] is None else str(r[1])) for r in worker.sql(query)}  # NULL: unpriced


def test_overview_shows_every_project_with_totals_equal_to_sql(
    ui: str, loaded: Worker, page: Page, shots: Path
) -> None:
    expected = sql_usd(
        loaded,
        f"SELECT project, sum(cost_usd) FROM usage_events FINAL WHERE {_month_sql()} GROUP BY project",
    )
    assert set(expected) == {"checkout", "search", "weekend", "labs"}
    assert expected["checkout"] == CHECKOUT_USD
    page.goto(ui)
    page.wait_for_selector("#budgets")
    shown = {
        row.get_attribute("data-label"): Decimal(row.locator(".total .usd").get_attribute("data-usd") or "")
        for row in page.locator("#projects tbody tr").all()
    }
    assert shown == expected
    grand = sum(expected.values(), Decimal(0))
    assert usd_of(page, "#projects .grand .usd") == grand
    assert usd_of(page, "#month .usd") == grand
    today = loaded.sql(
        "SELECT sum(cost_usd) FROM usage_events FINAL WHERE toDate(event_time, 'UTC') = today()"
    )[0][0]
    assert usd_of(page, "#today .usd") == Decimal(str(today))
    assert page.locator("#projects tr[data-label=checkout] .total").inner_text() == "$61.71"
    # budgets: a bar each, with the state the worker decided
    states = {
        (
            row.get_attribute("data-scope"),
            (row.get_attribute("data-window") or "").split(":")[0],
        ): row.locator("td.state .badge").inner_text().split()[0]
        for row in page.locator("#budgets tbody tr").all()
    }
    assert states == {
        ("project:checkout", "day"): "ok",  # the scope's warn is its month's: each window shows its own
        ("project:checkout", "month"): "warn",
        ("project:weekend", "month"): "blocked",
        ("team:data", "month"): "ok",
    }
    assert page.locator("#budgets svg.bar").count() == 4
    month_row = page.locator('#budgets tr[data-scope="project:checkout"][data-window^="month"]')
    assert month_row.locator("line.mark").count() == 3  # 50, 80, 100
    assert page.locator('#killswitch tr[data-scope="project:weekend"][data-state=blocked]').count() == 1
    page.screenshot(path=str(shots / "overview.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.screenshot(path=str(shots / "overview-narrow.png"), full_page=True)


def test_a_block_reaches_the_open_page_within_a_second(
    ui: str, loaded: Worker, page: Page, shots: Path
) -> None:
    page.goto(ui)
    page.wait_for_function("document.getElementById('feed').className === 'feed on'")
    assert page.locator('#killswitch tr[data-scope="project:search"]').count() == 0
    loaded.cli("block", "project:search", "--reason", "incident 4711")
    page.wait_for_selector('#killswitch tr[data-scope="project:search"][data-state=blocked]', timeout=10_000)
    shown_ms = int(page.evaluate("document.body.dataset.lastSignalAt"))  # the browser's clock (this host's)
    # From the moment the CLI published the block (its record's timestamp on the budgets topic) and
    # the moment the worker decided it (the signal's decided_at) to the row on the page.
    published_ms = in_thread(record_time(loaded, loaded.topics.budgets, b"project:search"))
    decided_ms = int(
        page.locator('#killswitch tr[data-scope="project:search"]').get_attribute("data-decided") or 0
    )
    print(
        f"\nblock: published -> on the page {shown_ms - published_ms} ms "
        f"(worker decided after {decided_ms - published_ms} ms; decided -> page {shown_ms - decided_ms} ms)"
    )
    assert published_ms <= decided_ms <= shown_ms
    assert shown_ms - published_ms < 1000
    row = page.locator('#killswitch tr[data-scope="project:search"]')
    assert "manual" in row.inner_text()
    assert page.locator("#blocked-count").inner_text() == "2"  # weekend (budget) and search (manual)
    page.screenshot(path=str(shots / "overview-after-block.png"), full_page=True)
    page.goto(ui + "control")
    assert page.locator('#changes li:has-text("project:search")').count() >= 1
    page.screenshot(path=str(shots / "control.png"), full_page=True)


def test_drill_down_and_selectors(ui: str, loaded: Worker, page: Page, shots: Path) -> None:
    page.goto(ui)
    page.locator("#projects").get_by_role("link", name="checkout", exact=True).click()
    page.wait_for_url("**/scope?by=project&id=checkout&period=month")
    models = sql_usd(
        loaded,
        "SELECT model, sum(cost_usd) FROM usage_events FINAL "
        f"WHERE project = 'checkout' AND {_month_sql()} GROUP BY model",
    )
    assert usd_of(page, "#scope-total .usd") == sum(models.values(), Decimal(0)) == CHECKOUT_USD
    assert {
        r.get_attribute("data-label"): Decimal(r.locator(".total .usd").get_attribute("data-usd") or "")
        for r in page.locator("#models tbody tr").all()
    } == models
    assert {r.get_attribute("data-label") for r in page.locator("#breakdown tbody tr").all()} == {"ana", "bo"}
    assert page.locator("#chart svg rect").count() >= 2  # one segment per model with spend
    assert page.locator('#budgets tr[data-scope="project:checkout"]').count() == 2  # day and month
    page.screenshot(path=str(shots / "scope-checkout.png"), full_page=True)

    page.goto(ui + "spend?period=30d&by=project")
    page.select_option("#period", "today")  # a change reloads with the new period
    page.wait_for_url("**/spend?period=today&by=project")
    today = sql_usd(
        loaded,
        "SELECT project, sum(cost_usd) FROM usage_events FINAL WHERE toDate(event_time, 'UTC') = today() GROUP BY project",
    )
    assert usd_of(page, "#totals .grand .usd") == sum(today.values(), Decimal(0))
    page.select_option("#by", "team")
    page.wait_for_url("**/spend?period=today&by=team")
    teams = {r.get_attribute("data-label") for r in page.locator("#totals tbody tr").all()}
    assert teams == {"web", "data", "research"}
    page.screenshot(path=str(shots / "spend-by-team.png"), full_page=True)
    page.select_option("#by", "tag")
    page.fill("#tag", "feature")
    page.click("form.selectors button")
    page.wait_for_url("**/spend?period=today&by=tag&tag=feature")
    tags = sql_usd(
        loaded,
        "SELECT if(mapContains(tags, 'feature'), tags['feature'], '(none)'), sum(cost_usd) FROM usage_events FINAL "
        "WHERE toDate(event_time, 'UTC') = today() GROUP BY 1",
    )
    assert {
        r.get_attribute("data-label"): Decimal(r.locator(".total .usd").get_attribute("data-usd") or "")
        for r in page.locator("#totals tbody tr").all()
    } == tags
    assert set(tags) == {"chat", "search", "backfill", "(none)"}
    page.screenshot(path=str(shots / "spend-by-tag.png"), full_page=True)


def test_health_of_the_numbers(ui: str, loaded: Worker, page: Page, shots: Path) -> None:
    page.goto(ui + "numbers?period=today")
    gaps = page.locator("#gaps tbody tr")
    assert gaps.count() == 1
    assert "gpt-9-preview" in gaps.first.inner_text()
    assert "unpriced" in gaps.first.inner_text()
    assert "unknown" in gaps.first.inner_text()  # never shown as $0
    dead = page.locator("#dead tbody tr")
    assert dead.count() == 1
    assert dead.first.inner_text().startswith("undecodable")
    has_saved = loaded.sql(
        "SELECT count() FROM system.columns WHERE database = currentDatabase() "
        "AND table = 'usage_events' AND name = 'saved_usd'"
    )[0][0]
    assert ("no <code>saved_usd</code> column" in page.content()) == (not has_saved)
    page.screenshot(path=str(shots / "health.png"), full_page=True)


def test_bad_parameters_are_a_page_that_says_so(ui: str, page: Page) -> None:
    response = page.goto(ui + "spend?by=tag&tag=no'quotes")
    assert response is not None
    assert response.status == 400
    assert "tag:KEY" in page.locator(".error").inner_text()


def test_report_grand_total_equals_sql_to_the_last_unit(
    loaded: Worker, browser: Browser, shots: Path, tmp_path: Path
) -> None:
    month = datetime.now(UTC).strftime("%Y-%m")
    start, end = f"{month}-01", (datetime.now(UTC).replace(day=1) + timedelta(days=32)).strftime("%Y-%m-01")
    where = (
        f"event_time >= toDateTime64('{start}', 6, 'UTC') AND event_time < toDateTime64('{end}', 6, 'UTC')"
    )
    [[total, events]] = loaded.sql(f"SELECT sum(cost_usd), count() FROM usage_events FINAL WHERE {where}")
    teams = sql_usd(
        loaded,
        f"SELECT ifNull(team, '(none)'), sum(cost_usd) FROM usage_events FINAL WHERE {where} GROUP BY 1",
    )
    report = json.loads(loaded.cli("report", "--period", month, "--by", "team", "--format", "json").stdout)
    assert Decimal(report["total"]["cost_usd"]) == Decimal(str(total))  # to the pico-USD
    assert Decimal(str(total)) % Decimal("0.000001") != 0  # the sub-micro event is in it
    assert report["total"]["events"] == events == SENT
    assert {r["team"]: Decimal(r["cost_usd"]) for r in report["rows"]} == teams
    data_row = next(r for r in report["rows"] if r["team"] == "data")
    assert Decimal(data_row["budget_usd"]) == 100_000
    assert Decimal(data_row["budget_use"]) == (teams["data"] / 100_000).quantize(Decimal("0.000001"))
    research = next(r for r in report["rows"] if r["team"] == "research")
    assert research["unpriced_events"] == 1
    assert Decimal(research["unpriced_share"]) == 1
    table = loaded.cli("report", "--period", month, "--by", "project").stdout  # for a person: to the cent
    assert "$61.71" in table
    assert f"{Decimal(str(total)).quantize(Decimal('0.01')):,}" in table
    # --from/--to, CSV: the same range, the same total in its TOTAL row
    last_day = (datetime.fromisoformat(end) - timedelta(days=1)).date().isoformat()
    csv_out = loaded.cli(
        "report", "--from", start, "--to", last_day, "--by", "tag:feature", "--format", "csv"
    ).stdout
    total_row = next(row for row in csv_out.splitlines() if row.startswith("TOTAL,"))
    assert Decimal(total_row.split(",")[1]) == Decimal(str(total))
    # html: one file that needs nothing else (no request leaves it), looked at in the browser
    html = tmp_path / "chargeback.html"
    loaded.cli("report", "--period", month, "--by", "project", "--format", "html", "--output", str(html))
    page = browser.new_page(viewport={"width": 900, "height": 700})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(html.as_uri())
    assert requests == [html.as_uri()]
    assert page.locator("tfoot th[title]").first.get_attribute("title") == f"${Decimal(str(total)):f}"
    page.screenshot(path=str(shots / "report.png"), full_page=True)
    page.close()
