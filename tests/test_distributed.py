"""Two CPU processes (gloo) under torchrun: data-parallel training equals one process with twice
the batch; the precomputed reference is shared out and equals one process's."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import sentiment_records

from preftune.config import DataConfig
from preftune.data import prepare_pairs
from preftune.reference import ModelReference, precompute
from preftune.synthetic import tiny_llama

HERE = Path(__file__).parent


def _launch(args: list[str], tmp_path: Path) -> str:
    """The stdout of ``args``, which must succeed."""
    # This tree's sources, not whichever copy of preftune the environment has installed.
    path = os.pathsep.join([str(HERE), str(HERE.parent / "src")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    # A session of its own: on a timeout the whole group (torchrun and its workers) is killed.
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def _run(args: list[str], tmp_path: Path) -> list[dict]:
    stdout = _launch(args, tmp_path)
    lines = [line for line in stdout.splitlines() if line.startswith("HISTORY ")]
    assert len(lines) == 1, stdout[-2000:]  # only the main process reports
    return json.loads(lines[0][len("HISTORY ") :])


# --standalone: a private rendezvous on a free local port.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_two_processes_of_batch_2_match_one_process_of_batch_4(tmp_path):
    ddp = _run([*TORCHRUN, str(HERE / "distributed_run.py"), str(tmp_path / "ddp"), "2"], tmp_path)
    single = _run([sys.executable, str(HERE / "distributed_run.py"), str(tmp_path / "one"), "4"], tmp_path)
    train_ddp = [h for h in ddp if "loss" in h]
    train_one = [h for h in single if "loss" in h]
    assert [h["learning_rate"] for h in train_ddp] == pytest.approx([h["learning_rate"] for h in train_one])
    for a, b in zip(train_ddp, train_one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    eval_ddp = [h for h in ddp if "eval_loss" in h]
    eval_one = [h for h in single if "eval_loss" in h]
    assert [h["step"] for h in eval_ddp] == [2, 4]  # uneven eval shards finish, no hang
    for a, b in zip(eval_ddp, eval_one, strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)


def test_two_processes_share_the_precomputed_reference_and_equal_one_process(tmp_path, tokenizer):
    stdout = _launch([*TORCHRUN, str(HERE / "distributed_reference.py"), str(tmp_path)], tmp_path)
    reports = sorted(
        (json.loads(line[len("REPORT ") :]) for line in stdout.splitlines() if line.startswith("REPORT ")),
        key=lambda report: report["rank"],
    )
    pairs, _ = prepare_pairs(sentiment_records(11, seed=2), tokenizer, DataConfig(), progress=False)
    single = precompute(
        ModelReference(tiny_llama(len(tokenizer), seed=6)),
        pairs,
        tokenizer.pad_token_id,
        2,
        torch.device("cpu"),
    )
    cached = torch.load(tmp_path / "reference_logps.pt", weights_only=True)
    for rank in (0, 1):
        gathered = torch.load(tmp_path / f"tables-rank{rank}.pt", weights_only=True)
        for name, table in single.items():
            torch.testing.assert_close(gathered[name], table, atol=1e-5, rtol=0, equal_nan=True)
            assert torch.equal(gathered[name], cached[name])
    assert [r["computed"] for r in reports] == [6, 5]  # each pair once, shared out
    assert [r["computed_when_reused"] for r in reports] == [0, 0]
    assert all(r["reused_equal"] for r in reports)
    assert all("computed for another model" in r["refused"] for r in reports)  # every rank stops
