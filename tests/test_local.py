"""`cpworker local`: the demo runs the real worker on the emulator and checks every job.

The command runs as a subprocess (its own emulator child on free ports); its summary is
read back from stdout. The summary itself is a pure function, tested on hand-made
histories.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from cpworker.cli import main
from cpworker.local import Summary, percentile, plan_modes, render, summarize

LOCAL = [sys.executable, "-m", "cpworker", "local"]
RUN_TIMEOUT_S = 180.0


async def run_local(*args: str) -> tuple[int, str]:
    with anyio.fail_after(RUN_TIMEOUT_S):
        done = await anyio.run_process([*LOCAL, *args], check=False, stderr=subprocess.STDOUT)
    return done.returncode, done.stdout.decode()


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in the output:\n{text}"
    return float(found.group(1))


def times(label: str, text: str) -> list[float]:
    line = next((x for x in text.splitlines() if x.strip().startswith(label)), "")
    values = [float(v) for v in re.findall(r"p\d\d\s+([\d.]+) ms", line)]
    assert len(values) == 3, f"no p50/p95/p99 on the {label!r} line:\n{text}"
    return values


def calls(operation: str, text: str) -> int:
    return int(number(rf"\n\s+{operation}\s+[\d.]+\s+\((\d+) calls\)", text))


async def test_local_runs_every_job_to_its_planned_outcome() -> None:
    code, out = await run_local("--jobs", "40", "--concurrency", "10")
    modes = plan_modes(40)
    failing, continuing = modes.count("fail"), modes.count("continue")
    assert failing >= 1 and continuing >= 1
    assert code == 0, out
    total = 40 + continuing  # each continued job comes back once as a new job
    assert number(r"cpworker local: (\d+) jobs", out) == total
    assert number(r"\n\s+failed\s+(\d+)", out) == failing
    assert number(r"\n\s+continued\s+(\d+)", out) == continuing
    assert number(r"\n\s+succeeded\s+(\d+)", out) == total - failing - continuing
    assert f"failures are exactly the {failing} Mode=fail jobs" in out
    # The shell script's stderr is the failure message; its stdout tail the summary.
    assert "command exited with 1: demo failure: project demo has Mode=fail" in out
    for label in ("job time", "run time"):
        p50, p95, p99 = times(label, out)
        assert 0 < p50 <= p95 <= p99
    # Every job acknowledged once and reported once; polls come in batches.
    assert calls("AcknowledgeJob", out) == total
    assert calls("PutJobFailureResult", out) == failing
    assert calls("PutJobSuccessResult", out) == total - failing
    assert calls("PollForJobs", out) < total
    per_job = number(r"API calls per job\s+([\d.]+)", out)
    assert 2.0 < per_job < 3.5
    assert number(r"API latency added to\s+(\d+) of", out) == 0
    assert number(r"throughput\s+.*= ([\d.]+) jobs/s", out) > 0
    # Not a TTY: plain progress lines, the last one with everything done.
    assert f"done {total}/{total}  failed {failing}  in flight 0" in out


async def test_local_with_latency_adds_it_to_every_api_call() -> None:
    code, out = await run_local("--jobs", "20", "--concurrency", "10", "--latency-ms", "20")
    assert code == 0, out
    assert "emulator latency 20 ms per API call" in out
    total = 20 + plan_modes(20).count("continue")
    assert number(r"cpworker local: (\d+) jobs", out) == total
    delayed = re.search(r"API latency added to\s+(\d+) of (\d+) calls", out)
    assert delayed, out
    assert int(delayed.group(1)) == int(delayed.group(2)) >= 2 * total
    # Acknowledged → accepted result spans at least the result call's 20 ms.
    assert times("run time", out)[0] >= 20.0


async def test_ctrl_c_stops_the_worker_gracefully_and_the_emulator() -> None:
    process = await anyio.open_process(
        [*LOCAL, "--jobs", "300", "--concurrency", "4"], stderr=subprocess.STDOUT
    )
    async with process:
        assert process.stdout is not None
        out = ""
        with anyio.fail_after(RUN_TIMEOUT_S):
            async for chunk in TextReceiveStream(process.stdout):
                out += chunk
                if re.search(r"done [1-9]\d*/", out):
                    break
            process.send_signal(signal.SIGINT)
            async for chunk in TextReceiveStream(process.stdout):
                out += chunk
            code = await process.wait()
    assert code == 130, out
    assert "interrupted: stopping the worker" in out
    after = out.split("interrupted: stopping the worker", 1)[1]
    # Graceful: the jobs it held were finished and reported; the rest were never started.
    last = re.findall(r"done (\d+)/310  failed \d+  in flight (\d+)", after)[-1]
    assert int(last[0]) < 310 and last[1] == "0", out
    assert "interrupted: the worker has stopped" in out
    url = urlsplit(re.findall(r"CodePipeline (http://\S+),", out)[0])
    with pytest.raises(ConnectionRefusedError), socket.create_connection((url.hostname, url.port)):
        pass


def test_bad_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--jobs", "0"], ["--concurrency", "-1"], ["--latency-ms", "-5"]):
        with pytest.raises(SystemExit) as exited:
            main(["local", *args])
        assert exited.value.code == 2
        assert f"argument {args[0]}" in capsys.readouterr().err


# --- the summary, on hand-made histories -----------------------------------------------


def history(
    job_id: str,
    mode: str,
    kinds: list[str],
    *,
    created: float = 100.0,
    acked: float = 101.0,
    ends: float = 102.0,
    status: str | None = None,
    token: str | None = None,
    previous: str | None = None,
    next_job: str | None = None,
) -> dict[str, Any]:
    """A job's history as `GET /_emulator/jobs/{id}` answers it, with accepted results."""
    results = []
    for kind in kinds:
        operation = "PutJobFailureResult" if kind == "failed" else "PutJobSuccessResult"
        payload: dict[str, Any] = {"jobId": job_id}
        if kind == "failed":
            payload["failureDetails"] = {"type": "JobFailed", "message": f"{job_id} broke"}
        if kind == "continued":
            payload["continuationToken"] = "step-2"
        results.append(
            {"event": "result", "time": ends, "operation": operation, "payload": payload}
            | {"outcome": "accepted"}
        )
    final = {"failed": "Failed"}.get(kinds[-1], "Succeeded") if kinds else "InProgress"
    return {
        "id": job_id,
        "status": status or final,
        "configuration": {"ProjectName": "demo", "Mode": mode},
        "continuationToken": token,
        "previousJobId": previous,
        "nextJobId": next_job,
        "acknowledgements": [{"event": "acknowledge", "time": acked, "outcome": "accepted"}],
        "results": results,
        "events": [{"event": "status", "time": created, "status": "Created"}],
    }


