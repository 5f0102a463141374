"""The worker's Prometheus metrics (names from DESIGN.md §4; they are an interface).

Each `Worker` has its own registry, so several workers can live in one process (tests).
No label carries a job id, pipeline name or secret: labels are action type names from
the configuration, outcomes, operations and directions.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

from cpworker.errors import ThrottledError

__all__ = ["OUTCOMES", "STATES", "WorkerMetrics"]

STATES: Final = ("starting", "ready", "draining", "stopped")
OUTCOMES: Final = ("succeeded", "failed", "continued", "lost_race", "rejected", "abandoned")
# Job durations from 50 ms to 1 h; API calls from 5 ms to 10 s.
JOB_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
API_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
FILL_BUCKETS: Final = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


class WorkerMetrics:
    """Every metric of one worker, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
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
        self.api_throttles = Counter(
            "cpworker_api_throttles",
            "Calls that still failed with throttling after botocore's retries",
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

    def call_failed(self, operation: str, exc: Exception) -> None:
        """Count a call that failed after botocore's retries (throttles by operation)."""
        if isinstance(exc, ThrottledError):
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
