"""The Workflows wing: definitions, steps, handles, the engine, the scheduler.

:mod:`actorflow.workflows.records` alone knows how workflow records are laid
out in storage.
"""
