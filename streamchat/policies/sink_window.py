"""StreamingLLM (Xiao et al., 2023): keep the first tokens (attention sinks) and a rolling window of recent ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from streamchat.policies.base import EvictionPolicy

if TYPE_CHECKING:
    from streamchat.config import Settings


class SinkWindowPolicy(EvictionPolicy):
    name = "sink_window"
    settings_keys = ("sinks", "window")

    @classmethod
    def budget(cls, settings: "Settings") -> int:
        return settings.sinks + settings.window

    def keep_indices(self, layer_idx: int, length: int, keep: int, protected: int) -> torch.Tensor:
        recent = keep - protected
        return torch.cat((torch.arange(protected), torch.arange(length - recent, length)))
