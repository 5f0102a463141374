"""The dashboard's panels from a real Prometheus: every PromQL expression checked, and a PNG.

`make dashboard` (``python -m grafana.panels``) runs the local emulator (CodePipeline +
S3), a `cpworker run` worker with two action types under a steady load (some jobs fail,
a few calls are throttled), and the Debian `prometheus` scraping it every second with
the project's rules (`deploy/prometheus/cpworker-rules.yaml`) loaded. It then prints
what every expression of the dashboard and the rules returned and draws each panel from
`query_range` answers into `grafana/dashboard.png`. `tests/test_prometheus.py` runs the
same harness for a shorter while and asserts on every check.

Grafana's variables are replaced as a user viewing everything would set them:
``$namespace`` and ``$pod`` by the scrape target's labels, ``$action_type`` by ``.*``,
``$__rate_interval`` by `RATE_INTERVAL`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import yaml
from aiobotocore.session import AioSession
from anyio.abc import Process

from cpworker import models as m
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.emulator.client import AdminClient, EmulatorProcess, stop_process

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "cpworker.json"
RULES = ROOT / "deploy" / "prometheus" / "cpworker-rules.yaml"
PICTURE = ROOT / "grafana" / "dashboard.png"
TARGET_LABELS = {"namespace": "demo", "pod": "cpworker-0"}
RATE_INTERVAL = "15s"
ACTIONS = {
    "build": m.ActionTypeId(category="Build", owner="Custom", provider="DemoBuild", version="1"),
    "deploy": m.ActionTypeId(category="Deploy", owner="Custom", provider="DemoDeploy", version="1"),
}
KEY_ID, SECRET = "AKIDCPWORKERDEMO", "dashboard-demo-secret-not-used-by-aws"
_THRESHOLD = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*[0-9.e+-]+\s*$")
_LEGEND = re.compile(r"{{\s*(\w+)\s*}}")
_TEMPLATE_LABEL = re.compile(r"\$labels\.(\w+)")


@dataclass
class Expression:
    """One PromQL expression: where it lives and which labels its answer must carry."""

    kind: str  # panel, record, alert
    name: str
    expr: str
    labels: tuple[str, ...] = ()
    legend: str = ""

    @property
    def query(self) -> str:
        """The expression with Grafana's variables replaced."""
        query = self.expr.replace("$__rate_interval", RATE_INTERVAL)
        query = query.replace("$namespace", TARGET_LABELS["namespace"])
        query = query.replace("$pod", TARGET_LABELS["pod"])
        return query.replace("$action_type", ".*")


@dataclass
class Check:
    """What one expression returned at the end of a run."""

    expression: Expression
    query: str
    status: str
    result_type: str = ""
    series: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    @property
    def problems(self) -> list[str]:
        """Why this answer is not of the expected shape (empty: it is)."""
        if self.status != "success":
            return [f"query failed: {self.error}"]
        if self.result_type != "vector":
            return [f"answered a {self.result_type}, not an instant vector"]
        if self.expression.kind == "alert":
            return []  # firing or not: its value expression ("value") must have data
        if not self.series:
            return ["no series"]
        missing = {
            label
            for s in self.series
            for label in self.expression.labels
            if label not in s["metric"]
        }
        return [f"series without label(s) {sorted(missing)}"] if missing else []

    def line(self) -> str:
        values = sorted(float(s["value"][1]) for s in self.series)
        shown = ", ".join(f"{v:.4g}" for v in values[:4]) + (" ..." if len(values) > 4 else "")
        verdict = "ok" if not self.problems else "; ".join(self.problems)
        e = self.expression
        return f"{e.kind:6} {e.name[:58]:58} {len(self.series):3} series [{shown}] {verdict}"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return loaded


