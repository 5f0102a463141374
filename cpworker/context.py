"""`JobContext`: what a handler gets — the job's facts, its artifacts and a bound logger.

::

    async def build(job: JobContext) -> Outcome:
        src = await job.inputs["SourceCode"].path()      # downloaded and unpacked
        out = job.outputs["BuildOutput"].path            # a directory to fill
        (out / "app.tar").write_bytes(...)
        job.log.info("built %s", job.configuration["ProjectName"])
        return Succeeded("built")                        # outputs are uploaded first

Artifacts are found by name, never by position. An output whose directory was used (or
that was uploaded with `upload()` or written with `writer()`) is packed and uploaded
before a `Succeeded` outcome is reported; a failed upload fails the job. Every declared
output must be produced. `inputs[n].stream()` and `outputs[n].writer()` move an
artifact's bytes as they are, without unpacking or touching disk.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from cpworker import models as m
from cpworker.errors import ArtifactError, CpWorkerError

if TYPE_CHECKING:
    from cpworker.transfers import ArtifactWriter

__all__ = ["ArtifactIO", "InputArtifact", "JobContext", "JobLogger", "OutputArtifact", "WorkDir"]

A = TypeVar("A", "InputArtifact", "OutputArtifact")


class ArtifactIO:
    """The job's S3 side; `cpworker.runner` gives each job one (kept out of handlers' way)."""

    async def download(self, artifact: m.Artifact, target: Path) -> Path:
        raise NotImplementedError

    async def upload(self, artifact: m.Artifact, source: Path) -> int:
        raise NotImplementedError

    def stream(self, artifact: m.Artifact, chunk_size: int) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError

    def writer(self, artifact: m.Artifact) -> AbstractAsyncContextManager[ArtifactWriter]:
        raise NotImplementedError


class WorkDir:
    """A job's private directory (mode 0o700), made on first use; most jobs never need one.

    One `mkdir` on the event loop costs less than a hop to a worker thread, and a job that
    never touches its files (a no-op, an API call, `stream()`/`writer()`) makes none.
    """

    def __init__(self, root: Path | None, job_id: str) -> None:
        self._root = root
        self._prefix = f"cpworker-{job_id[:36]}-"
        self.made: Path | None = None  # set once made; the runner removes it after the job

    def path(self) -> Path:
        """The directory, made now if it does not exist yet."""
        if self.made is None:
            try:
                self.made = Path(tempfile.mkdtemp(prefix=self._prefix, dir=self._root))
            except OSError as exc:
                raise CpWorkerError(
                    f"cannot create the job's work directory in {self._root} ({exc.strerror}); "
                    "the worker needs write access and free space in its work_dir"
                ) from None
        return self.made

    def sub(self, *parts: str) -> Path:
        """A private directory inside it (made if missing)."""
        path = self.path().joinpath(*parts)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path


class InputArtifact:
    """One input artifact: `await path()` downloads and unpacks it once, then reuses it."""

    def __init__(self, artifact: m.Artifact, io: ArtifactIO, work_dir: WorkDir) -> None:
        self.artifact = artifact
        self.name = artifact.name or ""
        self.revision = artifact.revision
        self._io = io
        self._work_dir = work_dir
        self._lock = anyio.Lock()
        self._path: Path | None = None

    async def path(self) -> Path:
        """The directory holding the artifact's unpacked files."""
        async with self._lock:
            if self._path is None:
                target = self._work_dir.sub("inputs") / self.name
                self._path = await self._io.download(self.artifact, target)
            return self._path

    def stream(self, chunk_size: int = 1 << 20) -> AsyncGenerator[bytes, None]:
        """The artifact's bytes as stored (the zip or tar itself), in order, never on disk::

        async with contextlib.aclosing(job.inputs["Src"].stream()) as chunks:
            async for chunk in chunks:
                digest.update(chunk)
        """
        return self._io.stream(self.artifact, chunk_size)

    def __repr__(self) -> str:
        return f"InputArtifact(name={self.name!r}, revision={self.revision!r})"


