"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): rank cached tokens by the attention the newest
query gives them, not by a history of scores.

Same layout as H2O (sinks + `heavy` best-ranked tokens + the `recent` window, per layer and KV head, GQA groups
averaged); only the ranking differs: at each eviction, the attention probabilities of the last token fed.
"""

from __future__ import annotations

import torch

from streamchat.policies.h2o import H2OPolicy


class TOVAPolicy(H2OPolicy):
    name = "tova"

    def observe(self, layer_idx: int, probs: torch.Tensor) -> None:
        super().observe(layer_idx, probs)  # keeps the bookkeeping (and the checks) of H2O
        self.scores[layer_idx][..., : probs.shape[-1]] = probs[:, :, -1]

    def ranking(self, layer_idx: int, length: int) -> torch.Tensor:
        super().ranking(layer_idx, length)  # raises if some tokens were never scored
        return self.scores[layer_idx][..., :length]
