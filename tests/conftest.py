import os
import shutil
import tempfile

import pytest
import torch

from preftune.experiments.synthetic import build_tokenizer

# The test models are tiny: a second intra-op thread gains nothing on them, and on a busy machine
# threads waiting for each other made runs many times slower. Launched subprocesses (torchrun,
# accelerate) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# Tokenized stores go to a folder of the test session, never to the user's cache; launched and
# command-line subprocesses inherit it through the environment.
os.environ["PREFTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="preftune-test-cache-")


@pytest.fixture(scope="session")
def tokenizer():
    """The local BPE tokenizer (BOS post-processor, chat template). Do not mutate it."""
    return build_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def _tokenized_stores():
    yield
    shutil.rmtree(os.environ["PREFTUNE_CACHE_DIR"], ignore_errors=True)
