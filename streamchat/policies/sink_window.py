"""StreamingLLM (Xiao et al., 2023): keep the first tokens (attention sinks) and a rolling window of recent ones.

With `evict_unit: message` the window is cut at a message boundary instead of at a token: the eviction goes on up
to the start (role header) of the oldest message that would otherwise be cut, so after the pinned part the cache
always begins with a whole message. When no message starts inside the window (one message longer than the
window), the window rolls token by token, as with `evict_unit: token`.
"""

from __future__ import annotations

import torch

from streamchat.policies.base import EvictionPolicy, PolicySettings


class SinkWindowPolicy(EvictionPolicy):
    name = "sink_window"
    settings_keys = ("sinks", "window")
    same_places_every_layer = True

    @classmethod
    def budget(cls, settings: PolicySettings) -> int:
        return settings.sinks + settings.window

    def keep_indices(self, layer_idx: int, length: int, keep: int, protected: int) -> torch.Tensor:
        first = length - (keep - protected)  # the oldest place a token-level window keeps
        starts = self.message_starts
        if starts is not None:
            aligned = starts[(starts >= first) & (starts <= length)]
            if len(aligned):
                first = int(aligned[0])
        return torch.cat((torch.arange(protected), torch.arange(first, length)))
