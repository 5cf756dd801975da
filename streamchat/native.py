"""streamchat's native CPU kernels (kernels.c): built once per machine with the system C compiler, loaded with ctypes.

The decode step of a 135M model on a CPU is bound by reading ~70 MB of 4-bit weights a token. torch's weight-only
int4 kernel widens every weight to a float before multiplying, which AVX2 CPUs (no bf16 arithmetic) pay for:
it streams about 4 GB/s there (../shared/notes/avx2-decode-profile.md). kernels.c multiplies 4-bit weights with
8-bit activations as integers (llama.cpp's Q4_1 x Q8_1 dot product), in two builds: AVX2 (vpmaddubsw) and AVX-512
VNNI (vpdpbusd). The build that runs is the one torch's own CPU capability names
(`torch.backends.cpu.get_cpu_capability()`, which honours ATEN_CPU_CAPABILITY), so a process forced to AVX2 uses
the AVX2 build.

The shared library is cached under the converted-models folder (`kernels/<isa>-<digest of source and flags>.so`),
compiled in about a second when missing; where there is no compiler, no x86 CPU or the build fails, `library()`
returns None and `unavailable_reason()` says why, and the fast path keeps torch's kernels.
$STREAMCHAT_KERNELS_LIB=path loads a library built elsewhere instead (no build, no cache): .ci/sanitize runs the
kernel tests on a build with AddressSanitizer and UndefinedBehaviorSanitizer that way.
Threads: the kernels run on a small thread pool of their own (kernels.c), as many threads as
`torch.get_num_threads()` says in the calling thread (`use_threads`), whichever thread calls: the server's scheduler
is not the main thread, and libgomp throttles a team started from another thread when it manages more threads than
there are cores, which made each decode step there ~3x slower on 2 cores.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from streamchat.paths import cache_root

SOURCE = Path(__file__).with_name("kernels.c")
INCLUDED = (Path(__file__).with_name("kernels_ggml.c"),)  # sources kernels.c includes (one translation unit)
DISABLE_ENV = "STREAMCHAT_NATIVE"  # "0" turns the native kernels off (torch's kernels then)
# A prebuilt kernels library to load instead of building one (.ci/sanitize: a build with the sanitizers); it must be
# an AVX2 build, or an AVX-512 VNNI one (-DSC_VNNI) where this process runs the VNNI kernels (see `isa`).
LIBRARY_ENV = "STREAMCHAT_KERNELS_LIB"
BLOCK = 32  # inputs per Q4_1 / Q8 block
ROWS = 8  # output rows interleaved per 4-bit (and 8-bit) block group
GROUP_BYTES = 160  # one block group: 8 fp16 steps, 8 fp16 minimums, 128 bytes of nibbles
Q8_GROUP_BYTES = 256  # one 8-bit block group: 8 rows x 32 inputs
# -ffp-contract=off: scalar a*b + c*d stays two roundings, as torch computes it (RoPE in compaction is bit-exact)
FLAGS = {
    "avx2": ["-ffp-contract=off", "-mavx2", "-mfma", "-mf16c"],
    "avx512vnni": [
        "-ffp-contract=off",
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512vnni",
        "-DSC_VNNI",
    ],
}

ATTENTION_DTYPES = (torch.float32, torch.float16)  # K/V dtypes sc_attention reads
# kernels.c's entry points that Python calls, and their arguments, a letter each (ARGUMENT_TYPES); each returns an
# int status (0: done), but those in RETURNS_NOTHING
ARGUMENT_TYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_long, "f": ctypes.c_float}
SIGNATURES = {
    "sc_q4_matmul": "piipipp",
    "sc_q8_matmul": "piippip",
    "sc_attention": "pppiliiiifp",
    "sc_decode": "iipiiiiiffpppppppippiippp",
    "sc_compact_layers": "piiiiiiiipp",
    "sc_greedy": "piipifp",
    "sc_sample": "piipiffifpp",
    "sc_ggml_matmul": "ipiipipi",
    "sc_ggml_dequantize": "iplp",
    "sc_ggml_repack": "ipiip",
    "sc_linear_matmul": "piipipp",
    "sc_set_threads": "i",
    "sc_read_bandwidth": "plp",
}
RETURNS_NOTHING = {"sc_set_threads"}
_LOCK = threading.Lock()
_LIBRARY: ctypes.CDLL | None = None
_REASON: str | None = None
_LOADED = False
_ISA: str | None = None  # the build loaded (avx2 where the AVX-512 one did not build)
_TURNED_OFF = False  # torch_kernels(): native kernels refused for new linears (tests, and speed's comparison rows)


def isa() -> str | None:
    """The build this process should run: "avx512vnni", "avx2", or None (no x86 AVX2, or native kernels off)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        return None
    if capability.startswith("AVX512") and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        return "avx512vnni"
    return "avx2" if capability in ("AVX2",) or capability.startswith("AVX512") else None


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo, read once per process)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _build(target: str, destination: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as folder:
        built = Path(folder) / destination.name
        command = [
            compiler,
            "-O3",
            "-shared",
            "-fPIC",
            "-pthread",
            "-std=c11",
            *FLAGS[target],
            str(SOURCE),
            "-o",
            str(built),
            "-lm",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-400:]}")
        os.replace(built, destination)  # atomic: concurrent starts never load a half-written library


