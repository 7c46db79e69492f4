import os

import pytest
import torch

from preftune.experiments.synthetic import build_tokenizer

# The test models are tiny: a second intra-op thread gains nothing on them, and on a busy machine
# threads waiting for each other made runs many times slower. Launched subprocesses (torchrun,
# accelerate) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """The local BPE tokenizer (BOS post-processor, chat template). Do not mutate it."""
    return build_tokenizer()
