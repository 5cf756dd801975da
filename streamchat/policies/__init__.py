"""Eviction policies: each decides which cached tokens to keep when the bounded cache must make room.

To add one, write a module here with a subclass of `EvictionPolicy` and list it in `POLICIES`.
"""

from __future__ import annotations

from streamchat.policies.base import EvictionPolicy
from streamchat.policies.h2o import H2OPolicy
from streamchat.policies.sink_window import SinkWindowPolicy
from streamchat.policies.tova import TOVAPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    SinkWindowPolicy.name: SinkWindowPolicy,
    H2OPolicy.name: H2OPolicy,
    TOVAPolicy.name: TOVAPolicy,
}


def get_policy_class(name: str) -> type[EvictionPolicy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None


__all__ = ["POLICIES", "EvictionPolicy", "get_policy_class"]
