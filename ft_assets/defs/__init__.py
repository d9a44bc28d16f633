"""Dagster wiring: one module per stage of the lineage. Thin: read the recipe, call
the ML rooms (trainers, evaluation, publish, ...), write metadata. `ft_assets.definitions` assembles them."""
