"""Lazy, per-tensor reads of a HuggingFace safetensors checkpoint.

Opening a checkpoint reads only the safetensors headers; tensors are read one by one on demand
(memory-mapped), so a component that owns a subset of the experts reads only those. `view` gives a
tensor straight over the memory-mapped file, with no copy: the expert cache's slow tier computes
from it where it lies and moves an expert with one copy into its fast-tier row.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from experts.errors import CheckpointError

log = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True, slots=True)
class _Mapped:
    """A safetensors file mapped into memory: its header, and its data bytes (after the header)."""

    header: dict
    data: torch.Tensor  # uint8 [bytes of tensor data]


def _map(path: Path) -> _Mapped:
    """Maps the file privately (pages are read on first touch; nothing is copied up front). The
    format: an 8-byte little-endian header length, the JSON header (each tensor's dtype, shape and
    data_offsets, relative to the data after the header), then the data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    size = path.stat().st_size
    if 8 + length > size or not isinstance(header, dict):
        raise ValueError("header larger than the file")
    whole = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    return _Mapped(header, whole[8 + length:])


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
        self._maps: dict[Path, _Mapped | None] = {}

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

    def view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `name`, checked to have `shape`, in the file's dtype, over the memory-mapped file
        without a copy (a private mapping: a write would change a copy of the page, never the
        file); a copy where the data cannot be viewed in place (an unaligned or unusual dtype)."""
        self._check_shape(name, shape)
        return self._view(name)

    def view_row(self, name: str, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """`tensor[index]` of a stacked tensor, as `view`; shape is the row's."""
        self._require(name)
        full = self._shapes[name]
        if full[1:] != shape or not 0 <= index < full[0]:
            raise CheckpointError(
                f"{name}: shape {list(full)} has no row {index} of shape {list(shape)}")
        return self._view(name, index)

    def _view(self, name: str, index: int | None = None) -> torch.Tensor:
        """The whole tensor, or its row `index`: a view where it can be one, else a copy of just that."""
        path = self._where[name]
        mapped = self._mapped(path)
        entry = mapped.header.get(name) if mapped is not None else None
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        if dtype is not None:
            begin, end = entry["data_offsets"]
            shape = self._shapes[name]
            if not 0 <= begin <= end <= mapped.data.numel() or end - begin != dtype.itemsize * math.prod(shape):
                raise CheckpointError(f"{path.name}: corrupt safetensors file (tensor {name} lies outside its data)")
            if (mapped.data.storage_offset() + begin) % dtype.itemsize == 0:
                whole = mapped.data[begin:end].view(dtype).view(shape)
                return whole if index is None else whole[index]
        if index is None:
            return self._read(name, lambda h: h.get_tensor(name))
        return self._read(name, lambda h: h.get_slice(name)[index])

    def _mapped(self, path: Path) -> "_Mapped | None":
        """The file's mapping; None where it cannot be mapped (a private mapping counts against a
        strict overcommit limit, for one), and tensors are then read as copies."""
        if path not in self._maps:
            try:
                self._maps[path] = _map(path)
            except (OSError, RuntimeError, ValueError) as exc:
                log.warning("%s: cannot map safetensors file (%s); reading its tensors as copies", path.name, exc)
                self._maps[path] = None
        return self._maps[path]

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
