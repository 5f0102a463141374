"""Built-in handlers: `echo` and `sleep` for demos and benchmarks, `shell` for commands.

Name them in the configuration as `handler = "echo"` (or `"sleep"`, `"shell"`); their
settings come from the action type's `[action_types.<name>.handler_options]` table.

The `shell` handler
-------------------

Runs a command from the worker's configuration for each job (no Python to write)::

    [action_types.build]
    category = "Build"
    provider = "MakeBuild"
    handler = "shell"
    handler_timeout_s = 1800

    [action_types.build.handler_options]
    command = ["make", "-C", "inputs/Source", "dist"]   # run directly, no shell
    # command = "make -C \\"$CPWORKER_INPUT_SOURCE\\" && cp -r dist \\"$CPWORKER_OUTPUT_DIR/App\\""
    env = { MAKEFLAGS = "-j4" }

Options (`handler_options`):

- `command` (required): a list of strings, executed directly (no shell), or a string,
  run with `/bin/sh -c <string>`. The command comes only from the trusted worker
  configuration: job data (configuration values, artifact names, tokens) reaches the
  process only through environment variables, never through the command line, so a
  value such as `$(rm -rf /)` arrives as text. Quote the variables (`"$CPWORKER_..."`) in
  a string command, as in any shell script.
- `env` (table of strings, default none): extra environment variables for the command.
- `summary_lines` (int, default 5): how many last lines of stdout become the summary.
- `error_lines` (int, default 20): how many last lines of stderr go into a failure message.
- `terminate_grace_s` (float, default 5.0): after SIGTERM, how long the command's process
  group gets before SIGKILL.

Missing or invalid options fail the job with type `ConfigurationError`.

The command runs in the job's private work directory (its current directory), stdin
closed, in a new session (its own process group), once every input artifact is unpacked
in `inputs/<name>/` and every output directory `outputs/<name>/` is made. Its
environment is the worker's own, minus every variable starting with `AWS_` (the worker's
credentials never reach user commands) or `CPWORKER_` (the worker's own settings), plus
`handler_options.env`, plus:

- `CPWORKER_JOB_ID`, `CPWORKER_PIPELINE`, `CPWORKER_STAGE`, `CPWORKER_ACTION`,
  `CPWORKER_EXECUTION_ID` (the pipeline execution), `CPWORKER_CONTINUATION_TOKEN` (the
  token of a continued job, empty for a new one);
- `CPWORKER_INPUT_DIR` (one subdirectory per input artifact) and `CPWORKER_INPUT_<NAME>`
  (the directory of each input);
- `CPWORKER_OUTPUT_DIR` and `CPWORKER_OUTPUT_<NAME>`: each output artifact is the zip of
  `$CPWORKER_OUTPUT_DIR/<name>` after the command succeeds (an empty directory gives an
  empty zip);
- `CPWORKER_CONFIG_<KEY>` for each action configuration property, value verbatim;
- `CPWORKER_RESULT_FILE`: a path the command may write a result to (see below);
- `<NAME>`, `<KEY>`: the name upper-cased, other characters than A-Z, 0-9 made `_`.

Outcome: exit status 0 succeeds, with the last `summary_lines` lines of stdout (at most
2048 characters) as the summary. Any other exit status fails the job (`JobFailed`,
"command exited with N: <last lines of stderr>"); so does death by a signal. Only the
last 64 KiB of stdout and of stderr are kept in memory, however much the command writes.
Known secret values (secret configuration properties, artifact credentials) are masked
in the summary and the failure message.

Result file: a command that exits with 0 may write a JSON object to
`$CPWORKER_RESULT_FILE` (at most 256 KiB), all keys optional::

    {"summary": "built 3 images", "external_execution_id": "build-42",
     "output_variables": {"ImageTag": "v1.2.3"},
     "continuation_token": "build-42", "percent_complete": 40}

With `continuation_token` the job continues (`Continue`): CodePipeline starts a new job
for the action later, whose command sees the token in `CPWORKER_CONTINUATION_TOKEN`;
`percent_complete` only applies there and `output_variables` are not allowed with it.
Without it the job succeeds, with the output variables. The summary is the file's
`summary`, else the stdout tail. A file that is not such a JSON object fails the job.

When the handler is cancelled (`handler_timeout_s`, the worker stops), the command's
process group gets SIGTERM, then SIGKILL after `terminate_grace_s`; so does what the
command leaves running in its group when it exits. Processes that leave the group
(`setsid`) are out of reach. Orphans are reaped by PID 1: if the worker is PID 1 itself,
run it under an init that reaps (`tini`, `docker run --init`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio
import msgspec
from anyio.abc import ByteReceiveStream, Process

from cpworker.context import JobContext
from cpworker.errors import CpWorkerError, first_exception
from cpworker.logs import redactor
from cpworker.outcomes import Continue, Failed, FailureType, Outcome, Succeeded

__all__ = ["ShellOptions", "ShellResult", "echo", "shell", "sleep"]

_TAIL_BYTES: Final = 64 * 1024
_SUMMARY_CHARS: Final = 2048
_ERROR_CHARS: Final = 4000
_RESULT_MAX_BYTES: Final = 256 * 1024
_PIPE_GRACE_S: Final = 1.0
_RESULT_NAME: Final = "cpworker-result.json"
_UNSAFE = re.compile(r"[^A-Z0-9]")


async def echo(job: JobContext) -> Outcome:
    """Succeed at once, naming the job's configuration keys in the summary.

    Each output artifact is uploaded as an empty zip.
    """
    for output in job.outputs.values():
        output.path  # noqa: B018 - an empty directory becomes an empty zip
    return Succeeded(f"echo: job {job.job_id} with configuration {sorted(job.configuration)}")


async def sleep(job: JobContext) -> Outcome:
    """Sleep `handler_options.seconds` (default 1.0), then succeed."""
    seconds = float(job.options.get("seconds", 1.0))
    await anyio.sleep(seconds)
    for output in job.outputs.values():
        output.path  # noqa: B018
    return Succeeded(f"slept {seconds:g} s")


# --- shell: options and results -----------------------------------------------------


class ShellOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `handler_options` of an action type run by the `shell` handler."""

    command: str | list[str]
    env: dict[str, str] = {}
    summary_lines: int = 5
    error_lines: int = 20
    terminate_grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.command or not all(self.command) or "\0" in "".join(self.command):
            raise ValueError(
                "handler_options.command is empty, or has an empty part or a NUL character"
            )
        for name in self.env:
            if not name or "=" in name or "\0" in name + self.env[name]:
                raise ValueError("handler_options.env has a name that is empty or holds '=' or NUL")
        if not (1 <= self.summary_lines <= 1000 and 1 <= self.error_lines <= 1000):
            raise ValueError("handler_options.summary_lines and error_lines: 1 to 1000")
        if self.terminate_grace_s <= 0:
            raise ValueError("handler_options.terminate_grace_s must be more than 0")

    @property
    def argv(self) -> list[str]:
        return ["/bin/sh", "-c", self.command] if isinstance(self.command, str) else self.command


