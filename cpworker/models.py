"""msgspec Structs for every shape of the CodePipeline job APIs, and their codecs.

Field names are snake_case in Python and camelCase on the wire, as in botocore's service
model (`botocore/data/codepipeline/2015-07-09/service-2.json`). Decoding accepts what
real services send: unknown keys (the AWS documentation's examples carry `"__type"`) are
ignored, and string values are not checked against the model's patterns or enums (a job id
such as ``"ef66c259-64f9-EXAMPLE"`` decodes). Encoding omits unset optional fields.

>>> decode("PollForJobs", body).jobs[0].data.input_artifacts[0].name
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import msgspec

from cpworker.errors import FAILURE_TYPES, ModelError

__all__ = [
    "FAILURE_TYPES",
    "JOB_STATUSES",
    "OPERATIONS",
    "AcknowledgeJobInput",
    "AcknowledgeJobOutput",
    "AcknowledgeThirdPartyJobInput",
    "ActionConfiguration",
    "ActionConfigurationProperty",
    "ActionContext",
    "ActionType",
    "ActionTypeId",
    "ActionTypeSettings",
    "Artifact",
    "ArtifactCredentials",
    "ArtifactDetails",
    "ArtifactLocation",
    "CreateCustomActionTypeInput",
    "CreateCustomActionTypeOutput",
    "CurrentRevision",
    "DeleteCustomActionTypeInput",
    "Empty",
    "EncryptionKey",
    "ExecutionDetails",
    "FailureDetails",
    "GetJobDetailsInput",
    "GetJobDetailsOutput",
    "GetThirdPartyJobDetailsInput",
    "GetThirdPartyJobDetailsOutput",
    "Job",
    "JobData",
    "JobDetails",
    "ListActionTypesInput",
    "ListActionTypesOutput",
    "PipelineContext",
    "PollForJobsInput",
    "PollForJobsOutput",
    "PollForThirdPartyJobsInput",
    "PollForThirdPartyJobsOutput",
    "PutJobFailureResultInput",
    "PutJobSuccessResultInput",
    "PutThirdPartyJobFailureResultInput",
    "PutThirdPartyJobSuccessResultInput",
    "S3ArtifactLocation",
    "StageContext",
    "Tag",
    "ThirdPartyJob",
    "ThirdPartyJobDetails",
    "decode",
    "decode_input",
    "encode",
]


JOB_STATUSES: Final = (
    "Created",
    "Queued",
    "Dispatched",
    "InProgress",
    "TimedOut",
    "Succeeded",
    "Failed",
)


class Model(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Base of every API shape: frozen, camelCase on the wire, unset fields omitted.

    Fields named in `_SECRETS` show as ``***`` in repr, str and rich's pretty printer.
    (Subclasses repeat ``frozen=True`` so that mypy's dataclass view knows it too.)
    """

    _SECRETS: ClassVar[frozenset[str]] = frozenset()

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [
            (name, "***" if name in self._SECRETS else getattr(self, name))
            for name in self.__struct_fields__
        ]

    def __repr__(self) -> str:
        if not self._SECRETS:
            return super().__repr__()
        fields = ", ".join(
            f"{name}={value}" if name in self._SECRETS else f"{name}={value!r}"
            for name, value in self.__rich_repr__()
        )
        return f"{type(self).__name__}({fields})"

    def __str__(self) -> str:
        return repr(self)


# --- shared shapes -------------------------------------------------------------------


class ActionTypeId(Model, frozen=True):
    category: str
    owner: str
    provider: str
    version: str


class ActionConfiguration(Model, frozen=True):
    configuration: dict[str, str] = {}


class StageContext(Model, frozen=True):
    name: str | None = None


class ActionContext(Model, frozen=True):
    name: str | None = None
    action_execution_id: str | None = None


class PipelineContext(Model, frozen=True):
    pipeline_name: str | None = None
    stage: StageContext | None = None
    action: ActionContext | None = None
    pipeline_arn: str | None = None
    pipeline_execution_id: str | None = None


class S3ArtifactLocation(Model, frozen=True):
    bucket_name: str
    object_key: str


class ArtifactLocation(Model, frozen=True):
    type: str | None = None
    s3_location: S3ArtifactLocation | None = None


class Artifact(Model, frozen=True):
    name: str | None = None
    revision: str | None = None
    location: ArtifactLocation | None = None


class ArtifactCredentials(Model, frozen=True):
    """Short-lived STS session credentials for the job's artifact bucket.

    The repr never shows the secret access key or the session token.
    """

    _SECRETS = frozenset({"secret_access_key", "session_token"})

    access_key_id: str
    secret_access_key: str
    session_token: str


