"""A transformers model over a GGUF file's own blocks: no weight converted, copied or written anywhere.

The model is built on the meta device from the file's metadata (llama, qwen2, qwen3: Llama 2/3.x, SmolLM,
Mistral's GGUFs, Qwen2/2.5, Qwen3), then every linear becomes a `BlockLinear` over the mapped tensors and the
embedding a `BlockEmbedding`; only norms, biases and RoPE factors (kilobytes) are copied into fp32 tensors. The
transformers forward (prefill, the measuring tools) and the native decode step (fastpath/decoder.py, which finds
the layers' linears under `PACKED_ATTR`) then read the same bytes.

Two re-layouts, both lossless and row-wise: llama.cpp's converter permutes the rows of a llama model's q and k
projections for its interleaved RoPE (`LlamaModel.permute` in convert_hf_to_gguf.py); streamchat's RoPE is
transformers' rotate-half, so those rows are put back (a copy of q and k: about 12% of a layer's weights, in
their own blocks; a file streamchat packed from an HF folder, marked `hf_pack.ROPE_ROWS_KEY`, keeps HF's order and
is read as it is). And a tensor type the kernels do not take is re-encoded (`ggml_blocks.convert_tensor`).
A `rope_freqs` tensor (Llama 3.x's frequency factors) divides the RoPE frequencies, as llama.cpp applies it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config, Qwen3Config

from streamchat.ggml_blocks import (
    NATIVE,
    REPACKED,
    BlockEmbedding,
    BlockLinear,
    BlockTensor,
    BlockTypeError,
    convert_tensor,
    repack,
)
from streamchat.gguf_file import GGUFError, GGUFFile
from streamchat.hf_pack import ROPE_ROWS_KEY
from streamchat.packing import PACKED_ATTR, PackedLayer, PackedWeights
from streamchat.quant import QuantLinear

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
ARCHITECTURES = tuple(CONFIGS)


@dataclass
class GGUFLoad:
    """What building took: the file's types, what was converted, the seconds."""

    types: dict[str, int]
    converted: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def note(self) -> str:
        types = ", ".join(f"{name} x{count}" for name, count in self.types.items())
        text = f"GGUF blocks read in place ({types}) on the native kernels"
        if self.converted:
            text += f"; converted: {', '.join(self.converted)}"
        return text


