"""Stable hashes: of JSON-able settings (stage markers, job fingerprints) and of files."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any


def stable_hash(payload: Mapping[str, Any] | Any, length: int = 16) -> str:
    """SHA-256 of ``payload`` written as JSON with sorted keys (anything JSON cannot write
    is written as ``str``), hex, cut to ``length`` characters. The same settings give the
    same hash in every process, on every machine, in any key order."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
