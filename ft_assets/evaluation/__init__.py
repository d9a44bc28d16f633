"""Held-out loss and generation, QA metrics (the `evaluate` modules in metrics/), reports,
tables and plots, the merge and its equivalence check, choosing a sweep trial. No store, no Dagster."""
