"""``preftune pipeline run pipeline.yaml``: named stages run in order, each a normal config.

    output: runs/pipeline
    stages:
      sft:  {kind: sft, model: {name_or_path: base/}, data: {path: sft.jsonl}, train: {...}}
      rm:   {kind: rm,  model: {name_or_path: "${sft.final}"}, data: {path: prefs.jsonl}}
      dpo:  {kind: dpo, model: {name_or_path: "${sft.final}"}, data: {path: prefs.jsonl}, objective: {loss: [dpo]}}
      ppo:  {kind: ppo, model: {name_or_path: "${sft.final}"}, prompts: {path: prompts.jsonl}, reward: {scorer: "${rm.final}"}}

A value may name an earlier stage's result: ``${NAME.final}`` (its ``final/`` folder) or
``${NAME.output}`` (its folder). A stage's name is a plain folder name (letters, digits, ``_``
and ``-``): each stage runs in ``OUTPUT/NAME``, and nothing it writes lies outside ``OUTPUT``. The
pipeline holds ``OUTPUT`` while it runs (a second pipeline into it is refused), and a stage's
folder holds its kind of run only. Each stage records a fingerprint
of its resolved config and inputs (data files by size and modification time, earlier stages
by their fingerprints) in ``OUTPUT/NAME/stage.json``: a complete stage with the same
fingerprint is skipped, an interrupted one is resumed from its last checkpoint, a changed one
is run again. The end is a summary table and ``OUTPUT/summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import load_config
from ..data.files import write_json
from ..data.outputs import STAGE_KINDS, check_kind, check_output_dir, holding, record_kind
from ..engine.tracking import setting_text
from ..errors import ConfigError, PreftuneError
from ..losses import available as available_objectives

STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")
"""A stage's name: its folder's name in the output folder, and what ``${NAME.…}`` refers to."""
REFERENCE = re.compile(r"\$\{([A-Za-z0-9_-]+)\.(final|output)\}")


@dataclass
class Stage:
    name: str
    kind: str
    tree: dict[str, Any]
    """The stage's config sections as written (references not yet resolved)."""


def _train_stage(kind: str) -> Callable[[dict[str, Any]], dict[str, float]]:
    """A stage that trains with one of the recipes; returns its last logged metrics."""

    def run(tree: dict[str, Any]) -> dict[str, float]:
        config = load_config(base=_dotted(tree), command=COMMAND[kind])
        if kind == "rm":
            from .reward import train_reward_model as recipe
        elif kind == "sft":
            from .sft import train_sft as recipe  # type: ignore[no-redef]
        elif kind == "ppo":
            from .ppo import train_ppo as recipe  # type: ignore[no-redef, assignment]
        else:
            from .dpo import train as recipe  # type: ignore[no-redef]
        history = recipe(config).history
        last: dict[str, float] = {}
        for row in history:
            last.update(row)
        return last

    return run


EVAL_OPTIONS = (
    "policy",
    "reference",
    "reward_model",
    "reward",
    "sets",
    "samples",
    "max_new_tokens",
    "beta",
    "seed",
)


def _eval_stage(tree: dict[str, Any]) -> dict[str, float]:
    """``preftune eval`` as a stage: ``policy``, ``sets`` (name: file), and the command's options;
    the other sections (``model``, ``data``) configure tokenizer and loading as usual."""
    from ..evaluation.run import run_eval
    from ..evaluation.settings import EvalSettings

    tree = dict(tree)
    options = {key: tree.pop(key) for key in EVAL_OPTIONS if key in tree}
    output = Path(tree.pop("train")["output_dir"])
    if "policy" not in options or not isinstance(options.get("sets"), dict) or not options["sets"]:
        raise ConfigError("an eval stage needs 'policy' and 'sets' (a mapping of set names to files)")
    config = load_config(base={**_dotted(tree), "model.name_or_path": options.pop("policy")}, command="eval")
    sets = list(options.pop("sets").items())
    measured = ("samples", "max_new_tokens", "beta", "seed")
    settings = EvalSettings(**{key: options.pop(key) for key in measured if key in options})
    summary = run_eval(config, sets, output, settings, **options)
    flat: dict[str, float] = {}
    for name, report in summary["sets"].items():
        flat.update({f"{name}/{key}": value for key, value in report.items() if isinstance(value, float)})
    first = sets[0][0]
    flat["dpo_rm_accuracy"] = flat.get(f"{first}/dpo_rm_accuracy", float("nan"))
    return flat


