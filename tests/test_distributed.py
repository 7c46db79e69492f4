"""Two data-parallel CPU processes (gloo) train exactly like one process with twice the batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _run(args: list[str], tmp_path: Path) -> list[dict]:
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
    out = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("HISTORY ")]
    assert len(lines) == 1, out.stdout[-2000:]  # only the main process reports
    return json.loads(lines[0][len("HISTORY ") :])


def test_two_processes_of_batch_2_match_one_process_of_batch_4(tmp_path):
    # --standalone: a private rendezvous on a free local port.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = _run([*torchrun, str(HERE / "distributed_run.py"), str(tmp_path / "ddp"), "2"], tmp_path)
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


def test_kto_gathers_its_kl_estimate_across_processes(tmp_path):
    """KTO on examples sharing one prompt: each process's micro-batch of 2 estimates KL from its own
    rows, and only their mean over the processes (clamped after averaging) equals the estimate of one
    process with all 4, so the losses and the logged ``kl`` match only if the estimate is gathered.
    Evaluation (uneven shards) does not gather and must not hang."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = _run([*torchrun, str(HERE / "distributed_run.py"), str(tmp_path / "ddp"), "2", "kto"], tmp_path)
    single = _run(
        [sys.executable, str(HERE / "distributed_run.py"), str(tmp_path / "one"), "4", "kto"], tmp_path
    )
    train_ddp = [h for h in ddp if "loss" in h]
    train_one = [h for h in single if "loss" in h]
    assert max(h["kl"] for h in train_one) > 0.05  # the estimate is not clamped to 0 throughout
    for a, b in zip(train_ddp, train_one, strict=True):
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert [h["step"] for h in ddp if "eval_loss" in h] == [2, 4]
