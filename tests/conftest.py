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
