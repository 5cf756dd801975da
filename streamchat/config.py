"""Settings: one flat, typed record loaded from YAML, overridden from the command line, validated here only.

Every front end builds its settings through `load_settings`, so a bad value fails the same way everywhere:
with a `SettingsError` that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from streamchat.policies import POLICIES, get_policy_class
from streamchat.policies.h2o import H2O_SCORES
from streamchat.reporting import read_text_file

# configs/ beside the package in a checkout (and an editable install); `pip install .` ships it inside the package
# as streamchat/configs (pyproject.toml), which is looked for first.
_INSTALLED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _INSTALLED_CONFIGS if _INSTALLED_CONFIGS.is_dir() else Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
MAX_NEW_TOKENS_LIMIT = 1_000_000
MIN_TEMPERATURE = 1e-5  # below it (but above 0, greedy), logits divided by the temperature overflow float32
MIN_RECALL_TOKENS, MAX_RECALL_TOKENS = 32, 8192  # a recalled passage needs a few dozen tokens with its frame
MAX_BUDGET = 1 << 20  # no model has a longer context; a typo like window: 10000000000 fails here, not in malloc
DTYPES = ("float32", "bfloat16", "float16")
DECODE_PATHS = ("fast", "transformers")
DECODE_WEIGHTS = ("auto", "model", "bf16", "int8", "int4", "int8_dynamic")  # see streamchat/quant.py
KV_DTYPES = ("auto", "model", *DTYPES)  # see streamchat/fastpath: kv_dtype_for
EVICT_UNITS = ("token", "message")  # see streamchat/policies/sink_window.py
HF_PACKS = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16", "transformers")  # streamchat/hf_pack.py's CHOICES


class SettingsError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass
class Settings:
    # Model
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch intra-op threads; None: torch's default
    # Bounded KV cache
    policy: str = "sink_window"
    sinks: int = 4
    window: int = 1020  # sink_window: recent tokens kept
    heavy: int = 256  # h2o: heavy-hitter tokens kept
    recent: int = 764  # h2o: recent tokens kept
    h2o_score: str = "normalized"  # h2o ranking: normalized, cumulative or decayed (docs/policies.md)
    h2o_decay: float = 0.99  # h2o_score decayed: weight a past attention score keeps per new token
    slack: int = 16  # extra tokens evicted at once, to amortize compaction
    evict_unit: str = "token"  # sink_window: token (rolling window) | message (whole oldest messages; docs/recall.md)
    memory: bool = False  # conversation memory: evicted messages kept on disk and recalled (docs/recall.md)
    recall_tokens: int = 256  # memory on: cache places reserved for recalled passages, after the pinned/sink part
    recall_semantic: bool = True  # memory on: also find passages by meaning (a bundled sentence model; docs/recall.md)
    kv_dtype: str = "auto"  # auto (fastpath/choice.py: fp16 on native kernels, else the model dtype or bf16 on AMX) | model | a dtype
    prefill_chunk: int = 256
    # Decode speed (streamchat/fastpath): single-token steps through a flat forward over the model's weights
    decode_path: str = "fast"  # fast (falls back to transformers where it cannot run) | transformers
    decode_weights: str = "auto"  # auto (int4 for 4-bit GGUF weights, else model) | model | bf16 | int8 | int4 | ...
    # ... int8_dynamic (see streamchat/quant.py)
    # HF folders (config.json + *.safetensors) on the native kernels: packed once into a cached GGUF of this ggml type
    hf_pack: str = "Q8_0"  # Q8_0 | Q5_1 | Q5_0 | Q4_1 | Q4_0 | BF16 | F16 | transformers (fp32 load, as before)
    decode_compile: bool = False  # torch.compile the fast step (paid once on the first reply; minutes on 2 cores)
    # Conversation
    system_prompt: str | None = None  # None: the chat template's own default
    pin_system_prompt: bool = True  # keep the whole system prompt as sinks, like llama.cpp's --keep
    # Sampling
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None
    # Front ends
    prompts_file: str | None = None  # scripted user turns for the endless demo and the stress test
    sessions_dir: str | None = None  # saved conversations; None: $XDG_DATA_HOME or ~/.local/share, /streamchat/sessions

    @property
    def budget(self) -> int:
        """Tokens the cache may hold, whatever the policy: the policy's budget, plus `recall_tokens` with memory on."""
        return get_policy_class(self.policy).budget(self) + self.recall_budget

    @property
    def recall_budget(self) -> int:
        """Cache places reserved for recalled passages: `recall_tokens` with memory on, else 0."""
        return self.recall_tokens if self.memory else 0

    def replace(self, **changes: Any) -> Settings:
        """A validated copy with `changes` applied (values may be strings, as typed on a command line)."""
        return load_settings(None, overrides=changes, base=self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in fields(Settings)}


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NULL = ("", "null", "none", "~")


