"""cpworker.emulator.validation: request checks compiled from botocore's service model.

Messages follow the wording of AWS's front end, e.g. ``1 validation error detected: Value
'x' at 'actionTypeId.provider' failed to satisfy constraint: Member must have length less
than or equal to 35``.
"""

from __future__ import annotations

from typing import Any

import pytest

from cpworker.emulator.validation import RequestValidator, SerializationError, validation_message
from cpworker.models import OPERATIONS

JOB_ID = "0123abcd-0123-4567-89ab-0123456789ab"
ACTION = {"category": "Test", "owner": "Custom", "provider": "MyProvider", "version": "1"}
UUID_PATTERN = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
FAILURE_TYPES = (
    "JobFailed, ConfigurationError, PermissionError, RevisionOutOfSync, "
    "RevisionUnavailable, SystemUnavailable"
)


@pytest.fixture(scope="module")
def validator() -> RequestValidator:
    return RequestValidator(list(OPERATIONS))


def action(**changes: Any) -> dict[str, Any]:
    return {**ACTION, **changes}


VALID: list[tuple[str, dict[str, Any]]] = [
    ("PollForJobs", {"actionTypeId": ACTION}),
    (
        "PollForJobs",
        {"actionTypeId": ACTION, "maxBatchSize": 100, "queryParam": {"ProjectName": "a-b_1"}},
    ),
    ("AcknowledgeJob", {"jobId": JOB_ID, "nonce": "1"}),
    ("GetJobDetails", {"jobId": JOB_ID}),
    ("PutJobSuccessResult", {"jobId": JOB_ID}),
    (
        "PutJobSuccessResult",
        {
            "jobId": JOB_ID,
            "currentRevision": {"revision": "r1", "changeIdentifier": "c1", "created": 1.5e9},
            "executionDetails": {"summary": "s" * 2048, "percentComplete": 100},
            "outputVariables": {"Out@put-1_x": "v" * 5000},
            "unknownMember": {"ignored": True},
        },
    ),
    (
        "PutJobFailureResult",
        {"jobId": JOB_ID, "failureDetails": {"type": "JobFailed", "message": "m" * 5000}},
    ),
    ("PollForThirdPartyJobs", {"actionTypeId": action(owner="ThirdParty"), "maxBatchSize": 1}),
    ("AcknowledgeThirdPartyJob", {"jobId": "x" * 512, "nonce": "2", "clientToken": "t"}),
    (
        "CreateCustomActionType",
        {
            "category": "Build",
            "provider": "p" * 35,
            "version": "v" * 9,
            "inputArtifactDetails": {"minimumCount": 0, "maximumCount": 5},
            "outputArtifactDetails": {"minimumCount": 0, "maximumCount": 0},
            "configurationProperties": [
                {"name": "ProjectName", "required": True, "key": True, "secret": False}
            ],
        },
    ),
    ("ListActionTypes", {}),
]


@pytest.mark.parametrize(("operation", "body"), VALID)
def test_valid_requests_have_no_errors(
    validator: RequestValidator, operation: str, body: dict[str, Any]
) -> None:
    assert validator.errors(operation, body) == []