def _built(target: str) -> Path:
    """The shared library for `target`, compiled now if this source and these flags have not been before. Cached
    under the model cache (older builds of the same target are removed); where that is not writable, in a
    temporary folder for this process."""
    sources = SOURCE.read_bytes() + b"".join(path.read_bytes() for path in INCLUDED)
    digest = hashlib.sha256(sources + " ".join(FLAGS[target]).encode()).hexdigest()[:16]
    folder = cache_root() / "kernels"
    path = folder / f"{target}-{digest}.so"
    if path.exists():
        return path
    try:
        _build(target, path)
    except OSError:  # the cache folder is not writable
        path = Path(tempfile.mkdtemp(prefix="streamchat-kernels-")) / path.name
        _build(target, path)
        return path
    for stale in folder.glob(f"{target}-*.so"):  # a process that loaded one keeps its mapping
        if stale != path:
            stale.unlink(missing_ok=True)
    return path


def _load_prebuilt(path: str, target: str) -> tuple[ctypes.CDLL | None, str, str | None]:
    """The library at `path` ($STREAMCHAT_KERNELS_LIB), its build ("avx512vnni" or "avx2", as its sc_vnni() says),
    and None; or None, `target` and why it cannot be used here."""
    try:
        lib = ctypes.CDLL(str(Path(path).resolve()))
    except OSError as error:
        return None, target, str(error)
    build = "avx512vnni" if lib.sc_vnni() else "avx2"
    if build == "avx512vnni" and target != "avx512vnni":
        return None, target, f"an AVX-512 VNNI build, but this process runs {target}"
    return lib, build, None


