"""A Hugging Face model folder (config.json + *.safetensors in bf16/fp16/fp32) packed once into a GGUF file of
native block types, cached, then run from its blocks like any GGUF file (gguf_model.py).

Packing streams the checkpoint tensor by tensor, and a large tensor a row block at a time (`ROW_BLOCK_WEIGHTS`
weights: 16 Mi, 64 MB as fp32): each block is read from its safetensors file (the header parsed here, then a
positioned read of the block's bytes: no memory map, so the checkpoint's pages never count in the process's
memory), converted to fp32, encoded with gguf-py's quantizers (`gguf.quants.quantize`) and written, so the process
never holds more than one tensor's encoded bytes plus one fp32 row block; never the model in fp32 (or in any
precision) at once.

What goes into which type (`pack` is the `hf_pack` setting; default `DEFAULT`, Q8_0):

- the layers' linears (q, k, v, o, gate, up, down): `pack` (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0: the types gguf-py can
  encode that the native kernels run; BF16 or F16: a 16-bit copy, lossless for a checkpoint of that dtype);
  a linear whose inputs are not whole blocks of 32 goes to F16;
- the token embedding and an untied output head: `pack` for Q8_0/BF16/F16, Q8_0 under a 4/5-bit `pack` (as
  llama.cpp keeps its output head at 6+ bits; gguf-py has no Q6_K encoder);
- norms, biases, RoPE factors: F32.

The file is the GGUF llama.cpp's converter would write, with two differences: no tokenizer in its metadata (the
tokenizer and chat template are read from the HF folder itself), and a llama model's q/k rows stay in the HF
checkpoint's rotate-half order, marked by `ROPE_ROWS_KEY` = "rotate_half" (llama.cpp's converter permutes them for
its interleaved RoPE, and gguf_model.py undoes that permutation for files without the mark: a copy of q and k at
every load that an HF-origin file does not need).

Cache: `cache_root()/hf/<folder name>-<pack>-<path hash>-<key>.gguf`, `key` a hash of `FORMAT`, the folder's path,
config.json's bytes and each safetensors file's name, size and mtime (hashing gigabytes at every start would cost
more than a second of the start). The file is written under a `.partial` staging name in the same folder and
renamed into place only once complete and flushed, so a pack interrupted part way is never read as a cached one;
a cached file that does not read back whole (`GGUFFile` checks every tensor's extent) is packed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType
from gguf.quants import quantize as gguf_quantize

from streamchat.ggml_blocks import block_size, row_bytes
from streamchat.paths import CACHE_ENV, cache_root

T = GGMLQuantizationType
PACK_TYPES = {
    "Q8_0": T.Q8_0,
    "Q5_1": T.Q5_1,
    "Q5_0": T.Q5_0,
    "Q4_1": T.Q4_1,
    "Q4_0": T.Q4_0,
    "BF16": T.BF16,
    "F16": T.F16,
}
DEFAULT = "Q8_0"
TRANSFORMERS = "transformers"  # the `hf_pack` value that keeps transformers' own fp32 load
CHOICES = (*PACK_TYPES, TRANSFORMERS)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # llama.cpp's converter writes Mistral as llama; without a sliding window only
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
DTYPES = {"BF16": 2, "F16": 2, "F32": 4}  # safetensors dtypes packed, and their bytes a weight
ROPE_ROWS_KEY = "streamchat.rope_rows"  # "rotate_half": q/k rows in HF order (the module's note)
SOURCE_KEY = "streamchat.hf_source"
FORMAT = 1  # bumped whenever what is written changes: older cached files are then packed again
ROW_BLOCK_WEIGHTS = 1 << 24  # weights converted to fp32 at once (64 MB)
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


class HFPackError(ValueError):
    """The folder cannot be packed (architecture, dtype, a tensor streamchat does not know); the message names it."""


@dataclass
class Packed:
    """A packed folder: the cached GGUF `path`, whether this call wrote it, the seconds it took, a start-up note."""

    path: Path
    packed: bool
    seconds: float
    note: str


@dataclass
class _Tensor:
    hf_name: str
    name: str  # GGUF name
    file: Path
    shape: tuple[int, ...]  # HF shape: [rows, columns] or [n]
    kind: T  # the ggml type written
    dtype: str  # the checkpoint's: BF16, F16, F32
    offset: int  # of its first byte in `file`


def read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> {"dtype", "shape", "data_offsets"}) and where its data starts; HFPackError
    for a file that is not safetensors or is shorter than its tensors (an interrupted download).
    Format: https://huggingface.co/docs/safetensors/index (an 8-byte little-endian length, then that much JSON)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= min(size - 8, 100_000_000):
                raise ValueError(f"a header of {length:,} bytes in a file of {size:,}")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        raise HFPackError(f"{file} is not a readable safetensors file ({error})") from error
    header.pop("__metadata__", None)
    start = 8 + length
    for name, entry in header.items():
        end = start + int(entry["data_offsets"][1])
        if end > size:
            raise HFPackError(
                f"{file} is truncated: tensor {name!r} ends at byte {end:,} but the file has {size:,}; download it again"
            )
    return header, start


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise HFPackError(f"{folder}/config.json cannot be read: {error}") from error


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: those model.safetensors.index.json names (a sharded checkpoint), else
    model.safetensors, else every *.safetensors (a folder may also hold other formats' files, such as Mistral's
    consolidated.safetensors, which the index or model.safetensors leaves out)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise HFPackError(f"{index} cannot be read: {error}") from error
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise HFPackError(f"{folder}: the checkpoint's index names files that are missing: {', '.join(missing)}")
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def cache_key(folder: Path, pack: str) -> str:
    """The cache file's key: changes when the folder's config or any weight file changes (size, mtime)."""
    parts = [f"format {FORMAT}", pack, str(folder.resolve()), (folder / "config.json").read_text()]
    for file in weight_files(folder):
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _stem(folder: Path, pack: str) -> str:
    """The cache file names' part shared by every version of this folder's pack as `pack`: its name, the type, and
    a hash of its resolved path (two folders of one name elsewhere are two entries)."""
    resolved = folder.resolve()
    return f"{resolved.name}-{pack}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def cached_path(folder: Path, pack: str) -> Path:
    """Where the pack of `folder` as `pack` is (or will be) cached."""
    return cache_root() / "hf" / f"{_stem(folder, pack)}-{cache_key(folder, pack)}.gguf"


def architecture(folder: Path) -> str:
    """The GGUF architecture of the folder's model ("llama", "qwen2", "qwen3"); HFPackError naming any other, or a
    variant the native step does not run (a sliding window, MLP biases, a quantized checkpoint)."""
    config = _config(folder)
    names = config.get("architectures") or [config.get("model_type", "?")]
    name = names[0]
    if name not in ARCHITECTURES:
        raise HFPackError(
            f"{folder}: architecture {name!r} cannot be packed for streamchat's native step (it packs "
            f"{', '.join(ARCHITECTURES)}); `--set hf_pack={TRANSFORMERS}` loads it through transformers in fp32"
        )
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise HFPackError(f"{folder}: a quantized checkpoint ({method}) cannot be packed; give its bf16/fp16/fp32 one")
    if config.get("hidden_act", "silu") != "silu":
        raise HFPackError(f"{folder}: {name} with activation {config['hidden_act']!r} (the native step runs silu)")
    if config.get("mlp_bias"):
        raise HFPackError(f"{folder}: {name} with MLP biases does not run on the native step")
    window = config.get("sliding_window") if name == "MistralForCausalLM" else None
    if name.startswith("Qwen") and config.get("use_sliding_window"):
        window = config.get("sliding_window")
    if window:
        raise HFPackError(
            f"{folder}: {name} with a sliding attention window ({window}) does not run on the native step"
        )
    try:
        _rope_factors(config, 2)
    except HFPackError as error:
        raise HFPackError(f"{folder}: {error}") from None
    return ARCHITECTURES[name]


def _gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of an HF checkpoint tensor; None for one to skip (old checkpoints' rotary tables);
    HFPackError for one streamchat does not know (it would be silently dropped otherwise)."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    if hf_name == "lm_head.weight":
        return "output.weight"
    match = LAYER.fullmatch(hf_name)
    if match and match.group(2).endswith("rotary_emb.inv_freq"):
        return None
    if match and match.group(2) in LAYER_NAMES:
        return f"blk.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    raise HFPackError(f"tensor {hf_name!r} has no place on streamchat's native step")


def _kind(name: str, shape: tuple[int, ...], pack: T) -> T:
    """The ggml type tensor `name` is written in (the module's note)."""
    if len(shape) == 1:
        return T.F32
    if name in ("token_embd.weight", "output.weight") and pack not in (T.Q8_0, T.BF16, T.F16):
        pack = T.Q8_0
    if shape[1] % block_size(pack)[0]:
        return T.F16
    return pack


def plan(folder: Path, pack: str) -> tuple[str, dict, list[_Tensor]]:
    """(architecture, config.json, the tensors to write and their types), read from the safetensors headers only.
    HFPackError for an architecture, dtype or tensor that cannot be packed, or a folder without safetensors."""
    arch = architecture(folder)
    config = _config(folder)
    files = weight_files(folder)
    if not files:
        raise HFPackError(f"{folder}: no *.safetensors files (a .bin checkpoint cannot be packed; convert it first)")
    tied = bool(config.get("tie_word_embeddings", False))
    tensors = []
    for file in files:
        header, data = read_header(file)
        for hf_name, entry in header.items():
            dtype, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
            if dtype not in DTYPES:
                raise HFPackError(
                    f"{file}: tensor {hf_name!r} is {dtype}; packing takes {', '.join(DTYPES)} checkpoints"
                )
            try:
                name = _gguf_name(hf_name)
            except HFPackError as error:
                raise HFPackError(f"{file}: {error}") from None
            if name is None or (name == "output.weight" and tied):
                continue
            begin, end = (int(n) for n in entry["data_offsets"])
            if len(shape) not in (1, 2) or end - begin != math.prod(shape) * DTYPES[dtype]:
                raise HFPackError(f"{file}: tensor {hf_name!r} of shape {list(shape)} holds {end - begin:,} bytes")
            kind = _kind(name, shape, PACK_TYPES[pack])
            tensors.append(_Tensor(hf_name, name, file, shape, kind, dtype, data + begin))
    return arch, config, tensors


def _rope(config: dict) -> tuple[float, str, dict]:
    """(theta, scaling type, scaling parameters) from a config.json of either transformers generation: v4's
    `rope_theta` + `rope_scaling`, or v5's `rope_parameters` (which holds both)."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or parameters
    theta = float(config.get("rope_theta") or parameters.get("rope_theta") or 10000.0)
    return theta, str(scaling.get("rope_type", scaling.get("type", "default"))), scaling


def _rope_factors(config: dict, head_dim: int) -> np.ndarray | None:
    """Llama 3.x's RoPE frequency factors [head_dim / 2] (what llama.cpp's converter writes as rope_freqs), or None
    for plain RoPE; HFPackError for a scaling the native step does not run."""
    base, kind, scaling = _rope(config)
    if kind in ("default", "linear"):
        return None
    if kind != "llama3":
        raise HFPackError(f"RoPE scaling {kind!r} does not run on the native step (default, linear, llama3)")
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < old / high:
            factors.append(1.0)
        elif wavelength > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _metadata(writer: GGUFWriter, arch: str, config: dict, folder: Path, pack: str) -> int:
    """The architecture metadata gguf_model.config_from reads; returns the head dimension."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_name(folder.resolve().name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    theta, kind, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        if isinstance(config.get(key), int):
            add(config[key])
    writer.add_string(ROPE_ROWS_KEY, "rotate_half")
    writer.add_string(SOURCE_KEY, f"{folder.resolve()} ({pack})")
    return head_dim


