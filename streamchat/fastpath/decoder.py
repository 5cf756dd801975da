"""The fast decode step: one token through a flat Llama forward over the HF model's weights (gpt-fast style).

The transformers forward spends most of a decode step in Python and module machinery, not in matmuls. Decode here
is a single function over pre-extracted weights (q/k/v and gate/up fused) that writes straight into the
`BoundedLayer` buffers: the new key is stored raw and rotated at place L (the cache length), the value and stream
index at place L, and the query attends over places 0..L. That is what the transformers path does through
`BoundedCache.update`, so both paths leave the same cache and give the same logits; eviction (`make_room`) stays
in the cache, between steps, untouched. Prefill keeps using the transformers path.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from streamchat import native
from streamchat.attention import grouped_probabilities
from streamchat.cache import BoundedCache
from streamchat.quant import PackedLinear, fuse, resolve_weights

PACKED_ATTR = "streamchat_packed"  # where streamchat/packing.py leaves a packed model's weights

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class FastPathUnavailable(RuntimeError):
    """The fast path cannot run this model or policy; the message says why (the caller falls back)."""


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the flat forward cannot reproduce this model's decode step, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (fast path: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    packed = getattr(model, PACKED_ATTR, None)
    on_blocks = packed is not None and packed.mode == "gguf" and native.library() is not None
    for layer in model.model.layers:
        attention = layer.self_attn
        if not hasattr(layer.mlp, "gate_proj"):
            return "a layer layout other than Llama's"
        if any(hasattr(attention, name) for name in ("q_norm", "k_norm")) and not on_blocks:
            return "per-head q/k norms (Qwen3) outside the native step over GGUF blocks"
    return None


class _Layer:
    def __init__(self, layer: torch.nn.Module, weights: str):
        packed = getattr(layer, PACKED_ATTR, None)  # the one resident copy (streamchat/packing.py)
        if packed is not None:
            self.qkv, self.out, self.gate_up, self.down = packed.qkv, packed.out, packed.gate_up, packed.down
            self.input_norm = layer.input_layernorm.weight.detach()
            self.post_norm = layer.post_attention_layernorm.weight.detach()
            q_norm, k_norm = getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None)
            self.q_norm = None if q_norm is None else q_norm.weight.detach()
            self.k_norm = None if k_norm is None else k_norm.weight.detach()
            return
        attention, mlp = layer.self_attn, layer.mlp
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.qkv = fuse([p.weight for p in projections], [p.bias for p in projections], weights)
        self.out = PackedLinear(attention.o_proj.weight, attention.o_proj.bias, weights)
        self.gate_up = fuse([mlp.gate_proj.weight, mlp.up_proj.weight], [None, None], weights)
        self.down = PackedLinear(mlp.down_proj.weight, None, weights)
        self.q_norm = self.k_norm = None
        self.input_norm = layer.input_layernorm.weight.detach()
        self.post_norm = layer.post_attention_layernorm.weight.detach()


def _native_linear(linear) -> native.Linear:
    """kernels.c's `sc_linear` for a linear: GGUF tensors as typed parts (ggml_blocks.BlockLinear), or one packed
    matrix (int4: block_q4x8; int8: block_q8x8 with its row scales)."""
    if linear.mode == "gguf":
        return native.linear([(part.kind, part.rows, part.data.data_ptr(), None) for part in linear.parts])
    if linear.mode == "int4":
        return native.linear([(native.Q4X8, linear.out_features, linear.weight.data_ptr(), None)])
    return native.linear([(native.Q8X8, linear.out_features, linear.weight.data_ptr(), linear.scales.data_ptr())])


class FastDecoder:
    """Decode steps for one model and weight option; works with any `BoundedCache` of that model.

    `compile=True` wraps the step in `torch.compile` (inductor; C++ on CPU): compiled on the first step, which
    then takes long (`compile_seconds` says how long). Without it the step runs eagerly, which needs nothing.
    """

    def __init__(self, model: torch.nn.Module, weights: str = "model", compile: bool = False):
        reason = unsupported_reason(model)
        if reason:
            raise FastPathUnavailable(f"the fast decode path does not support {reason}")
        config = model.config
        inner = model.model
        packed = getattr(model, PACKED_ATTR, None)
        weights = packed.mode if packed is not None else resolve_weights(inner.layers, weights)
        self.weights = weights
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.layers = [_Layer(layer, weights) for layer in inner.layers]
        self.final_norm = inner.norm.weight.detach()
        self.dtype, self.device = self.final_norm.dtype, self.final_norm.device  # the residual stream's
        if packed is not None:
            self.embed, self.lm_head = inner.embed_tokens, packed.lm_head  # int8 rows, shared with lm_head
        else:
            embedding = inner.embed_tokens.weight.detach()
            self.embed = lambda token: F.embedding(token, embedding)
            head_weights = "int8" if weights == "int4" else weights  # the GGUF's output projection is 8-bit
            self.lm_head = PackedLinear(model.lm_head.weight, getattr(model.lm_head, "bias", None), head_weights)
        half = self.head_dim // 2
        self._sin_signs = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(self.device, self.dtype)
        self._native_layers = self._native_plan()
        if compile and self._native_layers is not None:  # the whole step is one C call: nothing left to compile
            print(
                "streamchat: decode_compile skipped: the native decode step runs without Python between layers",
                file=sys.stderr,
            )
            compile = False
        elif compile:
            self._native_layers = None
        # decode attention on streamchat's kernel (not inside a compiled graph: torch.compile cannot trace it)
        self.native_attention = native.library() is not None and self.device.type == "cpu" and not compile
        self.compiled = compile
        self.compile_seconds: float | None = None
        self._step: Callable = torch.compile(self._forward, dynamic=True, fullgraph=True) if compile else self._forward

    def _native_plan(self):
        """The layers as kernels.c's `sc_layer` structures for the whole-step kernel (`native_decode`), or None where
        it cannot run this decoder (no native kernels, weights other than native int4 with an int8 output
        projection, biases outside q/k/v, a model not in fp32)."""
        if native.library() is None or self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        head = self.lm_head
        blocks = head.mode == "gguf"
        if (head.mode, head.kernel, head.bias) not in (("int8", "native", None), ("gguf", "native", None)):
            return None
        for layer in self.layers:
            linears = (layer.qkv, layer.out, layer.gate_up, layer.down)
            wanted = ("gguf", "native") if blocks else ("int4", "native")
            if any((l.mode, l.kernel) != wanted for l in linears) or any(l.bias is not None for l in linears[1:]):
                return None
        self._kept = []  # the fp32 norm weights the structures point at

        def address(tensor):
            if tensor is None:
                return None
            tensor = tensor.float().contiguous()
            self._kept.append(tensor)
            return tensor.data_ptr()

        layers = (native.Layer * len(self.layers))()
        for structure, layer in zip(layers, self.layers):
            for name in ("qkv", "out", "gate_up", "down"):
                setattr(structure, name, _native_linear(getattr(layer, name)))
            structure.qkv_bias = address(layer.qkv.bias)
            structure.input_norm, structure.post_norm = address(layer.input_norm), address(layer.post_norm)
            structure.q_norm, structure.k_norm = address(layer.q_norm), address(layer.k_norm)
        self._final_norm = address(self.final_norm)
        self._head = _native_linear(head)
        self._intermediate = self.layers[0].gate_up.out_features // 2
        return layers

    def native_ready(self, caches: list[BoundedCache], prefill: bool = False) -> bool:
        """Whether `native_feed` runs these caches: the whole-step kernel is built and every cache stores K/V in one
        dtype the kernel reads. A policy that observes attention scores (H2O, TOVA) gets them from the kernel for
        one token per step (decode); a prefill chunk of several (`prefill`) takes the transformers forward."""
        if self._native_layers is None:
            return False
        dtypes = {cache.layers[0].dtype for cache in caches}  # what the buffers hold (or will, once allocated)
        return (
            len(dtypes) == 1
            and dtypes <= set(native.ATTENTION_DTYPES)
            and not (prefill and any(cache.policy.needs_attention_scores for cache in caches))
        )

    def prefill(self, ids: list[int], cache: BoundedCache) -> torch.Tensor:
        """Feed `ids` at places cache.length, ... in one native call (`native_feed`); returns fp32 logits [1, vocab]
        of the last. Call `make_room(len(ids))` first and check `native_ready([cache])`."""
        return self.native_feed([ids], [cache])

    def native_decode(self, token_ids: list[int], caches: list[BoundedCache]) -> torch.Tensor:
        """Feed token_ids[b] at place caches[b].length for every b in one call of kernels.c's `sc_decode` (the
        computation of `_forward`, per sequence, with no Python between layers); returns fp32 logits [B, vocab].
        Call `make_room(1)` on each cache first and check `native_ready`. Raises RuntimeError if the kernel
        refuses the sizes."""
        return self.native_feed([[token_id] for token_id in token_ids], caches)

    def native_feed(self, chunks: list[list[int]], caches: list[BoundedCache]) -> torch.Tensor:
        """Feed chunks[b] (one token or more) at places caches[b].length, ... for every b in one `sc_decode` call:
        each token is a row that attends over its own cache up to its own place (a chunk is causal, as the
        transformers forward over it: prefill, or a prefill piece batched with other conversations' decode steps);
        returns fp32 logits [B, vocab] of each chunk's last token. Call `make_room(len(chunks[b]))` on each cache
        first (an empty cache gets its buffers here) and check `native_ready`. Raises RuntimeError if the kernel
        refuses the sizes."""
        lib, layers = native.library(), len(self.layers)
        for cache in caches:
            if not cache.layers[0].is_initialized:
                cache.allocate(self.num_kv_heads, self.head_dim, self.device)
        counts = [len(chunk) for chunk in chunks]
        rows = sum(counts)
        places = [cache.length + i for cache, count in zip(caches, counts) for i in range(count)]
        origins = [cache.seen_tokens + i for cache, count in zip(caches, counts) for i in range(count)]
        ids = [token for chunk in chunks for token in chunk]
        x = self.embed(torch.tensor(ids, device=self.device)).to(torch.float32).contiguous()  # [rows, hidden]
        spans = [(cache.layers[0].rope, cache.length, count) for cache, count in zip(caches, counts)]
        cos = torch.cat([rope.cos[start : start + count] for rope, start, count in spans]).float().contiguous()
        sin = torch.cat([rope.sin[start : start + count] for rope, start, count in spans]).float().contiguous()
        if rows == 1:
            buffers = _cache_pointers(caches[0])
        else:
            buffers = (native.CacheLayer * (rows * layers))()
            size, row = ctypes.sizeof(native.CacheLayer) * layers, 0
            for cache, count in zip(caches, counts):
                array = _cache_pointers(cache)
                for _ in range(count):
                    ctypes.memmove(ctypes.byref(buffers, row * size), array, size)
                    row += 1
        capacities = [cache.layers[0].keys.shape[2] for cache, count in zip(caches, counts) for _ in range(count)]
        last_rows = [sum(counts[: b + 1]) - 1 for b in range(len(counts))]
        logits = torch.empty(len(chunks), self.lm_head.out_features)
        scored = [cache.policy.needs_attention_scores for cache in caches]
        if any(count != 1 for count, scoring in zip(counts, scored) if scoring):
            raise RuntimeError("a policy that observes attention scores is fed one token per native step")
        probs = [
            torch.empty(layers, self.num_kv_heads, cache.layers[0].keys.shape[2]) if scoring else None
            for cache, scoring in zip(caches, scored)
        ]
        per_row = [p.data_ptr() if p is not None else None for p, count in zip(probs, counts) for _ in range(count)]
        probs_pointers = (ctypes.c_void_p * rows)(*per_row) if any(scored) else None
        native.use_threads()
        status = lib.sc_decode(
            rows,
            layers,
            self._native_layers,
            x.shape[1],
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self._intermediate,
            self.eps,
            self.scaling,
            x.data_ptr(),
            (ctypes.c_int * rows)(*places),
            (ctypes.c_int64 * rows)(*origins),
            cos.data_ptr(),
            sin.data_ptr(),
            buffers,
            (ctypes.c_int * rows)(*capacities),
            int(caches[0].layers[0].keys.dtype == torch.float16),
            self._final_norm,
            ctypes.byref(self._head),
            self.lm_head.out_features,
            len(chunks),
            (ctypes.c_int * len(chunks))(*last_rows),
            logits.data_ptr(),
            probs_pointers,
        )
        if status:
            raise RuntimeError(f"the native decode step refused {rows} row(s) of {len(chunks)} sequence(s)")
        for cache, count, layer_probs in zip(caches, counts, probs):
            end = cache.length + count
            for layer in cache.layers:
                layer.length = end
            cache.seen_tokens += count
            for index in range(layers if layer_probs is not None else 0):  # as `_scored_attention` hands them
                cache.policy.observe(index, layer_probs[index, :, :end].unsqueeze(0).unsqueeze(2))
        return logits

    def nbytes(self) -> int:
        """Bytes of the weights this decoder holds of its own (converted copies; 0 extra for "model")."""
        linears = [self.lm_head] + [
            l for layer in self.layers for l in (layer.qkv, layer.out, layer.gate_up, layer.down)
        ]
        return sum(linear.nbytes() for linear in linears)

    @staticmethod
    def refusal(cache: BoundedCache, batch: int = 1) -> str | None:
        """Why this cache's next step must take the transformers path, or None when the fast path can run it."""
        if not isinstance(cache, BoundedCache):
            return f"{type(cache).__name__} is not a bounded cache"
        layer = cache.layers[0]
        if not layer.is_initialized:
            return "the cache is empty (prefill first)"
        if layer.keys.shape[0] != batch:
            return "batch size other than 1"
        if cache.length >= cache.capacity:
            return "the cache is full (make_room first)"
        return None

    def _buffers(self, cache: BoundedCache) -> tuple:
        """The cache's tensors, gathered per call (microseconds): a decoder serves many sessions and threads."""
        layers = cache.layers
        dtype = self.dtype  # RoPE in the residual stream's dtype, whatever the cache stores
        return (
            [layer.keys for layer in layers],
            [layer.raw_keys for layer in layers],
            [layer.values for layer in layers],
            [layer.origins for layer in layers],
            layers[0].rope.cos.to(dtype),
            layers[0].rope.sin.to(dtype),
        )

    @torch.inference_mode()
    def decode(self, token_id: int, cache: BoundedCache) -> torch.Tensor:
        """Feed one token at place `cache.length`; returns fp32 logits [1, vocab]. Call `make_room(1)` first."""
        refusal = self.refusal(cache)
        if refusal:
            raise FastPathUnavailable(refusal)
        if self.native_ready([cache]):
            return self.native_decode([token_id], [cache])
        length = cache.length
        token = torch.tensor([token_id], device=self.device)
        origin = torch.tensor([cache.seen_tokens], device=self.device)
        observe = cache.policy.observe if cache.policy.needs_attention_scores else None
        arguments = (token, origin, length, *self._buffers(cache), observe)
        if self.compiled and self.compile_seconds is None:
            logits = self._compile_first(arguments)
        else:
            logits = self._step(*arguments)
        for layer in cache.layers:
            layer.length = length + 1
        cache.seen_tokens += 1
        return logits

    def _compile_first(self, arguments: tuple) -> torch.Tensor:
        """The first compiled step compiles (said on stderr, with its duration); where compilation is not
        available (no C++ compiler...), the step stays eager from then on."""
        print("streamchat: compiling the fast decode step (once; minutes on a few CPU cores)...", file=sys.stderr)
        started = time.perf_counter()
        try:
            logits = self._step(*arguments)
        except Exception as error:
            print(
                f"streamchat: compilation failed ({type(error).__name__}: {error}); decoding eagerly", file=sys.stderr
            )
            self.compiled, self._step = False, self._forward
            logits = self._step(*arguments)
        self.compile_seconds = time.perf_counter() - started
        if self.compiled:
            print(f"streamchat: fast decode step compiled in {self.compile_seconds:.0f} s", file=sys.stderr)
        return logits

    def _forward(self, token, origin, length: int, keys, raw_keys, values, origins, cos_table, sin_table, observe):
        """One token through every layer. Written for few eager ops (each costs microseconds of Python and
        dispatch, a large share of a 135M model's step): fused norms, one rotation for q and k, narrow+copy_
        writes, in-place residual adds, and activations converted only where they cross into the matmuls.
        `observe`: the policy's attention-score observer (H2O), or None."""
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        rotated, half, kv_dtype = heads + kv_heads, head_dim // 2, keys[0].dtype
        end = length + 1
        cos = cos_table.narrow(0, length, 1)  # [1, head_dim]
        signed_sin = sin_table.narrow(0, length, 1) * self._sin_signs  # rotate_half(x) * sin == roll(x) * signed
        x = self.embed(token)  # [1, hidden], the residual stream in the model's dtype
        hidden = (x.shape[-1],)
        for i, layer in enumerate(self.layers):
            matmul_dtype = layer.qkv.input_dtype
            normed = F.rms_norm(x, hidden, layer.input_norm, self.eps).to(matmul_dtype)
            qkv = layer.qkv(normed).to(x.dtype).view(rotated + kv_heads, head_dim)
            qk = qkv.narrow(0, 0, rotated)
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), signed_sin)  # q and k rotated at place `length`
            # narrow + copy_ (not integer indexing): one compiled graph then serves every length
            keys[i].narrow(2, length, 1).copy_(qk.narrow(0, heads, kv_heads).view(1, kv_heads, 1, head_dim))
            raw_keys[i].narrow(2, length, 1).copy_(qkv.narrow(0, heads, kv_heads).view(1, kv_heads, 1, head_dim))
            values[i].narrow(2, length, 1).copy_(qkv.narrow(0, rotated, kv_heads).view(1, kv_heads, 1, head_dim))
            origins[i].narrow(2, length, 1).copy_(origin.view(1, 1, 1).expand(1, kv_heads, 1))
            query, layer_keys, layer_values = (
                qk.narrow(0, 0, heads),
                keys[i].narrow(2, 0, end),
                values[i].narrow(2, 0, end),
            )
            if observe is None and self.native_attention and kv_dtype in native.ATTENTION_DTYPES:
                attended = native.attention(query, keys[i], values[i], end, self.scaling)  # streamchat/kernels.c
            elif observe is None:
                # Grouped-query attention without repeating K/V (query head h reads KV head h // group, as
                # transformers' repeat_kv pairs them), in the cache's dtype: bf16 halves the bytes read (kv_dtype).
                attended = F.scaled_dot_product_attention(
                    query.view(1, heads, 1, head_dim).to(kv_dtype),
                    layer_keys,
                    layer_values,
                    scale=self.scaling,
                    enable_gqa=True,
                )
            else:
                attended = self._scored_attention(i, query, layer_keys, layer_values, observe)
            x.add_(layer.out(attended.view(1, heads * head_dim).to(matmul_dtype)))
            normed = F.rms_norm(x, hidden, layer.post_norm, self.eps).to(matmul_dtype)
            gate, up = layer.gate_up(normed).chunk(2, dim=-1)
            x.add_(layer.down(F.silu(gate).mul_(up)))
        normed = F.rms_norm(x, hidden, self.final_norm, self.eps).to(self.lm_head.input_dtype)
        return self.lm_head(normed).float()

    def _scored_attention(self, layer_idx: int, query, keys, values, observe: Callable) -> torch.Tensor:
        """Attention written out in fp32, for policies that rank cached tokens by the attention they receive: the
        probabilities come from the function the transformers path's scoring attention uses
        (streamchat/attention.py), go to the policy averaged over each GQA group, and weigh the values."""
        probabilities = grouped_probabilities(query.view(1, self.num_heads, 1, self.head_dim), keys, None, self.scaling)
        observe(layer_idx, probabilities.mean(dim=2))  # [1, kv_heads, 1, length]
        return torch.matmul(probabilities[0, :, :, 0], values[0].float())  # [kv_heads, group, head_dim]


