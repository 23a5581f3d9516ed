"""Reading a DCP checkpoint without running code from it: a run directory may come from someone else.

DCP's FileSystemReader unpickles `.metadata` with plain `pickle.load`, and its DefaultLoadPlanner reads every
non-tensor value (optimizer hyper-parameters) with `torch.load(weights_only=False)`: both execute whatever a
crafted file asks. Tensors already go through `torch.load(weights_only=True)`. Here the metadata is unpickled
with an allowlist of the classes DCP's metadata is made of, and non-tensor values with `weights_only=True`
(plain numbers, strings, tuples), so the three kinds of data DCP reads are all loaded without arbitrary code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

_DCP = "torch.distributed.checkpoint.metadata"
# What DCP's Metadata is built from (found with a recording Unpickler on checkpoints of every layout).
_ALLOWED = {
    (_DCP, "Metadata"), (_DCP, "MetadataIndex"), (_DCP, "StorageMeta"), (_DCP, "TensorProperties"),
    (_DCP, "TensorStorageMetadata"), (_DCP, "BytesStorageMetadata"), (_DCP, "ChunkStorageMetadata"),
    (_DCP, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset"),
    ("collections", "OrderedDict"),
}


class UnsafeMetadata(Exception):
    """`.metadata` names something other than DCP's metadata classes."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeMetadata(f"it refers to {module}.{name}, which DCP metadata never holds")


def read_metadata(path: Path) -> Metadata:
    """A checkpoint's `.metadata`, unpickled with the allowlist. Raises UnsafeMetadata, or pickle / OS errors
    for a damaged file."""
    with open(Path(path) / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeMetadata(f"it holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """A FileSystemReader that hands DCP metadata read beforehand with the allowlist. Reading it before
    `dcp.load` also keeps DCP off its fallback path, which logs two tracebacks on the root logger for a
    damaged `.metadata`."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._metadata = read_metadata(Path(path))

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never tries per-rank metadata files
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values load with weights_only=True (its own load_bytes, with
    weights_only=False otherwise)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
