"""Lazy, per-tensor reads of a HuggingFace safetensors checkpoint.

Opening a checkpoint reads only the safetensors headers; tensors are read one by one on demand
(memory-mapped), so a component that owns a subset of the experts reads only those.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from experts.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """Maps tensor name -> shard file for one model directory; reads tensors lazily."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"model directory {self.model_dir} does not exist")
        self.files = _shard_files(self.model_dir)
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in self.files:
            for name, shape in _header(path).items():
                self._where[name] = path
                self._shapes[name] = shape
        self._check_index()
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return self._shapes[name]

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole tensor `name`, checked to have `shape`, as `dtype` on `device`."""
        self._check_shape(name, shape)
        return self._read(name, lambda h: h.get_tensor(name)).to(device, dtype)

    def read_row(self, name: str, index: int, shape: tuple[int, ...],
                 dtype: torch.dtype) -> torch.Tensor:
        """`tensor[index]` of a stacked tensor, reading only that row; shape is the row's."""
        self._require(name)
        full = self._shapes[name]
        if full[1:] != shape or not 0 <= index < full[0]:
            raise CheckpointError(
                f"{name}: shape {list(full)} has no row {index} of shape {list(shape)}")
        return self._read(name, lambda h: h.get_slice(name)[index]).to(dtype)

    def _read(self, name: str, fetch) -> torch.Tensor:
        path = self._where[name]
        try:
            return fetch(self._handle(path))
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"{path.name}: cannot read tensor {name}: {exc}") from exc

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def _require(self, name: str) -> None:
        if name not in self._where:
            raise CheckpointError(f"{self.model_dir}: missing tensor {name}")

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        self._require(name)
        if self._shapes[name] != tuple(shape):
            raise CheckpointError(
                f"{name}: expected shape {list(shape)}, checkpoint has {list(self._shapes[name])}")

    def _check_index(self) -> None:
        index = self.model_dir / INDEX_FILE
        if not index.is_file():
            return
        for name, file in _index_map(index).items():
            if name not in self._where:
                raise CheckpointError(f"{INDEX_FILE} lists {name} in {file}, which lacks it")


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        names = sorted(set(_index_map(index).values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: missing shard file(s) {', '.join(missing)}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files")
    return files


def _index_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: corrupt index file ({exc!r})") from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map is not an object")
    return weight_map


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: corrupt safetensors file ({exc})") from exc
