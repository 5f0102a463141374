"""cpworker.models: the msgspec Structs of the job APIs and their codecs.

The reference answers are the AWS documentation's examples shipped in the AWS CLI v1
package; the reference shapes are botocore's service model.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import awscli
import botocore.session
import msgspec
import msgspec.inspect as mi
import pytest
from botocore.model import ListShape, Shape, StructureShape

from cpworker import models as m
from cpworker.errors import ModelError

EXAMPLES = pathlib.Path(awscli.__file__).parent / "examples" / "codepipeline"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TOKEN_START = "fICCQD6m7oRw0uXOjANBgkqhkiG9w0BAQUFADCB"
TOKEN_END = "rrszlaEXAMPLE="


def example(name: str, marker: str = "Output::") -> bytes:
    """The JSON document that follows `marker` in an AWS CLI example, byte for byte."""
    text = (EXAMPLES / f"{name}.rst").read_text()
    start = text.index("{", text.index(marker))
    _, end = json.JSONDecoder().raw_decode(text, start)
    return text[start:end].encode()


def check_documented_job_data(data: m.JobData) -> None:
    """The `data` of the documentation's PollForJobs and GetJobDetails examples."""
    assert data.action_type_id == m.ActionTypeId(
        category="Test", owner="Custom", provider="MyJenkinsProviderName", version="1"
    )
    assert data.action_configuration is not None
    assert data.action_configuration.configuration == {"ProjectName": "MyJenkinsExampleTestProject"}
    (artifact,) = data.input_artifacts
    assert artifact.name == "MyAppBuild"
    assert artifact.location is not None
    assert artifact.location.type == "S3"
    assert artifact.location.s3_location == m.S3ArtifactLocation(
        bucket_name="codepipeline-us-east-1-11EXAMPLE11",
        object_key="MySecondPipeline/MyAppBuild/EXAMPLE",
    )
    assert data.output_artifacts == ()
    context = data.pipeline_context
    assert context is not None
    assert context.pipeline_name == "MySecondPipeline"
    assert context.stage == m.StageContext(name="Testing")
    assert context.action == m.ActionContext(name="MyJenkinsTest-Action")
    assert context.pipeline_arn is None
    credentials = data.artifact_credentials
    assert credentials is not None
    assert credentials.access_key_id == "AKIAIOSFODNN7EXAMPLE"
    assert credentials.secret_access_key == SECRET
    assert credentials.session_token.startswith(TOKEN_START)
    assert credentials.session_token.endswith(TOKEN_END)
    assert data.continuation_token is None
    assert data.encryption_key is None


# --- the documentation's examples ----------------------------------------------------


def test_decodes_documented_poll_for_jobs_output() -> None:
    body = example("poll-for-jobs")
    assert b'"__type"' in body  # the example carries keys the model does not know
    output = m.decode("PollForJobs", body)
    assert isinstance(output, m.PollForJobsOutput)
    (job,) = output.jobs
    assert job.id == "ef66c259-64f9-EXAMPLE"  # not a UUID: ids are not pattern-checked
    assert job.nonce == "3"
    assert job.account_id == "111111111111"
    check_documented_job_data(job.data)
    key = m.decode("PollForJobs", body).jobs[0].data.input_artifacts[0].location.s3_location
    assert key.object_key == "MySecondPipeline/MyAppBuild/EXAMPLE"


def test_decodes_documented_get_job_details_output() -> None:
    output = m.decode("GetJobDetails", example("get-job-details"))
    assert isinstance(output, m.GetJobDetailsOutput)
    details = output.job_details
    assert details is not None
    assert details.id == "f4f4ff82-2d11-EXAMPLE"
    assert details.account_id == "111111111111"
    check_documented_job_data(details.data)
    poll = m.decode("PollForJobs", example("poll-for-jobs"))
    assert details.data == poll.jobs[0].data


def test_decodes_documented_acknowledge_and_list_action_types_outputs() -> None:
    assert m.decode("AcknowledgeJob", example("acknowledge-job")) == m.AcknowledgeJobOutput(
        status="InProgress"
    )
    listed = m.decode("ListActionTypes", example("list-action-types"))
    assert [t.id.category for t in listed.action_types[:2]] == ["Build", "Test"]
    first = listed.action_types[0]
    assert first.input_artifact_details == m.ArtifactDetails(minimum_count=0, maximum_count=5)
    assert first.action_configuration_properties == (
        m.ActionConfigurationProperty(
            name="MyJenkinsExampleBuildProject",
            required=True,
            key=True,
            secret=False,
            queryable=True,
        ),
    )
    assert first.settings is not None
    assert first.settings.entity_url_template == "http://192.0.2.4/job/{Config:ProjectName}"


