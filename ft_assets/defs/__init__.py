"""Dagster wiring: one module per stage of the lineage. Thin: read the recipe, call
`ft_assets.core`, write metadata. `ft_assets.definitions` assembles them."""
