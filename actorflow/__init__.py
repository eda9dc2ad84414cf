"""actorflow: Durable Objects and durable Workflows embedded in any Python process."""

import logging as _logging

from actorflow.binding import Instance, WorkflowBinding
from actorflow.errors import (
    ActorflowError,
    DataDirectoryLocked,
    EventTimeoutError,
    InstanceAlreadyExists,
    InstanceNotFound,
    InvalidInstanceId,
    InvalidInstanceState,
    LeaseLost,
    LimitExceeded,
    NonRetryableError,
    RateLimitError,
    RecordFormatError,
    SerializationError,
    StepTimeoutError,
    StorageCorrupted,
    StorageError,
    StorageFull,
)
from actorflow.history import Attempt, HistoryEvent, StepRecord
from actorflow.limits import Limits
from actorflow.objects import (
    AlarmInfo,
    DeliveryError,
    DurableObject,
    DurableObjectId,
    DurableObjectNamespace,
    DurableObjectState,
    DurableObjectStub,
)
from actorflow.runtime import Runtime
from actorflow.step import RetryPolicy, StepContext, WorkflowStep
from actorflow.storage import JsonSerializer, PickleSerializer
from actorflow.workflow import (
    InstanceStatus,
    Workflow,
    WorkflowEntrypoint,
    WorkflowEvent,
    WorkflowStepEvent,
)

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
    "InstanceNotFound",
    "InstanceStatus",
    "InvalidInstanceId",
    "InvalidInstanceState",
    "JsonSerializer",
    "LeaseLost",
    "LimitExceeded",
    "Limits",
    "NonRetryableError",
    "PickleSerializer",
    "RateLimitError",
    "RecordFormatError",
    "RetryPolicy",
    "Runtime",
    "SerializationError",
    "StepContext",
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
