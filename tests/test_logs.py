"""The JSON log formatter and the redactor: known secrets never reach a log line."""

from __future__ import annotations

import io
import json
import logging

from cpworker.logs import configure_logging, redactor


def test_secrets_with_json_special_characters_are_masked_in_json_lines() -> None:
    secret = 'pa\\ss"word9-xyz'
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    redactor.add(secret)
    try:
        log = logging.getLogger("cpworker.test")
        log.info("login with %s", secret, extra={"job_id": "j-1", "outcome": "failed"})
        try:
            raise ValueError(secret)
        except ValueError:
            log.exception("failed")
    finally:
        redactor.discard(secret)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["message"] == "login with ***"
    assert lines[0]["job_id"] == "j-1" and lines[0]["outcome"] == "failed"
    assert "ValueError: ***" in lines[1]["exception"]
    assert secret not in stream.getvalue() and json.dumps(secret)[1:-1] not in stream.getvalue()


def test_discarded_secrets_are_shown_again_and_short_values_never_masked() -> None:
    redactor.add("tok-123456", "abc")
    assert redactor("x tok-123456 abc") == "x *** abc"
    redactor.discard("tok-123456", "abc")
    assert redactor("x tok-123456") == "x tok-123456"
