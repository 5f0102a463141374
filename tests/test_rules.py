"""The Prometheus rules (deploy/prometheus), the Grafana dashboard and its provisioning.

promtool, from Debian's `prometheus` package (install it with `tests/install-debian-tools.sh`),
checks and unit-tests the rules. The metric names and labels the dashboard and the rules use
are checked against DESIGN.md §4 and the worker's own registry, and every dashboard query,
recording rule and alert value is evaluated by promtool over series shaped like a scrape of
a real worker, so a query that silently returns nothing fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cpworker.metrics import WorkerMetrics

ROOT: Final = Path(__file__).resolve().parent.parent
RULES_DIR: Final = ROOT / "deploy" / "prometheus"
RULES: Final = RULES_DIR / "cpworker-rules.yaml"
RULE_TESTS: Final = RULES_DIR / "cpworker-rules.test.yaml"
DASHBOARD: Final = ROOT / "grafana" / "dashboards" / "cpworker.json"
DATASOURCES: Final = ROOT / "grafana" / "provisioning" / "datasources" / "cpworker.yaml"
PROVIDERS: Final = ROOT / "grafana" / "provisioning" / "dashboards" / "cpworker.yaml"
INSTALL_SCRIPT: Final = "tests/install-debian-tools.sh"

# Labels Prometheus adds to every series of a scraped pod.
TARGET_LABELS: Final = frozenset({"namespace", "pod", "job", "instance"})
# The worker's series (DESIGN.md §4) and their own labels; histograms by their base name
# (their series are `_bucket` with `le`, `_sum` and `_count`).
METRICS: Final[dict[str, frozenset[str]]] = {
    "cpworker_jobs_polled_total": frozenset({"action_type"}),
    "cpworker_jobs_acknowledged_total": frozenset({"action_type"}),
    "cpworker_jobs_completed_total": frozenset({"action_type", "outcome"}),
    "cpworker_job_duration_seconds": frozenset({"action_type", "outcome"}),
    "cpworker_jobs_in_flight": frozenset({"action_type"}),
    "cpworker_slots": frozenset({"action_type"}),
    "cpworker_slot_utilization_ratio": frozenset(),
    "cpworker_poll_batch_fill_ratio": frozenset({"action_type"}),
    "cpworker_api_requests_total": frozenset({"operation", "result"}),
    "cpworker_api_request_duration_seconds": frozenset({"operation"}),
    "cpworker_api_throttles_total": frozenset({"operation"}),
    "cpworker_artifact_bytes_total": frozenset({"direction"}),
    "cpworker_credential_renewals_total": frozenset({"reason"}),
    "cpworker_credential_renewal_failures_total": frozenset(),
    "cpworker_worker_state": frozenset({"cpworker_worker_state"}),
    "cpworker_job_oldest_age_seconds": frozenset({"action_type"}),
    "cpworker_job_timeout_seconds": frozenset({"action_type"}),
    "cpworker_event_loop_lag_seconds": frozenset(),
    "cpworker_build_info": frozenset({"version", "python"}),
}
HISTOGRAMS: Final = frozenset(
    {
        "cpworker_job_duration_seconds",
        "cpworker_poll_batch_fill_ratio",
        "cpworker_api_request_duration_seconds",
    }
)
ALERTS: Final = (
    "CpworkerDown",
    "CpworkerSaturated",
    "CpworkerThrottled",
    "CpworkerJobFailureRatioHigh",
    "CpworkerJobNearTimeout",
    "CpworkerCredentialRenewalFailures",
)
SEVERITIES: Final = frozenset({"critical", "warning", "info"})

# A metric name token (recording rule names have colons), a quoted string, a selector with
# its matchers, one matcher, a range, a legend's label.
NAME: Final = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR: Final = re.compile(r"\b(cpworker_[a-z_]+)\{([^}]*)\}")
MATCHER: Final = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
RANGE: Final = re.compile(r"\[([^\]]*)\]")
LEGEND_LABEL: Final = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# `<value expression> <comparison> <number>`
THRESHOLD: Final = re.compile(r"^(?P<value>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<number>-?[0-9.]+)$")
RECORD_NAME: Final = re.compile(r"^[a-z_]+:cpworker_[a-z0-9_]+:[a-z0-9_]+$")


def promtool() -> str:
    """promtool's path; the calling test fails (it is never skipped) when it is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH: install Debian's `prometheus` package with "
            f"`sudo {INSTALL_SCRIPT}`",
            pytrace=False,
        )
    return path


