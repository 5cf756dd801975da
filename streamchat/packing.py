"""One resident copy of the weights: the model's linears swapped for packed int4/int8 ones, cached on disk.

Decode reads packed weights (streamchat/quant.py); before this, prefill ran the transformers forward on the fp32
`nn.Linear`s, so both copies stayed in memory (540 MB of fp32 beside 80 MB packed). `install` replaces every
decoder-layer linear with a module over the packed tensors that the fast decode step reads (q/k/v and gate/up
run as one fused matmul, whose parts are row views where the layout allows, else slices of its output: no second
copy), the output projection with the int8 one and the tied embedding with a `QuantEmbedding` over the same int8
rows. The kernels (streamchat/native.py's, else torch's weight-only ones) take any number of rows, so prefill
runs batched on them (gpt-fast's int4 `WeightOnlyInt4Linear` does the same on GPU).

Packing takes seconds and reads all 540 MB of fp32 weights, so the packed tensors are cached beside the converted
model (`packed-<mode>-<kernel family>.safetensors` + `.json`), keyed by the source weights' digest, the mode, the
kernel family (streamchat/native.py's layout, or torch's), and for torch's kernels the torch version and the CPU
capability (its int4 packing layout depends on both), and checked by size and digest at every load like the
conversion: missing, stale or corrupt means packed again and rewritten.

CPU only, fp32 models of the layouts the fast path supports (Llama, Mistral, Qwen2); elsewhere the model keeps its
own weights (`packable_reason` says why).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from streamchat import native
from streamchat.memory import release_free_memory
from streamchat.quant import (
    LINEAR_MODES,
    PackedLinear,
    QuantEmbedding,
    QuantLinear,
    fuse,
    native_kernel,
    resolve_weights,
)

PACKED_ATTR = (
    "streamchat_packed"  # on the model (PackedWeights) and each decoder layer (PackedLayer); decoder.py reads it
)
PACKED_MODES = tuple(m for m in ("int8", "int4", "int8_dynamic") if m in LINEAR_MODES)  # what this torch/quant has
DYNAMIC = "int8_dynamic"  # fbgemm's packed-weight object, not a tensor: stored as its int8 weight and row scales
FORMAT = 3  # bump when what is stored changes (3: native int8 rows in 8-row groups)


@dataclass
class PackedLayer:
    """One decoder layer's packed linears, fused as the decode step reads them: qkv [q+k+v rows], gate_up."""

    qkv: PackedLinear
    out: PackedLinear
    gate_up: PackedLinear
    down: PackedLinear


