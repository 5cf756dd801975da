"""A semantic score for conversation memory from the chat model itself: nothing extra to download or hold.

A passage's vector is the mean, over its tokens, of the hidden states after the model's first `EMBED_LAYERS`
decoder layers (run on the passage alone, no cache), projected to `EMBED_DIM` dimensions by a fixed random
matrix (Johnson-Lindenstrauss: cosines are kept to within a few hundredths, and the store's disk use stays near
its text's). `streamchat.conversation_store` compares vectors by cosine after subtracting the store's mean
vector. Measured on SmolLM2-135M (docs/recall.md): early layers place a question and the statement that answers
it ("Which town is my home?" / "I live in Lisbon") close together even with no word in common; later layers
mostly say "a question" or "a statement". Two layers cost about 2/30 of a prefill of the same tokens at 135M.
"""

from __future__ import annotations

import numpy as np
import torch

EMBED_LAYERS = 2
EMBED_DIM = 256
MAX_EMBED_TOKENS = 512  # a passage is at most ~48 words; a longer query is cut here


class PassageEmbedder:
    """Vectors for texts' token ids: `embed([[ids...], ...])` -> float32 [n, EMBED_DIM].

    Raises ValueError at construction for a model without the decoder layout this reads (`model.model` with
    `embed_tokens`, `rotary_emb` and `layers`: the transformers Llama/Qwen family and streamchat's GGUF models)."""

    def __init__(self, model: torch.nn.Module):
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "layers")):
            raise ValueError(f"{type(model).__name__} has no decoder layout a passage embedding can read")
        self.inner = inner
        hidden = model.config.hidden_size
        generator = torch.Generator().manual_seed(0)  # the same projection in every process: vectors stay comparable
        self.projection = torch.randn(hidden, EMBED_DIM, generator=generator) / EMBED_DIM**0.5

    @torch.inference_mode()
    def embed(self, texts_ids: list[list[int]]) -> np.ndarray:
        vectors = []
        device = next(self.inner.parameters(), torch.empty(0)).device
        for ids in texts_ids:
            ids = ids[:MAX_EMBED_TOKENS] or [0]
            tokens = torch.tensor([ids], device=device)
            hidden = self.inner.embed_tokens(tokens)
            positions = torch.arange(len(ids), device=device)[None]
            rotary = self.inner.rotary_emb(hidden, positions)
            for layer in self.inner.layers[:EMBED_LAYERS]:
                out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
                hidden = out[0] if isinstance(out, tuple) else out
            vectors.append(hidden[0].float().mean(0).cpu() @ self.projection)
        return torch.stack(vectors).numpy() if vectors else np.zeros((0, EMBED_DIM), np.float32)