def run_promtool(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rule_groups() -> dict[str, list[dict[str, Any]]]:
    groups = load_yaml(RULES)["groups"]
    return {group["name"]: group["rules"] for group in groups}


def all_rules() -> list[dict[str, Any]]:
    return [rule for rules in rule_groups().values() for rule in rules]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in all_rules() if "alert" in rule}


def recorded() -> set[str]:
    return {rule["record"] for rule in all_rules() if "record" in rule}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = dashboard()["panels"]
    return found


def targets() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every query target of the dashboard, with where it is for messages."""
    for panel in panels():
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r} target {target['refId']}", target


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    """A query variable's query, in either of the forms Grafana stores."""
    query = variable["query"]
    text: str = query["query"] if isinstance(query, dict) else query
    return text


def series_labels(name: str) -> frozenset[str] | None:
    """The labels of series `name` (without target labels), None if the worker has none."""
    if name in METRICS and name not in HISTOGRAMS:
        return METRICS[name]
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and base in HISTOGRAMS:
            return METRICS[base] | ({"le"} if suffix == "_bucket" else frozenset())
    return None


def names_in(expr: str) -> set[str]:
    """The cpworker metric and recording rule names an expression refers to."""
    return {name for name in NAME.findall(STRING.sub('""', expr)) if "cpworker_" in name}


def unknown_names(expr: str) -> set[str]:
    known = recorded()
    return {
        name
        for name in names_in(expr)
        if name not in known and (":" in name or series_labels(name) is None)
    }


def test_known_metrics_are_the_workers() -> None:
    """METRICS above is what `WorkerMetrics` exposes, once every metric has a sample."""
    exposed = {name for name, _, _ in worker_samples()}
    expected = {
        series
        for name in METRICS
        for series in (
            [f"{name}_bucket", f"{name}_sum", f"{name}_count"] if name in HISTOGRAMS else [name]
        )
    }
    assert {n for n in exposed if n.startswith("cpworker_")} == expected


def test_promtool_checks_the_rules() -> None:
    output = run_promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert "SUCCESS" in output


def test_promtool_unit_tests_pass() -> None:
    """cpworker-rules.test.yaml: each alert fires and stays quiet where it should."""
    output = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULES_DIR)
    assert "SUCCESS" in output
    # the unit tests cover every alert, firing at least once and quiet at least once
    tests = load_yaml(RULE_TESTS)["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for alert in ALERTS:
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert} never fires in the tests"
        assert any(not case["exp_alerts"] for case in mine), f"{alert} never stays quiet"


def test_rule_groups_and_recording_rule_names() -> None:
    groups = rule_groups()
    assert set(groups) == {"cpworker.recording", "cpworker.alerts"}
    assert all("record" in rule for rule in groups["cpworker.recording"])
    assert all("alert" in rule for rule in groups["cpworker.alerts"])
    for name in recorded():
        assert RECORD_NAME.match(name), f"{name} is not level:metric:operations"