class ShellResult(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a command may write to `$CPWORKER_RESULT_FILE` (JSON, every key optional)."""

    summary: str | None = None
    external_execution_id: str | None = None
    output_variables: dict[str, str] | None = None
    continuation_token: str | None = None
    percent_complete: int | None = None


class ShellError(CpWorkerError):
    """The job cannot run or its command's result is unusable; the job fails with this."""

    def __init__(self, message: str, failure_type: FailureType = "JobFailed") -> None:
        super().__init__(message)
        self.failure_type: FailureType = failure_type


@dataclass
class _Tail:
    """The last `_TAIL_BYTES` of a stream: memory stays bounded whatever the output."""

    data: bytearray = field(default_factory=bytearray)
    total: int = 0

    async def read(self, stream: ByteReceiveStream | None) -> None:
        if stream is None:
            return
        async for chunk in stream:
            self.total += len(chunk)
            self.data += chunk
            if len(self.data) > 2 * _TAIL_BYTES:
                del self.data[:-_TAIL_BYTES]

    def lines(self, count: int, max_chars: int) -> str:
        """The last `count` lines (secrets masked), cut to the last `max_chars`."""
        text = bytes(self.data[-_TAIL_BYTES:]).decode("utf-8", errors="replace")
        tail = redactor("\n".join(text.rstrip().splitlines()[-count:]))
        return tail if len(tail) <= max_chars else "…" + tail[-(max_chars - 1) :]


# --- shell: the handler ---------------------------------------------------------------


async def shell(job: JobContext) -> Outcome:
    """Run `handler_options.command` for the job; see this module's documentation."""
    try:
        options = _options(job.options)
        result_file = job.work_dir / _RESULT_NAME
        env = _environment(job, options, result_file)
        await _prepare_artifacts(job)
        code, stdout, stderr = await _run(job, options, env)
        if code != 0:
            return Failed(_exit_message(code, stdout, stderr, options), type="JobFailed")
        result = await _read_result(result_file)
    except ShellError as exc:
        return Failed(str(exc), type=exc.failure_type)
    summary = (result.summary if result else None) or stdout.lines(
        options.summary_lines, _SUMMARY_CHARS
    )
    return _outcome(result, redactor(summary) or None)


def _options(raw: Mapping[str, object]) -> ShellOptions:
    try:
        return msgspec.convert(dict(raw), ShellOptions, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc).replace("`$", "`handler_options")
    text = text.replace(
        "Object missing required field `command`", "handler_options.command is missing"
    )
    if text.startswith("Object contains unknown field"):
        allowed = ", ".join(ShellOptions.__struct_fields__)
        text = text.replace("Object contains", "handler_options has an") + f" (allowed: {allowed})"
    if "handler_options.command" in text:
        text += "; set it to a list of strings (run directly) or a string (run with /bin/sh -c)"
    raise ShellError(
        f"shell handler: {text}; fix the action type's [action_types.<name>.handler_options]",
        "ConfigurationError",
    )


def _env_names(prefix: str, names: list[str], what: str) -> dict[str, str]:
    """`name → PREFIX_NAME`; two names that map to the same variable are refused."""
    mapped: dict[str, str] = {}
    for name in names:
        var = prefix + _UNSAFE.sub("_", name.upper())
        clash = next((other for other, v in mapped.items() if v == var), None)
        if clash is not None:
            raise ShellError(
                f"the {what} {clash!r} and {name!r} would both be {var}; rename one",
                "ConfigurationError",
            )
        mapped[name] = var
    return mapped


def _environment(job: JobContext, options: ShellOptions, result_file: Path) -> dict[str, str]:
    """The command's environment; job data only ever reaches the command through here."""
    inputs, outputs = job.inputs_dir, job.outputs_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CPWORKER_"))}
    env.update(options.env)
    env.update(
        CPWORKER_JOB_ID=job.job_id,
        CPWORKER_PIPELINE=job.pipeline_name or "",
        CPWORKER_STAGE=job.stage_name or "",
        CPWORKER_ACTION=job.action_name or "",
        CPWORKER_EXECUTION_ID=job.execution_id or "",
        CPWORKER_CONTINUATION_TOKEN=job.continuation_token or "",
        CPWORKER_INPUT_DIR=str(inputs),
        CPWORKER_OUTPUT_DIR=str(outputs),
        CPWORKER_RESULT_FILE=str(result_file),
    )
    for name, var in _env_names("CPWORKER_INPUT_", list(job.inputs), "input artifacts").items():
        env[var] = str(inputs / name)
    for name, var in _env_names("CPWORKER_OUTPUT_", list(job.outputs), "output artifacts").items():
        env[var] = str(outputs / name)
    config = job.configuration
    properties = _env_names("CPWORKER_CONFIG_", list(config), "configuration properties")
    for name, var in properties.items():
        if "\0" in config[name]:
            raise ShellError(
                f"configuration property {name!r} holds a NUL character, which cannot be "
                "passed in an environment variable; remove it from the action's configuration",
                "ConfigurationError",
            )
        env[var] = config[name]
    return env


async def _prepare_artifacts(job: JobContext) -> None:
    """Download and unpack every input (concurrently); create every output directory."""
    for directory in (job.inputs_dir, job.outputs_dir):
        directory.mkdir(mode=0o700, exist_ok=True)
    for output in job.outputs.values():
        output.path  # noqa: B018 - creates the directory, marks the output as made
    try:
        async with anyio.create_task_group() as tg:
            for artifact in job.inputs.values():
                tg.start_soon(artifact.path)
    except ExceptionGroup as group:  # plain exceptions only: cancellation passes through
        raise first_exception(group) from None


# --- shell: running the command -----------------------------------------------------


async def _run(
    job: JobContext, options: ShellOptions, env: dict[str, str]
) -> tuple[int, _Tail, _Tail]:
    """Run the command to its end; on cancellation its process group is stopped first."""
    started = time.monotonic()
    try:
        process = await anyio.open_process(
            options.argv,
            stdin=subprocess.DEVNULL,
            cwd=job.work_dir,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise ShellError(
            f"cannot start handler_options.command {options.argv[0]!r} "
            f"({type(exc).__name__}: {exc.strerror}); check the program exists on the "
            "worker's PATH and is executable",
            "ConfigurationError",
        ) from None
    job.log.info("command started, pid %d", process.pid, extra={"event": "shell_started"})
    stdout, stderr = _Tail(), _Tail()
    try:
        code = await _supervise(process, stdout, stderr, options.terminate_grace_s)
    finally:
        with anyio.move_on_after(options.terminate_grace_s + _PIPE_GRACE_S, shield=True):
            await _stop_group(process, options.terminate_grace_s)
            await process.aclose()
    job.log.info(
        "command exited with %d after %.3f s (%d bytes on stdout, %d on stderr)",
        code, time.monotonic() - started, stdout.total, stderr.total,
        extra={"event": "shell_exited"},
    )  # fmt: skip
    return code, stdout, stderr


async def _supervise(process: Process, stdout: _Tail, stderr: _Tail, grace_s: float) -> int:
    """Collect the output tails until the command exits and its pipes close."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(stdout.read, process.stdout)
        tg.start_soon(stderr.read, process.stderr)
        code = await _exited(process)
        # What the command left running in its group is stopped; a process that left the
        # group could hold the pipes open forever, so reading gets a short grace only.
        await _stop_group(process, grace_s)
        tg.cancel_scope.deadline = anyio.current_time() + _PIPE_GRACE_S
    return code


async def _exited(process: Process) -> int:
    """The exit status once the command exits, even while children hold its pipes open
    (asyncio's own wait, and older anyio's, waits for the pipes to close too)."""
    async with anyio.create_task_group() as tg:

        async def poll() -> None:
            delay = 0.01
            while process.returncode is None:
                await anyio.sleep(delay)
                delay = min(2 * delay, 0.2)
            tg.cancel_scope.cancel()

        tg.start_soon(poll)
        await process.wait()
        tg.cancel_scope.cancel()
    assert process.returncode is not None
    return process.returncode


async def _stop_group(process: Process, grace_s: float) -> None:
    """SIGTERM the command's process group, SIGKILL whatever is left after `grace_s`."""
    if not await _running(process):
        return
    _signal_group(process.pid, signal.SIGTERM)
    with anyio.move_on_after(grace_s):
        delay = 0.005
        while await _running(process):
            await anyio.sleep(delay)
            delay = min(2 * delay, 0.1)
    if await _running(process):
        _signal_group(process.pid, signal.SIGKILL)


async def _running(process: Process) -> bool:
    """Is the command, or any process in its group (its pid), still alive?"""
    if process.returncode is None:
        return True
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # The group exists; zombies count as gone (orphans stay zombies under a PID 1 that
    # does not reap). /proc is read off the event loop.
    return await anyio.to_thread.run_sync(_live_member, process.pid)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _live_member(pgid: int) -> bool:
    """Does process group `pgid` have a member that is not a zombie? (Linux /proc)"""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no procfs: trust killpg
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


# --- shell: the outcome ---------------------------------------------------------------


def _exit_message(code: int, stdout: _Tail, stderr: _Tail, options: ShellOptions) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "an unknown signal"
        status = f"command was killed by {name} ({-code})"
    else:
        status = f"command exited with {code}"
    tail = stderr.lines(options.error_lines, _ERROR_CHARS)
    if tail:
        return f"{status}: {tail}"
    tail = stdout.lines(options.error_lines, _ERROR_CHARS)
    return f"{status} (nothing on stderr; last lines of stdout: {tail})" if tail else status


async def _read_result(path: Path) -> ShellResult | None:
    """The command's result file, if it wrote one; `ShellError` if it is unusable."""
    file = anyio.Path(path)
    if not await file.exists():
        return None
    what = f"the result file $CPWORKER_RESULT_FILE ({path.name})"
    if not await file.is_file() or (await file.stat()).st_size > _RESULT_MAX_BYTES:
        raise ShellError(
            f"{what} is not a regular file of at most {_RESULT_MAX_BYTES} bytes; write a "
            "small JSON object there"
        )
    try:
        return msgspec.json.decode(await file.read_bytes(), type=ShellResult)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        problem = str(exc).replace("`$", "`result")
        raise ShellError(
            f"{what} is unusable: {problem}; write a JSON object with any of the keys "
            "summary, external_execution_id, output_variables (an object of strings), "
            "continuation_token, percent_complete (0 to 100)"
        ) from None


def _outcome(result: ShellResult | None, summary: str | None) -> Outcome:
    if result is None:
        return Succeeded(summary)
    if result.continuation_token is None:
        return Succeeded(
            summary,
            external_execution_id=result.external_execution_id,
            output_variables=result.output_variables,
        )
    if result.output_variables:
        return Failed(
            "the result file has both continuation_token and output_variables; CodePipeline "
            "takes output variables only on a final success, so write them in the last step",
            type="JobFailed",
        )
    return Continue(
        result.continuation_token,
        percent_complete=result.percent_complete,
        summary=summary,
        external_execution_id=result.external_execution_id,
    )
