"""Saving and resuming a conversation: one `NAME.streamchat` file per session, safe to load from anywhere.

The file is a safetensors file (tensors only, no code: never pickle, never `torch.load`). Its metadata header
holds the format name and version, the session as JSON (conversation, settings, model identity, counters) and a
SHA-256 over that JSON and every tensor's name, dtype, shape and bytes, so a truncated, damaged or edited file
is refused. The checksum catches accidents and casual edits; it is not a signature (whoever can write the file can
recompute it), which is fine because loading a file never runs anything in it. Loading checks everything before
the session changes, so a refused file leaves the conversation as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from streamchat.session import ChatSession, SessionError

FORMAT = "streamchat-session"
VERSION = 1
SUFFIX = ".streamchat"
MAX_FILE_BYTES = 8 << 30  # far above any real cache; refuses a bogus huge upload before reading it
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class SessionFileError(SessionError):
    """A session file or name that cannot be used; the current session is unchanged."""


def sessions_dir(folder: str | None = None) -> Path:
    """Where named sessions live: `folder` (the sessions_dir setting), else $XDG_DATA_HOME/streamchat/sessions,
    else ~/.local/share/streamchat/sessions."""
    if folder:
        return Path(folder).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home).expanduser() / "streamchat" / "sessions"


def session_path(name: str, folder: str | None = None) -> Path:
    """The file for session `name`. Names are plain words (letters, digits, `.`, `_`, `-`; 64 at most, not
    starting with a dot), so no name can reach outside the sessions folder."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise SessionFileError(
            f"invalid session name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return sessions_dir(folder) / f"{name}{SUFFIX}"


def saved_names(folder: str | None = None) -> list[str]:
    """Names of the sessions saved in the folder, newest first."""
    root = sessions_dir(folder)
    files = [p for p in root.glob(f"*{SUFFIX}") if p.is_file()] if root.is_dir() else []
    files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.name[: -len(SUFFIX)] for p in files if NAME_PATTERN.fullmatch(p.name[: -len(SUFFIX)])]


def _digest(session_json: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(session_json.encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dumps(session: ChatSession, extra: dict[str, Any] | None = None) -> bytes:
    """The session as the bytes of a `.streamchat` file (for a download, or `save`). `extra` (JSON-able) rides
    along in the session record under "extra" (the server keeps a conversation's id and message history there);
    `loads` ignores it, `decode` returns it."""
    tensors, meta = session.export_state()
    if extra is not None:
        meta = {**meta, "extra": extra}
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    session_json = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    digest = _digest(session_json, tensors)
    header = {"format": FORMAT, "version": str(VERSION), "session": session_json, "sha256": digest}
    return save_tensors(tensors, metadata=header)


def _read_header(data: bytes) -> dict[str, str]:
    """The safetensors metadata: an 8-byte little-endian length, then that many bytes of JSON."""
    if not data:
        raise ValueError("the file is empty")
    if len(data) < 9 or data[8:9] != b"{":
        raise ValueError("it is not a streamchat session file (no safetensors header)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("the file is truncated (in its header)")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        raise ValueError("it is not a streamchat session file (no readable header)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("it has no streamchat metadata")
    ends = [
        entry["data_offsets"][1]
        for entry in header.values()
        if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
    ]
    if ends and all(isinstance(end, int) for end in ends) and 8 + size + max(ends) > len(data):
        raise ValueError(f"the file is truncated ({len(data)} of {8 + size + max(ends)} bytes)")
    return metadata


def decode(data: bytes, source: str = "the file") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The (tensors, session record) a `.streamchat` file's bytes hold, checked (format, version, checksum) but not
    yet applied to a session; SessionFileError naming the problem if they cannot be used."""
    if len(data) > MAX_FILE_BYTES:
        raise SessionFileError(f"cannot load {source}: larger than {MAX_FILE_BYTES >> 30} GiB, not a session file")
    try:
        header = _read_header(data)
        if header.get("format") != FORMAT:
            raise ValueError(f"it is not a streamchat session (format {header.get('format')!r})")
        if header.get("version") != str(VERSION):
            raise ValueError(f"it has format version {header.get('version')}; this streamchat reads version {VERSION}")
        tensors = load_tensors(data)
        session_json = header.get("session", "")
        if header.get("sha256") != _digest(session_json, tensors):
            raise ValueError("checksum mismatch: the file was damaged or edited")
        meta: Any = json.loads(session_json)
        if not isinstance(meta, dict):
            raise ValueError("the session record is not a mapping")
    except (ValueError, RuntimeError, SafetensorError, AttributeError) as error:
        raise SessionFileError(f"cannot load {source}: {error}") from None
    return tensors, meta


def apply(
    session: ChatSession, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str = "the file"
) -> None:
    """Make `session` the one `decode` returned (SessionFileError if it does not fit; the session is then unchanged)."""
    try:
        session.import_state(tensors, meta)
    except SessionError as error:
        raise SessionFileError(f"cannot load {source}: {error}") from None


def loads(session: ChatSession, data: bytes, source: str = "the file") -> None:
    """Resume the session held in `data` (a `.streamchat` file's bytes); SessionFileError if it cannot be used."""
    tensors, meta = decode(data, source)
    apply(session, tensors, meta, source)


def save_file(session: ChatSession, path: str | Path) -> Path:
    """Write the session to `path` atomically (a crash mid-write never leaves half a file), readable by the owner
    only (it holds the conversation)."""
    path = Path(path)
    data = dumps(session)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle, staging = tempfile.mkstemp(prefix=".saving-", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(staging, path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise SessionFileError(f"cannot save to {path}: {error}") from None
    return path


def load_file(session: ChatSession, path: str | Path) -> Path:
    """Resume the session saved at `path` (a named session's file, or an upload)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise SessionFileError(f"cannot load {path}: larger than {MAX_FILE_BYTES >> 30} GiB, not a session file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise SessionFileError(f"no saved session at {path}") from None
    except OSError as error:
        raise SessionFileError(f"cannot read {path}: {error}") from None
    loads(session, data, str(path))
    return path


def save(session: ChatSession, name: str) -> Path:
    """Save under `name` in the sessions folder (replacing an earlier save of that name)."""
    return save_file(session, session_path(name, session.settings.sessions_dir))


def load(session: ChatSession, name: str) -> Path:
    """Resume the session saved under `name`."""
    folder = session.settings.sessions_dir
    path = session_path(name, folder)
    if not path.is_file():
        known = ", ".join(saved_names(folder)[:10]) or "none yet"
        raise SessionFileError(f"no saved session named {name!r} in {sessions_dir(folder)} (saved: {known})")
    return load_file(session, path)
