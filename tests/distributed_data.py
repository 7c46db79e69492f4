"""Run by tests/test_distributed.py under torchrun (2 CPU processes): both read the same pairs
file into a tokenized store in a fresh cache folder, and each says whether it scanned the file.

``distributed_data.py DATA CACHE``
"""

import hashlib
import importlib
import json
import sys

import torch

from preftune.config import DataConfig
from preftune.data import prepare_pairs
from preftune.distributed import close_process_group
from preftune.experiments.synthetic import build_tokenizer

data, cache = sys.argv[1], sys.argv[2]
prepare = importlib.import_module("preftune.data.prepare")
scans = []
scan_pairs = prepare.scan_pairs


def counted(*args, **kwargs):
    scans.append(1)
    return scan_pairs(*args, **kwargs)


prepare.scan_pairs = counted
torch.distributed.init_process_group("gloo")
pairs, report = prepare_pairs(data, build_tokenizer(), DataConfig(cache_dir=cache), progress=False)
ids = hashlib.sha256(json.dumps([vars(p) for p in pairs]).encode()).hexdigest()
print(
    "DATA "
    + json.dumps({"rank": torch.distributed.get_rank(), "scans": len(scans), "pairs": len(pairs), "ids": ids})
)
close_process_group()
