import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny-model forwards are bound by op dispatch, not arithmetic: one thread runs them fastest, and on a busy
    2-core machine a second thread mostly waits to be scheduled."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    from tiny import tiny_loaded

    return tiny_loaded()


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct (converted once into the user's model cache)."""
    from streamchat.model import load_model

    return load_model()


@pytest.fixture
def footprint_children(monkeypatch):
    """The command lines of the memory-measuring children (evaluate/footprint.py) a test starts, none run: each
    answers 2 MB RSS, 3 MB peak."""
    import subprocess

    from streamchat.evaluate import footprint

    commands = []

    def child(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout='{"rss_mb": 2.0, "peak_rss_mb": 3.0}\n', stderr="")

    monkeypatch.setattr(footprint.subprocess, "run", child)
    return commands


@pytest.fixture(params=["native", "torch"])
def kernel(request):
    """Run a test once per int4/int8 kernel family: streamchat's native kernels (streamchat/native.py) and torch's
    weight-only kernels (what runs where the native ones cannot build). Linears packed inside the test use it."""
    from streamchat import native

    if request.param == "torch":
        with native.torch_kernels():
            yield "torch"
        return
    if native.library() is None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    yield "native"
