"""The emulator's job state machine: pure state, time injected, no I/O.

Queued → Dispatched (on poll, fresh nonce) → InProgress (on acknowledge) → Succeeded /
Failed, with TimedOut for an in-progress job whose result does not come within its job
timeout. A dispatched job not acknowledged within its dispatch timeout goes back to Queued
and its nonce stops working. A success with a continuation token finishes the job and
creates a new job for the same action (status Created, then Queued after the continuation
delay) that carries the token. Deadlines sit in one heap and are applied by `advance()`,
which every entry point calls first.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OUTPUT_VARIABLES_LIMIT_BYTES = 122_880

ActionKey = tuple[str, str, str, str]  # category, owner, provider, version


class ApiError(Exception):
    """An error answer of the CodePipeline API (`__type` code, message, HTTP status)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Timeouts:
    dispatch_timeout_s: float = 30.0
    job_timeout_s: float = 24 * 3600.0
    continuation_delay_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("dispatch_timeout_s", "job_timeout_s", "continuation_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be 0 or more")


@dataclass
class ActionTypeRecord:
    key: ActionKey
    definition: dict[str, Any]
    queryable: str | None = None


@dataclass
class JobRecord:
    id: str
    action: ActionKey
    data: dict[str, Any]
    timeouts: Timeouts
    third_party: bool = False
    client_id: str | None = None
    client_token: str | None = field(default=None, repr=False)
    status: str = "Queued"
    nonce: str | None = None
    epoch: int = 0
    nonce_counter: int = 0
    previous_job_id: str | None = None
    next_job_id: str | None = None
    credentials: dict[str, str] = field(default_factory=dict, repr=False)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def configuration(self) -> dict[str, str]:
        config: dict[str, str] = self.data.get("actionConfiguration", {}).get("configuration", {})
        return config

    def history(self) -> dict[str, Any]:
        """The job's full history for the admin API."""
        kinds = ("nonce", "acknowledge", "result")
        by_kind = {k: [e for e in self.events if e["event"] == k] for k in kinds}
        return {
            "id": self.id,
            "status": self.status,
            "thirdParty": self.third_party,
            "actionTypeId": dict(
                zip(("category", "owner", "provider", "version"), self.action, strict=True)
            ),
            "configuration": self.configuration,
            "continuationToken": self.data.get("continuationToken"),
            "previousJobId": self.previous_job_id,
            "nextJobId": self.next_job_id,
            "noncesIssued": by_kind["nonce"],
            "acknowledgements": by_kind["acknowledge"],
            "results": by_kind["result"],
            "events": self.events,
        }


def _same(given: str, expected: str | None) -> bool:
    """Constant-time comparison of a nonce or token (any text, not only ASCII)."""
    return expected is not None and secrets.compare_digest(given.encode(), expected.encode())


def action_key(action_type_id: dict[str, str]) -> ActionKey:
    a = action_type_id
    return (a["category"], a["owner"], a["provider"], a["version"])