def test_decodes_documented_request_inputs() -> None:
    poll = m.decode_input("PollForJobs", example("poll-for-jobs", "JSON file sample contents::"))
    assert poll == m.PollForJobsInput(
        action_type_id=m.ActionTypeId(
            category="Test", owner="Custom", provider="MyJenkinsProviderName", version="1"
        ),
        max_batch_size=5,
        query_param={"ProjectName": "MyJenkinsTestProject"},
    )
    create = m.decode_input(
        "CreateCustomActionType",
        example("create-custom-action-type", "Contents of JSON file"),
    )
    assert create.provider == "MyJenkinsProviderName"
    assert create.output_artifact_details == m.ArtifactDetails(minimum_count=0, maximum_count=1)
    assert create.configuration_properties is not None
    assert create.configuration_properties[0].queryable is False
    assert create.configuration_properties[0].type == "String"


# --- decoding what AWS may send ------------------------------------------------------


def with_unknown_keys(value: Any, parent: str = "") -> Any:
    """`value` with an unknown key added to every object that is not a string map."""
    if isinstance(value, list):
        return [with_unknown_keys(item) for item in value]
    if not isinstance(value, dict):
        return value
    copy = {key: with_unknown_keys(item, key) for key, item in value.items()}
    if parent != "configuration":
        copy["zzFuture"] = {"nested": [1, None, {"deep": True}]}
    return copy


@pytest.mark.parametrize(
    ("operation", "name"),
    [
        ("PollForJobs", "poll-for-jobs"),
        ("GetJobDetails", "get-job-details"),
        ("ListActionTypes", "list-action-types"),
    ],
)
def test_unknown_keys_are_ignored_at_every_level(operation: str, name: str) -> None:
    body = example(name)
    noisy = json.dumps(with_unknown_keys(json.loads(body))).encode()
    assert noisy.count(b"zzFuture") > 10
    assert m.decode(operation, noisy) == m.decode(operation, body)


@pytest.mark.parametrize(
    ("operation", "body", "read", "expected"),
    [
        ("AcknowledgeJob", b'{"status":"Paused"}', lambda o: o.status, "Paused"),
        (
            "PollForJobs",
            b'{"jobs":[{"id":"j","data":{"encryptionKey":{"id":"k","type":"AES512"}}}]}',
            lambda o: o.jobs[0].data.encryption_key.type,
            "AES512",
        ),
        (
            "PollForJobs",
            b'{"jobs":[{"id":"j","data":{"inputArtifacts":[{"location":{"type":"Git"}}]}}]}',
            lambda o: o.jobs[0].data.input_artifacts[0].location.type,
            "Git",
        ),
        (
            "ListActionTypes",
            b'{"actionTypes":[{"id":{"category":"Quantum","owner":"Robot","provider":"p",'
            b'"version":"1"},"inputArtifactDetails":{"minimumCount":0,"maximumCount":1},'
            b'"outputArtifactDetails":{"minimumCount":0,"maximumCount":1}}]}',
            lambda o: (o.action_types[0].id.category, o.action_types[0].id.owner),
            ("Quantum", "Robot"),
        ),
    ],
)
def test_enum_values_aws_adds_later_still_decode(
    operation: str, body: bytes, read: Any, expected: object
) -> None:
    assert read(m.decode(operation, body)) == expected


def struct_fields(cls: type[m.Model]) -> tuple[mi.Field, ...]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info.fields


def has_required_fields(cls: type[m.Model]) -> bool:
    return any(f.required for f in struct_fields(cls))


@pytest.mark.parametrize(
    "operation", sorted(op for op, (_, out) in m.OPERATIONS.items() if not has_required_fields(out))
)
@pytest.mark.parametrize("body", [b"", b"{}"])
def test_empty_body_decodes_to_the_empty_output(operation: str, body: bytes) -> None:
    output_type = m.OPERATIONS[operation][1]
    output = m.decode(operation, body)
    assert output == output_type()
    assert m.encode(output) == b"{}"


