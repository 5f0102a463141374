"""The emulator's admin API under `/_emulator/` (plain JSON, unsigned).

- `POST /_emulator/jobs` creates jobs (and uploads their input artifacts as zips);
- `GET /_emulator/jobs[?status=S&provider=P]` lists job ids with their status;
- `GET /_emulator/jobs/{id}` is one job's full history;
- `GET /_emulator/stats` counts jobs by status, requests by operation and outcome, and
  injected faults;
- `GET`/`POST /_emulator/faults` reads or changes fault injection;
- `GET /_emulator/s3` is what S3 was asked: uploads with their SSE-KMS headers (checked
  against the job's key), GETs per key, refusals by code;
- `PUT /_emulator/objects/{key}` stores the raw body as an object of the artifact bucket.
"""

from __future__ import annotations

import tempfile
import uuid
from dataclasses import replace
from typing import Any, TypeVar

import anyio
import msgspec
from aiohttp import web

from cpworker.emulator.api import CodePipelineApi
from cpworker.emulator.faults import FaultsUpdate
from cpworker.emulator.jobs import ActionKey, JobRecord, JobStore, Timeouts, action_key
from cpworker.emulator.s3 import ACCOUNT_ID, BUCKET, REGION, zip_bytes
from cpworker.models import ActionTypeId

T = TypeVar("T")


MAX_RAW_OBJECT_BYTES = 5 * 1024**3  # S3's limit for one PUT
DEFAULT_KMS_KEY_ID = "alias/aws/s3"  # what S3 uses when a job has no encryption key


class ArtifactSpec(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True):
    """An input artifact: `files` zipped into a new object, or an existing `objectKey`."""

    name: str
    files: dict[str, str] = {}
    object_key: str | None = None

    def __post_init__(self) -> None:
        if self.files and self.object_key is not None:
            raise ValueError(
                f"input artifact {self.name!r} has both files and objectKey; give files "
                "(zipped into a new object) or objectKey (an object stored with "
                "PUT /_emulator/objects/KEY), not both"
            )


class CreateJobs(
    msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True
):
    """The body of `POST /_emulator/jobs`."""

    action_type_id: ActionTypeId
    configuration: dict[str, str] = {}
    input_artifacts: tuple[ArtifactSpec, ...] = ()
    output_artifacts: tuple[str, ...] = ()
    encryption_key_id: str | None = None
    count: int = 1
    third_party: bool = False
    pipeline_name: str = "demo-pipeline"
    stage_name: str = "Build"
    action_name: str = "CustomAction"
    dispatch_timeout_s: float | None = None
    job_timeout_s: float | None = None
    continuation_delay_s: float | None = None
    share_credentials: bool = False
    credential_ttl_s: float | None = None
    # Third-party jobs: the partner connection (client id and token) the jobs belong to;
    # without them every job gets its own random pair.
    client_id: str | None = None
    client_token: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 100_000:
            raise ValueError(f"count={self.count}: must be between 1 and 100000")
        if (self.client_id is None) != (self.client_token is None) or (
            self.client_id is not None and not self.third_party
        ):
            raise ValueError("clientId and clientToken go together, and only with thirdParty")
        if self.credential_ttl_s is not None and not self.credential_ttl_s > 0:
            raise ValueError(f"credentialTtlS={self.credential_ttl_s}: must be more than 0")


