"""Arrays cached on disk as an ``.npz`` (no pickle) with a JSON stamp beside it of what made them.

A cache whose stamp differs from the caller's (other weights, other files) counts as absent,
so it is rebuilt rather than silently reused; so does one that cannot be read.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write


def stamp_path(path: Path) -> Path:
    return path.with_suffix(".key.json")


def _stamp_text(stamp: dict[str, Any]) -> str:
    return json.dumps(stamp, sort_keys=True)


def digest(stamp: dict[str, Any], length: int = 20) -> str:
    """A short hash of a stamp, for naming a cache file after what made it."""
    return hashlib.sha256(_stamp_text(stamp).encode()).hexdigest()[:length]


def load(path: Path, stamp: dict[str, Any], names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays ``names`` of the cache at ``path`` if it was made under ``stamp``, else None."""
    key_path = stamp_path(path)
    if not (path.exists() and key_path.exists()):
        return None
    try:
        if json.loads(key_path.read_text()) != json.loads(_stamp_text(stamp)):
            return None
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in names}
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache: rebuild it


def save(path: Path, stamp: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays and their stamp (each atomically); raises OSError when it cannot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())
    atomic_write(stamp_path(path), _stamp_text(stamp).encode())