def _parse_text(text: str, kind: type) -> Any:
    """`text` as a value of `kind` (bool, int or float), or ValueError. Plain parsing, not YAML: a number or a
    switch typed on a command line, in a UI box or quoted in a config file."""
    word = text.strip()
    if kind is bool:
        if word.lower() in _TRUE:
            return True
        if word.lower() in _FALSE:
            return False
        raise ValueError(word)
    return kind(word)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert `value` to the field's type.

    Text for a text field (system prompt, model path, folders, files) is kept exactly as given: never parsed
    again, so `A: b`, `x # y`, `#x`, `- item` or `yes` reach the session as typed (empty text means null where
    null is allowed). Text for a number or a switch is parsed plainly (`0.5`, `60`, `on`/`off`, `null`).
    Raises SettingsError quoting the value as given.
    """
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    if isinstance(value, str):
        if str in allowed:
            if not value.strip() and type(None) in allowed:
                return None
            return value
        if value.strip().lower() in _NULL and type(None) in allowed:
            return None
        for kind in allowed:
            if kind is not type(None):
                try:
                    return _parse_text(value, kind)
                except ValueError:
                    continue
        raise SettingsError(f"{key}: expected {names}, got {value!r}")
    if value is None:
        if type(None) in allowed:
            return None
        raise SettingsError(f"{key}: a value is required")
    for kind in allowed:
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif kind is str:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
    hint_text = " (in a YAML file, put text in quotes)" if str in allowed else ""
    raise SettingsError(f"{key}: expected {names}, got {value!r}{hint_text}")


def _check_ranges(s: Settings) -> None:
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise SettingsError(f"{key}: {message}")

    need(s.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {s.dtype!r}")
    need(s.device == "cpu" or s.device.startswith("cuda"), "device", f"must be 'cpu' or 'cuda[:N]', got {s.device!r}")
    need(s.threads is None or s.threads >= 1, "threads", "must be at least 1")
    need(s.policy in POLICIES, "policy", f"must be one of {', '.join(sorted(POLICIES))}, got {s.policy!r}")
    need(s.sinks >= 0, "sinks", "must be 0 or more")
    need(s.window >= 1, "window", "must be at least 1")
    need(s.heavy >= 0, "heavy", "must be 0 or more")
    need(s.recent >= 1, "recent", "must be at least 1")
    need(s.h2o_score in H2O_SCORES, "h2o_score", f"must be one of {', '.join(H2O_SCORES)}, got {s.h2o_score!r}")
    need(0 < s.h2o_decay < 1, "h2o_decay", f"must be between 0 and 1 (exclusive), got {s.h2o_decay}")
    need(s.slack >= 0, "slack", "must be 0 or more")
    need(s.evict_unit in EVICT_UNITS, "evict_unit", f"must be one of {', '.join(EVICT_UNITS)}, got {s.evict_unit!r}")
    need(s.kv_dtype in KV_DTYPES, "kv_dtype", f"must be one of {', '.join(KV_DTYPES)}, got {s.kv_dtype!r}")
    need(s.prefill_chunk >= 1, "prefill_chunk", "must be at least 1")
    need(
        s.decode_path in DECODE_PATHS, "decode_path", f"must be one of {', '.join(DECODE_PATHS)}, got {s.decode_path!r}"
    )
    need(
        s.decode_weights in DECODE_WEIGHTS,
        "decode_weights",
        f"must be one of {', '.join(DECODE_WEIGHTS)}, got {s.decode_weights!r}",
    )
    need(s.hf_pack in HF_PACKS, "hf_pack", f"must be one of {', '.join(HF_PACKS)}, got {s.hf_pack!r}")
    need(
        MIN_RECALL_TOKENS <= s.recall_tokens <= MAX_RECALL_TOKENS,
        "recall_tokens",
        f"must be between {MIN_RECALL_TOKENS} and {MAX_RECALL_TOKENS:,}, got {s.recall_tokens}",
    )
    budget = s.budget
    if s.memory:  # the recalled region must leave the policy its own budget beyond the sinks and a pinned prompt
        policy_budget = budget - s.recall_tokens
        need(
            s.recall_tokens <= policy_budget,
            "recall_tokens",
            f"{s.recall_tokens} is more than the rest of the cache ({policy_budget}): lower it or raise the window",
        )
    need(budget <= MAX_BUDGET, "budget", f"{budget:,} cache tokens is above {MAX_BUDGET:,}: lower window/heavy/recent")
    need(s.sinks < budget, "sinks", f"must be below the cache budget ({budget})")
    if s.slack >= budget - s.sinks:  # name what the user can change: the cache size or the slack
        sizes = [key for key in get_policy_class(s.policy).settings_keys if key != "sinks"] or ["window"]
        named = " + ".join(f"{key} {getattr(s, key)}" for key in sizes if hasattr(s, key))
        raise SettingsError(
            f"{'/'.join(sizes)}/slack: the cache keeps {budget - s.sinks} tokens beyond the {s.sinks} sinks ({named}), "
            f"which must be more than slack ({s.slack}, the tokens evicted at once): set a larger "
            f"{' + '.join(sizes)} (at least {s.slack + 1}) or a smaller slack (below {budget - s.sinks}, "
            "e.g. --set slack=N)"
        )
    need(
        1 <= s.max_new_tokens <= MAX_NEW_TOKENS_LIMIT,
        "max_new_tokens",
        f"must be between 1 and {MAX_NEW_TOKENS_LIMIT:,}, got {s.max_new_tokens}",
    )
    need(
        s.temperature == 0 or s.temperature >= MIN_TEMPERATURE,
        "temperature",
        f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {s.temperature:g}",
    )
    need(0 < s.top_p <= 1, "top_p", "must be in (0, 1]")
    need(s.top_k >= 0, "top_k", "must be 0 (off) or more")
    need(s.repetition_penalty > 0, "repetition_penalty", "must be above 0 (1 is off)")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, or a SettingsError that says what is wrong with the file."""
    text = read_text_file(path, "config file", SettingsError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SettingsError(f"invalid YAML in {path}: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def load_settings(
    path: str | Path | None = DEFAULT_CONFIG,
    overrides: dict[str, Any] | None = None,
    base: Settings | None = None,
) -> Settings:
    """Settings from `base` (or the defaults), then the YAML file at `path`, then `overrides`; all validated."""
    hints = _field_types()
    values = dataclasses.asdict(base) if base is not None else {}
    layers = []
    if path is not None:
        layers.append((str(path), read_yaml(path)))
    if overrides:
        layers.append(("override", overrides))
    for source, layer in layers:
        for key, value in layer.items():
            key = str(key).replace("-", "_")
            if key not in hints:
                raise SettingsError(f"unknown key {key!r} (in {source}); known keys: {', '.join(hints)}")
            values[key] = _coerce(key, value, hints[key])
    settings = Settings(**values)
    _check_ranges(settings)
    return settings


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """`["heavy=32", "window=60"]` from `--set` flags into a dict; a pair without '=' is an error."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set expects key=value, got {pair!r}")
        result[key.strip()] = value.strip()
    return result