def panel_expressions() -> list[Expression]:
    """Every target of every dashboard panel; its legend's labels must be in the answer."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            legend = target.get("legendFormat", "")
            labels = tuple(_LEGEND.findall(legend))
            found.append(Expression("panel", panel["title"], target["expr"], labels, legend))
    return found


def rule_expressions() -> list[Expression]:
    """Every rule; an alert twice: as written, and its value without the threshold."""
    found = []
    for group in rules()["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                found.append(Expression("record", rule["record"], rule["expr"]))
                continue
            text = " ".join(str(v) for v in rule.get("annotations", {}).values())
            labels = tuple(sorted(set(_TEMPLATE_LABEL.findall(text))))
            expr = " ".join(rule["expr"].split())
            found.append(Expression("alert", rule["alert"], expr))
            value = _THRESHOLD.sub("", expr)
            found.append(Expression("value", rule["alert"], value, labels))
    return found


# --- Prometheus ---------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port of 127.0.0.1 (Prometheus cannot report a port it chose itself)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None or shutil.which("promtool") is None:
        raise RuntimeError(
            "prometheus and promtool are not installed: run `bash tests/install-debian-tools.sh`"
            " (as root; `make test` runs it) to install Debian's `prometheus` package"
        )
    return found


class Prometheus:
    """A Prometheus server's HTTP API."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self._session = session

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        async with self._session.get(f"{self.url}/api/v1/{path}", params=params) as answer:
            body: dict[str, Any] = await answer.json()
            return body

    async def check(self, expression: Expression) -> Check:
        answer = await self.api("query", query=expression.query)
        data = answer.get("data", {})
        return Check(
            expression,
            expression.query,
            answer["status"],
            data.get("resultType", ""),
            data.get("result", []),
            answer.get("error", ""),
        )

    async def series(self, query: str, start: float, end: float) -> list[dict[str, Any]]:
        answer = await self.api(
            "query_range", query=query, start=str(start), end=str(end), step="2"
        )
        if answer["status"] != "success":
            raise RuntimeError(f"{query}: {answer.get('error')}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def rule_health(self) -> dict[str, str]:
        """Each loaded rule's evaluation health (`ok`, `err` or `unknown`)."""
        answer = await self.api("rules")
        return {
            rule["name"]: rule["health"]
            + (f": {rule['lastError']}" if rule.get("lastError") else "")
            for group in answer["data"]["groups"]
            for rule in group["rules"]
        }

    async def samples_of(self, query: str) -> int:
        answer = await self.api("query", query=query)
        return len(answer.get("data", {}).get("result", []))


@asynccontextmanager
async def prometheus(target: str, work: Path) -> AsyncIterator[Prometheus]:
    """Debian's `prometheus` scraping `target` every second, with the project's rules."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "cpworker",
                "static_configs": [{"targets": [target], "labels": TARGET_LABELS}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        prometheus_binary(),
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with (work / "prometheus.log").open("wb") as log:
        process = await anyio.open_process(command, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, f"{url}/-/ready", process, work / "prometheus.log")
            yield Prometheus(url, session)
    finally:
        await stop_process(process)


async def _wait_ready(
    session: aiohttp.ClientSession, url: str, process: Process, log: Path
) -> None:
    with anyio.fail_after(60):
        while True:
            if process.returncode is not None:
                raise RuntimeError(
                    f"prometheus exited: {(await anyio.Path(log).read_text())[-2000:]}"
                )
            try:
                async with session.get(url) as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await anyio.sleep(0.1)


# --- the worker under load ----------------------------------------------------------------


@dataclass
class Demo:
    """The emulator, a `cpworker run` worker and a Prometheus scraping it."""

    emulator: EmulatorProcess
    worker_url: str
    prometheus: Prometheus
    worker: Process
    started: float


def _session() -> AioSession:
    session = AioSession()
    session.set_credentials(KEY_ID, SECRET)
    return session


async def _register(codepipeline: str) -> None:
    prop = m.ActionConfigurationProperty(name="Mode", required=False, key=False, secret=False)
    async with ControlPlane.open(ControlPlaneSettings(endpoint_url=codepipeline), _session()) as cp:
        for action in ACTIONS.values():
            await cp.create_custom_action_type(
                m.CreateCustomActionTypeInput(
                    category=action.category,
                    provider=action.provider,
                    version=action.version,
                    configuration_properties=(prop,),
                    input_artifact_details=m.ArtifactDetails(minimum_count=0, maximum_count=1),
                    output_artifact_details=m.ArtifactDetails(minimum_count=0, maximum_count=1),
                )
            )


def _worker_config(emulator: EmulatorProcess, work: Path) -> Path:
    tables = "".join(
        f"""
[action_types.{name}]
category = "{a.category}"
provider = "{a.provider}"
handler = "grafana.demo_handler:work"
slots = {8 if name == "build" else 4}
poll_loops = 2
idle_backoff_ceiling_s = 1.0
"""
        for name, a in ACTIONS.items()
    )
    path = work / "worker.toml"
    path.write_text(
        f"""codepipeline_endpoint_url = "{emulator.codepipeline}"
s3_endpoint_url = "{emulator.s3}"
bind = "127.0.0.1:0"
log_format = "json"
{tables}"""
    )
    return path


async def _worker_address(log: Path, process: Process) -> str:
    with anyio.fail_after(60):
        while True:
            text = await anyio.Path(log).read_text()
            for line in text.splitlines():
                if '"endpoints_listening"' in line:
                    return str(json.loads(line)["message"].rsplit(" on ", 1)[1])
            if process.returncode is not None:
                raise RuntimeError(f"the worker exited: {text[-2000:]}")
            await anyio.sleep(0.1)


@asynccontextmanager
async def demo(work: Path) -> AsyncIterator[Demo]:
    """Everything running; load is added with `load()`."""
    async with EmulatorProcess.start(["--seed", "5"]) as emulator:
        await _register(emulator.codepipeline)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CPWORKER_"))}
        env |= {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
        log_path = work / "worker.log"
        command = [
            sys.executable,
            "-m",
            "cpworker",
            "run",
            "-c",
            str(_worker_config(emulator, work)),
        ]
        with log_path.open("wb") as log:
            worker = await anyio.open_process(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
            )
        try:
            address = await _worker_address(log_path, worker)
            async with prometheus(address, work) as prom:
                yield Demo(emulator, f"http://{address}", prom, worker, time.time())
        finally:
            await stop_process(worker)


async def load(admin: AdminClient, seconds: float, rng: random.Random) -> int:
    """Jobs for `seconds`: builds with an input and an output, deploys, some failing."""
    await admin.set_faults({"global": {"throttle_rate": 0.03}})
    spec_in = {"inputArtifacts": [{"name": "In", "files": {"app.py": "print('hi')\n" * 500}}]}
    created = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, action in ACTIONS.items():
            fail = rng.random() < (0.1 if name == "build" else 0.3)
            spec: dict[str, Any] = {
                "actionTypeId": m.to_builtins(action),
                "count": rng.randint(1, 4),
                "configuration": {"Mode": "fail" if fail else "ok"},
                "shareCredentials": True,
            }
            if name == "build":
                spec |= spec_in | {"outputArtifacts": ["Out"]}
            created += len((await admin.create_jobs(spec))["jobIds"])
        await anyio.sleep(1.0)  # the arrival rate of the demo's jobs
    await admin.set_faults({"global": {}})
    return created


async def check_all(prom: Prometheus) -> list[Check]:
    """Every expression of the dashboard and the rules, evaluated now."""
    return [await prom.check(e) for e in [*panel_expressions(), *rule_expressions()]]


# --- the picture --------------------------------------------------------------------------


def _legend(template: str, labels: dict[str, str]) -> str:
    return _LEGEND.sub(lambda found: labels.get(found.group(1), ""), template) or "value"


async def render(prom: Prometheus, start: float, end: float, path: Path) -> dict[str, int]:
    """Each dashboard panel as a small chart of its `query_range` answers, in one PNG.

    Returns how many series each panel drew, by title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in dashboard()["panels"] if p.get("targets")]
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    drawn: dict[str, int] = {}
    for ax, panel in zip(axes.flat, panels, strict=False):
        drawn[panel["title"]] = 0
        for target in panel["targets"]:
            query = Expression("panel", panel["title"], target["expr"]).query
            for series in await prom.series(query, start, end):
                times = [float(t) - start for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                label = _legend(target.get("legendFormat", ""), series["metric"])
                ax.plot(times, values, label=label, linewidth=1.2)
                drawn[panel["title"]] += 1
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    figure.suptitle("cpworker dashboard panels, from a real Prometheus (make dashboard)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return drawn


async def main_async(seconds: float, out: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="cpworker-dashboard-") as tmp:
        async with demo(Path(tmp)) as d:
            print(f"worker {d.worker_url}, prometheus {d.prometheus.url}", flush=True)
            created = await load(d.emulator.admin, seconds, random.Random(7))
            await anyio.sleep(5)  # a few more scrapes and rule evaluations after the load
            end = time.time()
            checks = await check_all(d.prometheus)
            health = await d.prometheus.rule_health()
            await render(d.prometheus, d.started, end, out)
    print(f"{created} jobs over {seconds:.0f} s; every expression at the end:")
    for check in checks:
        print("  " + check.line())
    bad_rules = {name: h for name, h in health.items() if h != "ok"}
    print(f"rules loaded: {len(health)}, not ok: {bad_rules or 'none'}")
    print(f"written: {out}")
    return 1 if bad_rules or any(c.problems for c in checks) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="how long to add jobs")
    parser.add_argument("--out", type=Path, default=PICTURE, help="the PNG to write")
    args = parser.parse_args()
    return anyio.run(main_async, args.seconds, args.out)


if __name__ == "__main__":
    sys.exit(main())