def test_empty_body_lacking_a_required_member_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"CreateCustomActionType: .*actionType"):
        m.decode("CreateCustomActionType", b"")


def test_wrong_shape_raises_model_error_naming_operation_and_path() -> None:
    body = json.loads(example("poll-for-jobs"))
    body["jobs"][0]["data"]["inputArtifacts"] = "not-a-list"
    with pytest.raises(ModelError) as caught:
        m.decode("PollForJobs", json.dumps(body).encode())
    message = str(caught.value)
    assert "PollForJobs" in message
    assert "$.jobs[0].data.inputArtifacts" in message
    assert SECRET not in message
    assert TOKEN_START not in message


def test_wrongly_typed_secret_is_reported_by_path_only() -> None:
    secret = {"accessKeyId": "AKID", "secretAccessKey": ["s3cr3t-value"], "sessionToken": "tok"}
    body = json.dumps({"jobDetails": {"id": "j", "data": {"artifactCredentials": secret}}})
    with pytest.raises(ModelError, match=r"GetJobDetails: .*secretAccessKey") as caught:
        m.decode("GetJobDetails", body.encode())
    assert "s3cr3t-value" not in str(caught.value)


def test_malformed_json_and_unknown_operation_raise_model_error() -> None:
    with pytest.raises(ModelError, match="AcknowledgeJob"):
        m.decode("AcknowledgeJob", b'{"status":')
    with pytest.raises(ModelError) as caught:
        m.decode("PollForJob", b"{}")
    assert "'PollForJob'" in str(caught.value)
    for operation in m.OPERATIONS:
        assert operation in str(caught.value)
    with pytest.raises(ModelError, match="unknown operation"):
        m.decode_input("Nope", b"{}")


def test_from_builtins_ignores_unknown_keys_and_reports_bad_shapes() -> None:
    answer = {"status": "InProgress", "ResponseMetadata": {"HTTPStatusCode": 200}}
    assert m.from_builtins(m.AcknowledgeJobOutput, answer) == m.AcknowledgeJobOutput(
        status="InProgress"
    )
    with pytest.raises(ModelError, match=r"AcknowledgeJobOutput: .*\$\.status"):
        m.from_builtins(m.AcknowledgeJobOutput, {"status": 5})


# --- encoding ------------------------------------------------------------------------


def test_encode_omits_unset_optional_fields_and_uses_camel_case() -> None:
    assert m.encode(m.PutJobSuccessResultInput(job_id="x")) == b'{"jobId":"x"}'
    value = m.PutJobSuccessResultInput(
        job_id="x",
        continuation_token="c",
        execution_details=m.ExecutionDetails(percent_complete=0, external_execution_id="e"),
    )
    assert json.loads(m.encode(value)) == {
        "jobId": "x",
        "continuationToken": "c",
        "executionDetails": {"percentComplete": 0, "externalExecutionId": "e"},
    }
    assert m.to_builtins(value) == json.loads(m.encode(value))
    poll = m.PollForJobsInput(
        action_type_id=m.ActionTypeId(category="c", owner="o", provider="p", version="1")
    )
    assert m.to_builtins(poll) == {
        "actionTypeId": {"category": "c", "owner": "o", "provider": "p", "version": "1"}
    }


def sample(info: mi.Type) -> Any:
    """A value of the type that differs from every default (so nothing is omitted)."""
    if isinstance(info, mi.UnionType):
        return sample(next(t for t in info.types if not isinstance(t, mi.NoneType)))
    if isinstance(info, mi.StrType):
        return "v"
    if isinstance(info, mi.BoolType):
        return True
    if isinstance(info, mi.IntType):
        return 7
    if isinstance(info, mi.FloatType):
        return 1.5
    if isinstance(info, mi.DictType):
        return {"K": sample(info.value_type)}
    if isinstance(info, mi.VarTupleType):
        return (sample(info.item_type),)
    if isinstance(info, mi.StructType):
        return info.cls(**{f.name: sample(f.type) for f in info.fields})
    raise AssertionError(f"no sample for {info!r}")


