"""SigV4 verification in the emulator (`--verify-sigv4`), with boto3 and cpworker's client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import boto3
import pytest
from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.exceptions import ClientError

from cpworker import models as m
from cpworker.control_plane import ControlPlane, ControlPlaneSettings
from cpworker.emulator.client import EmulatorProcess
from cpworker.emulator.sigv4 import parse_keys
from cpworker.errors import ActionTypeNotFoundError, ServiceError

KEY_ID, SECRET = "AKIDVERIFIED", "verified-secret"
UNREGISTERED = m.ActionTypeId(category="Test", owner="Custom", provider="Nobody", version="1")


@pytest.fixture(scope="module")
async def verifying() -> AsyncIterator[EmulatorProcess]:
    keys = f"{KEY_ID}={SECRET},AKIDOTHER=other-secret"
    env = {"CPWORKER_EMULATOR_SIGV4_KEYS": keys}
    async with EmulatorProcess.start(["--verify-sigv4"], env=env) as process:
        yield process


def _boto(url: str, key_id: str, secret: str, token: str | None = None) -> Any:
    return boto3.client(
        "codepipeline",
        endpoint_url=url,
        region_name="eu-west-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=Config(retries={"total_max_attempts": 1}),
    )


def _code(client: Any) -> str:
    """The error code of a poll through `client`, which is closed afterwards."""
    with contextlib.closing(client), pytest.raises(ClientError) as info:
        client.poll_for_jobs(actionTypeId=m.to_builtins(UNREGISTERED))
    return str(info.value.response["Error"]["Code"])


@pytest.mark.parametrize("token", [None, "a-session-token"])
async def test_right_signature_passes(verifying: EmulatorProcess, token: str | None) -> None:
    # Past authentication, the unregistered action type is what the answer is about.
    client = _boto(verifying.codepipeline, KEY_ID, SECRET, token)
    assert _code(client) == "ActionTypeNotFoundException"


async def test_wrong_secret_and_unknown_key_are_refused(verifying: EmulatorProcess) -> None:
    assert _code(_boto(verifying.codepipeline, KEY_ID, "not-the-secret")) == (
        "InvalidSignatureException"
    )
    assert _code(_boto(verifying.codepipeline, "AKIDUNKNOWN", SECRET)) == (
        "UnrecognizedClientException"
    )


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
async def test_async_client_signs_correctly(verifying: EmulatorProcess, lean: bool) -> None:
    settings = ControlPlaneSettings(
        endpoint_url=verifying.codepipeline, max_attempts=1, lean_job_calls=lean
    )
    good, bad = AioSession(), AioSession()
    good.set_credentials(KEY_ID, SECRET)
    bad.set_credentials(KEY_ID, "wrong")
    async with ControlPlane.open(settings, good) as cp:
        with pytest.raises(ActionTypeNotFoundError):
            await cp.poll_for_jobs(UNREGISTERED)
    async with ControlPlane.open(settings, bad) as cp:
        with pytest.raises(ServiceError) as info:
            await cp.poll_for_jobs(UNREGISTERED)
    assert info.value.code == "InvalidSignatureException"
    assert "wrong" not in str(info.value)


def test_key_list_errors_never_show_secrets() -> None:
    assert parse_keys("A=1, B=2") == {"A": "1", "B": "2"}
    with pytest.raises(ValueError, match="entry 2") as info:
        parse_keys("A=topsecret,Bsecretvalue")
    assert "topsecret" not in str(info.value)
    assert "secretvalue" not in str(info.value)
    with pytest.raises(ValueError, match="empty"):
        parse_keys(" , ")
