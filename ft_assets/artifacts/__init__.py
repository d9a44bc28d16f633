"""The versioned artifact store: local directories or object storage, retention, per-slot locks.

`store` (versions, manifests, LATEST, checkpoints), `object_store` (the same on an fsspec URL),
`retention` (`prune`), `slot_locks` (writers vs prune), `asset_keys` (`asset[partition]`). Used by
`defs` and the command line only (an import-linter contract in pyproject.toml): the ML code
receives paths, never the store. No torch, no Dagster.
"""