@pytest.mark.parametrize("operation", sorted(m.OPERATIONS))
def test_every_input_round_trips_with_all_fields_set(operation: str) -> None:
    input_type = m.OPERATIONS[operation][0]
    value = sample(mi.type_info(input_type))
    body = m.encode(value)
    wire = json.loads(body)
    assert set(wire) == {f.encode_name for f in struct_fields(input_type)}
    assert m.decode_input(operation, body) == value
    assert msgspec.json.encode(m.to_builtins(value)) == body  # tuples stand for lists
    assert m.from_builtins(input_type, wire) == value


def walk_against_model(info: mi.Type, shape: Shape, path: str) -> None:
    """Check a Struct's wire names against botocore's shape, recursively."""
    if isinstance(info, mi.UnionType):
        info = next(t for t in info.types if not isinstance(t, mi.NoneType))
    if isinstance(info, mi.StructType):
        assert isinstance(shape, StructureShape), path
        assert {f.encode_name for f in info.fields} == set(shape.members), path
        for f in info.fields:
            walk_against_model(f.type, shape.members[f.encode_name], f"{path}.{f.encode_name}")
    elif isinstance(info, mi.VarTupleType):
        assert isinstance(shape, ListShape), path
        walk_against_model(info.item_type, shape.member, f"{path}[]")


@pytest.mark.parametrize("operation", sorted(m.OPERATIONS))
def test_struct_fields_match_the_service_model(operation: str) -> None:
    model = botocore.session.get_session().get_service_model("codepipeline")
    op = model.operation_model(operation)
    input_type, output_type = m.OPERATIONS[operation]
    assert op.input_shape is not None
    walk_against_model(mi.type_info(input_type), op.input_shape, operation)
    required = {f.encode_name for f in struct_fields(input_type) if f.required}
    assert required == set(op.input_shape.required_members)
    if op.output_shape is None:
        assert output_type is m.Empty
    else:
        walk_against_model(mi.type_info(output_type), op.output_shape, operation)


# --- credentials never leak through repr ---------------------------------------------


def test_credentials_repr_and_str_hide_secrets() -> None:
    (job,) = m.decode("PollForJobs", example("poll-for-jobs")).jobs
    credentials = job.data.artifact_credentials
    assert credentials is not None
    renderings = [
        repr(credentials),
        str(credentials),
        f"{credentials}",
        repr(job),
        str(job),
        repr(job.data),
        repr(m.GetJobDetailsOutput(job_details=m.JobDetails(id="j", data=job.data))),
    ]
    for text in renderings:
        assert "AKIAIOSFODNN7EXAMPLE" in text
        assert SECRET not in text
        assert TOKEN_START not in text
        assert TOKEN_END not in text


def test_credentials_rich_repr_hides_secrets() -> None:
    """msgspec gives every Struct a `__rich_repr__` (used by rich's pretty printer and
    logging handler); it must not bypass the redacting `__repr__`."""
    credentials = m.ArtifactCredentials(
        access_key_id="AKID", secret_access_key="the-secret", session_token="the-token"
    )
    rich_repr = getattr(credentials, "__rich_repr__", lambda: iter(()))
    rendered = repr(list(rich_repr()))
    assert "the-secret" not in rendered
    assert "the-token" not in rendered


def test_structs_are_frozen() -> None:
    value = m.AcknowledgeJobInput(job_id="j", nonce="1")
    with pytest.raises(AttributeError):
        value.nonce = "2"  # type: ignore[misc]
    assert msgspec.structs.replace(value, nonce="2").nonce == "2"


@pytest.mark.parametrize(
    "request_struct",
    [
        m.AcknowledgeThirdPartyJobInput(job_id="j", nonce="1", client_token="CLIENT-TOKEN-X"),
        m.GetThirdPartyJobDetailsInput(job_id="j", client_token="CLIENT-TOKEN-X"),
        m.PutThirdPartyJobSuccessResultInput(job_id="j", client_token="CLIENT-TOKEN-X"),
        m.PutThirdPartyJobFailureResultInput(
            job_id="j",
            client_token="CLIENT-TOKEN-X",
            failure_details=m.FailureDetails(type="JobFailed", message="no"),
        ),
    ],
)
def test_third_party_requests_hide_the_client_token(request_struct: m.Model) -> None:
    for text in (repr(request_struct), str(request_struct), f"{request_struct}"):
        assert "CLIENT-TOKEN-X" not in text
        assert "client_token=***" in text
    assert ("client_token", "***") in request_struct.__rich_repr__()
    assert b"CLIENT-TOKEN-X" in m.encode(request_struct)  # the wire still carries it