def library() -> ctypes.CDLL | None:
    """The loaded kernels for this CPU, built first if needed; None where unavailable (see `unavailable_reason`)."""
    global _LIBRARY, _REASON, _LOADED, _ISA
    if _TURNED_OFF:
        return None
    with _LOCK:
        if _LOADED:
            return _LIBRARY
        _LOADED = True
        target = isa()
        if target is None:
            _REASON = (
                "turned off (STREAMCHAT_NATIVE=0)"
                if os.environ.get(DISABLE_ENV) == "0"
                else f"needs an x86 CPU with AVX2/FMA/F16C (this one: {platform.machine()}, "
                f"{torch.backends.cpu.get_cpu_capability()})"
            )
            return None
        lib, errors = None, []
        prebuilt = os.environ.get(LIBRARY_ENV)
        if prebuilt:
            lib, target, error = _load_prebuilt(prebuilt, target)
            errors.append(error or "")
        builds = [target] + (["avx2"] if target != "avx2" else [])  # an older compiler may lack AVX-512 VNNI
        for build in [] if prebuilt else builds:
            try:
                lib = ctypes.CDLL(str(_built(build)))
                target = build
                break
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                errors.append(f"{build}: {error}")
        if lib is None:
            _REASON = f"could not build the native kernels ({'; '.join(errors)})"
            if prebuilt:
                _REASON = f"could not load {LIBRARY_ENV}={prebuilt} ({'; '.join(errors)})"
            print(f"streamchat: {_REASON}; using torch's kernels", file=sys.stderr)
            return None
        _ISA = target
        for name, arguments in SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes = [ARGUMENT_TYPES[code] for code in arguments]
            function.restype = None if name in RETURNS_NOTHING else ctypes.c_int
        sizes = (lib.sc_layer_bytes(), lib.sc_cache_layer_bytes(), lib.sc_linear_bytes())
        if sizes != (ctypes.sizeof(Layer), ctypes.sizeof(CacheLayer), ctypes.sizeof(Linear)):
            _REASON = "the compiled decode-step structures do not match"
            return None
        if (lib.sc_block_q4x8_bytes(), lib.sc_block_q8x8_bytes()) != (GROUP_BYTES, Q8_GROUP_BYTES):
            _REASON = "the compiled block layouts do not match"
            return None
        _LIBRARY = lib
        return lib


def active() -> str | None:
    """The build in use ("avx2", "avx512vnni"), or None where the kernels are unavailable."""
    return _ISA if library() is not None else None


def _compactable(layer) -> bool:
    """Whether sc_compact_layers takes this `BoundedLayer`: batch 1, fp32/fp16 CPU buffers, contiguous, an fp32 RoPE table."""
    buffers = (layer.keys, layer.raw_keys, layer.values, layer.origins)
    return (
        layer.keys.shape[0] == 1
        and layer.keys.dtype in ATTENTION_DTYPES
        and all(t.device.type == "cpu" and t.is_contiguous() for t in buffers)
        and layer.values.shape == layer.keys.shape
        and layer.rope.cos.dtype == torch.float32
        and layer.rope.cos.is_contiguous()
        and layer.rope.sin.is_contiguous()
    )


def compact_layers(layers: list, src: int, dst: int, count: int) -> bool:
    """`compact` for every layer of a cache at once (the same run in each, as sink_window keeps), one call of
    kernels.c `sc_compact_layers` with a task per layer and kv head over the pool. Returns False, having done
    nothing, where the kernel does not apply to every layer (the layers differ in shape, dtype or RoPE table)."""
    lib = library()
    if lib is None or not layers or not all(_compactable(layer) for layer in layers):
        return False
    first = layers[0]
    if any(
        layer.keys.shape != first.keys.shape or layer.keys.dtype != first.keys.dtype or layer.rope is not first.rope
        for layer in layers
    ):
        return False
    _, heads, capacity, dim = first.keys.shape
    use_threads()
    status = lib.sc_compact_layers(
        cache_layers(layers),
        len(layers),
        int(first.keys.dtype == torch.float16),
        heads,
        capacity,
        dim,
        src,
        dst,
        count,
        first.rope.cos.data_ptr(),
        first.rope.sin.data_ptr(),
    )
    return status == 0


def compact(layer, src: int, dst: int, count: int) -> bool:
    """Move places src..src+count-1 of a `BoundedLayer` (batch 1, fp32/fp16 buffers on the CPU) to dst.. (down, as an
    eviction compacts, or up; the runs may overlap), keys re-rotated at their new places (`compact_layers` for one
    layer). Returns False, having done nothing, where the kernel does not apply (no kernels, another layout or
    dtype); the caller then compacts with torch."""
    return compact_layers([layer], src, dst, count)