def rows_fp32(tensor: _Tensor, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of checkpoint tensor `tensor` as fp32 [stop - start, columns] (a 1-D tensor: [n], all of
    it): the only fp32 the packing holds, `ROW_BLOCK_WEIGHTS` weights at most. A positioned read of just those
    bytes (no memory map: the checkpoint's pages never count in the process's resident memory); bf16 widened
    exactly (its 16 bits are an fp32's top half)."""
    columns = tensor.shape[-1]
    count = (stop - start) * columns if len(tensor.shape) > 1 else columns
    width = DTYPES[tensor.dtype]
    with tensor.file.open("rb") as handle:
        handle.seek(tensor.offset + start * columns * width)
        raw = handle.read(count * width)
    if len(raw) != count * width:
        raise HFPackError(f"{tensor.file}: tensor {tensor.hf_name!r} could not be read whole (the file changed?)")
    if tensor.dtype == "BF16":
        values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, "<f2" if tensor.dtype == "F16" else "<f4").astype(np.float32)
    return values.reshape(-1, columns) if len(tensor.shape) > 1 else values


def _encode(values: np.ndarray, kind: T) -> np.ndarray:
    """fp32 [rows, columns] (or [n]) -> the type's bytes, uint8 [rows, row bytes] (or [n bytes])."""
    if kind == T.F32:
        encoded = np.ascontiguousarray(values, dtype=np.float32)
    else:
        encoded = gguf_quantize(np.ascontiguousarray(values, dtype=np.float32), kind)
    return np.ascontiguousarray(encoded).view(np.uint8)


def _write(folder: Path, staging: Path, pack: str) -> list[_Tensor]:
    """Write the pack of `folder` to `staging`, tensor by tensor (header first: every tensor's type and size is
    known from the safetensors headers), flushed to disk. Returns what it wrote."""
    arch, config, tensors = plan(folder, pack)
    writer = GGUFWriter(str(staging), arch)
    head_dim = _metadata(writer, arch, config, folder, pack)
    factors = _rope_factors(config, head_dim)
    for tensor in tensors:
        columns = tensor.shape[-1]
        rows = tensor.shape[0] if len(tensor.shape) > 1 else 1
        size = row_bytes(tensor.kind, columns) * rows
        shape = (rows, size // rows) if len(tensor.shape) > 1 else (size,)
        writer.add_tensor_info(tensor.name, shape, np.dtype(np.uint8), size, raw_dtype=tensor.kind)
    if factors is not None:
        writer.add_tensor_info("rope_freqs.weight", (factors.nbytes,), np.dtype(np.uint8), factors.nbytes, T.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        columns = tensor.shape[-1]
        rows = tensor.shape[0] if len(tensor.shape) > 1 else 1
        out = np.empty((rows, row_bytes(tensor.kind, columns)), np.uint8)
        step = max(1, ROW_BLOCK_WEIGHTS // columns)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            out[start:stop] = _encode(rows_fp32(tensor, start, stop), tensor.kind).reshape(stop - start, -1)
        writer.write_tensor_data(out.reshape(-1) if len(tensor.shape) == 1 else out)
        del out
    if factors is not None:
        writer.write_tensor_data(factors.view(np.uint8))
    writer.flush()
    for handle in writer.fout or []:
        os.fsync(handle.fileno())
    writer.close()
    return tensors


def _complete(path: Path) -> bool:
    """True when the cached file reads back whole, written by this `FORMAT` (gguf_file checks every extent)."""
    from streamchat.gguf_file import GGUFError, GGUFFile

    try:
        file = GGUFFile(path)
    except GGUFError:
        return False
    return file.metadata.get(ROPE_ROWS_KEY) == "rotate_half"


def _alive(partial: Path) -> bool:
    """Whether the process that named staging file `partial` (`.<name>.<pid>.partial`) is still running."""
    try:
        pid = int(partial.name.split(".")[-2])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def pack_folder(folder: str | Path, pack: str = DEFAULT) -> Packed:
    """The cached GGUF of HF folder `folder` packed as `pack` (a `PACK_TYPES` name), packed now where the cache has
    no complete one. HFPackError for a folder that cannot be packed; OSError when the model cache cannot be written
    (the message names it and the variable that moves it)."""
    started = time.perf_counter()
    folder = Path(folder)
    if pack not in PACK_TYPES:
        raise HFPackError(f"hf_pack {pack!r}: one of {', '.join(CHOICES)}")
    architecture(folder)  # before anything is hashed or written
    path = cached_path(folder, pack)
    if path.is_file() and _complete(path):
        seconds = time.perf_counter() - started
        return Packed(path, False, seconds, f"{folder.name} as {pack}, packed before: {path}")
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = _write(folder, staging, pack)
        os.replace(staging, path)
    except OSError as error:
        raise OSError(f"cannot write the packed model to {path.parent} ({error}); set {CACHE_ENV} elsewhere") from error
    finally:
        with contextlib.suppress(OSError):  # nothing to remove where the folder could not be made
            staging.unlink(missing_ok=True)
    for old in path.parent.glob(f"{_stem(folder, pack)}-*.gguf"):  # packs of this folder's earlier versions
        if old != path:
            old.unlink(missing_ok=True)
    for partial in path.parent.glob(f".{_stem(folder, pack)}-*.partial"):  # left by packs killed part way
        if not _alive(partial):
            partial.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    size = path.stat().st_size / 1e6
    note = f"{folder.name} packed as {pack} ({len(tensors)} tensors) in {seconds:.1f} s, {size:,.1f} MB: {path}"
    return Packed(path, True, seconds, note)
