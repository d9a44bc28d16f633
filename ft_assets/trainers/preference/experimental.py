"""TRL's `trl.experimental` trainers (ORPO, CPO/SimPO) warn on import that their API may change:
the versions are pinned in requirements.lock and their behaviour is tested here, so the warning
is expected and silenced for that import only."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def trl_experimental() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental.*", category=UserWarning)
        yield
