"""The built-in `shell` handler, run by a real `Worker` against the emulator.

Each test configures an action type with `handler = "shell"`, creates jobs through the
admin API, runs the worker, and checks what CodePipeline (the emulator) was told, what
reached the command, and what the command left behind.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from cpworker import models as m
from cpworker.config import WorkerConfig
from cpworker.control_plane import ControlPlane
from cpworker.emulator.client import AdminClient, EmulatorProcess
from tests.conftest import (
    JobFactory,
    action_table,
    plain_s3,
    run_burst,
    running_worker,
    status_of,
    wait_for,
    worker_config,
)

PYTHON = sys.executable
# Writes the command's environment (all of it, or the CPWORKER_* part) to $DUMP as JSON.
DUMP_ENV = (
    "import json, os; prefix = os.environ.get('DUMP_PREFIX', '');"
    "json.dump({k: v for k, v in os.environ.items() if k.startswith(prefix)},"
    " open(os.environ['DUMP'], 'w'))"
)


def _config(
    emulator: EmulatorProcess,
    action_type: m.ActionTypeId,
    command: str | list[str],
    *,
    handler_timeout_s: float = 30.0,
    **options: Any,
) -> WorkerConfig:
    table = action_table(
        action_type,
        "shell",
        handler_options={"command": command, **options},
        handler_timeout_s=handler_timeout_s,
    )
    return worker_config(emulator, {"shell": table})


async def _result(admin: AdminClient, job_id: str) -> dict[str, Any]:
    """The payload of the job's one accepted result call."""
    history = await admin.job(job_id)
    [result] = [r for r in history["results"] if r["outcome"] == "accepted"]
    payload: dict[str, Any] = result["payload"]
    return payload


async def _failure(admin: AdminClient, job_id: str) -> dict[str, Any]:
    assert await status_of(admin, job_id) == "Failed"
    details: dict[str, Any] = (await _result(admin, job_id))["failureDetails"]
    return details


async def _download_output(
    emulator: EmulatorProcess, cp: ControlPlane, job_id: str
) -> zipfile.ZipFile:
    """The job's one output artifact, read from S3 with the job's fresh credentials."""
    details = await cp.get_job_details(job_id)
    [output] = details.data.output_artifacts
    assert output.location is not None and output.location.s3_location is not None
    location = output.location.s3_location
    assert details.data.artifact_credentials is not None
    async with plain_s3(emulator, details.data.artifact_credentials) as s3:
        answer = await s3.get_object(Bucket=location.bucket_name, Key=location.object_key)
        body = await answer["Body"].read()
    return zipfile.ZipFile(io.BytesIO(body))


