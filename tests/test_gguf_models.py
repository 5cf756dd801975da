"""GGUF files run from their own blocks (gguf_file.py, gguf_model.py): the same logits as the model they were
written from, llama.cpp's logits on the shared fixtures, and clear errors for broken files."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import quantize
from streamchat import native
from streamchat.config import Settings
from streamchat.evaluate.kl import ReferenceError, chat_path_logits, compare, read_reference, top1_agreement
from streamchat.gguf_file import GGUFError, GGUFFile
from streamchat.gguf_model import build_model
from streamchat.model import ModelError, load_model
from tests.conftest import SHARED_DATA
from tests.tiny import tiny_model

pytestmark = pytest.mark.skipif(native.library() is None, reason="native kernels unavailable on this CPU")
FIXTURES = SHARED_DATA / "gguf"
NAMES = [
    "tiny-llama.Q4_K_M",
    "tiny-llama.Q5_K_M",
    "tiny-llama.Q6_K",
    "tiny-llama.Q8_0",
    "tiny-llama.Q4_0",
    "tiny-llama.f16",
    "tiny-qwen2.Q4_K_M",
    "tiny-qwen3.Q4_K_M",
]
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared GGUF fixtures absent ({FIXTURES})")


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(model, path: Path, kind: T = T.F32, **metadata_overrides) -> Path:
    """The HF Llama `model` as a GGUF file the way llama.cpp's converter writes one (tensors in `kind`)."""
    config = model.config
    writer = GGUFWriter(str(path), "llama")
    values = {
        "block_count": config.num_hidden_layers,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "head_count": config.num_attention_heads,
        "head_count_kv": config.num_key_value_heads,
        **metadata_overrides,
    }
    writer.add_block_count(values["block_count"])
    writer.add_embedding_length(values["embedding_length"])
    writer.add_feed_forward_length(values["feed_forward_length"])
    writer.add_head_count(values["head_count"])
    writer.add_head_count_kv(values["head_count_kv"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_context_length(4096)

    def add(name: str, tensor: torch.Tensor, tensor_kind: T = kind):
        array = tensor.detach().float().numpy()
        if array.ndim == 1 or tensor_kind == T.F32:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif tensor_kind == T.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(array, tensor_kind), raw_dtype=tensor_kind)

    add("token_embd.weight", model.model.embed_tokens.weight)
    add("output_norm.weight", model.model.norm.weight)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_q.weight", torch.from_numpy(_permute(a.q_proj.weight.detach().numpy(), heads)))
        add(f"blk.{i}.attn_k.weight", torch.from_numpy(_permute(a.k_proj.weight.detach().numpy(), kv)))
        add(f"blk.{i}.attn_v.weight", a.v_proj.weight)
        add(f"blk.{i}.attn_output.weight", a.o_proj.weight)
        add(f"blk.{i}.ffn_gate.weight", m.gate_proj.weight)
        add(f"blk.{i}.ffn_up.weight", m.up_proj.weight)
        add(f"blk.{i}.ffn_down.weight", m.down_proj.weight)
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def hf_model():
    return tiny_model(vocab_size=320, seed=5)


@pytest.mark.parametrize("kind", [T.F32, T.F16, T.Q8_0])
def test_blocks_model_equals_the_model_it_was_written_from(hf_model, tmp_path, kind):
    path = write_gguf(hf_model, tmp_path / f"tiny.{kind.name}.gguf", kind)
    model, load = build_model(path)
    assert load.types.get(kind.name if kind != T.F32 else "F32")
    ids = torch.tensor([[3, 17, 200, 45, 9, 310, 2, 77]])
    with torch.no_grad():
        expected, ours = hf_model(input_ids=ids).logits[0], model(input_ids=ids).logits[0]
    tolerance = {T.F32: 1e-4, T.F16: 2e-2, T.Q8_0: 0.1}[kind]
    assert (ours - expected).abs().max() <= tolerance * expected.abs().max()
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_native_step_equals_transformers_forward(hf_model, tmp_path):
    model, _ = build_model(write_gguf(hf_model, tmp_path / "tiny.f32.gguf"))
    tokens = [3, 17, 200, 45, 9, 310, 2, 77, 5, 6]
    settings = Settings(kv_dtype="float32")
    stepped = chat_path_logits(model, settings, tokens)
    with torch.no_grad():
        whole = model(input_ids=torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(stepped, whole, atol=1e-3, rtol=1e-3)


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_fixture_kl_against_llama_cpp(name):
    loaded = load_model(str(FIXTURES / f"{name}.gguf"))
    assert loaded.packing.mode == "gguf" and not loaded.converted
    tokens, reference = read_reference(FIXTURES / f"{name}.ref.npz", loaded.model.config.vocab_size)
    result = compare(chat_path_logits(loaded.model, Settings(), tokens), reference, tokens)
    assert result["kl_mean"] <= 0.01, result
    # 32 positions of a random-weight model: a disagreement is a near-tie (exact fp32 math on the dequantized
    # weights disagrees at the same places; docs/models.md)
    assert result["top1_agreement"] >= 0.84, result


@needs_fixtures
def test_qwen3_native_step_equals_its_forward():
    model, _ = build_model(FIXTURES / "tiny-qwen3.Q4_K_M.gguf")
    tokens = [1, 520, 3000, 7, 48000, 12, 99, 5]
    stepped = chat_path_logits(model, Settings(kv_dtype="float32"), tokens)
    with torch.no_grad():
        whole = model(input_ids=torch.tensor([tokens])).logits[0]
    # the steps see their inputs within float rounding of the forward's (attention computed otherwise); 8-bit
    # activation blocks can round a value near a level boundary the other way: a logit moves by about 1%
    assert (stepped - whole).abs().max() <= 0.02 * whole.abs().max()
    assert compare(stepped, whole, tokens)["kl_mean"] <= 1e-3


def test_top1_agreement_counts_stored_ties_alike():
    reference = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 0.0, 1.0, 0.0]])
    # position 0: the reference's best two are equal as stored, either is its top 1; position 1: ours is wrong
    assert top1_agreement(torch.tensor([[0.0, 0.1, 0.2, 0.0], [0.0, 0.0, 1.0, 0.0]]), reference) == 0.5
    assert top1_agreement(torch.tensor([[0.0, 0.2, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0]]), reference) == 1.0
    assert top1_agreement(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]), reference) == 0.5