Q4X8, Q8X8 = 100, 101  # kernels.c's own layouts (pack_q4, pack_q8) beside ggml's type numbers (ggml_blocks.py)


class Part(ctypes.Structure):
    """kernels.c's `sc_part`: one row-part of a linear (a GGUF tensor of a ggml type, or a packed matrix)."""

    _fields_ = [("data", ctypes.c_void_p), ("extra", ctypes.c_void_p), ("type", ctypes.c_int), ("rows", ctypes.c_int)]


class Linear(ctypes.Structure):
    """kernels.c's `sc_linear`: up to 3 parts side by side in the output (q, k, v; gate, up)."""

    _fields_ = [("parts", Part * 3), ("count", ctypes.c_int)]


def linear(parts: list[tuple[int, int, int, int | None]]) -> Linear:
    """A `Linear` of (type, rows, data address, extra address or None) parts."""
    structure = Linear()
    structure.count = len(parts)
    for slot, (kind, rows, data, extra) in zip(structure.parts, parts):
        slot.type, slot.rows, slot.data, slot.extra = kind, rows, data, extra
    return structure


class Layer(ctypes.Structure):
    """kernels.c's `sc_layer`: one decoder layer's linears, biases and norms (addresses)."""

    _fields_ = [(name, Linear) for name in ("qkv", "out", "gate_up", "down")] + [
        (name, ctypes.c_void_p) for name in ("qkv_bias", "input_norm", "post_norm", "q_norm", "k_norm")
    ]


class CacheLayer(ctypes.Structure):
    """kernels.c's `sc_cache_layer`: one layer's cache buffers of one sequence (addresses)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("keys", "raw_keys", "values", "origins")]


def cache_layers(layers: list) -> ctypes.Array:
    """`BoundedLayer`s' buffers (contiguous, on the CPU: the caller checks) as an array of `CacheLayer`."""
    array = (CacheLayer * len(layers))()
    for structure, layer in zip(array, layers):
        structure.keys, structure.raw_keys = layer.keys.data_ptr(), layer.raw_keys.data_ptr()
        structure.values, structure.origins = layer.values.data_ptr(), layer.origins.data_ptr()
    return array


def unavailable_reason() -> str | None:
    """Why `library()` is None, or None when the kernels are loaded."""
    if _TURNED_OFF:
        return "turned off in this process (torch_kernels)"
    library()
    return _REASON


@contextlib.contextmanager
def torch_kernels():
    """Within this block, linears packed anew use torch's kernels (linears packed before keep theirs)."""
    global _TURNED_OFF
    previous, _TURNED_OFF = _TURNED_OFF, True
    try:
        yield
    finally:
        _TURNED_OFF = previous


