"""Reading a GGUF file: its metadata and its tensors as block bytes in the file's memory map (gguf's GGUFReader).

Nothing here copies a weight: each tensor is a `BlockTensor` over the mapped bytes, so opening an 8B file costs
what reading its header costs, and pages are read when a matmul first touches them (as llama.cpp's mmap). What a
broken file gets is an error that names the problem (`GGUFError`): a wrong magic, a file that ends before its
tensors do (an interrupted download), a header gguf cannot parse.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import contextlib
import mmap
import threading
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from streamchat.ggml_blocks import BlockTensor, row_bytes

MAGIC = b"GGUF"


class GGUFError(ValueError):
    """The file is not a GGUF file streamchat can read; the message names the file and what is wrong."""


_READING = threading.Lock()


@contextlib.contextmanager
def fast_header_reads():
    """While inside, every GGUFReader (ours, and transformers' tokenizer conversion) maps the file as a plain
    ndarray view (its `.base` is the np.memmap): the header parse slices the map once per field part, ~250,000
    times for a 49k-token vocabulary, and every slice of an np.memmap pays numpy's memmap bookkeeping (1.8 s of a
    1B file's 2 s header read; 0.3 s this way). One thread at a time: the reader module's `np` is swapped."""
    import gguf.gguf_reader as module

    with _READING:
        original = module.np.memmap

        def plain(*args, **kwargs):
            return np.asarray(original(*args, **kwargs))

        module.np = types.SimpleNamespace(**{**vars(np), "memmap": plain})  # the module's `np`, memmap swapped
        try:
            yield
        finally:
            module.np = np


def _read(path: Path) -> GGUFReader:
    """GGUFReader over the file's memory map, read fast (fast_header_reads)."""
    with fast_header_reads():
        return GGUFReader(path, "r")


class GGUFFile:
    """One GGUF file, memory-mapped: `metadata` (key -> value), `tensors` (name -> BlockTensor), `architecture`.

    Raises GGUFError for a missing file, a wrong magic, a truncated file or a header that does not parse."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with self.path.open("rb") as handle:
                magic = handle.read(4)
        except OSError as error:
            raise GGUFError(f"cannot read {self.path}: {error}") from error
        if magic != MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (it starts with {magic!r}, a GGUF file with {MAGIC!r})")
        size = self.path.stat().st_size
        try:
            reader = _read(self.path)
        except Exception as error:  # gguf raises ValueError/IndexError/struct errors on a short or corrupt header
            raise GGUFError(
                f"{self.path} is truncated or corrupt ({size:,} bytes; gguf could not read it: {error}); "
                "download it again"
            ) from error
        self.metadata: dict[str, object] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception:  # an exotic value type: not one streamchat reads
                continue
        self.tensors: dict[str, BlockTensor] = {}
        for tensor in reader.tensors:
            end = int(tensor.data_offset) + int(tensor.n_bytes)
            if end > size:
                raise GGUFError(
                    f"{self.path} is truncated: tensor {tensor.name!r} ends at byte {end:,} but the file has "
                    f"{size:,}; download it again"
                )
            shape = [int(n) for n in tensor.shape]  # ggml order: inputs first
            columns = shape[0]
            rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            try:
                expected = row_bytes(int(tensor.tensor_type), columns) * rows
            except (ValueError, KeyError) as error:
                raise GGUFError(f"{self.path}: tensor {tensor.name!r}: {error}") from error
            if expected != int(tensor.n_bytes):
                raise GGUFError(
                    f"{self.path}: tensor {tensor.name!r} of type {tensor.tensor_type.name} and shape {shape} "
                    f"should hold {expected:,} bytes, the file gives {int(tensor.n_bytes):,}"
                )
            with warnings.catch_warnings():  # a read-only map: streamchat never writes through it
                warnings.simplefilter("ignore", UserWarning)
                data = torch.from_numpy(tensor.data.view(np.uint8).reshape(rows, -1))
            self.tensors[tensor.name] = BlockTensor(tensor.name, int(tensor.tensor_type), rows, columns, data)
        self._map = getattr(reader.data.base, "_mmap", None) or getattr(reader.data, "_mmap", None)
        self._offsets = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
        self.architecture = str(self.metadata.get("general.architecture", ""))
        self.file_bytes = size

    def get(self, key: str, default=None):
        """Metadata value under `{architecture}.{key}` (or `key` itself when it has a dot prefix of its own)."""
        return self.metadata.get(f"{self.architecture}.{key}", self.metadata.get(key, default))

    def require(self, key: str):
        """As `get`, but GGUFError naming the key when it is missing."""
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path}: metadata key {self.architecture}.{key} is missing")
        return value

    def tensor(self, name: str, shape: tuple[int, int] | tuple[int] | None = None) -> BlockTensor:
        """The tensor `name`; GGUFError when it is missing or its shape (rows, columns) differs from `shape`."""
        found = self.tensors.get(name)
        if found is None:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing")
        if shape is not None:
            actual = (found.rows, found.columns) if len(shape) == 2 else (found.columns,)
            if tuple(actual) != tuple(shape):
                raise GGUFError(
                    f"{self.path}: tensor {name!r} has shape {list(actual)} (rows, inputs), but the metadata "
                    f"says {list(shape)}"
                )
        return found

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each ggml type the file holds, e.g. {"Q4_K": 97, "Q6_K": 16, "F32": 33}."""
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))

    def release(self, name: str) -> None:
        """Drop tensor `name`'s pages from this process's resident memory (madvise MADV_DONTNEED on its whole
        pages): for a tensor copied into another layout, whose file bytes are not read again. The file stays
        mapped; a later read would fault the pages back in from the page cache."""
        if self._map is None or name not in self._offsets or not hasattr(mmap, "MADV_DONTNEED"):
            return
        offset, size = self._offsets[name]
        page = mmap.PAGESIZE
        start, stop = -(-offset // page) * page, (offset + size) // page * page
        if stop > start:
            with contextlib.suppress(OSError, ValueError):
                self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def vector(self, name: str, length: int) -> torch.Tensor:
        """A small tensor (norm weights, biases, RoPE factors) as an fp32 copy [length]."""
        tensor = self.tensor(name, (length,))
        return tensor.dequantize().reshape(length).clone()
