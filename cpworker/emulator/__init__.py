"""The local CodePipeline job-API emulator, next to moto's S3 server (`cpworker emulator`)."""

from cpworker.errors import CpWorkerError


class EmulatorError(CpWorkerError):
    """The emulator could not start, or its admin API refused a call."""
