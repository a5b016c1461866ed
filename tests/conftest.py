"""Shared test set-up: offline Hugging Face, one torch thread (tiny models run many times faster
single-threaded on a small, shared CPU), and small toy-world fixtures."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_world():
    """(base model, tokenizer) of the default toy world (V=12, seed 0)."""
    from smclm.models.toy import build_toy_world

    return build_toy_world(vocab_size=12, seed=0)
