"""ft_assets: LLM fine-tuning as Dagster software-defined assets, declared by a YAML recipe.

The folders are the architecture (README "Layout"; pyproject.toml's import-linter contracts keep
it true): `defs/` is the Dagster wiring and, with the command line, the only user of
`artifacts/` (the versioned store); `core/` is the ML code and knows no Dagster; `jobs/` runs a
training step outside the Dagster process; `config/` knows no torch or Dagster. This file is
empty on purpose: importing the package starts nothing and pulls in neither torch nor Dagster.
"""
