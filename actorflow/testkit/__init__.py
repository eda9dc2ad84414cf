"""Testing tools behind :mod:`actorflow.testing`: fault injection and node processes."""