@dataclass
class PackedWeights:
    """Every packed tensor of a model: decoder-layer linears in `mode`, the output projection in int8 (the GGUF's
    Q8_0), the embedding as int8 rows (the output projection's own when tied)."""

    mode: str
    layers: list[PackedLayer]
    lm_head: PackedLinear
    embedding: tuple[torch.Tensor, torch.Tensor] | None  # (int8 rows, scales) when not tied to lm_head

    def state(self) -> dict[str, torch.Tensor]:
        tensors = self.lm_head.state("lm_head")
        for i, layer in enumerate(self.layers):
            for name in ("qkv", "out", "gate_up", "down"):
                tensors.update(_linear_state(getattr(layer, name), f"layers.{i}.{name}"))
        if self.embedding is not None:
            tensors["embedding.weight"], tensors["embedding.scales"] = self.embedding
        return {name: tensor.contiguous() for name, tensor in tensors.items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], mode: str, model: torch.nn.Module) -> PackedWeights:
        """Back from `state()`; KeyError/ValueError when the tensors do not fit this model."""
        config = model.config

        def linear(prefix: str, linear_mode: str, out_features: int) -> PackedLinear:
            weight = tensors[f"{prefix}.weight"]
            kernel = native_kernel(linear_mode, (out_features, config.hidden_size), weight.device)
            grouped = kernel == "native"  # stored in groups of 8 rows (int8: the last one padded)
            if weight.shape[0] != (-(-out_features // native.ROWS) if grouped else out_features):
                raise ValueError(f"{prefix}: {weight.shape[0]} rows, expected {out_features}")
            if linear_mode == DYNAMIC:
                return _dynamic_from_state(weight, tensors[f"{prefix}.scales"], tensors.get(f"{prefix}.bias"))
            return PackedLinear.from_packed(
                linear_mode,
                weight,
                tensors.get(f"{prefix}.scales"),
                tensors.get(f"{prefix}.bias"),
                out_features,
                kernel,
            )

        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
        layers = [
            PackedLayer(
                linear(f"layers.{i}.qkv", mode, qkv_rows),
                linear(f"layers.{i}.out", mode, config.hidden_size),
                linear(f"layers.{i}.gate_up", mode, 2 * config.intermediate_size),
                linear(f"layers.{i}.down", mode, config.hidden_size),
            )
            for i in range(config.num_hidden_layers)
        ]
        embedding = None
        if "embedding.weight" in tensors:
            embedding = (tensors["embedding.weight"], tensors["embedding.scales"])
        return cls(mode, layers, linear("lm_head", "int8", config.vocab_size), embedding)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())


def _linear_state(linear: PackedLinear, prefix: str) -> dict[str, torch.Tensor]:
    if linear.mode != DYNAMIC:
        return linear.state(prefix)
    quantized, bias = torch.ops.quantized.linear_unpack(linear.weight)
    tensors = {f"{prefix}.weight": quantized.int_repr(), f"{prefix}.scales": quantized.q_per_channel_scales().float()}
    if bias is not None:
        tensors[f"{prefix}.bias"] = bias
    return tensors


def _dynamic_from_state(weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    """An int8_dynamic linear re-packed for fbgemm from its stored int8 weight and row scales (exact: the same
    integers and scales; prepacking is a reordering, milliseconds)."""
    quantized = torch._make_per_channel_quantized_tensor(
        weight, scales.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0
    )
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        packed = torch.ops.quantized.linear_prepack(quantized, bias)
    finally:
        torch.backends.quantized.engine = previous
    linear = PackedLinear.__new__(PackedLinear)
    linear.mode, linear.weight, linear.scales, linear.bias, linear.kernel = DYNAMIC, packed, None, None, "torch"
    linear.input_dtype, linear.out_features = torch.float32, weight.shape[0]
    linear._nbytes = weight.numel() + 8 * weight.shape[0] + (0 if bias is None else 4 * bias.numel())
    return linear


def packable_reason(model: torch.nn.Module, weights: str) -> str | None:
    """Why this model keeps its own weights under decode weights `weights`, or None when it can be packed."""
    from streamchat.fastpath.decoder import unsupported_reason  # the layouts the packed layers are cut for

    if weights not in PACKED_MODES:
        return f"decode weights {weights!r} are not stored packed"
    if model.device.type != "cpu":
        return f"int8/int4 kernels are CPU kernels (the model is on {model.device})"
    if model.dtype != torch.float32:
        return f"the model is loaded in {model.dtype} (packing serves fp32 models)"
    return unsupported_reason(model)


def pack_weights(model: torch.nn.Module, mode: str) -> PackedWeights:
    """Quantize the model's fp32 linears into `mode` (and the output projection/embedding into int8)."""
    layers = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        layers.append(
            PackedLayer(
                fuse([p.weight for p in projections], [p.bias for p in projections], mode),
                PackedLinear(attention.o_proj.weight, attention.o_proj.bias, mode),
                fuse([mlp.gate_proj.weight, mlp.up_proj.weight], [None, None], mode),
                PackedLinear(mlp.down_proj.weight, None, mode),
            )
        )
    head = model.lm_head
    lm_head = PackedLinear(head.weight, getattr(head, "bias", None), "int8")
    embedding = None
    if model.model.embed_tokens.weight is not head.weight:
        embedding = PackedLinear(model.model.embed_tokens.weight, None, "int8")
        embedding = (embedding.weight, embedding.scales)
    return PackedWeights(mode, layers, lm_head, embedding)


class _FusedPart(torch.nn.Module):
    """Output columns start..stop of a fused linear, for a layout that cannot be cut into row views: q/k/v (or
    gate/up) read the same input, so the fused matmul runs once per input and each part takes its slice
    (per thread: sessions on other threads may share the model)."""

    def __init__(self, shared: _SharedOutput, start: int, stop: int, in_features: int):
        super().__init__()
        self.shared, self.start, self.stop = shared, start, stop
        self.in_features, self.out_features = in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x)[..., self.start : self.stop]


class _SharedOutput:
    def __init__(self, fused: PackedLinear, parts: int):
        self.fused, self.parts, self.local = fused, parts, threading.local()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        state = self.local
        if getattr(state, "left", 0) == 0 or state.input is not x:
            state.input, state.output, state.left = x, self.fused(x.to(self.fused.input_dtype)).to(x.dtype), self.parts
        state.left -= 1
        output = state.output
        if state.left == 0:
            state.input = state.output = None
        return output


def _parts(fused: PackedLinear, sizes: list[int], in_features: int) -> list[torch.nn.Module]:
    """Modules for the parts of a fused linear: int8 row views sharing its storage (free: rows and scales are
    both row-major); else slices of the fused output, one matmul per input (int4: its scales are laid out
    [in / 32, out, 2], so a row view needs a strided copy of them, a quarter of the weight bytes and seconds at
    start-up on a busy machine; prefill measured as fast either way)."""
    bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
    cuttable = fused.mode == "int8" or fused.kernel == "native"
    views = [fused.rows(start, stop) for start, stop in bounds] if cuttable else [None]
    if all(view is not None for view in views):
        return [QuantLinear(view, in_features) for view in views]
    shared = _SharedOutput(fused, len(sizes))
    return [_FusedPart(shared, start, stop, in_features) for start, stop in bounds]


def install(model: torch.nn.Module, packed: PackedWeights) -> None:
    """Swap the model's linears and embedding for modules over `packed`, and drop the full-precision ones.

    Afterwards the transformers forward (prefill) and the fast decode step (which finds `PackedLayer`s under
    `PACKED_ATTR`) read the same tensors. The remaining small parameters (norms) are copied out of the loaded
    file: transformers loads every tensor as a view of one memory-mapped safetensors file, and a single
    surviving view would keep every page of it that was ever read resident."""
    config = model.config
    hidden = config.hidden_size
    for layer, packed_layer in zip(model.model.layers, packed.layers):
        attention, mlp = layer.self_attn, layer.mlp
        names = ("q_proj", "k_proj", "v_proj")
        parts = _parts(packed_layer.qkv, [getattr(attention, n).out_features for n in names], hidden)
        for name, part in zip(names, parts):
            setattr(attention, name, part)
        attention.o_proj = QuantLinear(packed_layer.out, attention.o_proj.in_features)
        names = ("gate_proj", "up_proj")
        for name, part in zip(
            names, _parts(packed_layer.gate_up, [getattr(mlp, n).out_features for n in names], hidden)
        ):
            setattr(mlp, name, part)
        mlp.down_proj = QuantLinear(packed_layer.down, mlp.down_proj.in_features)
        setattr(layer, PACKED_ATTR, packed_layer)
    embed = model.model.embed_tokens
    rows, scales = packed.embedding or (packed.lm_head.weight, packed.lm_head.scales)
    model.model.embed_tokens = QuantEmbedding(
        rows, scales, model.dtype, getattr(embed, "padding_idx", None), embed.num_embeddings
    )
    model.lm_head = QuantLinear(packed.lm_head, hidden)
    setattr(model, PACKED_ATTR, packed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
        for module in model.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    setattr(module, name, buffer.clone())
    release_free_memory()


def packed_mode(model: torch.nn.Module) -> str | None:
    """The mode of the packed weights the model holds, or None when it holds its own."""
    packed = getattr(model, PACKED_ATTR, None)
    return packed.mode if packed is not None else None


# ----- disk cache -------------------------------------------------------------------------------------------------


def kernel_family() -> str:
    """The packed layout in use: "native" (the same for every build of streamchat/kernels.c) or "torch"."""
    return "native" if native.active() else "torch"


def cache_key(source_digest: str, mode: str) -> dict[str, str | int]:
    """What the packed tensors depend on: the source weights, the mode, the kernel family, and for torch's kernels
    torch's packing code and the CPU capability (its int4 layout depends on both)."""
    kernel = kernel_family()
    return {
        "format": FORMAT,
        "source": source_digest,
        "mode": mode,
        "torch": torch.__version__,
        "kernel": kernel,
        "capability": torch.backends.cpu.get_cpu_capability() if kernel == "torch" else "any",
    }


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_paths(folder: Path, mode: str, kernel: str | None = None) -> tuple[Path, Path]:
    """The packed weights and manifest for `mode` and kernel family ("native" or "torch"; default: the family in
    use now), each family in its own files, so switching between them (STREAMCHAT_NATIVE=0) repacks nothing."""
    kernel = kernel or kernel_family()
    stem = f"packed-{mode}-{kernel}"
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def read_cached(folder: Path, key: dict, model: torch.nn.Module) -> PackedWeights | None:
    """The cached packed weights when present, of this key, and intact (size and digest); else None."""
    weights, manifest = cache_paths(folder, str(key["mode"]), str(key["kernel"]))
    try:
        saved = json.loads(manifest.read_text())
        if saved.get("key") != key or weights.stat().st_size != saved["size"]:
            return None
        # Read into memory, not memory-mapped: a mapped file rewritten by another process would crash this one.
        data = weights.read_bytes()
        if hashlib.sha256(data).hexdigest() != saved["sha256"]:
            return None
        return PackedWeights.from_state(load(data), str(key["mode"]), model)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None


def write_cache(folder: Path, key: dict, packed: PackedWeights) -> None:
    """Write the packed weights and their manifest (each by a rename, so a reader never sees half a file)."""
    weights, manifest = cache_paths(folder, str(key["mode"]), str(key["kernel"]))
    folder.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".packing-", dir=folder)
    os.close(handle)
    try:
        save_file(packed.state(), staging)
        os.replace(staging, weights)
    finally:
        Path(staging).unlink(missing_ok=True)
    for legacy in (folder / f"packed-{key['mode']}.safetensors", folder / f"packed-{key['mode']}.json"):
        legacy.unlink(missing_ok=True)  # the single-family names of earlier versions: 95 MB nobody reads now
    record = {"key": key, "size": weights.stat().st_size, "sha256": _digest(weights)}
    handle, staging = tempfile.mkstemp(prefix=".packing-", dir=folder)
    with os.fdopen(handle, "w") as out:
        json.dump(record, out, indent=1)
    os.replace(staging, manifest)


@dataclass
class PackResult:
    mode: str | None  # None: the model keeps its own weights
    seconds: float
    from_cache: bool
    note: str  # one line for the start-up message


def pack_model(model: torch.nn.Module, weights: str, folder: Path | None, source_digest: str) -> PackResult:
    """Pack the model's weights for decode weights `weights` ("auto": int4 for 4-bit weights), read from or
    written to the cache in `folder` (None: no cache), and install them. Leaves the model as it was where it
    cannot be packed (the note says why)."""
    started = time.perf_counter()
    if weights == "auto":
        if model.device.type != "cpu" or packable_reason(model, "int4") is not None:
            return PackResult(None, 0.0, False, "full weights (auto: not a CPU fp32 model the fast path runs)")
        weights = resolve_weights(model.model.layers, weights)
    reason = packable_reason(model, weights)
    if reason is not None:
        return PackResult(None, 0.0, False, f"full weights ({reason})")
    key = cache_key(source_digest, weights)
    packed = read_cached(folder, key, model) if folder is not None else None
    from_cache = packed is not None
    if packed is None:
        packed = pack_weights(model, weights)
        if folder is not None:
            try:
                write_cache(folder, key, packed)
            except OSError as error:
                note = f"cannot cache the packed weights in {folder} ({error})"
                install(model, packed)
                return PackResult(weights, time.perf_counter() - started, False, note)
    install(model, packed)
    seconds = time.perf_counter() - started
    how = "read from the cache" if from_cache else "packed and cached (once per model and kernel family)"
    return PackResult(weights, seconds, from_cache, f"{weights} weights {how} in {seconds:.1f} s")
