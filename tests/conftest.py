import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402 (after the path set-up above)
from helpers import QWEN3_TOKENIZER  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite is many small models: one intra-op thread per process avoids OpenMP oversubscription, and
# `make test` runs two pytest workers (pytest-xdist) to use both cores of a CI machine.
torch.set_num_threads(int(os.environ.get("ENGINE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="module")
def tok():
    """The real Qwen3 tokenizer (rollout parsing and batching tests)."""
    return engine.load_tokenizer(QWEN3_TOKENIZER)
