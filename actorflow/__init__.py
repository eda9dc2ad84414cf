"""actorflow: Durable Objects and durable Workflows embedded in any Python process."""

from actorflow.errors import (
    ActorflowError,
    EventTimeoutError,
    InstanceAlreadyExists,
    InstanceNotFound,
    InvalidInstanceId,
    InvalidInstanceState,
    LimitExceeded,
    NonRetryableError,
    RateLimitError,
    SerializationError,
    StepTimeoutError,
    StorageError,
)
from actorflow.limits import Limits
from actorflow.objects import (
    AlarmInfo,
    DurableObject,
    DurableObjectId,
    DurableObjectNamespace,
    DurableObjectState,
    DurableObjectStub,
)
from actorflow.runtime import Runtime
from actorflow.storage import JsonSerializer, PickleSerializer

__all__ = [
    "ActorflowError",
    "AlarmInfo",
    "DurableObject",
    "DurableObjectId",
    "DurableObjectNamespace",
    "DurableObjectState",
    "DurableObjectStub",
    "EventTimeoutError",
    "InstanceAlreadyExists",
    "InstanceNotFound",
    "InvalidInstanceId",
    "InvalidInstanceState",
    "JsonSerializer",
    "LimitExceeded",
    "Limits",
    "NonRetryableError",
    "PickleSerializer",
    "RateLimitError",
    "Runtime",
    "SerializationError",
    "StepTimeoutError",
    "StorageError",
]
