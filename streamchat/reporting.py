"""Files the front ends share: text files a user names (read with an error that says what is wrong), and the
result files of the stress test and the benchmarks (an output folder, JSON, CSV, a last JSON line)."""

from __future__ import annotations

import csv
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def read_text_file(path: str | Path, what: str, error: type[Exception] = ValueError, encoding: str = "utf-8") -> str:
    """The text of a file the user named (`what`: "config file", "--text file"...), or `error` saying whether it is
    missing or unreadable (not UTF-8, a folder, no permission)."""
    path = Path(path)
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as problem:
        raise error(f"cannot read {what} {path}: {problem}") from None


def output_dir(path: str | Path) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, as `lscpu | grep 'Model name'` shows it); "" where unknown."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        return ""


def machine_info() -> dict[str, Any]:
    """What the figures were measured on, to be written beside them: date, CPU model and torch's CPU capability
    (AVX512, AVX2...), cores, torch."""
    import os

    return {
        "cpu_model": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def print_json_line(data: dict[str, Any]) -> None:
    """The `--json` contract: the last line of stdout is one JSON object with the headline figures."""
    print(json.dumps(data, default=str), flush=True)
