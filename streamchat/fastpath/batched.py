"""One fast-path decode step for several conversations at once (continuous batching, issue 12).

A decode step on a CPU is bound by reading the weights: B conversations decoded in one step read them once.
`decode_batch` runs B single-token steps as one forward over the `FastDecoder`'s packed weights: the embedding,
norms, q/k/v, output, MLP and LM-head matmuls take all B rows at once ([B, hidden]); each row's rotary
embedding is taken at its own cache length, and its new key/value is written into its own `BoundedCache` at its
own place, where its query attends over its own places 0..L_b (each cache keeps its own buffers: nothing is
copied or padded, and conversations join or leave between any two steps). Per row this is the computation of
`FastDecoder.decode` (vLLM's continuous batching, Yu et al. 2022 "Orca" iteration-level scheduling, over bounded
caches), so a greedy reply is the same token for token batched or alone.

Policies that rank tokens by attention (H2O, TOVA) observe scores per step; their conversations decode singly
(`FastDecoder.decode`): `batchable` says which caches may join a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamchat import native
from streamchat.cache import BoundedCache
from streamchat.fastpath.decoder import FastDecoder, FastPathUnavailable


def batchable(cache: BoundedCache) -> bool:
    """Whether this cache's next step may run in a batched step: the fast path is ready for it (a policy that
    observes attention scores batches on the native step only, `decode_batch`)."""
    return FastDecoder.refusal(cache) is None


def _check_rows(rows: list, caches: list[BoundedCache]) -> None:
    """One entry per cache, at least one, no cache twice; else ValueError."""
    if len(rows) != len(caches) or not caches:
        raise ValueError(f"{len(rows)} rows for {len(caches)} caches")
    if len({id(cache) for cache in caches}) != len(caches):
        raise ValueError("a cache appears twice in one batched step")


@torch.inference_mode()
def decode_batch(decoder: FastDecoder, token_ids: list[int], caches: list[BoundedCache]) -> torch.Tensor:
    """Feed token_ids[b] at place caches[b].length for every b; returns fp32 logits [B, vocab].

    Call `make_room(1)` on each cache first. Raises FastPathUnavailable for a cache `batchable` refuses, ValueError
    for mismatched lists or a cache listed twice. Eager only (a compiled decoder's graph is for one row)."""
    _check_rows(token_ids, caches)
    for cache in caches:
        if not batchable(cache):
            raise FastPathUnavailable(FastDecoder.refusal(cache))
    if decoder.native_ready(caches):
        return decoder.native_decode(token_ids, caches)
    if any(cache.policy.needs_attention_scores for cache in caches):
        raise FastPathUnavailable("attention-score policies batch on the native step only")
    heads, kv_heads, head_dim = decoder.num_heads, decoder.num_kv_heads, decoder.head_dim
    rotated, half = heads + kv_heads, head_dim // 2
    device, dtype = decoder.device, decoder.dtype
    lengths = [cache.length for cache in caches]
    places = torch.tensor(lengths, device=device)
    rope = caches[0].layers[0].rope
    cos = rope.cos.to(dtype).index_select(0, places).unsqueeze(1)  # [B, 1, head_dim]
    signed_sin = (rope.sin.to(dtype).index_select(0, places) * decoder._sin_signs).unsqueeze(1)
    x = decoder.embed(torch.tensor(token_ids, device=device)).to(dtype)  # [B, hidden]
    batch, hidden = x.shape[0], (x.shape[-1],)
    origins = [torch.tensor([cache.seen_tokens], device=device) for cache in caches]
    for i, layer in enumerate(decoder.layers):
        matmul_dtype = layer.qkv.input_dtype
        normed = F.rms_norm(x, hidden, layer.input_norm, decoder.eps).to(matmul_dtype)
        qkv = layer.qkv(normed).to(dtype).view(batch, rotated + kv_heads, head_dim)
        qk = qkv.narrow(1, 0, rotated)
        qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), signed_sin)  # each row rotated at its own place
        attended = []
        for b, cache in enumerate(caches):
            buffers, length = cache.layers[i], lengths[b]
            end = length + 1
            buffers.keys.narrow(2, length, 1).copy_(qk[b].narrow(0, heads, kv_heads).view(1, kv_heads, 1, head_dim))
            buffers.raw_keys.narrow(2, length, 1).copy_(
                qkv[b].narrow(0, heads, kv_heads).view(1, kv_heads, 1, head_dim)
            )
            buffers.values.narrow(2, length, 1).copy_(
                qkv[b].narrow(0, rotated, kv_heads).view(1, kv_heads, 1, head_dim)
            )
            buffers.origins.narrow(2, length, 1).copy_(origins[b].view(1, 1, 1).expand(1, kv_heads, 1))
            kv_dtype = buffers.keys.dtype
            if decoder.native_attention and kv_dtype in native.ATTENTION_DTYPES:
                query = qk[b].narrow(0, 0, heads)
                attended.append(native.attention(query, buffers.keys, buffers.values, end, decoder.scaling).view(1, -1))
                continue
            attended.append(
                F.scaled_dot_product_attention(
                    qk[b].narrow(0, 0, heads).view(1, heads, 1, head_dim).to(kv_dtype),
                    buffers.keys.narrow(2, 0, end),
                    buffers.values.narrow(2, 0, end),
                    scale=decoder.scaling,
                    enable_gqa=True,
                ).view(1, heads * head_dim)
            )
        x.add_(layer.out(torch.cat(attended).to(matmul_dtype)))
        normed = F.rms_norm(x, hidden, layer.post_norm, decoder.eps).to(matmul_dtype)
        gate, up = layer.gate_up(normed).chunk(2, dim=-1)
        x.add_(layer.down(F.silu(gate).mul_(up)))
    normed = F.rms_norm(x, hidden, decoder.final_norm, decoder.eps).to(decoder.lm_head.input_dtype)
    logits = decoder.lm_head(normed).float()
    for cache, length in zip(caches, lengths):
        for layer in cache.layers:
            layer.length = length + 1
        cache.seen_tokens += 1
    return logits


@torch.inference_mode()
def feed_batch(decoder: FastDecoder, chunks: list[list[int]], caches: list[BoundedCache]) -> torch.Tensor:
    """`decode_batch` where every chunk is one token; where some are longer (a prefill piece batched with decode
    steps: chunked prefill, as vLLM's scheduler mixes them), one native call over all their tokens
    (`FastDecoder.native_feed`). Returns fp32 logits [B, vocab] of each chunk's last token. Call `make_room` with
    each chunk's length first. Raises FastPathUnavailable where the native step cannot run these caches."""
    if all(len(chunk) == 1 for chunk in chunks):
        return decode_batch(decoder, [chunk[0] for chunk in chunks], caches)
    _check_rows(chunks, caches)
    if any(not chunk for chunk in chunks):
        raise ValueError("an empty chunk in a batched step")
    if not decoder.native_ready(caches):
        raise FastPathUnavailable("chunks of several tokens batch only on the native decode step")
    for chunk, cache in zip(chunks, caches):
        if cache.length + len(chunk) > cache.capacity:
            raise ValueError(f"{len(chunk)} tokens do not fit in the cache (make_room first)")
    return decoder.native_feed(chunks, caches)