def pack_q4(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (N a multiple of 8, K of 32) -> 4-bit blocks as uint8 [N / 8, K / 32 * 160].

    Per row and 32 inputs (Q4_1): fp16 step d = (max - min) / 15, fp16 minimum m, q = round((w - m) / d) in 0..15,
    so w ~ q d + m; a Q4_1 GGUF's weights (dequantized) come back as the GGUF's own blocks. Stored 8 rows
    interleaved per block (kernels.c, `block_q4x8`): 8 steps, 8 minimums, then 4 chunks of 32 bytes whose byte
    4r + i holds row r's element 4j + i (low nibble) and 4(j + 4) + i (high nibble).
    Raises ValueError for other sizes."""
    rows, columns = weight.shape
    if columns % BLOCK or rows % ROWS:
        raise ValueError(f"4-bit blocks need {ROWS}-row groups and {BLOCK}-input blocks, got {rows} x {columns}")
    blocks = weight.detach().float().reshape(rows, columns // BLOCK, BLOCK)
    low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
    step = ((high - low) / 15).to(torch.float16)
    minimum = low.to(torch.float16)
    inverse = torch.where(step.float() > 0, 1.0 / step.float(), torch.zeros_like(low))
    q = torch.round((blocks - minimum.float()[..., None]) * inverse[..., None]).clamp(0, 15).to(torch.uint8)
    groups, nb = rows // ROWS, columns // BLOCK
    # [G, r, b, g, i] -> [G, b, g, r, i]: for block b and 4-input group g, the 8 rows' 4 bytes side by side
    q = q.reshape(groups, ROWS, nb, 8, 4).permute(0, 2, 3, 1, 4).reshape(groups, nb, 8, 32)
    nibbles = q[:, :, :4] | (q[:, :, 4:] << 4)  # [G, b, 4, 32]
    header = torch.stack([step, minimum], dim=-1).reshape(groups, ROWS, nb, 2).permute(0, 2, 3, 1)  # [G, b, 2, 8]
    header = header.contiguous().view(torch.uint8).reshape(groups, nb, 32)
    return torch.cat([header, nibbles.reshape(groups, nb, 128)], dim=-1).reshape(groups, -1).contiguous()


def unpack_q4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """The fp32 weight [N, K] that `pack_q4`'s blocks stand for (tests, and reading packed weights back)."""
    groups, nb = packed.shape[0], columns // BLOCK
    blocks = packed.reshape(groups, nb, GROUP_BYTES)
    header = blocks[..., :32].contiguous().view(torch.float16).float().reshape(groups, nb, 2, ROWS)
    nibbles = blocks[..., 32:].reshape(groups, nb, 4, 32)
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=2).float()  # [G, b, g, 32 = r * 4 + i]
    q = q.reshape(groups, nb, 8, ROWS, 4).permute(0, 3, 1, 2, 4).reshape(groups, ROWS, nb, BLOCK)
    step, minimum = header[:, :, 0].permute(0, 2, 1), header[:, :, 1].permute(0, 2, 1)  # [G, r, b]
    return (q * step[..., None] + minimum[..., None]).reshape(groups * ROWS, columns)


_PINNED = threading.local()  # .threads: this thread's kernels' count, set by pin_threads


def kernel_threads() -> int:
    """Threads the kernels called from this thread use: `pin_threads`' count, else torch's own here."""
    return getattr(_PINNED, "threads", None) or torch.get_num_threads()


def pinned_threads() -> int | None:
    """This thread's `pin_threads` count, or None where it follows torch's."""
    return getattr(_PINNED, "threads", None)


def use_threads() -> None:
    """The kernels called from this thread use `kernel_threads()` threads (this one included) from now on."""
    _LIBRARY.sc_set_threads(kernel_threads())


def pin_threads(threads: int | None) -> None:
    """The kernels called from this thread use `threads` threads whatever torch's own count here (None: follow
    torch's again). The server's scheduler thread pins the engine's count and runs torch's small ops on one thread:
    an OpenMP team started from any thread but the process's first is throttled (kernels.c's pool note)."""
    _PINNED.threads = threads


def q4_matmul(
    x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] fp32 contiguous -> [M, N] fp32 through `pack_q4`'s blocks. Raises RuntimeError on bad sizes."""
    use_threads()
    rows, columns = x.shape
    out = torch.empty(rows, out_features)
    status = _LIBRARY.sc_q4_matmul(
        x.data_ptr(),
        rows,
        columns,
        packed.data_ptr(),
        out_features,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
    )
    if status:
        raise RuntimeError(f"sc_q4_matmul failed for x {tuple(x.shape)}, {out_features} outputs")
    return out


