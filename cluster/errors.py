"""Exceptions shared by the engine and the cluster (imports neither torch nor ray)."""

from __future__ import annotations


class ClusterRecovered(RuntimeError):
    """A cluster step failed and the cluster was repaired: running sequences must be recomputed."""
