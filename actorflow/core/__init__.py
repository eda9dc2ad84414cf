"""The substrate: errors, clock, limits, serializers, storage, timers and actors.

It knows no workflow and no Durable Object; every layer above builds on it.
"""
