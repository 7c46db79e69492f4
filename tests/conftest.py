import pytest

from preftune.synthetic import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The local BPE tokenizer (BOS post-processor, chat template). Do not mutate it."""
    return build_tokenizer()
