"""The worker's Prometheus metrics (names from DESIGN.md §4; they are an interface).

Each `Worker` has its own registry, so several workers can live in one process (tests);
it holds the process and platform collectors and `cpworker_build_info` too. No label
carries a job id, pipeline name or secret: labels are action type names from the
configuration, outcomes, operations, request results, directions and reasons, all from
fixed sets.
"""

from __future__ import annotations

import platform
from typing import Final

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
)

from cpworker import __version__
from cpworker.errors import ERRORS_BY_CODE, ThrottledError

__all__ = ["OUTCOMES", "RESULTS", "STATES", "WorkerMetrics", "request_result"]

STATES: Final = ("starting", "ready", "draining", "stopped")
OUTCOMES: Final = ("succeeded", "failed", "continued", "lost_race", "rejected", "abandoned")
CUSTOM_OPERATIONS: Final = (
    "PollForJobs",
    "AcknowledgeJob",
    "GetJobDetails",
    "PutJobSuccessResult",
    "PutJobFailureResult",
)
THIRD_PARTY_OPERATIONS: Final = (
    "PollForThirdPartyJobs",
    "GetThirdPartyJobDetails",
    "AcknowledgeThirdPartyJob",
    "PutThirdPartyJobSuccessResult",
    "PutThirdPartyJobFailureResult",
)
RESULTS: Final = ("success", "throttled", "client_error", "server_error", "transport_error")
# Job durations from 50 ms to 1 h; API calls from 5 ms to 10 s.
JOB_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
API_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
FILL_BUCKETS: Final = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def request_result(status: int | None, code: str | None = None) -> str:
    """The `result` label of one HTTP request to CodePipeline (one of `RESULTS`).

    `status` is None when no answer came (connection refused, reset or timed out).
    """
    if status is None:
        return "transport_error"
    if status < 300:
        return "success"
    if code is not None and ERRORS_BY_CODE.get(code) is ThrottledError:
        return "throttled"
    return "server_error" if status >= 500 else "client_error"


class WorkerMetrics:
    """Every metric of one worker, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        Info("cpworker_build", "cpworker build: version and Python", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        at = ["action_type"]
        self.jobs_polled = Counter("cpworker_jobs_polled", "Jobs returned by polls", at, registry=r)
        self.jobs_acknowledged = Counter(
            "cpworker_jobs_acknowledged", "Jobs this worker acknowledged", at, registry=r
        )
        self.jobs_completed = Counter(
            "cpworker_jobs_completed",
            "Jobs finished, by outcome (lost_race: another worker won the acknowledgement; "
            "rejected: CodePipeline refused the result because the job timed out or was taken; "
            "abandoned: not acknowledged after retries, left to CodePipeline to re-dispatch)",
            [*at, "outcome"],
            registry=r,
        )
        self.job_duration = Histogram(
            "cpworker_job_duration_seconds",
            "Acknowledgement to accepted result",
            [*at, "outcome"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.jobs_in_flight = Gauge("cpworker_jobs_in_flight", "Jobs running", at, registry=r)
        self.slots = Gauge("cpworker_slots", "Configured slots", at, registry=r)
        self.slot_utilization = Gauge(
            "cpworker_slot_utilization_ratio",
            "Jobs in flight / slots of the process (the autoscaling signal)",
            registry=r,
        )
        self.poll_batch_fill = Histogram(
            "cpworker_poll_batch_fill_ratio",
            "Jobs returned / jobs asked for, per poll",
            at,
            buckets=FILL_BUCKETS,
            registry=r,
        )
        self.api_requests = Counter(
            "cpworker_api_requests",
            "HTTP requests to CodePipeline (each retry is one), by operation and result: "
            + ", ".join(RESULTS),
            ["operation", "result"],
            registry=r,
        )
        self.api_request_duration = Histogram(
            "cpworker_api_request_duration_seconds",
            "Time of one HTTP request to CodePipeline, sent to answered (or failed)",
            ["operation"],
            buckets=API_BUCKETS,
            registry=r,
        )
        self.api_throttles = Counter(
            "cpworker_api_throttles",
            "Requests CodePipeline answered with throttling (retried or not)",
            ["operation"],
            registry=r,
        )
        self.artifact_bytes = Counter(
            "cpworker_artifact_bytes",
            "Artifact bytes moved to or from S3",
            ["direction"],
            registry=r,
        )
        self.credential_renewals = Counter(
            "cpworker_credential_renewals",
            "Artifact credential renewals (GetJobDetails), by reason: scheduled or refused "
            "(S3 refused the credentials)",
            ["reason"],
            registry=r,
        )
        self.credential_renewal_failures = Counter(
            "cpworker_credential_renewal_failures",
            "Artifact credential renewals that failed",
            registry=r,
        )
        self.worker_state = Enum(
            "cpworker_worker_state", "Lifecycle state", states=list(STATES), registry=r
        )
        self.job_oldest_age = Gauge(
            "cpworker_job_oldest_age_seconds",
            "Age of the oldest running job since it was acknowledged (0 when none runs)",
            at,
            registry=r,
        )
        self.job_timeout = Gauge(
            "cpworker_job_timeout_seconds",
            "The action type's handler timeout (handler_timeout_s)",
            at,
            registry=r,
        )
        self.event_loop_lag = Gauge(
            "cpworker_event_loop_lag_seconds",
            "How late the event loop's last heartbeat ran (a blocked loop shows here)",
            registry=r,
        )

    def prepare(self, action_types: dict[str, bool]) -> None:
        """Create the series of every fixed label value at zero (action type → third party?).

        So a rate or ratio over them is 0 rather than absent before the first event, as
        Prometheus' instrumentation guide asks.
        """
        for name, third_party in action_types.items():
            self.jobs_polled.labels(name)
            self.jobs_acknowledged.labels(name)
            self.jobs_in_flight.labels(name)
            for outcome in OUTCOMES:
                self.jobs_completed.labels(name, outcome)
            operations = THIRD_PARTY_OPERATIONS if third_party else CUSTOM_OPERATIONS
            for operation in operations:
                self.api_throttles.labels(operation)
        for reason in ("scheduled", "refused"):
            self.credential_renewals.labels(reason)
        for direction in ("download", "upload"):
            self.artifact_bytes.labels(direction)

    def api_request(
        self, operation: str, status: int | None, code: str | None, duration_s: float
    ) -> None:
        """Count one HTTP request to CodePipeline (a `ControlPlane` request observer)."""
        result = request_result(status, code)
        self.api_requests.labels(operation, result).inc()
        self.api_request_duration.labels(operation).observe(duration_s)
        if result == "throttled":
            self.api_throttles.labels(operation).inc()

    def artifact_bytes_moved(self, direction: str, count: int) -> None:
        self.artifact_bytes.labels(direction).inc(count)

    def completed(self, action_type: str, outcome: str, duration_s: float | None) -> None:
        self.jobs_completed.labels(action_type, outcome).inc()
        if duration_s is not None:
            self.job_duration.labels(action_type, outcome).observe(duration_s)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when absent); for tests and the local demo."""
        return self.registry.get_sample_value(name, labels) or 0.0
