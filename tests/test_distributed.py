"""Several CPU processes (gloo) under torchrun / accelerate launch: DDP, FSDP2 and DeepSpeed
ZeRO-2/3 train like one process with the doubled batch, sharded checkpoints resume, the
precomputed reference is shared out and equals one process's, a live reference is sharded like
the policy, a finished command ends its process group, and a process that fails ends the run
with its error."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType
from helpers import quiet_config, sentiment_records
from transformers import AutoModelForCausalLM

from preftune.config import DataConfig
from preftune.data import prepare_pairs
from preftune.engine.sharding import check_distributed
from preftune.errors import ConfigError
from preftune.experiments.synthetic import tiny_llama, tiny_reward_model
from preftune.model.reference import Batching, ModelReference, precompute
from preftune.recipes.dpo import train
from preftune.recipes.reward import train_reward_model
from preftune.recipes.sft import train_sft

HERE = Path(__file__).parent
EXAMPLES = HERE.parent / "examples" / "accelerate"


def _launch(args: list[str], tmp_path: Path, succeed: bool = True, timeout: float = 240) -> str:
    """The stdout of ``args`` (with ``succeed=False``: its stderr, and it must fail)."""
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
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out:\n{stderr[-3000:]}")
    if not succeed:
        assert process.returncode != 0, stdout[-2000:]
        return stderr
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


@pytest.mark.slow  # a 2-process launch (40 s on 2 cores)
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


@pytest.mark.slow  # a 2-process launch (18 s on 2 cores)
def test_two_processes_share_the_precomputed_reference_and_equal_one_process(tmp_path, tokenizer):
    _launch([*TORCHRUN, str(HERE / "distributed_reference.py"), str(tmp_path)], tmp_path)
    reports = [json.loads((tmp_path / f"report-rank{rank}.json").read_text()) for rank in (0, 1)]
    pairs, _ = prepare_pairs(sentiment_records(11, seed=2), tokenizer, DataConfig(), progress=False)
    single = precompute(
        ModelReference(tiny_llama(len(tokenizer), seed=6)), pairs, Batching(tokenizer.pad_token_id, 2)
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


def _cli_run(tmp_path: Path, tokenizer, *extra: str) -> list[str]:
    """``preftune train`` under torchrun (tests/distributed_cli.py) on a saved model and a data file."""
    model_dir = tmp_path / "model"
    tiny_llama(len(tokenizer), seed=8).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in sentiment_records(16, seed=4)))
    return [
        *TORCHRUN,
        str(HERE / "distributed_cli.py"),
        str(model_dir),
        str(data),
        str(tmp_path / "out"),
        *extra,
    ]


@pytest.mark.slow  # a 2-process launch of the command line (20 s on 2 cores)
def test_a_finished_cli_run_ends_its_process_group_and_exits_0_on_every_process(tmp_path, tokenizer):
    stdout = _launch(_cli_run(tmp_path, tokenizer), tmp_path)  # exit status 0, no abort at the exit
    reports = [
        json.loads(line[len("REPORT ") :]) for line in stdout.splitlines() if line.startswith("REPORT ")
    ]
    assert sorted((r["rank"], r["code"], r["group"]) for r in reports) == [(0, 0, False), (1, 0, False)]
    assert (tmp_path / "out" / "final" / "config.json").is_file()


@pytest.mark.slow  # a 2-process launch (22 s on 2 cores)
def test_a_process_that_fails_ends_the_run_with_its_error_in_the_launchers_summary(tmp_path, tokenizer):
    # Rank 0 waits in a collective for the failed rank: gloo sees the peer gone, the launcher
    # ends the group. A hang would hit the timeout and fail the test.
    stderr = _launch(_cli_run(tmp_path, tokenizer, "fail"), tmp_path, succeed=False, timeout=120)
    summary = stderr[stderr.index("Root Cause") :]
    assert "rank      : 1" in summary
    assert "ValueError: a bad batch on rank 1" in summary
    assert not (tmp_path / "out" / "final").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> tuple[dict, Path]:
    """One 2-process FSDP2 launch (tests/distributed_fsdp.py): its report and its folder."""
    folder = tmp_path_factory.mktemp("fsdp2")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(EXAMPLES / "fsdp2.yaml"),
    ]
    launch += ["--num_processes=2", f"--main_process_port={_free_port()}"]
    stdout = _launch([*launch, str(HERE / "distributed_fsdp.py"), str(folder)], folder)
    line = next(line for line in stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :]), folder


def _steps(history: list[dict]) -> dict[int, dict]:
    return {h["step"]: h for h in history if "loss" in h}


@pytest.fixture(scope="module")
def doubled_batch(tmp_path_factory, tokenizer):
    """The sharded runs' training on one process, with the batch of two (4 steps, clipped, evaluated,
    against a live reference other than the starting policy)."""
    return train(
        quiet_config(
            str(tmp_path_factory.mktemp("one")),
            "train.batch_size=4",
            "train.max_steps=4",
            "train.scheduler=linear",
            "train.eval_every=2",
            "train.seed=3",
            "train.max_grad_norm=0.5",
            "reference.strategy=copy",
        ),
        model=tiny_llama(len(tokenizer), seed=8),
        tokenizer=tokenizer,
        train_data=sentiment_records(16, seed=4),
        eval_data=sentiment_records(5, seed=9),
        reference_model=tiny_llama(len(tokenizer), seed=9),
    )


def _assert_held_alike(shards: dict[str, dict], expected: dict[str, list[int]]) -> None:
    """The policy and the live reference hold the ``expected`` parts of their weights, the
    reference frozen (``trainable``: [parameters that train, parameters])."""
    for weights in (shards["policy"], shards["reference"]):
        assert {name: weights[name] for name in expected} == expected
    trainable, parameters = shards["policy"]["trainable"]
    assert trainable == parameters > 0
    assert shards["reference"]["trainable"] == [0, parameters]


def _assert_trains_like_one_process(history: list[dict], run_dir: Path, single) -> None:
    """Per-step losses, clipped gradient norms over the whole model, learning rates, evaluation
    on uneven shards, and a final/ that transformers loads with the single process's weights."""
    sharded, one = _steps(history), _steps(single.history)
    assert sorted(sharded) == sorted(one) == [1, 2, 3, 4]
    for step, expected in one.items():
        assert sharded[step]["loss"] == pytest.approx(expected["loss"], abs=1e-5)
        assert sharded[step]["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
        assert sharded[step]["learning_rate"] == pytest.approx(expected["learning_rate"])
    assert one[1]["grad_norm"] > 0.5  # clipping was active, over the whole model
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    expected_evals = [(h["step"], h["eval_loss"]) for h in single.history if "eval_loss" in h]
    assert [s for s, _ in evals] == [2, 4]
    assert [v for _, v in evals] == pytest.approx([v for _, v in expected_evals], abs=1e-5)
    gathered = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(single.final_dir).state_dict().items():
        torch.testing.assert_close(gathered[name], tensor, atol=1e-5, rtol=0)


def test_fsdp2_on_two_processes_trains_like_one_process_with_the_doubled_batch(
    fsdp2, doubled_batch, tokenizer
):
    report, folder = fsdp2
    # Sharded for real: each decoder layer its own group, each process holding half of every
    # weight, of the policy and of the live reference alike (which stays frozen).
    halves = {"groups": 2, "layer": [32, 64], "lm_head": [len(tokenizer) // 2, len(tokenizer)]}
    _assert_held_alike(report["shards"], halves)
    # Against that reference, the losses equal one process's with the whole reference.
    _assert_trains_like_one_process(report["full"], folder / "full", doubled_batch)


def test_fsdp2_run_stopped_after_step_2_resumes_to_the_uninterrupted_losses(fsdp2):
    report, _ = fsdp2
    uninterrupted, resumed = _steps(report["full"]), _steps(report["resumed"])
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], abs=1e-5)
        assert resumed[step]["grad_norm"] == pytest.approx(uninterrupted[step]["grad_norm"], rel=1e-4)


def test_reward_models_and_sft_under_fsdp2_train_like_one_process(fsdp2, tmp_path, tokenizer):
    report, _ = fsdp2
    records = sentiment_records(16, seed=4)
    short = ("train.batch_size=4", "train.max_steps=2")
    reward = train_reward_model(
        quiet_config(str(tmp_path / "rm"), *short),
        model=tiny_reward_model(len(tokenizer), seed=4),
        tokenizer=tokenizer,
        train_data=records,
    )
    sft = train_sft(
        quiet_config(str(tmp_path / "sft"), *short),
        model=tiny_llama(len(tokenizer), seed=4),
        tokenizer=tokenizer,
        train_data=[{"prompt": r["prompt"], "completion": r["chosen"]} for r in records],
    )
    for name, one_process in (("reward", reward), ("sft", sft)):
        two, one = _steps(report[name]), _steps(one_process.history)
        assert sorted(two) == sorted(one) == [1, 2]
        for step, expected in one.items():
            assert two[step]["loss"] == pytest.approx(expected["loss"], abs=1e-5), name
            assert two[step]["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), name


@pytest.mark.parametrize(
    ("config", "kind", "processes"),
    [
        ("ddp.yaml", DistributedType.MULTI_GPU, 8),
        ("fsdp2.yaml", DistributedType.FSDP, 8),
        ("multi-node.yaml", DistributedType.FSDP, 16),
        ("zero2.yaml", DistributedType.DEEPSPEED, 8),
        ("zero3.yaml", DistributedType.DEEPSPEED, 8),
    ],
)
def test_each_example_accelerate_config_is_one_accelerate_reads(config, kind, processes):
    read = ClusterConfig.from_yaml_file(EXAMPLES / config)
    assert (read.distributed_type, read.num_processes) == (kind, processes)
    if kind == DistributedType.FSDP:
        assert read.fsdp_config["fsdp_version"] == 2


def _launched(
    kind: DistributedType, fsdp2: bool = False, zero_stage: int | None = None, zero3_init: bool = False
) -> SimpleNamespace:
    plugin = SimpleNamespace(zero_stage=zero_stage, zero3_init_flag=zero3_init)
    return SimpleNamespace(
        distributed_type=kind, is_fsdp2=fsdp2, state=SimpleNamespace(deepspeed_plugin=plugin)
    )


@pytest.mark.parametrize(
    ("launched", "refusal"),
    [
        (_launched(DistributedType.FSDP, fsdp2=False), "fsdp_version: 2"),
        (_launched(DistributedType.DEEPSPEED, zero_stage=1), "zero_stage: 2 or 3"),
        (_launched(DistributedType.DEEPSPEED, zero_stage=0), "zero_stage: 2 or 3"),
        (_launched(DistributedType.DEEPSPEED, zero_stage=3, zero3_init=True), "zero3_init_flag"),
        (_launched(DistributedType.MEGATRON_LM), "not supported yet"),
    ],
)
def test_fsdp1_zero_0_and_1_zero3_init_and_megatron_are_refused_with_what_to_use_instead(launched, refusal):
    with pytest.raises(ConfigError, match=refusal):
        check_distributed(launched)
    check_distributed(_launched(DistributedType.FSDP, fsdp2=True))
    check_distributed(_launched(DistributedType.DEEPSPEED, zero_stage=2))
    check_distributed(_launched(DistributedType.DEEPSPEED, zero_stage=3))


# ---------------------------------------------------------------- DeepSpeed ZeRO-2 / ZeRO-3

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install deepspeed): the ZeRO-2/3 runs need it",
)