def _online_stage(tree: dict[str, Any]) -> dict[str, float]:
    """``preftune online`` as a stage; its figures are the final policy's samples' (or the last round's)."""
    from .online import train_online

    result = train_online(load_config(base=_dotted(tree), command="online"))
    last = result.final or (result.rounds[-1] if result.rounds else {})
    return {key: value for key, value in last.items() if isinstance(value, float)}


COMMAND = {"sft": "sft", "rm": "rm train", "dpo": "train", "online": "online", "ppo": "ppo", "eval": "eval"}
"""The command each stage kind runs (and whose keys it accepts)."""

KINDS: dict[str, Callable[[dict[str, Any]], dict[str, float]]] = {
    "sft": _train_stage("sft"),
    "rm": _train_stage("rm"),
    "dpo": _train_stage("dpo"),
    "eval": _eval_stage,
    "online": _online_stage,
    "ppo": _train_stage("ppo"),
}
HEADLINE = {
    "sft": "loss",
    "rm": "eval_accuracy",
    "dpo": "rewards/accuracies",
    "online": "reward_mean",
    "eval": "dpo_rm_accuracy",
    "ppo": "objective/scores",
}


def load_pipeline(path: Path) -> tuple[Path, list[Stage]]:
    """The output folder and the stages, checked: kinds known and built, references to earlier stages."""
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(f"{path}:{mark.line + 1 if mark else '?'}: malformed YAML") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("stages"), dict) or not tree["stages"]:
        raise ConfigError(f"{path}: expected 'output' and a mapping 'stages' of named stages")
    output = Path(tree.get("output") or path.with_suffix(""))
    stages: list[Stage] = []
    for name, body in tree["stages"].items():
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
            raise ConfigError(
                f"{path}: stages.{name}: a stage name is a plain folder name (letters, digits, _ and -), "
                "the stage's folder in the pipeline's output"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: stages.{name}: expected a mapping of config sections")
        body = dict(body)
        kind = str(body.pop("kind", name))
        if kind not in KINDS and kind in available_objectives():  # `simpo:` trains a policy with SimPO
            body.setdefault("objective", {}).setdefault("loss", [kind])
            kind = "dpo"
        if kind not in KINDS:
            raise ConfigError(
                f"{path}: stages.{name}.kind: unknown '{kind}'; one of {', '.join(KINDS)} or an objective name"
            )
        if kind == "eval" and (
            "policy" not in body or not isinstance(body.get("sets"), dict) or not body["sets"]
        ):
            raise ConfigError(
                f"{path}: stages.{name}: an eval stage needs 'policy' and 'sets' (set names to files)"
            )
        given = _dotted(body)
        absent = [key for key in ("prompts.path", "reward.scorer") if kind == "online" and not given.get(key)]
        if absent:
            raise ConfigError(
                f"{path}: stages.{name}.{absent[0]}: an online stage needs prompts and a reward"
            )
        earlier = [stage.name for stage in stages]
        for key, value in _dotted(body).items():
            for reference, _ in REFERENCE.findall(str(value)):
                if reference not in earlier:
                    raise ConfigError(
                        f"{path}: stages.{name}.{key}: ${{{reference}.…}} names no earlier stage "
                        f"(earlier: {', '.join(earlier) or 'none'})"
                    )
        stages.append(Stage(name, kind, body))
    return output, stages


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resolve(value: Any, folders: dict[str, Path]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, folders) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, folders) for v in value]
    if isinstance(value, str):
        return REFERENCE.sub(
            lambda m: str(folders[m[1]] / "final" if m[2] == "final" else folders[m[1]]), value
        )
    return value


