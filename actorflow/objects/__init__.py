"""The Durable Objects wing: namespaces, stubs, the object actor and its storage."""

from actorflow.objects.namespace import *  # noqa: F403
from actorflow.objects.namespace import __all__  # noqa: F401
