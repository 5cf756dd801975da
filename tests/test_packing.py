"""One resident copy of the weights (streamchat/packing.py): packed linears serve prefill and decode, the fp32 ones
are gone, and the packed tensors are cached on disk, reused, and rebuilt when stale or corrupt."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
from streamchat.cache import BoundedCache
from streamchat.config import Settings
from streamchat.fastpath import decoder_for
from streamchat.model import LoadedModel, load_model
from streamchat.packing import PACKED_ATTR, PACKED_MODES, cache_paths, pack_model, packed_mode
from streamchat.quant import INT4_GROUP, QuantEmbedding, QuantLinear, quantize_int4, resolve_weights
from streamchat.session import ChatSession
from transformers import LlamaConfig, LlamaForCausalLM

from tiny import tiny_model, tiny_tokenizer


def int8_rows(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().amax(1, keepdim=True) / 127
    return (weight / scale).round() * scale


def on_grid(model: torch.nn.Module, mode: str = "int4") -> torch.nn.Module:
    """Snap the layer linears to a 4-bit grid per 32 inputs (or 8 bits per row for int8) and the output
    projection to 8 bits per row, as a Q4_1 GGUF's weights are: then packing loses only the bf16 rounding of
    scales and activations."""
    with torch.no_grad():
        for parameter in model.model.layers.parameters():
            if parameter.dim() == 2 and mode == "int8":
                parameter.copy_(int8_rows(parameter))
            elif parameter.dim() == 2:
                blocks = parameter.view(parameter.shape[0], -1, INT4_GROUP)
                low = blocks.amin(-1, keepdim=True)
                step = (blocks.amax(-1, keepdim=True) - low) / 15
                parameter.copy_(((blocks - low) / step).round().mul(step).add(low).view_as(parameter))
        model.lm_head.weight.copy_(int8_rows(model.lm_head.weight))
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def reference(tokenizer):
    return on_grid(tiny_model(len(tokenizer)))


def wide_model(vocab_size: int) -> LlamaForCausalLM:
    """Projection sizes on torch's 64-row int4 packing blocks (q 128, k 64, v 64 rows): q/k/v become row views
    of the fused tensor, where the tiny model's (64, 32, 32) take the fused-output path."""
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.25)
    return on_grid(model)


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("layout", ["tiny", "wide"])
def test_prefill_through_packed_weights_matches_the_reference(reference, tokenizer, mode, layout, kernel):
    source = copy.deepcopy(reference) if layout == "tiny" else wide_model(len(tokenizer))
    on_grid(source, mode)
    packed = copy.deepcopy(source)
    result = pack_model(packed, mode, None, "test")
    assert result.mode == mode and packed_mode(packed) == mode
    q_proj = packed.model.layers[0].self_attn.q_proj
    # row views of the fused tensor (int8; native int4 in 8-row groups), else the fused output sliced (torch's int4)
    assert isinstance(q_proj, QuantLinear) == (mode == "int8" or kernel == "native")
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = source(ids).logits, packed(ids).logits
    scale = expected.abs().max()
    # rounding, not a different model: torch's kernels take bf16 activations; the native ones round activations to
    # 8 bits per 32 inputs (llama.cpp's Q8_1), about twice the error on this random model (real model: ppl in docs)
    assert (got - expected).abs().max() < {"torch": 0.1, "native": 0.15}[kernel] * scale
    assert (got - expected).norm() < {"torch": 0.04, "native": 0.08}[kernel] * expected.norm()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_no_full_precision_copy_stays_referenced(reference):
    model = copy.deepcopy(reference)
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    watched = [weakref.ref(w) for w in linears] + [weakref.ref(model.model.embed_tokens.weight)]
    del linears
    pack_model(model, "int4", None, "test")
    decoder_for(model, "int4")  # the decode step must not make its own copies either
    gc.collect()
    assert all(ref() is None for ref in watched)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert all(p.dim() == 1 for p in model.parameters())  # norms only
    embedding, head = model.model.embed_tokens, getattr(model, PACKED_ATTR).lm_head
    assert embedding.weight_int8 is head.weight  # the tied table is held once


