"""A real Prometheus scrapes a `cpworker run` worker processing emulator jobs; every PromQL
expression of the dashboard and of the rules is evaluated through its HTTP API."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from grafana import panels
from tests.conftest import wait_for


@pytest.fixture(scope="module")
async def observed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[panels.Demo]:
    """The demo under load for 20 s, then a last scrape and rule evaluation."""
    async with panels.demo(tmp_path_factory.mktemp("prometheus")) as demo:
        created = await panels.load(demo.emulator.admin, 20, random.Random(3))
        assert created > 40
        await _until_scraped(demo, created)
        yield demo


async def _until_scraped(demo: panels.Demo, created: int) -> None:
    """Wait until Prometheus has scraped every finished job and evaluated the rules since."""
    admin = demo.emulator.admin

    async def final() -> bool:
        counts: dict[str, int] = (await admin.stats())["jobs"]
        return counts.get("Succeeded", 0) + counts.get("Failed", 0) == created

    await wait_for(final, 60, "every demo job final")
    query = "sum(cpworker_jobs_completed_total)"

    async def scraped() -> bool:
        answer = await demo.prometheus.api("query", query=query)
        result = answer["data"]["result"]
        return bool(result) and float(result[0]["value"][1]) == created

    await wait_for(scraped, 30, "Prometheus to scrape the last completions")
    recorded = "namespace_action_type_outcome:cpworker_jobs_completed:rate5m"

    async def evaluated() -> bool:
        return await demo.prometheus.samples_of(recorded) > 0

    await wait_for(evaluated, 30, "the recording rules to be evaluated")


async def test_every_expression_returns_data_of_the_expected_shape(
    observed: panels.Demo, capsys: pytest.CaptureFixture[str]
) -> None:
    checks = await panels.check_all(observed.prometheus)
    with capsys.disabled():
        print("\n" + "\n".join(check.line() for check in checks))
    kinds = {check.expression.kind for check in checks}
    assert kinds == {"panel", "record", "alert", "value"}
    assert len([c for c in checks if c.expression.kind == "panel"]) >= 12
    problems = {
        f"{c.expression.kind} {c.expression.name}": c.problems for c in checks if c.problems
    }
    assert {where: found for where, found in problems.items() if found} == {}


async def test_every_rule_loads_and_evaluates_without_error(observed: panels.Demo) -> None:
    health = await observed.prometheus.rule_health()
    names = {e.name for e in panels.rule_expressions()}
    assert set(health) == names
    assert {name: h for name, h in health.items() if h != "ok"} == {}


async def test_prometheus_sees_what_the_emulator_counted(observed: panels.Demo) -> None:
    admin = observed.emulator.admin
    stats = await admin.stats()
    prom = observed.prometheus

    async def value(query: str) -> float:
        answer = await prom.api("query", query=query)
        return sum(float(r["value"][1]) for r in answer["data"]["result"])

    jobs = stats["jobs"]
    assert await value('sum(cpworker_jobs_completed_total{outcome="succeeded"})') == jobs.get(
        "Succeeded", 0
    )
    assert await value('sum(cpworker_jobs_completed_total{outcome="failed"})') == jobs.get(
        "Failed", 0
    )
    requests = stats["requests"]
    # The worker is idle now: only its polls still change; every other count is final.
    for operation in ("AcknowledgeJob", "PutJobSuccessResult", "PutJobFailureResult"):
        seen = requests.get(operation, {})
        query = f'sum(cpworker_api_requests_total{{operation="{operation}"}})'
        assert await value(query) == sum(seen.values()), operation
        throttled = f'sum(cpworker_api_throttles_total{{operation="{operation}"}})'
        assert await value(throttled) == seen.get("ThrottlingException", 0), operation
    assert await value("sum(cpworker_api_throttles_total)") > 0  # the load was throttled
    assert await value('cpworker_artifact_bytes_total{direction="upload"}') > 0
    assert await value('up{job="cpworker"}') == 1


async def test_the_dashboard_picture_is_drawn_from_prometheus(
    observed: panels.Demo, tmp_path: Path
) -> None:
    picture = tmp_path / "dashboard.png"
    drawn = await panels.render(observed.prometheus, observed.started, time.time(), picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [p["title"] for p in panels.dashboard()["panels"] if p.get("targets")]
    assert list(drawn) == titles
    assert {title: n for title, n in drawn.items() if n == 0} == {}  # every panel has lines
