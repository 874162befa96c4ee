"""Shared fixtures: tiny random checkpoints written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from experts.tiny import make_tiny

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, dtype="float32", **overrides) -> directory, cached per argument set."""
    cache: dict[tuple, Path] = {}

    def get(family: str, dtype: str = "float32", shards: int = 1, **overrides) -> Path:
        key = (family, dtype, shards, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{dtype}")
            cache[key] = make_tiny(family, out, dtype=dtype, shards=shards, **overrides)
        return cache[key]

    return get