def good_run() -> list[dict[str, Any]]:
    return [
        history("b1", "build", ["succeeded"], ends=101.5),
        history("b2", "build", ["succeeded"], ends=103.0),
        history("f1", "fail", ["failed"], ends=102.0),
        history("c1", "continue", ["continued"], ends=101.2, next_job="c2"),
        history(
            "c2", "continue", ["succeeded"], created=101.2, acked=101.6, ends=104.0,
            token="step-2", previous="c1",
        ),
    ]  # fmt: skip


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
    assert [percentile(values, p) for p in (50, 95, 99, 100)] == [50.0, 95.0, 99.0, 100.0]
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([], 50) == 0.0


def test_summary_counts_outcomes_times_and_calls_per_job() -> None:
    requests = {"AcknowledgeJob": 5, "PollForJobs": 2, "PutJobSuccessResult": 4}
    summary = summarize(
        good_run(), requests | {"PutJobFailureResult": 1}, started_at=100.0, expected_jobs=4
    )
    assert summary.problems == ()
    assert summary.jobs == 5
    assert summary.outcomes == {"succeeded": 3, "failed": 1, "continued": 1}
    # Created → result: 1.5, 3.0, 2.0, 1.2, 2.8 (the continuation job counts on its own).
    assert summary.job_time_s == pytest.approx({"p50": 2.0, "p95": 3.0, "p99": 3.0})
    # Acknowledged → result: 0.5, 2.0, 1.0, 0.2, 2.4.
    assert summary.run_time_s == pytest.approx({"p50": 1.0, "p95": 2.4, "p99": 2.4})
    assert summary.elapsed_s == pytest.approx(4.0)
    assert summary.jobs_per_s == pytest.approx(1.25)
    assert summary.api_calls_per_job == pytest.approx(12 / 5)
    assert summary.failure_sample == "f1 broke"
    text = render(summary)
    assert "failures are exactly the 1 Mode=fail jobs" in text
    assert re.search(r"PollForJobs\s+0\.40\s+\(2 calls\)", text)
    assert re.search(r"job time.*p50\s+2000\.0 ms\s+p95\s+3000\.0 ms\s+p99\s+3000\.0 ms", text)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda h: h[2].update(configuration={"Mode": "build"}), "f1 (Mode=build): failed, "),
        (lambda h: h[0].update(configuration={"Mode": "fail"}), "b1 (Mode=fail): succeeded"),
        (lambda h: h[0]["results"].append(h[0]["results"][0]), "b1 (Mode=build): Succeeded with 2"),
        (lambda h: h[1].update(status="InProgress", results=[]), "b2 (Mode=build): InProgress"),
        (lambda h: h.pop(4), "c1 (Mode=continue): continued, but its continuation job is"),
        (lambda h: h.append(history("x", "build", ["succeeded"])), "holds 5 demo jobs; 4 were"),
    ],
)
def test_summary_names_each_problem(change: Any, problem: str) -> None:
    histories = good_run()
    change(histories)
    summary: Summary = summarize(histories, {}, started_at=100.0, expected_jobs=4)
    assert any(problem in p for p in summary.problems), summary.problems
    assert "CHECK FAILED" in render(summary)
