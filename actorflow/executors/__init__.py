"""Where step bodies run: ``af.Runtime(..., executor=...)``.

- :class:`InProcessExecutor`: in the runtime's own process (the default).
- :class:`RayExecutor`: as Ray tasks (the ``ray`` extra).
- :class:`DaskExecutor`: as Dask tasks (the ``dask`` extra).

Whatever runs the bodies, the runtime alone owns retries, timeouts (a timed-out
remote attempt is cancelled) and checkpoints. Ray and Dask are imported only
when their executor opens.
"""

from actorflow.core.errors import ExecutorError
from actorflow.executors.base import RanOn, StepCall, StepExecutor
from actorflow.executors.dask_executor import DaskExecutor
from actorflow.executors.inprocess import InProcessExecutor
from actorflow.executors.ray_executor import RayExecutor

__all__ = [
    "DaskExecutor",
    "ExecutorError",
    "InProcessExecutor",
    "RanOn",
    "RayExecutor",
    "StepCall",
    "StepExecutor",
]