# ZeRO-2 is the slower-to-launch, lesser case of ZeRO-3 here: it runs with -m slow.
@pytest.fixture(scope="module", params=[pytest.param(2, marks=pytest.mark.slow), 3], ids=["zero2", "zero3"])
def zero(request, tmp_path_factory) -> tuple[int, dict, Path]:
    """One 2-process DeepSpeed launch (tests/distributed_deepspeed.py): stage, report, folder."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed): the ZeRO-2/3 runs need it")
    stage = request.param
    folder = tmp_path_factory.mktemp(f"zero{stage}")
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--config_file", str(EXAMPLES / f"zero{stage}.yaml")]
    launch += ["--num_processes=2", f"--main_process_port={_free_port()}"]
    stdout = _launch([*launch, str(HERE / "distributed_deepspeed.py"), str(folder)], folder)
    line = next(line for line in stdout.splitlines() if line.startswith("REPORT "))
    return stage, json.loads(line[len("REPORT ") :]), folder


@needs_deepspeed
def test_deepspeed_zero_on_two_processes_trains_like_one_process_with_the_doubled_batch(
    zero, doubled_batch, tokenizer
):
    stage, report, folder = zero
    lm_head = 64 * len(tokenizer)
    # ZeRO-3: each process holds half of every weight, of the policy and of the frozen live
    # reference alike; ZeRO-2: every weight whole.
    held = {
        2: {"layer": [64 * 64] * 2, "lm_head": [lm_head] * 2},
        3: {"layer": [2048, 4096], "lm_head": [lm_head // 2, lm_head]},
    }
    _assert_held_alike(report["shards"], held[stage])
    _assert_trains_like_one_process(report["full"], folder / "full", doubled_batch)


@needs_deepspeed
def test_deepspeed_zero_run_stopped_after_step_2_resumes_to_the_uninterrupted_losses(zero):
    _, report, folder = zero
    uninterrupted, resumed = _steps(report["full"]), _steps(report["resumed"])
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], abs=1e-5)
        assert resumed[step]["grad_norm"] == pytest.approx(uninterrupted[step]["grad_norm"], rel=1e-4)
    # The optimizer state as DeepSpeed wrote it, one file per process; the weights gathered.
    checkpoint = folder / "resumed" / "checkpoint-2"
    assert len(list((checkpoint / "optimizer" / "zero").glob("*optim_states.pt"))) == 2
    saved = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    for name, tensor in (
        AutoModelForCausalLM.from_pretrained(folder / "full" / "checkpoint-2").state_dict().items()
    ):
        torch.testing.assert_close(saved[name], tensor, atol=1e-6, rtol=0)


def test_a_launch_of_two_processes_tokenizes_once_and_both_read_the_same_store(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_records(40, seed=6)))
    stdout = _launch(
        [*TORCHRUN, str(HERE / "distributed_data.py"), str(data), str(tmp_path / "cache")], tmp_path
    )
    ranks = [json.loads(line[len("DATA ") :]) for line in stdout.splitlines() if line.startswith("DATA ")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert sum(r["scans"] for r in ranks) == 1  # the main process scanned, the other mapped its store
    assert ranks[0]["ids"] == ranks[1]["ids"] and ranks[0]["pairs"] == 40