class Admin:
    """Handlers of the admin API."""

    def __init__(self, api: CodePipelineApi) -> None:
        self.api = api
        self.store: JobStore = api.store

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/_emulator/jobs", self.create_jobs),
            web.get("/_emulator/jobs", self.list_jobs),
            web.get("/_emulator/jobs/{job_id}", self.job),
            web.get("/_emulator/stats", self.stats),
            web.get("/_emulator/faults", self.get_faults),
            web.post("/_emulator/faults", self.set_faults),
            web.get("/_emulator/s3", self.s3_log),
            web.put("/_emulator/objects/{key:.+}", self.put_object),
        ]

    async def create_jobs(self, request: web.Request) -> web.Response:
        spec = _decode(await request.read(), CreateJobs)
        key = action_key(msgspec.to_builtins(spec.action_type_id))
        try:
            timeouts = replace(
                self.store.timeouts,
                **{
                    name: value
                    for name in ("dispatch_timeout_s", "job_timeout_s", "continuation_delay_s")
                    if (value := getattr(spec, name)) is not None
                },
            )
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"bad CreateJobs body: {exc}") from None
        self._ensure_action_type(key, spec)
        jobs = await self._create(spec, key, timeouts, await self._upload_inputs(spec))
        answer: dict[str, Any] = {"jobIds": [j.id for j in jobs]}
        if spec.third_party:
            answer["clientTokens"] = {j.id: j.client_token for j in jobs}
        return web.json_response(answer)

    async def _create(
        self, spec: CreateJobs, key: ActionKey, timeouts: Timeouts, inputs: list[dict[str, Any]]
    ) -> list[JobRecord]:
        """The jobs, each with credentials minted for it (or one set shared by all)."""
        shared = await self.api.s3.mint_credentials() if spec.share_credentials else None
        jobs = []
        for _ in range(spec.count):
            credentials = shared or await self.api.s3.mint_credentials()
            # No await from here on: a job is never polled without its credentials.
            job = self.store.create_job(
                key, _job_data(spec, inputs), timeouts=timeouts, third_party=spec.third_party
            )
            if spec.credential_ttl_s is not None:
                self.api.set_credential_ttl(job.id, spec.credential_ttl_s)
            if shared is None:
                self.api.give_credentials([job], credentials)
            else:
                job.credentials = shared
            if spec.client_id is not None:
                job.client_id, job.client_token = spec.client_id, spec.client_token
            jobs.append(job)
        if shared is not None:
            self.api.give_credentials(jobs, shared)  # registers the set for the whole batch
        return jobs

    def _ensure_action_type(self, key: ActionKey, spec: CreateJobs) -> None:
        if key in self.store.action_types:
            return
        properties = [
            {"name": name, "required": True, "key": True, "secret": False, "queryable": False}
            for name in spec.configuration
        ]
        self.store.register_action_type(
            {
                "id": msgspec.to_builtins(spec.action_type_id),
                "actionConfigurationProperties": properties,
                "inputArtifactDetails": {"minimumCount": 0, "maximumCount": 5},
                "outputArtifactDetails": {"minimumCount": 0, "maximumCount": 5},
            }
        )

    async def _upload_inputs(self, spec: CreateJobs) -> list[dict[str, Any]]:
        artifacts = []
        for artifact in spec.input_artifacts:
            if artifact.object_key is not None:
                key = artifact.object_key
                if not await self.api.s3.object_exists(key):
                    raise web.HTTPBadRequest(
                        text=f"input artifact {artifact.name!r}: no object {key!r} in the "
                        "artifact bucket; store it first with PUT /_emulator/objects/KEY"
                    )
            else:
                key = f"{spec.pipeline_name}/{artifact.name}/{uuid.uuid4().hex[:12]}"
                body = await anyio.to_thread.run_sync(zip_bytes, artifact.files)
                await self.api.s3.put_object(key, body)
            artifacts.append(_artifact(artifact.name, key, revision=uuid.uuid4().hex))
        return artifacts

    async def list_jobs(self, request: web.Request) -> web.Response:
        self.store.advance()
        status = request.query.get("status")
        provider = request.query.get("provider")
        jobs = [
            {"id": j.id, "status": j.status}
            for j in self.store.jobs.values()
            if status in (None, j.status) and provider in (None, j.action[2])
        ]
        return web.json_response({"jobs": jobs})

    async def job(self, request: web.Request) -> web.Response:
        self.store.advance()
        job = self.store.jobs.get(request.match_info["job_id"])
        if job is None:
            raise web.HTTPNotFound(
                text=f"no job {request.match_info['job_id']!r}; list them at /_emulator/jobs"
            )
        return web.json_response(job.history())

    async def stats(self, request: web.Request) -> web.Response:
        self.store.advance()
        return web.json_response(
            {
                "jobs": self.store.stats(),
                "requests": self.api.stats(),
                "emptyPolls": dict(self.api.empty_polls),
                "faultsInjected": self.api.faults.injected_stats(),
            }
        )

    async def s3_log(self, request: web.Request) -> web.Response:
        uploads, gets, refused = self.api.s3.log.snapshot()
        for upload in uploads:
            job = self.store.jobs.get(upload["jobId"]) if upload["jobId"] else None
            key = job.data.get("encryptionKey") if job is not None else None
            expected = (key or {}).get("id") or DEFAULT_KMS_KEY_ID
            upload["expectedKmsKeyId"] = expected
            upload["kmsKeyOk"] = upload["sse"] == "aws:kms" and upload["kmsKeyId"] == expected
        return web.json_response({"uploads": uploads, "gets": gets, "refused": refused})

    async def put_object(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as body:
            size = 0
            async for chunk in request.content.iter_chunked(1024 * 1024):
                size += len(chunk)
                if size > MAX_RAW_OBJECT_BYTES:
                    raise web.HTTPRequestEntityTooLarge(
                        max_size=MAX_RAW_OBJECT_BYTES, actual_size=size
                    )
                await anyio.to_thread.run_sync(body.write, chunk)
            etag = await self.api.s3.put_raw_object(key, body)
        return web.json_response({"bucket": BUCKET, "key": key, "size": size, "etag": etag})

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.api.faults.describe())

    async def set_faults(self, request: web.Request) -> web.Response:
        update = _decode(await request.read(), FaultsUpdate)
        unknown = sorted(set(update.operations or {}) - self.api.operations)
        if unknown:
            known = ", ".join(sorted(self.api.operations))
            raise web.HTTPBadRequest(text=f"unknown operations {unknown}; known: {known}")
        self.api.faults.update(update)
        return web.json_response(self.api.faults.describe())


def _decode(body: bytes, cls: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=cls)
    except (msgspec.DecodeError, ValueError) as exc:
        raise web.HTTPBadRequest(text=f"bad {cls.__name__} body: {exc}") from None


def _artifact(name: str, key: str, revision: str | None = None) -> dict[str, Any]:
    artifact: dict[str, Any] = {
        "name": name,
        "location": {"type": "S3", "s3Location": {"bucketName": BUCKET, "objectKey": key}},
    }
    if revision is not None:
        artifact["revision"] = revision
    return artifact


def _job_data(spec: CreateJobs, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    outputs = [
        _artifact(name, f"{spec.pipeline_name}/{name}/{uuid.uuid4().hex[:12]}")
        for name in spec.output_artifacts
    ]
    data: dict[str, Any] = {
        "actionTypeId": msgspec.to_builtins(spec.action_type_id),
        "actionConfiguration": {"configuration": dict(spec.configuration)},
        "pipelineContext": {
            "pipelineName": spec.pipeline_name,
            "stage": {"name": spec.stage_name},
            "action": {"name": spec.action_name, "actionExecutionId": str(uuid.uuid4())},
            "pipelineArn": f"arn:aws:codepipeline:{REGION}:{ACCOUNT_ID}:{spec.pipeline_name}",
            "pipelineExecutionId": str(uuid.uuid4()),
        },
        "inputArtifacts": inputs,
        "outputArtifacts": outputs,
    }
    if spec.encryption_key_id is not None:
        data["encryptionKey"] = {"id": spec.encryption_key_id, "type": "KMS"}
    return data
