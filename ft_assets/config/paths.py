"""Where an installation keeps things: the repository's root (its vendored files) and the homes.

- `REPO_ROOT`: the checkout ft_assets runs from (`.ft_vendor/` holds the bundled GGUF and llama.cpp).
- `store_location()`: where artifacts live: `FT_HOME`, a path or a URL (`s3://bucket/prefix`),
  default `.ft_home/` in the repository; `is_url` tells the two apart (`file://` is a path).
- `ft_home()`: the local working directory: FT_HOME itself, or `FT_LOCAL_HOME` when FT_HOME is a
  URL (the cache of remote artifacts and checkpoints, caches, the default DAGSTER_HOME).
Reads the environment only; imports nothing of ft_assets, torch or Dagster.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def is_url(location: str | os.PathLike) -> bool:
    """A remote location (`s3://...`); `file://` URLs and plain paths are local directories."""
    s = str(location)
    return "://" in s and not s.startswith("file://")



def store_location(home: str | os.PathLike | None = None) -> str:
    """Where artifacts live: `home`, else $FT_HOME, else `.ft_home/` in the repo. A URL
    (`s3://bucket/prefix`) is kept as written; a path (or `file://` URL) is resolved against the
    current directory."""
    loc = str(home or os.environ.get("FT_HOME") or REPO_ROOT / ".ft_home")
    if is_url(loc):
        return loc.rstrip("/")
    return str(Path(loc.removeprefix("file://")).resolve())


def ft_home() -> Path:
    """The local working directory: FT_HOME itself when it is a path; when FT_HOME is a URL,
    $FT_LOCAL_HOME (default `.ft_home/` in the repo), which then holds the local copies of remote
    artifacts and checkpoints, caches and the default DAGSTER_HOME."""
    loc = store_location()
    return local_home() if is_url(loc) else Path(loc)


def local_home() -> Path:
    """Local state beside a remote store: $FT_LOCAL_HOME, default `.ft_home/` in the repo."""
    return Path(os.environ.get("FT_LOCAL_HOME") or REPO_ROOT / ".ft_home").resolve()
