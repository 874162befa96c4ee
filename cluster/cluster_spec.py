"""ClusterSpec: the node kinds of a cluster, read from a YAML or JSON description (torch-free).

    label_key: moe-serve/node-kind   # optional; the Ray node label whose value is a node kind
    nodes:
      - {kind: cpu-highmem, count: 1, memory_gb: 64, speed: 1.0, device: cpu, role: attention,
         resources: {cpu_highmem: 1}}
      - {kind: gpu, count: 2, memory_gb: 70, speed: 8.0, device: cuda, role: experts}

`memory_gb` is the per-node budget for model weights and KV cache, in GiB (2**30 bytes); `speed`
is the relative expert throughput; `role` is attention | experts | any | none (runs nothing);
`resources` are custom Ray resources that every actor placed on that kind requests.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_LABEL_KEY = "moe-serve/node-kind"
DEVICES = ("cpu", "cuda")
ROLES = ("attention", "experts", "any", "none")
CLUSTERS_DIR = Path(__file__).resolve().parent / "clusters"
DEFAULT_CLUSTER_FILE = CLUSTERS_DIR / "local.yaml"
GIB = 1 << 30

_TOP_KEYS = ("label_key", "nodes")
_NODE_KEYS = ("kind", "count", "memory_gb", "speed", "device", "role", "resources")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")  # Ray/Kubernetes label value


class ClusterSpecError(ValueError):
    """A cluster description that is missing or invalid; the message names the file and the field."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class NodeKind:
    """`count` identical Ray nodes whose label `label_key` has the value `kind`."""

    kind: str
    memory_gb: float
    count: int = 1
    speed: float = 1.0
    device: str = "cpu"
    role: str = "any"
    resources: dict[str, float] = field(default_factory=dict)  # per actor placed here

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not _LABEL_VALUE.match(self.kind):
            raise ClusterSpecError(f"kind must be a label value (letters, digits, '-', '_', '.'; "
                                   f"at most 63), got {self.kind!r}")
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise ClusterSpecError(f"count must be an integer >= 1, got {self.count!r}")
        for name in ("memory_gb", "speed"):
            value = getattr(self, name)
            if not _number(value) or value <= 0:
                raise ClusterSpecError(f"{name} must be a number > 0, got {value!r}")
        if self.device not in DEVICES:
            raise ClusterSpecError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.role not in ROLES:
            raise ClusterSpecError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.resources, dict):
            raise ClusterSpecError(f"resources must be a mapping of name to amount, got {self.resources!r}")
        for name, amount in self.resources.items():
            if not isinstance(name, str) or not name or not _number(amount) or amount <= 0:
                raise ClusterSpecError(f"resources: {name!r} must name a resource with an amount > 0, "
                                       f"got {amount!r}")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GIB)

    @property
    def hosts_attention(self) -> bool:
        return self.role in ("attention", "any")

    @property
    def hosts_experts(self) -> bool:
        return self.role in ("experts", "any")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "count": self.count, "memory_gb": self.memory_gb, "speed": self.speed,
                "device": self.device, "role": self.role, "resources": dict(self.resources)}


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The node kinds in file order; `source` names the file they came from (for messages)."""

    nodes: tuple[NodeKind, ...]
    label_key: str = DEFAULT_LABEL_KEY
    source: str = "<cluster>"

    def __post_init__(self) -> None:
        if not isinstance(self.label_key, str) or not self.label_key.strip():
            raise ClusterSpecError(f"{self.source}: label_key must be a non-empty string, got {self.label_key!r}")
        if not self.nodes:
            raise ClusterSpecError(f"{self.source}: nodes must list at least one node kind")
        seen: set[str] = set()
        for i, node in enumerate(self.nodes):
            if node.kind in seen:
                raise ClusterSpecError(f"{self.source}: nodes[{i}]: duplicate kind {node.kind!r}")
            seen.add(node.kind)

    def kind(self, name: str) -> NodeKind:
        for node in self.nodes:
            if node.kind == name:
                return node
        raise ClusterSpecError(f"{self.source}: no node kind {name!r} (kinds: {', '.join(self.kinds)})")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(n.kind for n in self.nodes)

    def to_dict(self) -> dict:
        return {"label_key": self.label_key, "nodes": [n.to_dict() for n in self.nodes]}


def load_cluster(path: str | Path | None = None) -> ClusterSpec:
    """Read a cluster description (YAML, or JSON by a .json suffix); None reads the local default."""
    path = Path(path) if path is not None else DEFAULT_CLUSTER_FILE
    if not path.is_file():
        raise ClusterSpecError(f"{path}: cluster description not found")
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ClusterSpecError(f"{path}: cannot parse cluster description ({exc})") from exc
    return cluster_from_dict(raw, source=str(path))


def cluster_from_dict(raw: Any, source: str = "<cluster>") -> ClusterSpec:
    """A decoded description -> ClusterSpec; every error names `source` and the field at fault."""
    if not isinstance(raw, dict):
        raise ClusterSpecError(f"{source}: expected a mapping with 'nodes', got {type(raw).__name__}")
    _reject_unknown(raw, _TOP_KEYS, source)
    nodes = raw.get("nodes")
    if not isinstance(nodes, list):
        raise ClusterSpecError(f"{source}: nodes must be a list of node kinds, got {nodes!r}")
    kinds = tuple(_node(entry, f"{source}: nodes[{i}]") for i, entry in enumerate(nodes))
    return ClusterSpec(nodes=kinds, label_key=raw.get("label_key", DEFAULT_LABEL_KEY), source=source)


def _node(entry: Any, where: str) -> NodeKind:
    if not isinstance(entry, dict):
        raise ClusterSpecError(f"{where}: expected a mapping, got {entry!r}")
    if "kind" in entry:
        where = f"{where} ({entry['kind']})"
    _reject_unknown(entry, _NODE_KEYS, where)
    for required in ("kind", "memory_gb"):
        if required not in entry:
            raise ClusterSpecError(f"{where}: missing required key {required!r}")
    args = dict(entry)
    if args.get("resources") is None:
        args.pop("resources", None)
    try:
        return NodeKind(**args)
    except ClusterSpecError as exc:
        raise ClusterSpecError(f"{where}: {exc}") from exc


def _reject_unknown(mapping: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ClusterSpecError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")
