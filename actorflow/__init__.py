"""actorflow: Durable Objects and durable Workflows embedded in any Python process."""

__version__ = "0.1.0"

import logging as _logging

from actorflow import executors as executors
from actorflow.core.errors import (
    ActorflowError,
    DataDirectoryLocked,
    EventTimeoutError,
    InstanceAlreadyExists,
    InstanceNotFound,
    InvalidCursor,
    InvalidFlowControl,
    InvalidInstanceId,
    InvalidInstanceState,
    InvalidSchedule,
    LeaseLost,
    LimitExceeded,
    NonRetryableDelayError,
    NonRetryableError,
    RateLimitError,
    RecordFormatError,
    SerializationError,
    StepDependencyError,
    StepTimeoutError,
    StorageCorrupted,
    StorageError,
    StorageFull,
)
from actorflow.core.limits import Limits
from actorflow.core.storage import JsonSerializer, PickleSerializer
from actorflow.objects.namespace import (
    AlarmInfo,
    DeliveryError,
    DurableObject,
    DurableObjectId,
    DurableObjectNamespace,
    DurableObjectState,
    DurableObjectStub,
)
from actorflow.runtime import Runtime
from actorflow.workflows.definition import (
    InstanceStatus,
    Workflow,
    WorkflowEntrypoint,
    WorkflowEvent,
    WorkflowStepEvent,
)
from actorflow.workflows.handles import Instance, WorkflowBinding
from actorflow.workflows.history import Attempt, HistoryEvent, StepRecord
from actorflow.workflows.query import InstanceDescription
from actorflow.workflows.step import RetryPolicy, StepContext, WorkflowStep

__all__ = [
    "ActorflowError",
    "AlarmInfo",
    "Attempt",
    "DataDirectoryLocked",
    "DeliveryError",
    "DurableObject",
    "DurableObjectId",
    "DurableObjectNamespace",
    "DurableObjectState",
    "DurableObjectStub",
    "EventTimeoutError",
    "HistoryEvent",
    "Instance",
    "InstanceAlreadyExists",
    "InstanceDescription",
    "InstanceNotFound",
    "InstanceStatus",
    "InvalidCursor",
    "InvalidFlowControl",
    "InvalidInstanceId",
    "InvalidInstanceState",
    "InvalidSchedule",
    "JsonSerializer",
    "LeaseLost",
    "LimitExceeded",
    "Limits",
    "NonRetryableDelayError",
    "NonRetryableError",
    "PickleSerializer",
    "RateLimitError",
    "RecordFormatError",
    "RetryPolicy",
    "Runtime",
    "SerializationError",
    "StepContext",
    "StepDependencyError",
    "StepRecord",
    "StepTimeoutError",
    "StorageCorrupted",
    "StorageError",
    "StorageFull",
    "Workflow",
    "WorkflowBinding",
    "WorkflowEntrypoint",
    "WorkflowEvent",
    "WorkflowStep",
    "WorkflowStepEvent",
]

# Quiet by default: records go nowhere until the application configures logging.
_logging.getLogger("actorflow").addHandler(_logging.NullHandler())