class OutputArtifact:
    """One output artifact: fill `path` (created on first use) or call `upload(dir)`."""

    def __init__(self, artifact: m.Artifact, io: ArtifactIO, work_dir: WorkDir) -> None:
        self.artifact = artifact
        self.name = artifact.name or ""
        self._io = io
        self._work_dir = work_dir
        self.used = False
        self.uploaded_bytes: int | None = None

    @property
    def path(self) -> Path:
        """A private directory whose contents become this artifact's archive."""
        directory = self._work_dir.sub("outputs", self.name)
        self.used = True
        return directory

    async def upload(self, directory: Path | None = None) -> int:
        """Pack `directory` (default: `path`) and upload it now; returns the archive's size."""
        source = self.path if directory is None else directory
        self.uploaded_bytes = await self._io.upload(self.artifact, source)
        return self.uploaded_bytes

    @asynccontextmanager
    async def writer(self) -> AsyncIterator[ArtifactWriter]:
        """Write the artifact's bytes as they are to be stored, never on disk::

            async with job.outputs["Out"].writer() as out:
                await out.write(zip_bytes)

        Parts are uploaded while the handler writes; the artifact exists once the block
        ends without an error (an error aborts the upload and is raised).
        """
        async with self._io.writer(self.artifact) as writer:
            yield writer
        self.uploaded_bytes = writer.size

    @property
    def pending(self) -> bool:
        return self.uploaded_bytes is None

    def __repr__(self) -> str:
        return f"OutputArtifact(name={self.name!r})"


class Artifacts(Mapping[str, A], Generic[A]):
    """Artifacts by name; an unknown name raises `ArtifactError` listing the known ones.

    ``name in job.inputs`` and ``job.inputs.get(name)`` ask without failing the job.
    """

    def __init__(self, kind: str, items: dict[str, A]) -> None:
        self._kind = kind
        self._items: dict[str, A] = items

    def __getitem__(self, name: str) -> A:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise ArtifactError(
                f"this job has no {self._kind} artifact named {name!r}; its {self._kind}s: "
                f"{known} (names come from the pipeline's action definition)",
                failure_type="ConfigurationError",
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str, default: Any = None) -> Any:
        return self._items.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"{self._kind}s({', '.join(self._items)})"


class JobLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds the job's fields to every record (merged with `extra=`)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


class JobContext:
    """Everything a handler may use about one job. Build by the runner, not by hand."""

    def __init__(
        self,
        *,
        job_id: str,
        data: m.JobData,
        io: ArtifactIO,
        work_dir: WorkDir,
        options: Mapping[str, Any],
        third_party: bool = False,
        log: JobLogger,
    ) -> None:
        self.job_id = job_id
        self.action_type_id = data.action_type_id
        config = data.action_configuration
        self.configuration: Mapping[str, str] = dict(config.configuration) if config else {}
        self.pipeline = data.pipeline_context or m.PipelineContext()
        self.continuation_token = data.continuation_token
        self.encryption_key = data.encryption_key
        self._work_dir = work_dir
        self.options = options
        self.third_party = third_party
        self.log = log
        self.inputs: Artifacts[InputArtifact] = Artifacts(
            "input", _by_name(data.input_artifacts, "input", InputArtifact, io, work_dir)
        )
        self.outputs: Artifacts[OutputArtifact] = Artifacts(
            "output", _by_name(data.output_artifacts, "output", OutputArtifact, io, work_dir)
        )

    @property
    def work_dir(self) -> Path:
        """The job's private temporary directory, made on first use, removed after the job."""
        return self._work_dir.path()

    @property
    def inputs_dir(self) -> Path:
        """The directory holding one subdirectory per unpacked input (`inputs[n].path()`)."""
        return self._work_dir.sub("inputs")

    @property
    def outputs_dir(self) -> Path:
        """The directory holding one subdirectory per output (`outputs[n].path`)."""
        return self._work_dir.sub("outputs")

    @property
    def pipeline_name(self) -> str | None:
        return self.pipeline.pipeline_name

    @property
    def stage_name(self) -> str | None:
        return self.pipeline.stage.name if self.pipeline.stage else None

    @property
    def action_name(self) -> str | None:
        return self.pipeline.action.name if self.pipeline.action else None

    @property
    def execution_id(self) -> str | None:
        """The pipeline execution this job belongs to."""
        return self.pipeline.pipeline_execution_id

    def __repr__(self) -> str:
        # Configuration values may be secret: only their names are shown.
        return (
            f"JobContext(job_id={self.job_id!r}, pipeline={self.pipeline_name!r}, "
            f"configuration keys={sorted(self.configuration)!r}, inputs={list(self.inputs)!r}, "
            f"outputs={list(self.outputs)!r})"
        )


def _by_name(
    artifacts: tuple[m.Artifact, ...],
    kind: str,
    cls: type[A],
    io: ArtifactIO,
    work_dir: WorkDir,
) -> dict[str, A]:
    items: dict[str, A] = {}
    for artifact in artifacts:
        name = artifact.name or ""
        if not name or name in items or "/" in name or name in (".", ".."):
            raise CpWorkerError(
                f"the job's {kind} artifacts have a missing, repeated or unsafe name {name!r}; "
                "give every artifact of the action a distinct name"
            )
        items[name] = cls(artifact, io, work_dir)
    return items
