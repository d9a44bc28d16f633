"""Entry points that run outside the Dagster process (launched by `ft_assets.defs.launchers`).
They import `dagster_pipes` only, never `dagster`."""
