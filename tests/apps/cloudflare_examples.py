# ruff: noqa
# fmt: off
"""Cloudflare's own Python Workflows examples, with only their imports changed.

Each workflow class below is copied as Cloudflare published it; the only
change is the import line (``from workers import WorkflowEntrypoint`` becomes
``from actorflow import WorkflowEntrypoint``, actorflow's name for
``af.Workflow``). Left out is each example's HTTP front, the
``Default(WorkerEntrypoint)`` Worker that calls ``env.MY_WORKFLOW.create()``
on a request: it is Cloudflare Workers, not Workflows, and its actorflow
counterpart is ``rt.register(cls, name=...).create()`` (what
tests/test_python_style.py does). The file is kept out of the formatter and
the linter so that the code stays as published.
"""

import asyncio
import random

from actorflow import WorkflowEntrypoint


# From https://developers.cloudflare.com/workflows/python/dag/ ("DAG Workflows",
# Cloudflare docs, implicit dependencies): dep_1 and dep_2 run concurrently,
# then final_step, which names them as parameters.
class PythonWorkflowStarter(WorkflowEntrypoint):
    async def run(self, event, step):
        async def await_step(fn):
            try:
                return await fn()
            except TypeError as e:
                print(f"Successfully caught {type(e).__name__}: {e}")

        await step.sleep('demo sleep', '10 seconds')

        @step.do()
        async def dep_1():
            # does stuff
            print('executing dep1')
            return 'dep1'

        @step.do()
        async def dep_2():
            # does stuff
            print('executing dep2')
            return 'dep2'

        @step.do(concurrent=True)
        async def final_step(dep_1, dep_2):
            # does stuff
            print(f'{dep_1} {dep_2}')

        await await_step(final_step)


# From https://developers.cloudflare.com/workers/languages/python/examples/#workflows
# ("Python Worker Examples", Cloudflare Workers docs, section "Workflows").
class MyWorkflow(WorkflowEntrypoint):
    async def run(self, event, step):
        @step.do()
        async def step_a():
            # do some work
            return 10

        @step.do()
        async def step_b():
            # do some work
            return 20

        @step.do(concurrent=True)
        async def my_final_step(step_a, step_b):
            # should return 30
            return step_a + step_b

        await my_final_step()


# From github.com/cloudflare/python-workers-examples, 10-workflows/src/entry.py
# (commit 3ed385f2): the legacy form, depends=[...] matched to the parameters.
# Its first line, ``from workers import WorkerEntrypoint, Response,
# WorkflowEntrypoint``, and ``from urllib.parse import urlparse`` served the
# left-out Worker.
class DAGWorkflow(WorkflowEntrypoint):
    async def run(self, event, step):
        @step.do("dependency 1")
        async def sleep_a_little():
            print("executing dep1")
            await asyncio.sleep(random.randint(1, 10))

        @step.do("dependency 2")
        async def sleep_longer():
            print("executing dep2")
            await asyncio.sleep(random.randint(5, 15))

        @step.do("final step", depends=[sleep_a_little, sleep_longer], concurrent=True)
        async def summarize(res1=None, res2=None):
            print("I awaited the first two steps and now I am done")

        await summarize()