@pytest.mark.parametrize(
    ("operation", "body", "expected"),
    [
        (
            "AcknowledgeJob",
            {"nonce": "1"},
            "Value null at 'jobId' failed to satisfy constraint: Member must not be null",
        ),
        (
            "AcknowledgeJob",
            {"jobId": JOB_ID, "nonce": None},
            "Value null at 'nonce' failed to satisfy constraint: Member must not be null",
        ),
        (
            "PollForJobs",
            {"actionTypeId": {"category": "Test", "owner": "Custom", "version": "1"}},
            "Value null at 'actionTypeId.provider' failed to satisfy constraint: "
            "Member must not be null",
        ),
        (
            "PollForJobs",
            {"actionTypeId": action(provider="p" * 36)},
            f"Value '{'p' * 36}' at 'actionTypeId.provider' failed to satisfy constraint: "
            "Member must have length less than or equal to 35",
        ),
        (
            "AcknowledgeJob",
            {"jobId": JOB_ID, "nonce": ""},
            "Value '' at 'nonce' failed to satisfy constraint: "
            "Member must have length greater than or equal to 1",
        ),
        (
            "PollForJobs",
            {"actionTypeId": ACTION, "maxBatchSize": 0},
            "Value '0' at 'maxBatchSize' failed to satisfy constraint: "
            "Member must have value greater than or equal to 1",
        ),
        (
            "PutJobSuccessResult",
            {"jobId": JOB_ID, "executionDetails": {"percentComplete": 101}},
            "Value '101' at 'executionDetails.percentComplete' failed to satisfy constraint: "
            "Member must have value less than or equal to 100",
        ),
        (
            "PutJobSuccessResult",
            {"jobId": JOB_ID, "executionDetails": {"summary": "s" * 2049}},
            f"Value '{'s' * 57}...' at 'executionDetails.summary' failed to satisfy "
            "constraint: Member must have length less than or equal to 2048",
        ),
        (
            "PutJobFailureResult",
            {"jobId": JOB_ID, "failureDetails": {"type": "Oops", "message": "m"}},
            "Value 'Oops' at 'failureDetails.type' failed to satisfy constraint: "
            f"Member must satisfy enum value set: [{FAILURE_TYPES}]",
        ),
        (
            "AcknowledgeJob",
            {"jobId": "ef66c259-64f9-EXAMPLE", "nonce": "3"},
            "Value 'ef66c259-64f9-EXAMPLE' at 'jobId' failed to satisfy constraint: "
            f"Member must satisfy regular expression pattern: {UUID_PATTERN}",
        ),
        (
            "GetJobDetails",
            {"jobId": JOB_ID.upper()},
            f"Value '{JOB_ID.upper()}' at 'jobId' failed to satisfy constraint: "
            f"Member must satisfy regular expression pattern: {UUID_PATTERN}",
        ),
        (
            "PollForJobs",
            {"actionTypeId": action(provider="my provider")},
            "Value 'my provider' at 'actionTypeId.provider' failed to satisfy constraint: "
            "Member must satisfy regular expression pattern: [0-9A-Za-z_-]+",
        ),
        (
            "CreateCustomActionType",
            {
                "category": "Build",
                "provider": "p",
                "version": "1",
                "inputArtifactDetails": {"minimumCount": 0, "maximumCount": 6},
                "outputArtifactDetails": {"minimumCount": 0, "maximumCount": 0},
            },
            "Value '6' at 'inputArtifactDetails.maximumCount' failed to satisfy constraint: "
            "Member must have value less than or equal to 5",
        ),
    ],
)
def test_single_violation_is_reported_in_aws_wording(
    validator: RequestValidator, operation: str, body: dict[str, Any], expected: str
) -> None:
    errors = validator.errors(operation, body)
    assert errors == [expected]
    assert validation_message(errors) == f"1 validation error detected: {expected}"


def test_pattern_violation_in_a_query_param_value(validator: RequestValidator) -> None:
    body = {"actionTypeId": ACTION, "queryParam": {"ProjectName": "my project"}}
    (error,) = validator.errors("PollForJobs", body)
    assert error == (
        "Value '{ProjectName=my project}' at 'queryParam' failed to satisfy constraint: "
        "Map value must satisfy constraint: "
        "[Member must satisfy regular expression pattern: [a-zA-Z0-9_-]+]"
    )


def test_query_param_map_with_two_entries_is_too_large(validator: RequestValidator) -> None:
    body = {"actionTypeId": ACTION, "queryParam": {"A": "1", "B": "2"}}
    (error,) = validator.errors("PollForJobs", body)
    assert "at 'queryParam' failed to satisfy constraint: " in error
    assert error.endswith("Member must have length less than or equal to 1")


def test_output_variable_name_pattern(validator: RequestValidator) -> None:
    body = {"jobId": JOB_ID, "outputVariables": {"ok_name": "v", "bad name": "v"}}
    (error,) = validator.errors("PutJobSuccessResult", body)
    assert error == (
        "Value '{ok_name=v, bad name=v}' at 'outputVariables' failed to satisfy constraint: "
        "Map keys must satisfy constraint: "
        "[Member must satisfy regular expression pattern: [A-Za-z0-9@\\-_]+]"
    )


def test_list_members_are_addressed_by_one_based_index(validator: RequestValidator) -> None:
    prop = {"name": "ok", "required": True, "key": True, "secret": False}
    body = {
        "category": "Build",
        "provider": "p",
        "version": "1",
        "inputArtifactDetails": {"minimumCount": 0, "maximumCount": 1},
        "outputArtifactDetails": {"minimumCount": 0, "maximumCount": 1},
        "configurationProperties": [prop, {**prop, "name": "n" * 51}],
    }
    (error,) = validator.errors("CreateCustomActionType", body)
    assert "at 'configurationProperties.2.member.name' failed to satisfy constraint: " in error
    assert error.endswith("Member must have length less than or equal to 50")