def _fingerprint(tree: dict[str, Any], inputs: list[str]) -> str:
    """The resolved config, the files it reads (size and modification time), earlier stages' prints."""
    digest = hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode())
    for key, value in sorted(_dotted(tree).items()):
        if isinstance(value, str) and Path(value).is_file():
            stat = Path(value).stat()
            digest.update(f"{key}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for print_ in inputs:
        digest.update(print_.encode())
    return digest.hexdigest()[:16]


def run_pipeline(
    path: Path, start: str | None = None, only: str | None = None, say: Any = print
) -> dict[str, Any]:
    output, stages = load_pipeline(path)
    names = [stage.name for stage in stages]
    for option, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{option} {value}: no such stage (stages: {', '.join(names)})")
    # Where every stage writes, checked before the first runs: inside the output, each its kind.
    check_output_dir(output, f"{path}: output")
    check_kind(output, "pipeline", f"{path}: output")
    folders = {stage.name: _stage_folder(output, stage.name, path) for stage in stages}
    for stage in stages:
        check_kind(folders[stage.name], STAGE_KINDS[stage.kind], f"{path}: stages.{stage.name}")
    with holding(output, "pipeline", f"{path}: output"):
        rows = _run_stages(stages, folders, start, only, say)
        result = {"output": str(output), "stages": rows}
        write_json(output / "summary.json", result)
    say(_table(rows))
    return result


def _stage_folder(output: Path, name: str, path: Path) -> Path:
    """``OUTPUT/NAME``, refused when it leads elsewhere (a link out of the output folder)."""
    folder = output / name
    if folder.resolve().parent != output.resolve():
        raise ConfigError(
            f"{path}: stages.{name}: {folder} leads outside the pipeline's output ({folder.resolve()})"
        )
    return folder


def _run_stages(
    stages: list[Stage], folders: dict[str, Path], start: str | None, only: str | None, say: Any
) -> list[dict[str, Any]]:
    """Each stage in order: skipped when complete with the same fingerprint (or not asked for),
    else run or resumed; one summary row per stage."""
    names = [stage.name for stage in stages]
    prints: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    reached = start is None
    for stage in stages:
        reached = reached or stage.name == start
        tree = _resolve(stage.tree, folders)
        inputs = [
            prints[n] for n in names[: names.index(stage.name)] if n in prints and n in json.dumps(stage.tree)
        ]
        fingerprint = _fingerprint(tree, inputs)
        prints[stage.name] = fingerprint
        folder = folders[stage.name]
        record_path = folder / "stage.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        wanted = (only is None or only == stage.name) and reached
        same = record.get("fingerprint") == fingerprint
        if not wanted or (same and record.get("status") == "complete" and only is None):
            status = "skipped" if same and record.get("status") == "complete" else "not run"
            rows.append(
                {"stage": stage.name, "kind": stage.kind, "status": status, **record.get("summary", {})}
            )
            say(f"pipeline: {stage.name} {status}")
            continue
        resume = same and record.get("status") == "running"
        rows.append(_run_stage(stage, tree, folder, fingerprint, resume, say))
    return rows


def _run_stage(
    stage: Stage, tree: dict[str, Any], folder: Path, fingerprint: str, resume: bool, say: Any
) -> dict[str, Any]:
    """Run (or resume) one stage in ``folder``; its summary row."""
    tree.setdefault("train", {}).update(output_dir=str(folder), resume=resume, overwrite=not resume)
    say(f"pipeline: {stage.name} ({stage.kind}) {'resuming' if resume else 'running'} in {folder}")
    say("\n".join(f"  {key}: {setting_text(value)}" for key, value in _dotted(stage.tree).items()))
    record_kind(folder.parent, "pipeline")
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "stage.json"
    write_json(record_path, {"fingerprint": fingerprint, "status": "running", "kind": stage.kind})
    started = time.perf_counter()
    try:
        metrics = KINDS[stage.kind](tree)
    except PreftuneError as err:  # name the stage; a signal keeps its exit code
        err.args = (f"stage {stage.name}: {err}",)
        raise
    # A `dpo` stage training KTO logs no accuracy: its margin, else the loss, under its own name.
    candidates = (HEADLINE.get(stage.kind, "loss"), "rewards/margins")
    headline = next((name for name in candidates if name in metrics), "loss")
    summary = {
        "seconds": round(time.perf_counter() - started, 1),
        "final": str(folder / "final"),
        headline: metrics.get(headline),
    }
    write_json(
        record_path,
        {"fingerprint": fingerprint, "status": "complete", "kind": stage.kind, "summary": summary},
    )
    return {"stage": stage.name, "kind": stage.kind, "status": "resumed" if resume else "ran", **summary}


def _table(rows: list[dict[str, Any]]) -> str:
    width = max([12, *(len(row["stage"]) + 2 for row in rows)])
    lines = [f"{'stage':{width}}{'kind':8}{'status':10}{'seconds':>9}  headline metric"]
    for row in rows:
        metric = next(
            ((k, v) for k, v in row.items() if k not in {"stage", "kind", "status", "seconds", "final"}), None
        )
        shown = f"{metric[0]} {metric[1]:.4f}" if metric and isinstance(metric[1], float) else ""
        seconds = f"{row['seconds']:.1f}" if "seconds" in row else "-"
        lines.append(f"{row['stage']:{width}}{row['kind']:8}{row['status']:10}{seconds:>9}  {shown}")
    return "\n".join(lines)