def test_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(path)
    with pytest.raises(ModelError, match="not a GGUF file"):
        load_model(str(path))


def test_truncated(hf_model, tmp_path):
    whole = write_gguf(hf_model, tmp_path / "whole.gguf").read_bytes()
    for keep in (len(whole) - 1000, 60):
        path = tmp_path / f"cut{keep}.gguf"
        path.write_bytes(whole[:keep])
        with pytest.raises(GGUFError, match="truncated"):
            GGUFFile(path)


def test_shape_disagrees_with_metadata(hf_model, tmp_path):
    path = write_gguf(hf_model, tmp_path / "bad.gguf", feed_forward_length=96)
    with pytest.raises(GGUFError, match=r"blk.0.ffn_gate.weight.*shape \[128, 64\].*metadata says \[96, 64\]"):
        build_model(path)


def test_architecture_not_native(hf_model, tmp_path):
    path = write_gguf(hf_model, tmp_path / "arch.gguf")
    data = path.read_bytes().replace(b"llama", b"gpt2x", 1)  # general.architecture's value, same length
    path.write_bytes(data)
    with pytest.raises(GGUFError, match="architecture 'gpt2x'"):
        build_model(path)


def test_bad_reference(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, tokens=np.arange(4, dtype=np.int32))
    with pytest.raises(ReferenceError, match="'tokens' and 'logits'"):
        read_reference(path, 100)
    np.savez(path, tokens=np.arange(4, dtype=np.int32), logits=np.zeros((4, 50), np.float16))
    with pytest.raises(ReferenceError, match="vocabulary has 100"):
        read_reference(path, 100)
