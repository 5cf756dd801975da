"""Memory probes: what the process and the KV cache hold right now."""

from __future__ import annotations

import ctypes
import gc
import resource
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:  # no torch import at run time: llama.cpp's measuring child uses these probes without torch
    import torch

_PROCESS = psutil.Process()
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not Linux/glibc
    _LIBC = None


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return _PROCESS.memory_info().rss


def peak_rss_bytes() -> int:
    """Highest resident memory this process has had since it started its program: VmHWM where /proc has it
    (ru_maxrss keeps a parent's peak across fork and exec, so a measuring child would report its parent's),
    else ru_maxrss (Linux and BSD report kilobytes)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> None:
    """Hand memory the process has freed back to the system now (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed heap pages for reuse, so after a long prefill (activations of a chunk, tens of MB) or after
    dropping full-precision weights, RSS would stay at the high-water mark although nothing uses those pages."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def freeze_startup_objects() -> None:
    """Put every object alive now (the libraries' and the loaded model's) out of the cyclic garbage collector's
    reach (`gc.freeze`, after one last collection). Python's full collections otherwise walk the ~400,000 objects
    that importing torch and transformers creates, 90-170 ms each, and a chat process met them at random, mid-turn:
    a 170 ms stall in a served stream's time to first token, measured in `serve`. Objects made later are collected
    as before."""
    gc.collect()
    gc.freeze()


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cache_bytes(cache: object) -> int:
    """Bytes held by any transformers cache's key/value tensors (ours reports its own extra buffers)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(tensor_bytes(layer.keys, layer.values) for layer in getattr(cache, "layers", []))
