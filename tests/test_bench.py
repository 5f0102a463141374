"""A smoke run of the benchmark harness (`benchmarks/bench.py --smoke`): a few jobs per
system and scenario, through the real emulator and real worker processes.

No timing is asserted: the run must finish, every job of every system must succeed, and
the JSON must have the shape `make bench` promises, with the PNG plots beside it; with
`--profile`, py-spy's profile of cpworker is written for every job scenario.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = {
    "jobs_per_s", "p50_s", "p95_s", "p99_s", "api_calls_per_job", "cpu_ms_per_job",
    "peak_rss_mib", "mib_per_s", "failed", "lost",
}  # fmt: skip
JOB_SCENARIOS = {
    "control_plane_0ms": {"cpworker", "boto3_sequential", "boto3_threads"},
    "control_plane_20ms": {"cpworker", "boto3_sequential", "boto3_threads"},
    "handler_bound": {"cpworker", "boto3_sequential", "boto3_threads"},
    "artifacts": {"cpworker", "boto3_sequential", "boto3_threads", "aws_s3_cp"},
    "big_artifact": {"cpworker", "aws_s3_cp"},
    "pickup": {"cpworker", "boto3_sequential", "boto3_threads"},
}


def test_the_smoke_run_completes_every_job_and_writes_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results" / "smoke.json"
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke"]
    done = subprocess.run(
        [*bench, "--out", str(out), "--profile", str(tmp_path / "profiles")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke"
    assert result["machine"]["cpus"] >= 1
    scenarios = result["scenarios"]
    assert set(scenarios) == {*JOB_SCENARIOS, "idle"}
    for name, systems in JOB_SCENARIOS.items():
        assert set(scenarios[name]["systems"]) == systems, name
        for system, row in scenarios[name]["systems"].items():
            assert set(row) >= METRICS, (name, system)
            assert row["failed"] == row["lost"] == 0, (name, system, row)
            assert row["jobs_per_s"] > 0, (name, system)
            assert 0 < row["p50_s"] <= row["p95_s"] <= row["p99_s"], (name, system)
            # Each job is at least polled, acknowledged and given a result.
            assert row["api_calls_per_job"] >= 2, (name, system)
            # Polls that found no job are left out: fewer calls, still at least 2 per job.
            assert 2 <= row["api_calls_per_job_saturated"] <= row["api_calls_per_job"], row
            assert row["cpu_ms_per_job"] > 0 and row["peak_rss_mib"] > 0, (name, system)
    for name in ("artifacts", "big_artifact"):
        assert all(r["mib_per_s"] > 0 for r in scenarios[name]["systems"].values())
    for system, row in scenarios["idle"]["systems"].items():
        assert row["polls_per_s"] > 0 and row["cpu_percent"] >= 0, system
    assert set(result["goals"]) >= {"x_boto3_sequential", "x_boto3_threads", "pickup_p99_s"}
    for what in ("throughput", "cpu", "latency", "resources"):
        picture = out.with_name(f"smoke-{what}.png")
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", what
    assert "goal x_boto3_threads >= 3" in done.stdout  # the printed table ends with the goals
    # py-spy sampled cpworker in every job scenario; the hot spots are printed.
    profiles = {p.stem for p in (tmp_path / "profiles").glob("*.txt")}
    assert profiles == set(JOB_SCENARIOS), profiles
    assert done.stdout.count("profile ") == len(JOB_SCENARIOS)