def _alive(pid: int) -> bool:
    """Is `pid` a live process? A zombie (dead, not yet reaped by PID 1) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


# --- artifacts and environment ---------------------------------------------------------


async def test_inputs_are_unpacked_in_the_work_dir_and_outputs_uploaded(
    emulator: EmulatorProcess,
    admin: AdminClient,
    cp: ControlPlane,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
) -> None:
    [job_id] = await make_jobs(
        inputArtifacts=[{"name": "Src-Code", "files": {"dir/a.txt": "hello", "top.txt": "top"}}],
        outputArtifacts=["Out"],
    )
    script = (
        "set -e\n"
        'cp "$CPWORKER_INPUT_SRC_CODE/dir/a.txt" "$CPWORKER_OUTPUT_DIR/Out/copied.txt"\n'
        'cat inputs/Src-Code/top.txt > "$CPWORKER_OUTPUT_OUT/from-cwd.txt"\n'
        'ls "$CPWORKER_INPUT_DIR" > "$CPWORKER_OUTPUT_DIR/Out/inputs.txt"\n'
        'mkdir "$CPWORKER_OUTPUT_DIR/Out/nested"; echo deep > "$CPWORKER_OUTPUT_DIR/Out/nested/d"\n'
    )
    await run_burst(_config(emulator, action_type, ["/bin/sh", "-c", script]))
    assert await status_of(admin, job_id) == "Succeeded"
    with await _download_output(emulator, cp, job_id) as archive:
        assert archive.read("copied.txt") == b"hello"
        assert archive.read("from-cwd.txt") == b"top"
        assert archive.read("inputs.txt") == b"Src-Code\n"
        assert archive.read("nested/d") == b"deep\n"


async def test_configuration_reaches_the_command_verbatim_and_is_never_executed(
    emulator: EmulatorProcess,
    admin: AdminClient,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    marks = [tmp_path / f"pwned{i}" for i in range(3)]
    configuration = {
        "Danger": f"$(touch {marks[0]})",
        "Semi": f"x; touch {marks[1]}; rm -rf {victim}",
        "Quotes": f'it\'s "quoted" `touch {marks[2]}` \\ end',
        "lower-key.name": "plain",
    }
    [job_id] = await make_jobs(configuration=configuration, outputArtifacts=["Out"])
    dump = tmp_path / "env.json"
    # A string command (run by /bin/sh -c), which even uses two values unquoted.
    command = '"$PYTHON" -c "$DUMP_SCRIPT"; echo $CPWORKER_CONFIG_SEMI $CPWORKER_CONFIG_DANGER'
    env = {"PYTHON": PYTHON, "DUMP_SCRIPT": DUMP_ENV, "DUMP": str(dump), "DUMP_PREFIX": "CPW"}
    await run_burst(_config(emulator, action_type, command, env=env))

    payload = await _result(admin, job_id)
    # Unquoted, the values were split into words, but nothing in them was run.
    summary = payload["executionDetails"]["summary"]
    assert summary == f"{configuration['Semi']} {configuration['Danger']}"
    seen = json.loads(dump.read_text())
    assert seen["CPWORKER_CONFIG_DANGER"] == configuration["Danger"]
    assert seen["CPWORKER_CONFIG_SEMI"] == configuration["Semi"]
    assert seen["CPWORKER_CONFIG_QUOTES"] == configuration["Quotes"]
    assert seen["CPWORKER_CONFIG_LOWER_KEY_NAME"] == "plain"
    assert not any(mark.exists() for mark in marks)
    assert victim.is_dir()
    # The job's facts.
    assert seen["CPWORKER_JOB_ID"] == job_id
    assert (seen["CPWORKER_PIPELINE"], seen["CPWORKER_STAGE"], seen["CPWORKER_ACTION"]) == (
        "demo-pipeline",
        "Build",
        "CustomAction",
    )
    assert len(seen["CPWORKER_EXECUTION_ID"]) == 36
    assert seen["CPWORKER_CONTINUATION_TOKEN"] == ""
    work_dir = Path(seen["CPWORKER_INPUT_DIR"]).parent
    assert Path(seen["CPWORKER_OUTPUT_DIR"]) == work_dir / "outputs"
    assert Path(seen["CPWORKER_OUTPUT_OUT"]) == work_dir / "outputs" / "Out"
    assert Path(seen["CPWORKER_RESULT_FILE"]).parent == work_dir
    assert not work_dir.exists()  # the runner removed the work dir after the job


async def test_the_workers_aws_credentials_do_not_reach_the_command(
    emulator: EmulatorProcess,
    admin: AdminClient,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDWORKEROWNKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-own-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "worker-own-session-token")
    monkeypatch.setenv("CPWORKER_ACTION_TYPES__X__HANDLER_OPTIONS__API_TOKEN", "worker-setting")
    monkeypatch.setenv("SHELL_TEST_INHERITED", "yes")
    [job_id] = await make_jobs()
    dump = tmp_path / "env.json"
    await run_burst(
        _config(emulator, action_type, [PYTHON, "-c", DUMP_ENV], env={"DUMP": str(dump)})
    )
    assert await status_of(admin, job_id) == "Succeeded"
    seen = json.loads(dump.read_text())
    assert seen["SHELL_TEST_INHERITED"] == "yes"  # the rest of the environment is inherited
    assert seen["CPWORKER_JOB_ID"] == job_id
    assert not [name for name in seen if name.startswith("AWS_")]
    assert "CPWORKER_ACTION_TYPES__X__HANDLER_OPTIONS__API_TOKEN" not in seen
    assert "worker-own-secret-value" not in json.dumps(seen)


# --- outcomes -------------------------------------------------------------------------

MODES = """
case "$CPWORKER_CONFIG_MODE" in
  fail)
    echo "some stdout"
    i=1; while [ $i -le 30 ]; do echo "err line $i" >&2; i=$((i+1)); done
    exit 3;;
  signal) kill -KILL $$;;
  many) seq 1 100;;
  long) head -c 5000 /dev/zero | tr '\\0' x; echo; echo end;;
  vars) printf '%s' '{"summary": "custom summary", "external_execution_id": "ext-42",
    "output_variables": {"Tag": "v1", "Commit": "abc123"}}' > "$CPWORKER_RESULT_FILE";;
  badjson) echo '{not json' > "$CPWORKER_RESULT_FILE";;
  badshape) echo '{"output_variables": {"Tag": 1}}' > "$CPWORKER_RESULT_FILE";;
  both) echo '{"continuation_token": "t", "output_variables": {"A": "b"}}' \\
    > "$CPWORKER_RESULT_FILE";;