class EncryptionKey(Model, frozen=True):
    id: str
    type: str = "KMS"


class JobData(Model, frozen=True):
    action_type_id: ActionTypeId | None = None
    action_configuration: ActionConfiguration | None = None
    pipeline_context: PipelineContext | None = None
    input_artifacts: tuple[Artifact, ...] = ()
    output_artifacts: tuple[Artifact, ...] = ()
    artifact_credentials: ArtifactCredentials | None = None
    continuation_token: str | None = None
    encryption_key: EncryptionKey | None = None


class Job(Model, frozen=True):
    id: str
    data: JobData = JobData()
    nonce: str | None = None
    account_id: str | None = None


class JobDetails(Model, frozen=True):
    id: str
    data: JobData = JobData()
    account_id: str | None = None


class ThirdPartyJob(Model, frozen=True):
    client_id: str | None = None
    job_id: str | None = None


class ThirdPartyJobDetails(Model, frozen=True):
    id: str
    data: JobData = JobData()
    nonce: str | None = None


class ExecutionDetails(Model, frozen=True):
    summary: str | None = None
    external_execution_id: str | None = None
    percent_complete: int | None = None


class FailureDetails(Model, frozen=True):
    type: str
    message: str
    external_execution_id: str | None = None


class CurrentRevision(Model, frozen=True):
    revision: str
    change_identifier: str
    created: float | None = None
    revision_summary: str | None = None


class ActionTypeSettings(Model, frozen=True):
    third_party_configuration_url: str | None = None
    entity_url_template: str | None = None
    execution_url_template: str | None = None
    revision_url_template: str | None = None


class ActionConfigurationProperty(Model, frozen=True):
    name: str
    required: bool
    key: bool
    secret: bool
    queryable: bool | None = None
    description: str | None = None
    type: str | None = None


class ArtifactDetails(Model, frozen=True):
    minimum_count: int
    maximum_count: int


class Tag(Model, frozen=True):
    key: str
    value: str


class ActionType(Model, frozen=True):
    id: ActionTypeId
    input_artifact_details: ArtifactDetails
    output_artifact_details: ArtifactDetails
    settings: ActionTypeSettings | None = None
    action_configuration_properties: tuple[ActionConfigurationProperty, ...] = ()


class Empty(Model, frozen=True):
    """The output of operations that return nothing."""


# --- operation inputs and outputs ----------------------------------------------------


class PollForJobsInput(Model, frozen=True):
    action_type_id: ActionTypeId
    max_batch_size: int | None = None
    query_param: dict[str, str] | None = None


class PollForJobsOutput(Model, frozen=True):
    jobs: tuple[Job, ...] = ()


class AcknowledgeJobInput(Model, frozen=True):
    job_id: str
    nonce: str


class AcknowledgeJobOutput(Model, frozen=True):
    status: str | None = None


class GetJobDetailsInput(Model, frozen=True):
    job_id: str


class GetJobDetailsOutput(Model, frozen=True):
    job_details: JobDetails | None = None


class PutJobSuccessResultInput(Model, frozen=True):
    job_id: str
    current_revision: CurrentRevision | None = None
    continuation_token: str | None = None
    execution_details: ExecutionDetails | None = None
    output_variables: dict[str, str] | None = None


class PutJobFailureResultInput(Model, frozen=True):
    job_id: str
    failure_details: FailureDetails


class PollForThirdPartyJobsInput(Model, frozen=True):
    action_type_id: ActionTypeId
    max_batch_size: int | None = None


class PollForThirdPartyJobsOutput(Model, frozen=True):
    jobs: tuple[ThirdPartyJob, ...] = ()


class AcknowledgeThirdPartyJobInput(Model, frozen=True):
    _SECRETS = frozenset({"client_token"})

    job_id: str
    nonce: str
    client_token: str


class GetThirdPartyJobDetailsInput(Model, frozen=True):
    _SECRETS = frozenset({"client_token"})

    job_id: str
    client_token: str


class GetThirdPartyJobDetailsOutput(Model, frozen=True):
    job_details: ThirdPartyJobDetails | None = None


class PutThirdPartyJobSuccessResultInput(Model, frozen=True):
    _SECRETS = frozenset({"client_token"})

    job_id: str
    client_token: str
    current_revision: CurrentRevision | None = None
    continuation_token: str | None = None
    execution_details: ExecutionDetails | None = None


class PutThirdPartyJobFailureResultInput(Model, frozen=True):
    _SECRETS = frozenset({"client_token"})

    job_id: str
    client_token: str
    failure_details: FailureDetails