def test_every_alert_is_there_with_for_severity_and_annotations() -> None:
    found = alerts()
    assert set(found) == set(ALERTS)
    for name, rule in found.items():
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for`"
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert "$labels." in annotations["description"], name
        assert "$value" in annotations["description"], name


def test_alert_expressions_end_with_a_threshold() -> None:
    """`<value expression> <comparison> <number>` on one line: the value can be split off."""
    for name, rule in alerts().items():
        expr = rule["expr"].strip()
        assert "\n" not in expr, f"{name}: the expression spans lines"
        match = THRESHOLD.match(expr)
        assert match, f"{name}: {expr!r} does not end with a comparison against a number"
        float(match["number"])
        value = match["value"]
        depth = 0
        for char in value:
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth >= 0, f"{name}: unbalanced value expression {value!r}"
        assert depth == 0, f"{name}: unbalanced value expression {value!r}"


def test_rules_use_only_known_metrics() -> None:
    for rule in all_rules():
        name = rule.get("record") or rule["alert"]
        assert not unknown_names(rule["expr"]), f"{name}: unknown {unknown_names(rule['expr'])}"


def test_dashboard_identity_and_variables() -> None:
    dash = dashboard()
    assert (dash["uid"], dash["title"], dash["schemaVersion"]) == ("cpworker", "cpworker", 39)
    found = variables()
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod", "action_type"):
        variable = found[name]
        assert variable["type"] == "query", name
        assert variable["datasource"]["uid"] == "${datasource}", name
        assert variable_query(variable).startswith("label_values("), name
        assert variable_query(variable).rstrip().endswith(f", {name})"), name
        assert variable["multi"] is True, name
        assert variable["includeAll"] is True, name
        assert variable["allValue"] == ".*", name


def test_dashboard_panels_are_unique_and_do_not_overlap() -> None:
    found = panels()
    ids = [panel["id"] for panel in found]
    titles = [panel["title"] for panel in found]
    assert len(set(ids)) == len(ids), ids
    assert len(set(titles)) == len(titles), titles
    boxes: list[tuple[str, set[tuple[int, int]]]] = []
    for panel in found:
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 24, panel["title"]
        cells = {(i, j) for i in range(x, x + w) for j in range(y, y + h)}
        for title, other in boxes:
            assert not cells & other, f"{panel['title']!r} overlaps {title!r}"
        boxes.append((panel["title"], cells))


def test_dashboard_panels_and_targets() -> None:
    found = panels()
    assert len(found) >= 12
    for panel in found:
        assert panel["type"] == "timeseries", panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    for where, target in targets():
        assert target["expr"].strip(), where
        assert target["legendFormat"].strip(), where
        assert target["datasource"]["uid"] == "${datasource}", where


def test_dashboard_queries_filter_by_the_variables() -> None:
    for where, target in targets():
        expr = target["expr"]
        assert "$namespace" in expr and "$pod" in expr, where
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{where}: no cpworker selector"
        for name, matchers in selectors:
            labels = series_labels(name)
            assert labels is not None, f"{where}: unknown metric {name}"
            found = {(label, op, value) for label, op, value in MATCHER.findall(matchers)}
            assert ("namespace", "=~", "$namespace") in found, f"{where}: {name}"
            assert ("pod", "=~", "$pod") in found, f"{where}: {name}"
            if "action_type" in labels:
                assert ("action_type", "=~", "$action_type") in found, f"{where}: {name}"
            for label, _, _ in found:
                assert label in labels | TARGET_LABELS, f"{where}: {name} has no {label}"
        ranges = RANGE.findall(expr)
        assert all(r == "$__rate_interval" for r in ranges), f"{where}: {ranges}"


def test_dashboard_legends_name_existing_labels() -> None:
    for where, target in targets():
        available = set(TARGET_LABELS)
        for name in names_in(target["expr"]):
            available |= series_labels(name) or frozenset()
        for label in LEGEND_LABEL.findall(target["legendFormat"]):
            assert label in available, f"{where}: legend label {label!r}"


def test_dashboard_uses_only_known_metrics() -> None:
    exprs = [(where, target["expr"]) for where, target in targets()]
    exprs += [
        (f"variable {n}", variable_query(v)) for n, v in variables().items() if n != "datasource"
    ]
    for where, expr in exprs:
        assert not unknown_names(expr), f"{where}: unknown {unknown_names(expr)}"


def test_provisioning() -> None:
    datasources = load_yaml(DATASOURCES)
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == "prometheus"
    assert source["url"] == "${PROMETHEUS_URL}"
    assert source["access"] == "proxy"

    providers = load_yaml(PROVIDERS)
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/cpworker"
    comments = [line for line in PROVIDERS.read_text().splitlines() if line.startswith("#")]
    assert any("grafana/dashboards" in line for line in comments)


def test_install_script_parses() -> None:
    done = subprocess.run(
        ["bash", "-n", str(ROOT / INSTALL_SCRIPT)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


# --- every query returns data over a scrape of a real worker -------------------------------


def worker_samples() -> list[tuple[str, dict[str, str], float]]:
    """The cpworker samples of a `WorkerMetrics` that has seen a bit of everything."""
    m = WorkerMetrics()
    for action_type in ("Build", "Deploy"):
        m.jobs_polled.labels(action_type).inc(3)
        m.jobs_acknowledged.labels(action_type).inc(3)
        m.completed(action_type, "succeeded", 1.5)
        m.completed(action_type, "failed", 20.0)
        m.jobs_in_flight.labels(action_type).set(1)
        m.slots.labels(action_type).set(4)
        m.poll_batch_fill.labels(action_type).observe(0.5)
        m.job_oldest_age.labels(action_type).set(30)
        m.job_timeout.labels(action_type).set(600)
    m.slot_utilization.set(0.25)
    m.api_request("PollForJobs", 200, None, 0.05)
    m.api_request("PollForJobs", 400, "ThrottlingException", 0.01)
    m.api_request("AcknowledgeJob", 500, "InternalError", 0.2)
    m.api_request("GetJobDetails", None, None, 1.0)
    m.artifact_bytes_moved("download", 4096)
    m.artifact_bytes_moved("upload", 1024)
    m.credential_renewals.labels("scheduled").inc()
    m.credential_renewals.labels("refused").inc()
    m.credential_renewal_failures.inc()
    m.worker_state.state("ready")
    m.event_loop_lag.set(0.002)
    text = generate_latest(m.registry).decode()
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("cpworker_") and not s.name.endswith("_created")
    ]


def series(name: str, labels: dict[str, str]) -> str:
    matchers = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    return f"{name}{{{matchers}}}"


def test_every_query_returns_data(tmp_path: Path) -> None:
    """Dashboard queries, recording rules and alert values (threshold stripped) all return
    data over ten minutes of scrapes of two pods of a busy worker."""
    inputs = []
    for pod in ("cpworker-0", "cpworker-1"):
        target = {"namespace": "ci", "pod": pod, "job": "cpworker", "instance": f"{pod}:9100"}
        inputs.append({"series": series("up", target), "values": "1x15"})
        for name, labels, value in worker_samples():
            counter = name.endswith(("_total", "_bucket", "_sum", "_count"))
            inputs.append(
                {
                    "series": series(name, labels | target),
                    "values": f"0+{value}x15" if counter else f"{value}x15",
                }
            )

    checks: dict[str, str] = {}
    grafana = {
        "$__rate_interval": "2m",
        "$namespace": ".*",
        "$pod": ".*",
        "$action_type": ".*",
    }

    def substituted(expr: str) -> str:
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        return expr

    for where, target in targets():
        checks[f"dashboard {where}"] = substituted(target["expr"])
    for name, variable in variables().items():
        if name != "datasource":
            query = variable_query(variable)
            selector = query.removeprefix("label_values(").rsplit(",", 1)[0]
            checks[f"variable {name}"] = substituted(selector)
    for name in sorted(recorded()):
        checks[f"recording rule {name}"] = name
    for name, rule in alerts().items():
        match = THRESHOLD.match(rule["expr"].strip())
        assert match, name
        checks[f"alert {name} value"] = match["value"]

    names = {f"check_{i}": where for i, where in enumerate(checks)}
    check_rules = {
        "groups": [
            {
                "name": "checks",
                "rules": [
                    {"alert": alert, "expr": f"count({checks[where]}) > 0"}
                    for alert, where in names.items()
                ],
            }
        ]
    }
    (tmp_path / "checks.yaml").write_text(yaml.safe_dump(check_rules))
    unit_tests = {
        "rule_files": [str(RULES), "checks.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": alert, "exp_alerts": [{"exp_labels": {}}]}
                    for alert in names
                ],
            }
        ],
    }
    (tmp_path / "checks.test.yaml").write_text(yaml.safe_dump(unit_tests))

    done = subprocess.run(
        [promtool(), "test", "rules", "checks.test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    empty = sorted({where for alert, where in names.items() if f"alertname: {alert}," in output})
    assert done.returncode == 0, f"no data from: {empty}\n{output[-4000:]}"