esac
"""


async def _run_modes(
    emulator: EmulatorProcess,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
    modes: list[str],
    **options: Any,
) -> dict[str, str]:
    """One job per mode of `MODES`, all run by one burst; returns mode → job id."""
    jobs = {mode: (await make_jobs(configuration={"MODE": mode}))[0] for mode in modes}
    await run_burst(_config(emulator, action_type, MODES, **options))
    return jobs


async def test_a_failing_command_fails_the_job_with_the_tail_of_stderr(
    emulator: EmulatorProcess,
    admin: AdminClient,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
) -> None:
    jobs = await _run_modes(emulator, action_type, make_jobs, ["fail", "signal"])

    failed = await _failure(admin, jobs["fail"])
    assert failed["type"] == "JobFailed"
    status, _, tail = failed["message"].partition(": ")
    assert status == "command exited with 3"
    assert tail.splitlines() == [f"err line {i}" for i in range(11, 31)]  # error_lines=20

    killed = await _failure(admin, jobs["signal"])
    assert killed["type"] == "JobFailed"
    assert killed["message"].startswith("command was killed by SIGKILL (9)")


async def test_the_tail_of_stdout_becomes_the_summary(
    emulator: EmulatorProcess,
    admin: AdminClient,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
) -> None:
    jobs = await _run_modes(emulator, action_type, make_jobs, ["many", "long"], summary_lines=3)

    many = await _result(admin, jobs["many"])
    assert many["executionDetails"]["summary"] == "98\n99\n100"
    long = (await _result(admin, jobs["long"]))["executionDetails"]["summary"]
    assert len(long) == 2048  # CodePipeline's limit: the end of the output is kept
    assert long.startswith("…x")
    assert long.endswith("x\nend")


async def test_the_result_file_sets_output_variables_or_fails_the_job(
    emulator: EmulatorProcess,
    admin: AdminClient,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
) -> None:
    modes = ["vars", "badjson", "badshape", "both"]
    jobs = await _run_modes(emulator, action_type, make_jobs, modes)

    assert await status_of(admin, jobs["vars"]) == "Succeeded"
    payload = await _result(admin, jobs["vars"])
    assert payload["outputVariables"] == {"Tag": "v1", "Commit": "abc123"}
    assert payload["executionDetails"]["summary"] == "custom summary"
    assert payload["executionDetails"]["externalExecutionId"] == "ext-42"

    bad_json = await _failure(admin, jobs["badjson"])
    assert "result file $CPWORKER_RESULT_FILE" in bad_json["message"]
    assert "malformed" in bad_json["message"]
    bad_shape = await _failure(admin, jobs["badshape"])
    assert "Expected `str`, got `int` - at `result.output_variables[...]`" in bad_shape["message"]
    both = await _failure(admin, jobs["both"])
    assert "both continuation_token and output_variables" in both["message"]


async def test_a_continuation_token_chains_to_a_second_job_that_sees_it(
    emulator: EmulatorProcess,
    admin: AdminClient,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
) -> None:
    script = """
    if [ -z "$CPWORKER_CONTINUATION_TOKEN" ]; then
      echo '{"continuation_token": "step-2", "percent_complete": 50, "summary": "half way"}' \\
        > "$CPWORKER_RESULT_FILE"
    else
      printf '{"summary": "resumed with %s"}' "$CPWORKER_CONTINUATION_TOKEN" \\
        > "$CPWORKER_RESULT_FILE"
    fi
    """
    [first] = await make_jobs(continuationDelayS=0.05)
    async with running_worker(_config(emulator, action_type, script)):

        async def chained() -> bool:
            next_id = (await admin.job(first))["nextJobId"]
            return next_id is not None and await status_of(admin, next_id) == "Succeeded"

        await wait_for(chained, timeout_s=10, what="the continued job to succeed")

    step1 = await _result(admin, first)
    assert step1["continuationToken"] == "step-2"
    assert step1["executionDetails"] == {"summary": "half way", "percentComplete": 50}
    second = await admin.job(first)
    history = await admin.job(second["nextJobId"])
    assert history["continuationToken"] == "step-2"
    assert history["nextJobId"] is None
    step2 = await _result(admin, history["id"])
    assert step2["executionDetails"]["summary"] == "resumed with step-2"
    assert "continuationToken" not in step2


# --- timeouts and configuration ------------------------------------------------------


async def test_a_handler_timeout_kills_the_whole_process_group(
    emulator: EmulatorProcess,
    admin: AdminClient,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    script = """
    sh -c 'trap "" TERM; exec sleep 30' &   # ignores SIGTERM: needs the SIGKILL
    echo $! > "$PIDS"
    sleep 30 &
    echo $! >> "$PIDS"
    echo $$ >> "$PIDS"
    wait
    """
    [job_id] = await make_jobs()
    config = _config(
        emulator,
        action_type,
        script,
        handler_timeout_s=1.0,
        terminate_grace_s=0.3,
        env={"PIDS": str(pids)},
    )
    await run_burst(config, timeout_s=15)

    failed = await _failure(admin, job_id)
    assert "handler_timeout_s=1 s" in failed["message"]
    started = [int(line) for line in pids.read_text().split()]
    assert len(started) == 3

    async def all_gone() -> bool:
        return not any(_alive(pid) for pid in started)

    await wait_for(all_gone, timeout_s=5, what=f"processes {started} to be gone")


async def test_what_a_command_leaves_running_is_stopped_when_it_exits(
    emulator: EmulatorProcess,
    admin: AdminClient,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    # The background sleep keeps stdout open: the job must not wait for it.
    script = 'sleep 30 & echo $! > "$PIDS"; echo done'
    [job_id] = await make_jobs()
    config = _config(emulator, action_type, script, env={"PIDS": str(pids)})
    await run_burst(config, timeout_s=10)

    assert await status_of(admin, job_id) == "Succeeded"
    assert (await _result(admin, job_id))["executionDetails"]["summary"] == "done"
    [pid] = [int(line) for line in pids.read_text().split()]

    async def gone() -> bool:
        return not _alive(pid)

    await wait_for(gone, timeout_s=5, what=f"the left-over process {pid} to be gone")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"env": {"A": "b"}}, "handler_options.command is missing"),
        ({"command": ["/nonexistent/program"]}, "cannot start handler_options.command"),
        ({"command": "true", "summary_line": 3}, "unknown field `summary_line`"),
    ],
)
async def test_bad_options_fail_the_job_as_a_configuration_error(
    emulator: EmulatorProcess,
    admin: AdminClient,
    action_type: m.ActionTypeId,
    make_jobs: JobFactory,
    options: dict[str, Any],
    expected: str,
) -> None:
    [job_id] = await make_jobs()
    table = action_table(action_type, "shell", handler_options=options)
    await run_burst(worker_config(emulator, {"shell": table}))
    failed = await _failure(admin, job_id)
    assert failed["type"] == "ConfigurationError"
    assert expected in failed["message"]