class CreateCustomActionTypeInput(Model, frozen=True):
    category: str
    provider: str
    version: str
    input_artifact_details: ArtifactDetails
    output_artifact_details: ArtifactDetails
    settings: ActionTypeSettings | None = None
    configuration_properties: tuple[ActionConfigurationProperty, ...] | None = None
    tags: tuple[Tag, ...] | None = None


class CreateCustomActionTypeOutput(Model, frozen=True):
    action_type: ActionType
    tags: tuple[Tag, ...] | None = None


class ListActionTypesInput(Model, frozen=True):
    action_owner_filter: str | None = None
    next_token: str | None = None
    region_filter: str | None = None


class ListActionTypesOutput(Model, frozen=True):
    action_types: tuple[ActionType, ...] = ()
    next_token: str | None = None


class DeleteCustomActionTypeInput(Model, frozen=True):
    category: str
    provider: str
    version: str


#: operation name → (input Struct, output Struct)
OPERATIONS: Final[dict[str, tuple[type[Model], type[Model]]]] = {
    "PollForJobs": (PollForJobsInput, PollForJobsOutput),
    "AcknowledgeJob": (AcknowledgeJobInput, AcknowledgeJobOutput),
    "GetJobDetails": (GetJobDetailsInput, GetJobDetailsOutput),
    "PutJobSuccessResult": (PutJobSuccessResultInput, Empty),
    "PutJobFailureResult": (PutJobFailureResultInput, Empty),
    "PollForThirdPartyJobs": (PollForThirdPartyJobsInput, PollForThirdPartyJobsOutput),
    "AcknowledgeThirdPartyJob": (AcknowledgeThirdPartyJobInput, AcknowledgeJobOutput),
    "GetThirdPartyJobDetails": (GetThirdPartyJobDetailsInput, GetThirdPartyJobDetailsOutput),
    "PutThirdPartyJobSuccessResult": (PutThirdPartyJobSuccessResultInput, Empty),
    "PutThirdPartyJobFailureResult": (PutThirdPartyJobFailureResultInput, Empty),
    "CreateCustomActionType": (CreateCustomActionTypeInput, CreateCustomActionTypeOutput),
    "ListActionTypes": (ListActionTypesInput, ListActionTypesOutput),
    "DeleteCustomActionType": (DeleteCustomActionTypeInput, Empty),
}

_encoder = msgspec.json.Encoder()
_input_decoders = {op: msgspec.json.Decoder(types[0]) for op, types in OPERATIONS.items()}
_output_decoders = {op: msgspec.json.Decoder(types[1]) for op, types in OPERATIONS.items()}


def _run(decoders: dict[str, msgspec.json.Decoder[Any]], operation: str, body: bytes) -> Any:
    decoder = decoders.get(operation)
    if decoder is None:
        known = ", ".join(sorted(OPERATIONS))
        raise ModelError(f"unknown operation {operation!r}; known operations: {known}")
    try:
        return decoder.decode(body or b"{}")
    except msgspec.DecodeError as exc:
        # msgspec's message names the path ("Expected `str`, got `int` - at `$.jobs[0].id`")
        # and never echoes the values, so no credential can leak through it.
        raise ModelError(f"{operation}: the body does not match the API shape: {exc}") from None


def decode(operation: str, body: bytes) -> Any:
    """Decode the JSON body of an `operation`'s answer into its output Struct.

    Unknown keys are ignored; an empty body decodes to the empty output. Raises
    `ModelError` naming the operation and the path of the first bad value.
    """
    return _run(_output_decoders, operation, body)


def decode_input(operation: str, body: bytes) -> Any:
    """Decode the JSON body of an `operation`'s request into its input Struct."""
    return _run(_input_decoders, operation, body)


def encode(value: Model) -> bytes:
    """Encode a Struct as the JSON the API speaks (camelCase, unset fields omitted)."""
    return _encoder.encode(value)


def to_builtins(value: Model) -> dict[str, Any]:
    """The request parameters botocore expects for a Struct (camelCase dict)."""
    result: dict[str, Any] = msgspec.to_builtins(value)
    return result


def from_builtins(cls: type[Model], value: Any) -> Any:
    """Convert a botocore-parsed answer (a dict) into `cls`, ignoring unknown keys."""
    try:
        return msgspec.convert(value, cls, from_attributes=False, strict=False)
    except msgspec.ValidationError as exc:
        raise ModelError(
            f"{cls.__name__}: the answer does not match the API shape: {exc}"
        ) from None
