"""The loop toolkit every trainer shares: the loop (loop.py), the model prepared for it,
batching and packing, losses, distributed ranks, preemption, step counts, continual replay.
Imports methods, data, models and config; knows no store and no Dagster."""
