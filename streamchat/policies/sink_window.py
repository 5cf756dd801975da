"""StreamingLLM (Xiao et al., 2023): keep the first tokens (attention sinks) and a rolling window of recent ones."""

from __future__ import annotations

import torch

from streamchat.policies.base import EvictionPolicy, PolicySettings


class SinkWindowPolicy(EvictionPolicy):
    name = "sink_window"
    settings_keys = ("sinks", "window")

    @classmethod
    def budget(cls, settings: PolicySettings) -> int:
        return settings.sinks + settings.window

    def keep_indices(self, layer_idx: int, length: int, keep: int, protected: int) -> torch.Tensor:
        recent = keep - protected
        return torch.cat((torch.arange(protected), torch.arange(length - recent, length)))
