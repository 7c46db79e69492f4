"""Run by tests/test_distributed.py under torchrun (2 CPU processes): the precomputed reference
shared out, then reused from its cache, then a stale cache refused on every process."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import sentiment_records

from preftune.config import DataConfig
from preftune.data import prepare_pairs
from preftune.experiments.synthetic import build_tokenizer, tiny_llama
from preftune.model.reference import (
    Batching,
    ModelReference,
    Placement,
    ReferenceCache,
    ReferenceCacheError,
    load_or_precompute,
)

dist.init_process_group("gloo")
rank = dist.get_rank()
out = Path(sys.argv[1])
tokenizer = build_tokenizer()
pairs, _ = prepare_pairs(sentiment_records(11, seed=2), tokenizer, DataConfig(), progress=False)


class Counted(ModelReference):
    """Counts the pairs this process computed."""

    pairs = 0

    def logps_and_tails(self, batch):
        Counted.pairs += batch.num_examples
        return super().logps_and_tails(batch)


reference = Counted(tiny_llama(len(tokenizer), seed=6))
cache = out / "reference_logps.pt"


def load(settings):
    return load_or_precompute(
        ReferenceCache(cache, reference.model, settings),
        reference,
        pairs,
        Batching(tokenizer.pad_token_id, 2),
        Placement(is_main=rank == 0),
        progress=False,
    )


tables = load({"dtype": "float32"}).tables
computed = Counted.pairs
torch.save(tables, out / f"tables-rank{rank}.pt")
reused = load({"dtype": "float32"}).tables
try:
    load({"dtype": "bfloat16"})
    refused = ""
except ReferenceCacheError as err:
    refused = str(err)
report = {
    "rank": rank,
    "computed": computed,
    "computed_when_reused": Counted.pairs - computed,
    "reused_equal": all(torch.equal(reused[name], tables[name]) for name in tables),
    "refused": refused,
}
# A file per process: two processes printing to one pipe may interleave their lines.
(out / f"report-rank{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