class JobStore:
    """All jobs and action types of one emulator, and the rules that move them."""

    def __init__(
        self,
        clock: Callable[[], float],
        timeouts: Timeouts,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self.timeouts = timeouts
        self.action_types: dict[ActionKey, ActionTypeRecord] = {}
        self.jobs: dict[str, JobRecord] = {}
        self.status_counts: Counter[str] = Counter()
        self._queues: dict[ActionKey, dict[str, None]] = {}
        self._deadlines: list[tuple[float, int, str, int]] = []
        self._seq = itertools.count()

    # --- time ----------------------------------------------------------------------

    def advance(self) -> float:
        """Apply every deadline that has passed; returns the current time."""
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job_id, epoch = heapq.heappop(self._deadlines)
            job = self.jobs[job_id]
            if job.epoch != epoch:
                continue  # the job moved on since this deadline was set
            if job.status == "Dispatched":
                self._set_status(job, "Queued", "dispatch timeout")
            elif job.status == "InProgress":
                self._set_status(job, "TimedOut", "job timeout")
            elif job.status == "Created":
                self._set_status(job, "Queued", "continuation delay over")
        return now

    def _deadline(self, job: JobRecord, after_s: float) -> None:
        entry = (self._clock() + after_s, next(self._seq), job.id, job.epoch)
        heapq.heappush(self._deadlines, entry)

    def _set_status(self, job: JobRecord, status: str, reason: str) -> None:
        self.status_counts[job.status] -= 1
        self.status_counts[status] += 1
        job.status = status
        job.epoch += 1
        self._log(job, "status", status=status, reason=reason)
        if status == "Queued":
            job.nonce = None
            self._queues.setdefault(job.action, {})[job.id] = None
        else:
            self._queues.get(job.action, {}).pop(job.id, None)

    def _log(self, job: JobRecord, event: str, **fields: Any) -> None:
        job.events.append({"event": event, "time": self._wall_clock(), **fields})

    # --- action types --------------------------------------------------------------

    def register_action_type(self, definition: dict[str, Any]) -> ActionTypeRecord:
        key = action_key(definition["id"])
        props = definition.get("actionConfigurationProperties", [])
        queryable = next((p["name"] for p in props if p.get("queryable")), None)
        record = ActionTypeRecord(key=key, definition=definition, queryable=queryable)
        self.action_types[key] = record
        return record

    def delete_action_type(self, key: ActionKey) -> None:
        self.action_types.pop(key, None)

    def _known(self, key: ActionKey) -> ActionTypeRecord:
        record = self.action_types.get(key)
        if record is None:
            raise ApiError(
                "ActionTypeNotFoundException",
                f"Action type {'/'.join(key)} is not registered (category/owner/provider/version)",
            )
        return record

    # --- creating jobs -------------------------------------------------------------

    def create_job(
        self,
        action: ActionKey,
        data: dict[str, Any],
        *,
        timeouts: Timeouts | None = None,
        third_party: bool = False,
        previous: JobRecord | None = None,
        delay_s: float = 0.0,
    ) -> JobRecord:
        job = JobRecord(
            id=str(uuid.uuid4()),
            action=action,
            data=data,
            timeouts=timeouts or self.timeouts,
            third_party=third_party,
            status="Created",
        )
        if previous is not None:
            # A continuation belongs to the same partner: same client id and token.
            job.previous_job_id = previous.id
            previous.next_job_id = job.id
            job.client_id, job.client_token = previous.client_id, previous.client_token
            job.credentials = previous.credentials
        elif third_party:
            job.client_id = str(uuid.uuid4())
            job.client_token = secrets.token_urlsafe(24)
        self.jobs[job.id] = job
        self.status_counts["Created"] += 1
        self._log(job, "status", status="Created", reason="created")
        if delay_s > 0:
            self._deadline(job, delay_s)
        else:
            self._set_status(job, "Queued", "created")
        return job

    # --- the job API ---------------------------------------------------------------

    def poll(
        self, action: ActionKey, max_batch: int, query: dict[str, str], third_party: bool
    ) -> list[JobRecord]:
        """Dispatch up to `max_batch` queued jobs of `action` that match `query`."""
        self.advance()
        record = self._known(action)
        for name in query:
            if record.queryable is not None and name != record.queryable:
                raise ApiError(
                    "ValidationException",
                    f"queryParam key {name!r} is not the queryable property "
                    f"{record.queryable!r} of this action type",
                )
        batch: list[JobRecord] = []
        for job_id in self._queues.get(action, {}):
            job = self.jobs[job_id]
            if job.third_party != third_party:
                continue
            if all(job.configuration.get(k) == v for k, v in query.items()):
                batch.append(job)
                if len(batch) >= max_batch:
                    break
        for job in batch:
            self._dispatch(job)
        return batch

    def _dispatch(self, job: JobRecord) -> None:
        job.nonce_counter += 1
        self._set_status(job, "Dispatched", "polled")
        job.nonce = str(job.nonce_counter)
        self._log(job, "nonce", nonce=job.nonce)
        self._deadline(job, job.timeouts.dispatch_timeout_s)

    def get(self, job_id: str, third_party: bool, client_token: str | None = None) -> JobRecord:
        """The job, after checking that it exists in this flow and the client token."""
        self.advance()
        job = self.jobs.get(job_id)
        if job is None or job.third_party != third_party:
            raise ApiError("JobNotFoundException", f"Job {job_id} not found")
        if third_party and not (client_token and _same(client_token, job.client_token)):
            raise ApiError("InvalidClientTokenException", "The client token is not valid")
        return job

    def acknowledge(self, job: JobRecord, nonce: str) -> str:
        self.advance()
        # The current nonce claims a dispatched job, and again (idempotently) the job it
        # made InProgress; a finished job's nonce is spent.
        ok = job.status in ("Dispatched", "InProgress") and _same(nonce, job.nonce)
        outcome = "accepted" if ok else "InvalidNonceException"
        if ok and job.status == "InProgress":
            outcome = "repeated"  # an idempotent retry of the same acknowledgement
        self._log(job, "acknowledge", nonce=nonce, outcome=outcome, status=job.status)
        if not ok:
            raise ApiError(
                "InvalidNonceException", f"Nonce {nonce!r} is not valid for job {job.id}"
            )
        if job.status == "Dispatched":
            self._set_status(job, "InProgress", "acknowledged")
            self._deadline(job, job.timeouts.job_timeout_s)
        return job.status

    def put_result(self, job: JobRecord, operation: str, payload: dict[str, Any]) -> None:
        """Record a success or failure result, or raise the error AWS would answer."""
        self.advance()
        logged = {k: v for k, v in payload.items() if k != "clientToken"}
        try:
            if job.status != "InProgress":
                raise ApiError(
                    "InvalidJobStateException",
                    f"Job {job.id} is {job.status}; only an acknowledged (InProgress) job "
                    "takes a result",
                )
            if "Success" in operation:
                self._check_success(payload)
        except ApiError as exc:
            self._log(job, "result", operation=operation, payload=logged, outcome=exc.code)
            raise
        self._log(job, "result", operation=operation, payload=logged, outcome="accepted")
        if "Failure" in operation:
            self._set_status(job, "Failed", "failure result")
            return
        self._set_status(job, "Succeeded", "success result")
        token = payload.get("continuationToken")
        if token:
            data = dict(job.data, continuationToken=token)
            self.create_job(
                job.action,
                data,
                timeouts=job.timeouts,
                third_party=job.third_party,
                previous=job,
                delay_s=job.timeouts.continuation_delay_s,
            )

    @staticmethod
    def _check_success(payload: dict[str, Any]) -> None:
        variables: dict[str, str] = payload.get("outputVariables") or {}
        if variables and payload.get("continuationToken"):
            raise ApiError(
                "ValidationException",
                "outputVariables can only be set on a final success, not with a continuationToken",
            )
        size = sum(len(k.encode()) + len(v.encode()) for k, v in variables.items())
        if size > OUTPUT_VARIABLES_LIMIT_BYTES:
            raise ApiError(
                "OutputVariablesSizeExceededException",
                f"The output variables are {size} bytes; the limit for an action is "
                f"{OUTPUT_VARIABLES_LIMIT_BYTES} bytes",
            )

    def stats(self) -> dict[str, int]:
        return {status: n for status, n in self.status_counts.items() if n}