def test_multiple_errors_are_all_reported_and_counted(validator: RequestValidator) -> None:
    body = {"actionTypeId": action(provider="p" * 36), "maxBatchSize": 0}
    errors = validator.errors("PollForJobs", body)
    assert len(errors) == 2
    assert {e.split(" at ")[1].split("'")[1] for e in errors} == {
        "actionTypeId.provider",
        "maxBatchSize",
    }
    message = validation_message(errors)
    assert message.startswith("2 validation errors detected: Value '")
    assert message == "2 validation errors detected: " + "; ".join(errors)
    both_missing = validator.errors("AcknowledgeJob", {})
    assert validation_message(both_missing) == (
        "2 validation errors detected: "
        "Value null at 'jobId' failed to satisfy constraint: Member must not be null; "
        "Value null at 'nonce' failed to satisfy constraint: Member must not be null"
    )


def test_one_value_breaking_several_constraints_gives_several_errors(
    validator: RequestValidator,
) -> None:
    errors = validator.errors("PollForJobs", {"actionTypeId": action(provider="!" * 36)})
    assert len(errors) == 2
    assert "length less than or equal to 35" in errors[0]
    assert "regular expression pattern" in errors[1]


def test_long_values_are_truncated_in_messages(validator: RequestValidator) -> None:
    long_value = "abcdefghij" * 10
    (error,) = validator.errors("PollForJobs", {"actionTypeId": action(provider=long_value)})
    assert long_value not in error
    assert f"Value '{long_value[:57]}...' at 'actionTypeId.provider'" in error
    exactly_sixty = "x" * 60  # the longest value shown whole
    (shown,) = validator.errors("AcknowledgeJob", {"jobId": exactly_sixty, "nonce": "1"})
    assert f"Value '{exactly_sixty}' at 'jobId'" in shown


@pytest.mark.parametrize(
    ("operation", "body", "path"),
    [
        ("AcknowledgeJob", {"jobId": 5, "nonce": "1"}, "jobId"),
        ("PollForJobs", {"actionTypeId": ACTION, "maxBatchSize": "5"}, "maxBatchSize"),
        ("PollForJobs", {"actionTypeId": ACTION, "maxBatchSize": True}, "maxBatchSize"),
        ("PollForJobs", {"actionTypeId": ACTION, "maxBatchSize": 1.5}, "maxBatchSize"),
        ("PollForJobs", {"actionTypeId": "Test/Custom/P/1"}, "actionTypeId"),
        ("PollForJobs", {"actionTypeId": ACTION, "queryParam": [["A", "1"]]}, "queryParam"),
        ("PollForJobs", {"actionTypeId": ACTION, "queryParam": {"A": 1}}, "queryParam"),
        (
            "CreateCustomActionType",
            {
                "category": "Build",
                "provider": "p",
                "version": "1",
                "inputArtifactDetails": {"minimumCount": 0, "maximumCount": 1},
                "outputArtifactDetails": {"minimumCount": 0, "maximumCount": 1},
                "configurationProperties": [
                    {"name": "n", "required": "yes", "key": True, "secret": False}
                ],
            },
            "configurationProperties.1.member.required",
        ),
        (
            "CreateCustomActionType",
            {
                "category": "Build",
                "provider": "p",
                "version": "1",
                "inputArtifactDetails": {"minimumCount": 0, "maximumCount": 1},
                "outputArtifactDetails": {"minimumCount": 0, "maximumCount": 1},
                "configurationProperties": {"name": "n"},
            },
            "configurationProperties",
        ),
        (
            "PutJobSuccessResult",
            {
                "jobId": JOB_ID,
                "currentRevision": {"revision": "r", "changeIdentifier": "c", "created": [2024]},
            },
            "currentRevision.created",
        ),
    ],
)
def test_wrong_json_type_raises_serialization_error(
    validator: RequestValidator, operation: str, body: dict[str, Any], path: str
) -> None:
    with pytest.raises(SerializationError) as caught:
        validator.errors(operation, body)
    assert f"'{path}" in str(caught.value)


@pytest.mark.parametrize("body", [[], "jobId", 5, None])
def test_a_body_that_is_not_an_object_raises_serialization_error(
    validator: RequestValidator, body: Any
) -> None:
    with pytest.raises(SerializationError, match="structure"):
        validator.errors("GetJobDetails", body)


def test_only_the_requested_operations_are_compiled() -> None:
    validator = RequestValidator(["GetJobDetails"])
    assert validator.errors("GetJobDetails", {"jobId": JOB_ID}) == []
    with pytest.raises(KeyError):
        validator.errors("AcknowledgeJob", {"jobId": JOB_ID, "nonce": "1"})


def test_client_tokens_are_never_echoed(validator: RequestValidator) -> None:
    token = "SECRET-TOKEN-" + "x" * 300
    body = {"jobId": "j", "nonce": "1", "clientToken": token}
    (error,) = validator.errors("AcknowledgeThirdPartyJob", body)
    assert error == (
        "Value '***' at 'clientToken' failed to satisfy constraint: "
        "Member must have length less than or equal to 256"
    )