def config_from(file: GGUFFile):
    """The transformers config of the file's model. GGUFError for an architecture off the native step or
    missing metadata."""
    arch = file.architecture
    if arch not in CONFIGS:
        raise GGUFError(
            f"{file.path}: architecture {arch!r} does not run on streamchat's native step "
            f"(it runs {', '.join(ARCHITECTURES)}: Llama 2/3.x, SmolLM, Mistral, Qwen2/2.5, Qwen3)"
        )
    hidden = int(file.require("embedding_length"))
    heads = int(file.require("attention.head_count"))
    kv_heads = int(file.get("attention.head_count_kv", heads))
    head_dim = int(file.get("attention.key_length", hidden // heads))
    embedding = file.tensor("token_embd.weight")
    rope = {"rope_type": "default", "rope_theta": float(file.get("rope.freq_base", 10000.0))}
    scaling = file.get("rope.scaling.type")
    if scaling == "linear":
        rope = {**rope, "rope_type": "linear", "factor": float(file.require("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise GGUFError(f"{file.path}: RoPE scaling {scaling!r} is not supported (default, linear, rope_freqs)")
    if head_dim % 8 or head_dim > 256:
        raise GGUFError(f"{file.path}: head dimension {head_dim} (the native step takes multiples of 8 up to 256)")
    options = {
        "vocab_size": embedding.rows,
        "hidden_size": hidden,
        "intermediate_size": int(file.require("feed_forward_length")),
        "num_hidden_layers": int(file.require("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(file.get("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(file.get("context_length", 4096)),
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "bos_token_id": file.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": file.metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if arch == "llama":
        options["attention_bias"] = "blk.0.attn_q.bias" in file.tensors
    return CONFIGS[arch](**options)


def _rope_rows(heads: int, head_dim: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation: HF row h*D + j*D/2 + i is GGUF row h*D + 2i + j."""
    half = head_dim // 2
    order = [h * head_dim + 2 * i + j for h in range(heads) for j in range(2) for i in range(half)]
    return torch.tensor(order)


def _native(tensor: BlockTensor, load: GGUFLoad) -> BlockTensor:
    if tensor.kind in NATIVE:
        return tensor
    return _converted(tensor, load)


def _for_matmul(tensor: BlockTensor, file: GGUFFile) -> BlockTensor:
    """A linear's tensor in the layout its kernel reads fastest: Q4_K and Q6_K re-laid 8 rows at a time (lossless); the
    file's pages of it are then released (their bytes are not read again)."""
    if tensor.kind in REPACKED and tensor.rows % 8 == 0:
        repacked = repack(tensor)
        file.release(tensor.name)
        return repacked
    return tensor


def _converted(tensor: BlockTensor, load: GGUFLoad) -> BlockTensor:
    try:
        converted = convert_tensor(tensor)
    except (BlockTypeError, NotImplementedError, ValueError) as error:
        raise GGUFError(f"{error}") from error
    load.converted.append(f"{tensor.name} {tensor.type_name} -> {converted.type_name}")
    return converted


def _parameter(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)


def build_model(path: str | Path) -> tuple[torch.nn.Module, GGUFLoad]:
    """The model of a GGUF file over its own blocks (see the module's note), in eval mode, fp32 activations.

    Raises GGUFError naming the problem: not GGUF, truncated, architecture or tensor type not supported, a
    tensor missing or of another shape than the metadata says."""
    started = time.perf_counter()
    file = GGUFFile(path)
    config = config_from(file)
    load = GGUFLoad(file.type_counts())
    hidden, heads, kv, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    ffn, arch = config.intermediate_size, file.architecture
    # llama.cpp's files hold llama's q/k rows permuted; streamchat's packs of HF folders (hf_pack.py) do not
    permuted = arch == "llama" and file.metadata.get(ROPE_ROWS_KEY) != "rotate_half"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")

    def linear(name: str, rows: int, columns: int) -> BlockTensor:
        return _native(file.tensor(name, (rows, columns)), load)

    packed_layers = []
    for i, layer in enumerate(model.model.layers):
        p = f"blk.{i}."
        q, k, v = linear(p + "attn_q.weight", heads * D, hidden), linear(p + "attn_k.weight", kv * D, hidden), None
        v = linear(p + "attn_v.weight", kv * D, hidden)
        if permuted:  # back to rotate-half order (the module's note)
            q, k = q.gather_rows(_rope_rows(heads, D)), k.gather_rows(_rope_rows(kv, D))
        q, k, v = _for_matmul(q, file), _for_matmul(k, file), _for_matmul(v, file)
        bias = None
        if p + "attn_q.bias" in file.tensors:
            biases = [
                file.vector(p + f"attn_{n}.bias", rows) for n, rows in (("q", heads * D), ("k", kv * D), ("v", kv * D))
            ]
            if permuted:
                biases[0], biases[1] = biases[0][_rope_rows(heads, D)], biases[1][_rope_rows(kv, D)]
            bias = torch.cat(biases)
        qkv = BlockLinear([q, k, v], bias)
        out = BlockLinear([_for_matmul(linear(p + "attn_output.weight", hidden, heads * D), file)])
        gate, up = linear(p + "ffn_gate.weight", ffn, hidden), linear(p + "ffn_up.weight", ffn, hidden)
        gate_up = BlockLinear([_for_matmul(gate, file), _for_matmul(up, file)])
        down = BlockLinear([_for_matmul(linear(p + "ffn_down.weight", hidden, ffn), file)])
        attention, mlp = layer.self_attn, layer.mlp
        attention.q_proj = QuantLinear(qkv.rows(0, heads * D), hidden)
        attention.k_proj = QuantLinear(qkv.rows(heads * D, (heads + kv) * D), hidden)
        attention.v_proj = QuantLinear(qkv.rows((heads + kv) * D, (heads + 2 * kv) * D), hidden)
        attention.o_proj = QuantLinear(out, heads * D)
        mlp.gate_proj, mlp.up_proj = (
            QuantLinear(gate_up.rows(0, ffn), hidden),
            QuantLinear(gate_up.rows(ffn, 2 * ffn), hidden),
        )
        mlp.down_proj = QuantLinear(down, ffn)
        _parameter(layer.input_layernorm, "weight", file.vector(p + "attn_norm.weight", hidden))
        _parameter(layer.post_attention_layernorm, "weight", file.vector(p + "ffn_norm.weight", hidden))
        if arch == "qwen3":
            _parameter(attention.q_norm, "weight", file.vector(p + "attn_q_norm.weight", D))
            _parameter(attention.k_norm, "weight", file.vector(p + "attn_k_norm.weight", D))
        packed = PackedLayer(qkv, out, gate_up, down)
        setattr(layer, PACKED_ATTR, packed)
        packed_layers.append(packed)
    _parameter(model.model.norm, "weight", file.vector("output_norm.weight", hidden))
    embedding = _native(file.tensor("token_embd.weight", (config.vocab_size, hidden)), load)
    # tied: the head multiplies a re-laid copy; the embedding reads its few rows a turn from the file
    tied = config.tie_word_embeddings
    head_tensor = _for_matmul(embedding if tied else linear("output.weight", config.vocab_size, hidden), file)
    head = BlockLinear([head_tensor])
    model.model.embed_tokens = BlockEmbedding(embedding)
    model.lm_head = QuantLinear(head, hidden)
    setattr(model, PACKED_ATTR, PackedWeights("gguf", packed_layers, head, None))
    rotary = type(model.model.rotary_emb)(config=config)
    if "rope_freqs.weight" in file.tensors:  # Llama 3.x: per-frequency factors, as llama.cpp divides by them
        factors = file.vector("rope_freqs.weight", D // 2)
        rotary.inv_freq = rotary.inv_freq / factors
        rotary.original_inv_freq = rotary.inv_freq
    model.model.rotary_emb = rotary
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise GGUFError(f"{file.path}: no weights for {', '.join(left[:5])}")
    model.streamchat_gguf = file  # keeps the memory map alive as long as the model
    load.seconds = time.perf_counter() - started
    return model.eval(), load
