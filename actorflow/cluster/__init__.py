"""Nodes on one data directory: membership, leases and instance ownership.

It reads no workflow record: the workflow layer claims an expired node's
instances through the callback it gives (see :mod:`actorflow.cluster.lease`).
"""
