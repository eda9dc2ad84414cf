"""The engine: one instance actor per live instance, one execution per run."""