def pack_q8(weight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit rows weight [N, K] int8 (K a multiple of 32) and their scales [N] -> the kernel's layout: int8
    [ceil(N / 8), K / 32, 256] and fp32 scales [ceil(N / 8) * 8] (zero rows and scales past N).

    8 rows interleaved per 32-input block (kernels.c, `block_q8x8`): for row group G and block b, 8 chunks of 32
    bytes whose byte 4r + i is row 8G + r's element 32b + 4j + i (chunk j). Raises ValueError for other sizes."""
    rows, columns = weight.shape
    if columns % BLOCK or weight.dtype != torch.int8:
        raise ValueError(f"8-bit blocks need int8 rows of {BLOCK}-input blocks, got {weight.dtype} {rows} x {columns}")
    groups = -(-rows // ROWS)
    padded = torch.zeros(groups * ROWS, columns, dtype=torch.int8)
    padded[:rows] = weight
    # [G, r, b, j, i] -> [G, b, j, r, i]
    packed = padded.view(groups, ROWS, columns // BLOCK, 8, 4).permute(0, 2, 3, 1, 4)
    padded_scales = torch.zeros(groups * ROWS)
    padded_scales[:rows] = scales.float()
    return packed.reshape(groups, columns // BLOCK, Q8_GROUP_BYTES).contiguous(), padded_scales


def _q8_by_row(packed: torch.Tensor) -> torch.Tensor:
    """`pack_q8`'s groups as a view [G, r, b, j, i] (no copy): row 8G + r is [G, r] read as b, j, i."""
    groups, blocks, _ = packed.shape
    return packed.view(groups, blocks, 8, ROWS, 4).permute(0, 3, 1, 2, 4)


def q8_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [...] of `pack_q8`'s matrix as int8 [..., K], gathered from the interleaved groups (the tied
    embedding reads the output projection's rows so: no second row-major copy)."""
    by_row = _q8_by_row(packed)
    flat = ids.reshape(-1)
    rows = by_row[flat // ROWS, flat % ROWS]  # [n, b, j, i]
    return rows.reshape(*ids.shape, packed.shape[1] * BLOCK)


def unpack_q8(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The int8 matrix [rows, K] that `pack_q8`'s groups hold (tests, and reading packed weights back)."""
    groups, blocks, _ = packed.shape
    return _q8_by_row(packed).reshape(groups * ROWS, blocks * BLOCK)[:rows]


def q8_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] fp32 contiguous, `pack_q8`'s weight and scales -> [M, out_features] fp32."""
    rows, columns = x.shape
    if (
        packed.dim() != 3
        or packed.shape[1] * BLOCK != columns
        or scales.numel() != packed.shape[0] * ROWS
        or not scales.numel() - ROWS < out_features <= scales.numel()
    ):
        raise ValueError(f"q8_matmul: x {tuple(x.shape)} against groups {tuple(packed.shape)}, {scales.numel()} scales")
    use_threads()
    out = torch.empty(rows, out_features)
    status = _LIBRARY.sc_q8_matmul(
        x.data_ptr(), rows, columns, packed.data_ptr(), scales.data_ptr(), out_features, out.data_ptr()
    )
    if status:
        raise RuntimeError(f"sc_q8_matmul failed for x {tuple(x.shape)}")
    return out


def attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scale: float) -> torch.Tensor:
    """Decode attention of one sequence: query [heads, D] fp32; keys/values [1, kv_heads, capacity, D] fp32 or
    fp16 (a `BoundedLayer`'s buffers, places 0..length-1 used) -> [heads, D] fp32."""
    heads, dim = query.shape
    kv_heads = keys.shape[1]
    if keys.stride()[2:] != (dim, 1) or values.stride() != keys.stride() or values.dtype != keys.dtype:
        raise ValueError(
            f"attention needs [1, kv_heads, capacity, {dim}] buffers laid out alike, got keys "
            f"{tuple(keys.shape)} strides {keys.stride()} and values strides {values.stride()}"
        )
    use_threads()
    query = query.contiguous()
    out = torch.empty(heads, dim)
    half = keys.dtype == torch.float16
    status = _LIBRARY.sc_attention(
        query.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        int(half),
        keys.stride(1),
        length,
        heads,
        kv_heads,
        dim,
        scale,
        out.data_ptr(),
    )
    if status:
        raise RuntimeError(f"sc_attention failed for query {tuple(query.shape)}, keys {tuple(keys.shape)}")
    return out


def greedy(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> list[int]:
    """The greedy next token of each row of fp32 logits [B, V], after the repetition penalty over history int64
    [B, W] (ids >= V are padding): transformers' RepetitionPenaltyLogitsProcessor then torch.argmax, the same
    choice, in one pass per row (torch's argmax alone takes 50 us a row here). `logits` are changed in place.
    Raises RuntimeError where the kernels are unavailable."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
    if logits.dtype != torch.float32 or not logits.is_contiguous() or history.dtype != torch.int64:
        raise ValueError("greedy needs contiguous fp32 logits and int64 history")
    history = history.contiguous()
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64)
    if lib.sc_greedy(logits.data_ptr(), batch, vocab, history.data_ptr(), history.shape[1], penalty, out.data_ptr()):
        raise RuntimeError("out of memory in greedy sampling")
    return out.tolist()


MAX_TOP_K = 1024  # kernels.c's: the most candidates `sample` keeps
NOT_FINITE, NO_MEMORY = -2, -3  # kernels.c's SC_NOT_FINITE, SC_NO_MEMORY


def can_sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> bool:
    """Whether `sample` takes these settings (temperature > 0, 1 <= top_k <= MAX_TOP_K, 0 < top_p <= 1) and logits
    (contiguous fp32 [B, V] on the CPU) where the kernels are built; else the caller samples with torch."""
    return (
        ctypes.c_float(temperature).value > 0
        and 1 <= top_k <= MAX_TOP_K
        and 0 < top_p <= 1
        and logits.dtype == torch.float32
        and logits.device.type == "cpu"
        and logits.is_contiguous()
        and library() is not None
    )


def sample(
    logits: torch.Tensor,
    history: torch.Tensor,
    penalty: float,
    temperature: float,
    top_k: int,
    top_p: float,
    uniform: torch.Tensor,
) -> list[int]:
    """The next token of each row of fp32 logits [B, V] (changed in place), with what transformers' processors
    compute (`ChatSession._logits_processors`: repetition penalty over history int64 [B, W], ids >= V padding;
    temperature) then top-k and top-p (Holtzman et al. 2020), the kept candidates' probabilities inverted at uniform
    fp32 [B] in [0, 1) (from the session's generator: seeded replies repeat, on this path; torch's path draws with
    torch.multinomial, so the same seed gives other replies there). One native pass per row: torch's ops took 0.3
    ms a row alone and 0.8 ms on the server's scheduler thread, with the GIL. Raises ValueError where `can_sample`
    says no or a row's largest logit is not finite (torch's multinomial refuses those too)."""
    if not can_sample(logits, temperature, top_k, top_p) or history.dtype != torch.int64:
        raise ValueError(
            "sample needs contiguous fp32 CPU logits, int64 history, temperature > 0, "
            f"1 <= top_k <= {MAX_TOP_K}, 0 < top_p <= 1 and the native kernels"
        )
    history, uniform = history.contiguous(), uniform.to(torch.float32).contiguous()
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64)
    status = library().sc_sample(
        logits.data_ptr(),
        batch,
        vocab,
        history.data_ptr(),
        history.shape[1],
        penalty,
        temperature,
        top_k,
        top_p,
        uniform.data_ptr(),
        out.data_ptr(),
    )
    if status == NOT_FINITE:
        raise ValueError("cannot sample: the logits are infinite or NaN")
    if status:
        raise RuntimeError("out of memory in sampling" if status == NO_MEMORY else "sc_sample refused its arguments")
    return out.tolist()


def ggml_matmul(
    kind: int, x: torch.Tensor, weight: torch.Tensor, rows: int, out: torch.Tensor | None = None, column: int = 0
) -> torch.Tensor:
    """x [M, K] fp32 contiguous times a GGUF tensor (`rows` rows of K weights of ggml type `kind`, its blocks as
    uint8 bytes) transposed: [M, rows] fp32, or written into columns column..column+rows of `out` [M, N]. Raises
    RuntimeError where the kernels do not take the type or sizes."""
    M, K = x.shape
    if out is None:
        out, column = torch.empty(M, rows), 0
    _ggml_call(
        "sc_ggml_matmul",
        lambda: f"type {kind}, x {tuple(x.shape)}, {rows} rows",
        kind,
        x.data_ptr(),
        M,
        K,
        weight.data_ptr(),
        rows,
        out.data_ptr() + 4 * column,
        out.shape[1],
    )
    return out


def ggml_dequantize(kind: int, data: torch.Tensor, count: int) -> torch.Tensor:
    """`count` weights of ggml type `kind` from their blocks (uint8 bytes) -> fp32 [count]. Raises RuntimeError
    where the kernels do not take the type, or count is not whole blocks."""
    out = torch.empty(count)
    _ggml_call(
        "sc_ggml_dequantize", lambda: f"type {kind} for {count} weights", kind, data.data_ptr(), count, out.data_ptr()
    )
    return out


def ggml_repack(kind: int, data: torch.Tensor, rows: int, blocks: int, out: torch.Tensor) -> None:
    """A Q4_K/Q6_K tensor's rows (uint8 [rows, row bytes], contiguous) re-laid 8 rows at a time into `out`
    (kernels_ggml.c's block_q4_Kx8 / block_q6_Kx8). RuntimeError for another type or row count."""
    _ggml_call(
        "sc_ggml_repack", lambda: f"type {kind} with {rows} rows", kind, data.data_ptr(), rows, blocks, out.data_ptr()
    )


def _ggml_call(function: str, refused: Callable[[], str], *arguments) -> None:
    """kernels_ggml.c's `function`(*arguments) on this thread's kernel threads (`use_threads`). RuntimeError where
    the kernels are unavailable, or where it refuses its arguments (a nonzero status): "`function` refused
    `refused()`"."""
    if library() is None:
        raise RuntimeError(f"the native kernels are unavailable: {unavailable_reason()}")
    use_threads()
    if getattr(_LIBRARY, function)(*arguments):
        raise RuntimeError(f"{function} refused {refused()}")


def read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float | None:
    """This machine's streaming read on this thread's kernel threads (`use_threads`), in GB/s (1e9 bytes): the best
    of `repeats` passes over a `megabytes` buffer (much larger than the caches), read as the decode step reads its
    weights (kernels.c's sc_read_bandwidth). None without the native kernels. The yardstick for a decode step's
    reads (weights + K/V bytes per token x tokens/s), which memory bandwidth bounds at real model sizes."""
    if library() is None:
        return None
    buffer = torch.ones(megabytes * 2**20, dtype=torch.uint8)  # touched: its pages are resident before timing
    total, times = ctypes.c_uint64(), []
    use_threads()
    for _ in range(repeats + 1):  # the first pass warms the threads and the TLB
        started = time.perf_counter()
        if _LIBRARY.sc_read_bandwidth(buffer.data_ptr(), buffer.numel(), ctypes.byref(total)):
            raise RuntimeError(f"sc_read_bandwidth refused {buffer.numel()} bytes")
        times.append(time.perf_counter() - started)
    return buffer.numel() / min(times[1:]) / 1e9


if __name__ == "__main__":  # `python -m streamchat.native` (setup.sh runs it): build now, say which kernels run
    if library() is not None:
        print(f"streamchat: native CPU kernels ready ({active()}, {torch.backends.cpu.get_cpu_capability()} CPU)")
    else:
        print(
            f"streamchat: native CPU kernels unavailable ({unavailable_reason()}); decoding uses torch's kernels "
            "(install a C compiler, e.g. `apt-get install gcc`, for 2-3x faster decode)"
        )