_POINTERS: weakref.WeakKeyDictionary[BoundedCache, tuple] = weakref.WeakKeyDictionary()


def _cache_pointers(cache: BoundedCache):
    """The cache's buffers as `native.CacheLayer` structures, kept per cache (its buffers are allocated once, all
    layers together: by the first forward, `allocate` or a restore, so the first and last layers' tell)."""
    key = (cache.layers[0].keys.data_ptr(), cache.layers[-1].keys.data_ptr())
    found = _POINTERS.get(cache)
    if found is not None and found[0] == key:
        return found[1]
    for layer in cache.layers:
        buffers = (layer.keys, layer.raw_keys, layer.values, layer.origins)
        if not all(tensor.is_contiguous() and tensor.device.type == "cpu" for tensor in buffers):
            raise RuntimeError("the native decode step needs contiguous CPU cache buffers")
    array = native.cache_layers(cache.layers)
    _POINTERS[cache] = (key, array)
    return array


_DECODERS: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()
_BUILDING = threading.RLock()


def decoder_for(model: torch.nn.Module, weights: str = "model", compile: bool = False) -> FastDecoder:
    """The model's decoder for these options, built once and shared by every session (and thread) on the model.
    Raises FastPathUnavailable, also on later calls, for a model the fast path cannot run."""
    with _BUILDING:
        decoders = _DECODERS.setdefault(model, {})
        key = (weights, compile, native.active())  # linears packed here take the kernels available now
        if key not in decoders:
            try:
                packed = getattr(model, PACKED_ATTR, None)
                if packed is not None and weights != packed.mode:  # the model holds only its packed weights
                    decoders[key] = decoder_for(model, packed.mode, compile)
                elif weights == "auto":
                    decoders[key] = decoder_for(model, resolve_weights(model.model.layers, weights), compile)
                else:
                    started = time.perf_counter()
                    decoders[key] = FastDecoder(model, weights, compile)
                    if weights != "model" and packed is None:
                        seconds = time.perf_counter() - started
                        print(
                            f"streamchat: {weights} decode weights prepared in {seconds:.1f} s (once per model)",
                            file=sys.stderr,
                        )
            except FastPathUnavailable as error:
                decoders[key] = error
        found = decoders[key]
    if isinstance(found, FastPathUnavailable):
        raise found
    return found
