"""HF folders packed once into a cached GGUF of native blocks (streamchat/hf_pack.py) and run from its blocks:
transformers' own logits within the pack type's rounding, the cache reused and never read half written, fp32
held a row block at a time, clear errors for what cannot be packed, and chat on the result."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file
from streamchat import hf_pack, native
from streamchat.config import HF_PACKS, Settings, SettingsError, load_settings
from streamchat.gguf_file import GGUFFile
from streamchat.model import ModelError, load_for_chat, load_model
from streamchat.session import ChatSession
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from tiny import tiny_model, tiny_qwen, tiny_tokenizer

pytestmark = pytest.mark.skipif(native.library() is None, reason="native kernels unavailable on this CPU")
IDS = torch.tensor([[3, 17, 200, 45, 9, 310, 2, 77, 5, 6, 100, 120, 130, 140, 150, 160, 170, 180, 190, 11]])
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # short enough that 20 positions see the scaled frequencies
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def build(name: str, vocab: int):
    if name == "llama":
        return tiny_model(vocab, seed=5)
    if name == "llama3-rope":
        return tiny_model(vocab, seed=6, rope_scaling=LLAMA3_ROPE)
    if name == "mistral":  # without a sliding window (Mistral v0.2 on): llama in GGUF
        model = tiny_model(vocab, seed=8)
        config = MistralConfig(**{**model.config.to_dict(), "sliding_window": None, "head_dim": 16})
        mistral = MistralForCausalLM(config).eval()
        mistral.load_state_dict(model.state_dict())
        return mistral
    return tiny_qwen(int(name[-1]), vocab, seed=7)


def save(model, tokenizer, folder, dtype=torch.bfloat16):
    copy.deepcopy(model).to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits[0]


def relative(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("llama", torch.bfloat16),
        ("llama", torch.float32),
        ("llama3-rope", torch.bfloat16),
        ("mistral", torch.bfloat16),
        ("qwen2", torch.bfloat16),
        ("qwen3", torch.float32),
    ],
)
def test_packed_logits_match_transformers(tokenizer, tmp_path, name, dtype):
    folder = save(build(name, len(tokenizer)), tokenizer, tmp_path / name, dtype)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # transformers' fp32 load
    expected = logits(reference)
    # 16 bits: every tensor in its place (q/k rows in HF order, biases, q/k norms, llama3 RoPE factors). BF16 of a
    # bf16 checkpoint is its own values (float rounding only); F16 of an fp32 one rounds each weight once (11 bits)
    exact = load_model(str(folder), hf_pack="BF16" if dtype == torch.bfloat16 else "F16")
    assert exact.packing.mode == "gguf" and exact.converted
    assert relative(logits(exact.model), expected) <= (1e-4 if dtype == torch.bfloat16 else 0.01)
    # Q8_0 (the default): the error is Q8_0's own rounding of the weights. Exact fp32 math on the weights rounded
    # through gguf's Q8_0 lands as far from the reference (0.08 of the largest logit on these peaked random models);
    # the kernels then add only their 8-bit activation blocks
    packed = load_model(str(folder), hf_pack="Q8_0")
    ours = logits(packed.model)
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for parameter in rounded.parameters():
            if parameter.dim() == 2:
                array = parameter.numpy()
                parameter.copy_(torch.from_numpy(dequantize(quantize(array, T.Q8_0), T.Q8_0).reshape(array.shape)))
    # measured: 0.03-0.07 of the exact math, 0.05-0.115 of transformers' logits; top-1 0.95-1.0 of the exact math's,
    # 0.8-1.0 of transformers' (the exact math on the rounded weights agrees with transformers no better: Q8_0's
    # rounding flips the near-ties of these random models)
    rounded_logits = logits(rounded)
    assert relative(ours, rounded_logits) <= 0.1
    assert relative(ours, expected) <= 0.15
    assert (ours.argmax(-1) == rounded_logits.argmax(-1)).float().mean() >= 0.9
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75
    file = GGUFFile(packed.model.streamchat_gguf.path)
    assert file.architecture == ("llama" if name.startswith(("llama", "mistral")) else name)
    assert ("rope_freqs.weight" in file.tensors) == (name == "llama3-rope")
    assert ("output.weight" in file.tensors) == (name == "qwen2")  # the untied head


def test_second_load_reads_the_cache_without_packing(tokenizer, tmp_path, monkeypatch):
    folder = save(build("llama", len(tokenizer)), tokenizer, tmp_path / "llama")
    first = load_model(str(folder), hf_pack="Q8_0")
    path = first.model.streamchat_gguf.path
    written = path.stat().st_mtime_ns
    assert first.converted and not first.packing.from_cache

    def refuse(*args):
        raise AssertionError("packed again")

    with monkeypatch.context() as patch:
        patch.setattr(hf_pack, "_write", refuse)
        second = load_model(str(folder), hf_pack="Q8_0")
    assert not second.converted and second.packing.from_cache and "packed before" in second.packing.note
    assert second.model.streamchat_gguf.path == path and path.stat().st_mtime_ns == written
    assert torch.equal(logits(second.model), logits(first.model))
    assert second.identity == first.identity == path.stem
    # another pack type is another cache file; a changed checkpoint is packed again
    assert load_model(str(folder), hf_pack="Q4_0").model.streamchat_gguf.path != path
    save(build("qwen3", len(tokenizer)), tokenizer, tmp_path / "elsewhere" / "llama")
    save(build("llama", len(tokenizer)), tokenizer, folder, torch.float32)
    namesake = load_model(str(tmp_path / "elsewhere" / "llama"), hf_pack="Q8_0").model.streamchat_gguf.path
    again = load_model(str(folder), hf_pack="Q8_0")
    assert again.converted and not path.exists()  # the stale pack replaced
    assert namesake.exists()  # another folder of the same name keeps its own


def test_partial_or_truncated_cache_file_is_never_used(tokenizer, tmp_path):
    folder = save(build("qwen3", len(tokenizer)), tokenizer, tmp_path / "qwen3")
    path = hf_pack.cached_path(folder, "Q8_0")
    path.parent.mkdir(parents=True)
    dead = path.parent / f".{path.name}.{2**22 + 1}.partial"  # a pack killed part way (no such pid)
    dead.write_bytes(b"GGUF")
    live = path.parent / f".{path.name}.{os.getppid()}.partial"  # another process's pack under way
    live.write_bytes(b"GGUF")
    first = load_model(str(folder), hf_pack="Q8_0")
    assert first.converted and first.model.streamchat_gguf.path == path
    assert not dead.exists() and live.exists()  # the dead one's leftovers removed, never read
    expected, whole = logits(first.model), path.read_bytes()
    del first  # its map of the file (a file cut under a live map faults its reader)
    path.unlink()
    path.write_bytes(whole[: len(whole) // 2])  # a cache file that lost its end
    again = load_model(str(folder), hf_pack="Q8_0")
    assert again.converted and path.read_bytes() == whole
    assert torch.equal(logits(again.model), expected)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(f".{os.getpid()}.partial")]


def test_fp32_is_held_a_row_block_at_a_time(tokenizer, tmp_path, cache, monkeypatch):
    """Peak memory, structurally: the only fp32 the packing makes is `rows_fp32`'s blocks (RSS of a tiny model is
    noise). With the block made small, no read exceeds it, far below the model, and the file is byte for byte the
    one packed with whole tensors."""
    model = build("qwen2", len(tokenizer))
    folder = save(model, tokenizer, tmp_path / "qwen2")
    whole = hf_pack.pack_folder(folder, "Q8_0").path.read_bytes()
    monkeypatch.setenv("STREAMCHAT_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(hf_pack, "ROW_BLOCK_WEIGHTS", 1024)
    sizes = []
    read = hf_pack.rows_fp32

    def counted(*args):
        values = read(*args)
        sizes.append(values.size)
        return values

    monkeypatch.setattr(hf_pack, "rows_fp32", counted)
    packed = hf_pack.pack_folder(folder, "Q8_0")
    total = sum(p.numel() for p in model.parameters())
    assert packed.packed and max(sizes) <= 1024 < total // 50
    assert packed.path.read_bytes() == whole


def test_what_cannot_be_packed_is_a_clear_error(tokenizer, tmp_path, cache):
    folder = save(build("llama", len(tokenizer)), tokenizer, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match=r"architecture 'GPT2LMHeadModel' cannot be packed.*hf_pack=transformers"):
        load_model(str(folder), hf_pack="Q8_0")
    yarn = {**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}
    (folder / "config.json").write_text(json.dumps(yarn))
    with pytest.raises(ModelError, match="RoPE scaling 'yarn'"):
        load_model(str(folder), hf_pack="Q8_0")
    windowed = {**config, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    (folder / "config.json").write_text(json.dumps(windowed))
    with pytest.raises(ModelError, match=r"MistralForCausalLM with a sliding attention window \(4096\)"):
        load_model(str(folder), hf_pack="Q8_0")
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 64, dtype=torch.int8)}, str(folder / "model.safetensors"))
    with pytest.raises(ModelError, match=r"model.embed_tokens.weight' is I8; packing takes BF16, F16, F32"):
        load_model(str(folder), hf_pack="Q8_0")
    save_file({"model.extra.weight": torch.zeros(4, 64)}, str(folder / "model.safetensors"))
    with pytest.raises(ModelError, match="'model.extra.weight' has no place"):
        load_model(str(folder), hf_pack="Q8_0")
    weights = save(build("llama", len(tokenizer)), tokenizer, folder) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted download
    with pytest.raises(ModelError, match=r"model.safetensors is truncated: tensor '.*' ends at byte"):
        load_model(str(folder), hf_pack="Q8_0")
    assert not [p for p in cache.rglob("*") if p.is_file()]  # refused before anything was written


def test_unwritable_cache_names_the_variable(tokenizer, tmp_path, monkeypatch):
    folder = save(build("llama", len(tokenizer)), tokenizer, tmp_path / "llama")
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("STREAMCHAT_CACHE", str(tmp_path / "not-a-folder"))
    with pytest.raises(ModelError, match=r"cannot write the packed model to .*not-a-folder/hf.*STREAMCHAT_CACHE"):
        load_model(str(folder), hf_pack="Q8_0")


def test_chat_on_the_packed_model_by_default(tokenizer, tmp_path):
    folder = save(build("llama", len(tokenizer)), tokenizer, tmp_path / "llama")
    settings = load_settings(None, {"model": str(folder), "max_new_tokens": 3, "temperature": 0.0, "window": 64})
    assert settings.hf_pack == "Q8_0"
    loaded = load_for_chat(settings)  # the setting's default: packed, on the native kernels
    assert loaded.packing.mode == "gguf" and "packed as Q8_0" in loaded.packing.note
    session = ChatSession(loaded, settings)
    reply = "".join(session.send("Tell me a story."))
    assert reply and reply == "".join(ChatSession(load_for_chat(settings), settings).send("Tell me a story."))


def test_setting_is_validated():
    assert HF_PACKS == hf_pack.CHOICES
    assert Settings().hf_pack == hf_pack.DEFAULT
    with pytest.raises(SettingsError, match="hf_pack"):
        load_settings(None, {"hf_pack": "Q4_K"})


def test_sharded_checkpoint_packs_as_one(tokenizer, tmp_path):
    model = build("qwen2", len(tokenizer))
    whole = save(model, tokenizer, tmp_path / "whole")
    sharded = tmp_path / "sharded"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(sharded, max_shard_size="40KB")
    tokenizer.save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 64)}, str(sharded / "consolidated.safetensors"))
    expected = logits(load_model(str(whole), hf_pack="Q8_0").model)
    assert torch.equal(logits(load_model(str(sharded), hf_pack="Q8_0").model), expected)  # the stray file ignored
