"""Asset keys as manifests record their inputs: `asset` or `asset[partition]` (`adapter[lora]`,
`finance.adapter[lora@lr=2e-4]`, `raw/qa`).

One parser for every reader of those keys (`lineage`, `chat`, `retention`): the asset is what
comes before the first `[`; the partition what comes after it, less exactly one trailing `]`. So
a partition that holds brackets itself (`lora@target_modules=['q_proj', 'v_proj']`, the name a
list-valued sweep got before trial names were allow-listed) is read back whole. A key with `[`
but no closing `]`, or an empty partition, has none. Nothing here imports anything.
"""

from __future__ import annotations


def parse_key(key: str) -> tuple[str, str | None]:
    """`adapter[lora]` -> ("adapter", "lora"); `sft_dataset` -> ("sft_dataset", None)."""
    name, _, part = key.partition("[")
    return name, (part[:-1] or None) if part.endswith("]") else None


def format_key(asset: str, partition: str | None) -> str:
    """The key `parse_key` reads back: `asset[partition]`, or `asset` without a partition."""
    return f"{asset}[{partition}]" if partition else asset
