import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, os.path.dirname(__file__))

from tiny_model import build_model, build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def model(tokenizer):
    return build_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """The tiny model and tokenizer saved as a normal checkpoint folder (TRL reloads a reference model from it)."""
    from tiny_model import save_tiny_model

    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen3")))