def test_fast_decode_reads_the_packed_weights(reference, tokenizer, kernel):
    """The decode step on a packed model gives the logits of the transformers forward over the same weights."""
    model = copy.deepcopy(reference)
    pack_model(model, "int4", None, "test")
    decoder = decoder_for(model, "auto")
    assert decoder.weights == "int4"
    assert decoder.layers[0].qkv is getattr(model.model.layers[0], PACKED_ATTR).qkv
    settings = Settings(window=64)
    fast_cache = BoundedCache(model, settings, torch.float32)
    slow_cache = BoundedCache(model, settings, torch.float32)
    ids = torch.randint(0, len(tokenizer), (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(input_ids=ids[:, :8], past_key_values=fast_cache, use_cache=True)
        model(input_ids=ids[:, :8], past_key_values=slow_cache, use_cache=True)
        fast = decoder.decode(int(ids[0, 8]), fast_cache)
        slow = model(input_ids=ids[:, 8:], past_key_values=slow_cache, use_cache=True).logits[:, -1].float()
    torch.testing.assert_close(fast, slow, atol=0.05 * slow.abs().max().item(), rtol=0)


def test_cache_is_reused_and_rebuilt_when_stale_or_corrupt(reference, tmp_path):
    first = pack_model(copy.deepcopy(reference), "int4", tmp_path, "weights-a")
    assert not first.from_cache
    weights, manifest = cache_paths(tmp_path, "int4")
    assert weights.is_file() and manifest.is_file()
    again = copy.deepcopy(reference)
    assert pack_model(again, "int4", tmp_path, "weights-a").from_cache
    fresh = copy.deepcopy(reference)
    pack_model(fresh, "int4", None, "weights-a")
    ids = torch.arange(12).view(1, 12)
    with torch.inference_mode():
        torch.testing.assert_close(again(ids).logits, fresh(ids).logits, rtol=0, atol=0)  # the same tensors back

    assert not pack_model(copy.deepcopy(reference), "int4", tmp_path, "weights-b").from_cache  # other source weights
    assert pack_model(copy.deepcopy(reference), "int4", tmp_path, "weights-b").from_cache  # rewritten for them

    record = json.loads(manifest.read_text())
    record["key"]["torch"] = "0.0.0"  # packed by another torch (or CPU: the int4 layout is theirs)
    manifest.write_text(json.dumps(record))
    assert not pack_model(copy.deepcopy(reference), "int4", tmp_path, "weights-b").from_cache

    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte inside the tensors: same size, other digest
    weights.write_bytes(bytes(data))
    rebuilt = copy.deepcopy(reference)
    assert not pack_model(rebuilt, "int4", tmp_path, "weights-b").from_cache
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(ids).logits, fresh(ids).logits, rtol=0, atol=0)

    weights.write_bytes(b"truncated")
    assert not pack_model(copy.deepcopy(reference), "int4", tmp_path, "weights-b").from_cache


@pytest.mark.parametrize("mode", PACKED_MODES)
def test_cache_round_trip_is_exact(reference, tmp_path, mode):
    """What the cache gives back computes exactly what was packed, for every stored form."""
    packed, cached = copy.deepcopy(reference), copy.deepcopy(reference)
    assert not pack_model(packed, mode, tmp_path, "weights").from_cache
    assert pack_model(cached, mode, tmp_path, "weights").from_cache
    ids = torch.arange(16).view(1, 16)
    with torch.inference_mode():
        torch.testing.assert_close(cached(ids).logits, packed(ids).logits, rtol=0, atol=0)


def test_models_that_cannot_be_packed_keep_their_weights(reference):
    for model, weights in ((copy.deepcopy(reference).to(torch.bfloat16), "int4"), (copy.deepcopy(reference), "bf16")):
        result = pack_model(model, weights, None, "test")
        assert result.mode is None and "full weights" in result.note
        assert packed_mode(model) is None
        assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_load_model_packs_and_caches_an_hf_folder(reference, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-model"
    reference.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    first = load_model(str(folder), decode_weights="auto")  # auto: packed, the layers are on a 4-bit grid
    assert first.packing.mode == resolve_weights(reference.model.layers, "auto") and not first.packing.from_cache
    second = load_model(str(folder), decode_weights="auto")
    assert second.packing.from_cache
    # read from the cache without the full-precision checkpoint: a meta-device skeleton, norms read by name
    assert "checkpoint left unread" in second.packing.note
    assert not any(t.is_meta for t in (*second.model.parameters(), *second.model.buffers()))
    ids = torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(second.model(ids).logits, first.model(ids).logits, atol=0, rtol=0)
    session = ChatSession(second, Settings(max_new_tokens=6, temperature=0.0, window=64))
    assert "".join(session.send("Tell me a story.")) == "".join(
        ChatSession(first, Settings(max_new_tokens=6, temperature=0.0, window=64)).send("Tell me a story.")
    )
    assert load_model(str(folder)).packing is None  # without decode_weights: the model as loaded


@pytest.mark.parametrize("decode_path", ["fast", "transformers"])
def test_chat_on_packed_weights(reference, tokenizer, decode_path):
    model = copy.deepcopy(reference)
    pack_model(model, "int4", None, "test")
    loaded = LoadedModel(model, tokenizer, identity="tiny-packed", source="tiny", load_seconds=0.0, converted=False)
    session = ChatSession(loaded, Settings(decode_path=decode_path, max_new_tokens=8, temperature=0.0, window=64))
    reply = "".join(session.send("Tell me a story about a dragon."))
    assert session.last_turn.new_tokens == 8 and isinstance(reply, str)


def test_int4_row_views_are_the_rows_packed_alone(kernel):
    weight = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    from streamchat import native
    from streamchat.quant import PackedLinear

    fused = PackedLinear(weight, None, "int4")
    assert fused.kernel == kernel
    view = fused.rows(64, 192)
    if kernel == "native":  # 8-row groups
        assert view.weight.data_ptr() == fused.weight[64 // native.ROWS].data_ptr()  # shares the storage
        assert torch.equal(view.weight, native.pack_q4(weight[64:192]))
        assert fused.rows(60, 96) is None  # not on an 8-row group
        x = torch.randn(3, 64)
        torch.testing.assert_close(view(x), fused(x)[:, 64:192])
        return
    alone_weight, alone_scales = quantize_int4(weight[64:192])
    assert view.weight.data_ptr() == fused.weight[64].data_ptr()  # shares the storage
    assert torch.equal(view.weight, alone_weight) and torch.equal(view.scales, alone_scales)
    assert fused.rows(32, 96) is None  # not on a 64-row block


def test_each_kernel_family_keeps_its_own_cache(reference, tmp_path):
    """Switching between native and torch kernels (STREAMCHAT_NATIVE=0) repacks once per family, never again."""
    from streamchat import native

    if native.library() is None:
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    assert not pack_model(copy.deepcopy(reference), "int4", tmp_path, "w").from_cache
    with native.torch_kernels():
        assert not pack_model(copy.deepcopy(reference), "int4", tmp_path, "w").from_cache
    assert pack_model(copy.deepcopy(reference), "int4", tmp_path, "w").from_cache  # the native entry is still there
    with native.torch_kernels():
        assert pack_model(copy.deepcopy(reference), "int4", tmp_path, "w").from_cache
    assert cache_paths(tmp_path, "int4", "native")[0].is_file() and cache_paths(tmp_path, "int4", "torch")[0].is_file()
