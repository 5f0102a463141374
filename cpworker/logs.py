"""Logging: one JSON object per line (or text for a terminal), with job fields.

`configure_logging("INFO", "json")` installs the handler on the `cpworker` logger. Records
carry the job's fields (`job_id`, `action_type`, `pipeline`, `stage`, `action`,
`execution_id`) when logged through a job's `JobContext.log`, plus `event`, `outcome`,
`duration_s` and `error_type` where they apply. Values registered with `Redactor.add`
(artifact credentials, client tokens, secret configuration values) are replaced by
``***`` in every line, the last line of defence after the messages themselves avoid them.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from typing import Any, Final, TextIO

import msgspec

__all__ = ["FIELDS", "JsonFormatter", "Redactor", "configure_logging", "redactor"]

FIELDS: Final = (
    "event",
    "job_id",
    "action_type",
    "pipeline",
    "stage",
    "action",
    "execution_id",
    "outcome",
    "duration_s",
    "error_type",
)
_MIN_SECRET: Final = 6  # shorter values would mask ordinary words


class Redactor:
    """Known secret values, masked in any text; thread-safe, values held weakly by count."""

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add(self, *values: str | None) -> None:
        with self._lock:
            for value in values:
                if value and len(value) >= _MIN_SECRET:
                    self._values[value] = self._values.get(value, 0) + 1
            self._pattern = None

    def discard(self, *values: str | None) -> None:
        with self._lock:
            for value in values:
                if value in self._values:
                    self._values[value] -= 1
                    if not self._values[value]:
                        del self._values[value]
            self._pattern = None

    def __call__(self, text: str) -> str:
        if not self._values:
            return text
        pattern = self._pattern
        if pattern is None:
            with self._lock:
                values = sorted(self._values, key=len, reverse=True)  # longest first
                pattern = self._pattern = re.compile("|".join(map(re.escape, values)))
        return pattern.sub("***", text)


redactor: Final = Redactor()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the job fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redactor(record.getMessage()),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = redactor(self.formatException(record.exc_info))
        return redactor(msgspec.json.encode(entry).decode())


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, with the job fields appended."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{name}={value}" for name in FIELDS if (value := getattr(record, name, None))
        )
        return redactor(f"{line} {fields}" if fields else line)


def configure_logging(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send the `cpworker` loggers to `stream` (default stderr) in `fmt` at `level`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("cpworker")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
