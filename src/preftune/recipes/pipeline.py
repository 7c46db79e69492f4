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
folder holds its kind of run only.

The file is read strictly (a key written twice, an alias bomb: :mod:`preftune.config.yamlfile`)
and every stage's config is built as its command builds it before the first stage runs. Each
stage records a fingerprint of its resolved config, its inputs (every file a file or folder
input names, by size and modification time) and the fingerprints of the stages it references
in ``OUTPUT/NAME/stage.json``: a complete stage with the same fingerprint is skipped, an
interrupted one is resumed from its last checkpoint, a changed one is run again. The end is a
summary table and ``OUTPUT/summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config
from ..config.yamlfile import read_yaml
from ..data.files import write_json
from ..data.outputs import (
    INPUT_KEYS,
    LOCK_FILE,
    STAGE_KINDS,
    check_kind,
    check_output_dir,
    holding,
    record_kind,
)
from ..engine.guard import NonFiniteError, StopRequested
from ..engine.tracking import setting_text
from ..errors import ConfigError, PreftuneError
from ..losses import available as available_objectives
from ..losses import build_objective, build_unpaired_objective, is_unpaired

STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")
"""A stage's name: its folder's name in the output folder, and what ``${NAME.…}`` refers to."""
REFERENCE = re.compile(r"\$\{([A-Za-z0-9_-]+)\.(final|output)\}")


@dataclass
class Stage:
    name: str
    kind: str
    tree: dict[str, Any]
    """The stage's config sections as written (references not yet resolved)."""
    line: int = 0
    """The line of the pipeline file that names the stage."""
    lines: dict[str, int] = field(default_factory=dict)
    """The line of each of its keys, dotted from the stage (``train.learning_rate``)."""

    def line_of(self, message: str) -> int:
        """The line of the key a message names (the longest that it names), else the stage's."""
        named = [
            key for key in self.lines if f"'{key}'" in message or message.startswith((f"{key}:", f"{key} "))
        ]
        return self.lines[max(named, key=len)] if named else self.line


def _recipe(kind: str) -> Callable[[RunConfig, dict[str, Any], Path], dict[str, float]]:
    """A stage that trains with one of the recipes; returns its last logged metrics."""

    def run(config: RunConfig, tree: dict[str, Any], folder: Path) -> dict[str, float]:
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
MEASURED = ("samples", "max_new_tokens", "beta", "seed")
"""The eval options that :class:`~preftune.evaluation.settings.EvalSettings` holds."""


def _eval_stage(config: RunConfig, tree: dict[str, Any], folder: Path) -> dict[str, float]:
    """``preftune eval`` as a stage: ``policy``, ``sets`` (name: file), and the command's options;
    the other sections (``model``, ``data``) configure tokenizer and loading as usual."""
    from ..evaluation.run import run_eval
    from ..evaluation.settings import EvalSettings

    sets = list(tree["sets"].items())
    settings = EvalSettings(**{key: tree[key] for key in MEASURED if key in tree})
    scorers = {key: tree[key] for key in ("reference", "reward_model", "reward") if key in tree}
    summary = run_eval(config, sets, folder, settings, **scorers)
    flat: dict[str, float] = {}
    for name, report in summary["sets"].items():
        flat.update({f"{name}/{key}": value for key, value in report.items() if isinstance(value, float)})
    first = sets[0][0]
    flat["dpo_rm_accuracy"] = flat.get(f"{first}/dpo_rm_accuracy", float("nan"))
    return flat


def _online_stage(config: RunConfig, tree: dict[str, Any], folder: Path) -> dict[str, float]:
    """``preftune online`` as a stage; its figures are the final policy's samples' (or the last round's)."""
    from .online import train_online

    result = train_online(config)
    last = result.final or (result.rounds[-1] if result.rounds else {})
    return {key: value for key, value in last.items() if isinstance(value, float)}


COMMAND = {"sft": "sft", "rm": "rm train", "dpo": "train", "online": "online", "ppo": "ppo", "eval": "eval"}
"""The command each stage kind runs (and whose keys it accepts)."""

KINDS: dict[str, Callable[[RunConfig, dict[str, Any], Path], dict[str, float]]] = {
    "sft": _recipe("sft"),
    "rm": _recipe("rm"),
    "dpo": _recipe("dpo"),
    "eval": _eval_stage,
    "online": _online_stage,
    "ppo": _recipe("ppo"),
}
HEADLINE = {
    "sft": "loss",
    "rm": "eval_accuracy",
    "dpo": "rewards/accuracies",
    "online": "reward_mean",
    "eval": "dpo_rm_accuracy",
    "ppo": "objective/scores",
}


def stage_config(kind: str, tree: dict[str, Any], folder: Path, resume: bool = False) -> RunConfig:
    """A stage's run config (references resolved), built as its command builds it: the command's
    keys only, every range and rule, the objective resolved; the stage writes in ``folder``."""
    if kind == "eval":
        sections = {key: value for key, value in tree.items() if key not in EVAL_OPTIONS}
        return load_config(base={**_dotted(sections), "model.name_or_path": tree["policy"]}, command="eval")
    run = {"train.output_dir": str(folder), "train.resume": resume, "train.overwrite": not resume}
    config = load_config(base={**_dotted(tree), **run}, command=COMMAND[kind])
    if kind in ("dpo", "online"):
        (build_unpaired_objective if is_unpaired(config.objective) else build_objective)(config.objective)
    return config


def load_pipeline(path: Path) -> tuple[Path, list[Stage]]:
    """The output folder and the stages, checked: names, kinds known and built, references to
    earlier stages."""
    tree, lines = read_yaml(path, "pipeline file")
    if not isinstance(tree, dict) or not isinstance(tree.get("stages"), dict) or not tree["stages"]:
        raise ConfigError(f"{path}: expected 'output' and a mapping 'stages' of named stages")
    output = Path(tree.get("output") or path.with_suffix(""))
    stages: list[Stage] = []
    for name, body in tree["stages"].items():
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
            raise ConfigError(
                f"{path}:{lines.get(f'stages.{name}', '?')}: stages.{name}: a stage name is a plain folder "
                "name (letters, digits, _ and -), the stage's folder in the pipeline's output"
            )
        prefix = f"stages.{name}."
        mine = {key[len(prefix) :]: line for key, line in lines.items() if key.startswith(prefix)}
        stages.append(_stage(path, Stage(name, "", body, lines.get(f"stages.{name}", 0), mine), stages))
    return output, stages


def _stage(path: Path, stage: Stage, earlier: list[Stage]) -> Stage:
    """One stage as written, checked (its name, its kind, what its kind needs, its references)."""
    name, body = stage.name, stage.tree
    at = f"{path}:{stage.line}"
    if not isinstance(body, dict):
        raise ConfigError(f"{at}: stages.{name}: expected a mapping of config sections")
    body = dict(body)
    kind = str(body.pop("kind", name))
    if kind not in KINDS and kind in available_objectives():  # `simpo:` trains a policy with SimPO
        objective = body.get("objective")
        if objective is None or isinstance(objective, dict):  # else refused as the section it is not
            body["objective"] = {"loss": [kind], **(objective or {})}
        kind = "dpo"
    if kind not in KINDS:
        raise ConfigError(
            f"{at}: stages.{name}.kind: unknown '{kind}'; one of {', '.join(KINDS)} or an objective name"
        )
    if kind == "eval" and (
        "policy" not in body or not isinstance(body.get("sets"), dict) or not body["sets"]
    ):
        raise ConfigError(
            f"{at}: stages.{name}: an eval stage needs 'policy' and 'sets' (set names to files)"
        )
    given = _dotted(body)
    absent = [key for key in ("prompts.path", "reward.scorer") if kind == "online" and not given.get(key)]
    if absent:
        raise ConfigError(f"{at}: stages.{name}.{absent[0]}: an online stage needs prompts and a reward")
    names = [stage.name for stage in earlier]
    for key, value in given.items():
        unknown = sorted(_references(value) - set(names))
        if unknown:
            raise ConfigError(
                f"{path}:{stage.lines.get(key, stage.line)}: stages.{name}.{key}: ${{{unknown[0]}.…}} names "
                f"no earlier stage (earlier: {', '.join(names) or 'none'})"
            )
    return Stage(name, kind, body, stage.line, stage.lines)


def _references(value: Any) -> set[str]:
    """The stages a value names with ``${NAME.final}`` or ``${NAME.output}``: what a stage reads
    of the others, and the only way it depends on them."""
    if isinstance(value, dict):
        return set().union(*map(_references, value.values()))
    if isinstance(value, list):
        return set().union(*map(_references, value))
    return {m[0] for m in REFERENCE.findall(value)} if isinstance(value, str) else set()


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


def check_stages(path: Path, stages: list[Stage], folders: dict[str, Path]) -> None:
    """Every stage's config, built as its command builds it, before the first stage runs: a typo
    in the last stage is refused before the first trains. A reference stands for the folder the
    earlier stage will write."""
    for stage in stages:
        try:
            stage_config(stage.kind, _resolve(stage.tree, folders), folders[stage.name])
        except ConfigError as err:
            raise ConfigError(f"{path}:{stage.line_of(str(err))}: stages.{stage.name}: {err}") from None


INPUT_OPTIONS = ("policy", "reference", "reward_model", "reward")
"""The keys of an eval stage that name a model or reward it reads (its ``sets.NAME`` too)."""


def _fingerprint(tree: dict[str, Any], inputs: list[str]) -> str:
    """The resolved config, what its input keys name on disk (every file of a folder by its
    path, size and modification time), the fingerprints of the stages it references."""
    digest = hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode())
    for key, value in sorted(_dotted(tree).items()):
        if isinstance(value, str) and (key in INPUT_KEYS or key in INPUT_OPTIONS or key.startswith("sets.")):
            for name, stat in _files(value):
                digest.update(f"{key}|{name}|{stat}".encode())
    for print_ in inputs:
        digest.update(print_.encode())
    return digest.hexdigest()[:16]


def _files(value: str) -> Iterator[tuple[str, str]]:
    """The files a value names, each with its size and modification time: the file, every file
    under the folder (a model's weights), or the file of a ``file.py:function``. A hub name
    names nothing here: its revision is in the config."""
    file, _, function = value.rpartition(":")
    path = Path(file) if file.endswith(".py") and function.isidentifier() else Path(value)
    if path.is_file():
        yield "", _stat(path)
    elif path.is_dir():
        for root, folders, names in os.walk(path):
            folders.sort()
            for name in sorted(names):
                if name != LOCK_FILE:
                    yield os.path.relpath(os.path.join(root, name), path), _stat(Path(root) / name)


def _stat(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError as err:  # a link to nothing
        return f"unreadable {err.errno}"
    return f"{stat.st_size}|{stat.st_mtime_ns}"


def run_pipeline(
    path: Path, start: str | None = None, only: str | None = None, say: Any = print
) -> dict[str, Any]:
    output, stages = load_pipeline(path)
    names = [stage.name for stage in stages]
    for option, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{option} {value}: no such stage (stages: {', '.join(names)})")
    # Where every stage writes, checked before the first runs: inside the output, each its kind;
    # and every stage's config, whole.
    check_output_dir(output, f"{path}: output")
    check_kind(output, "pipeline", f"{path}: output", f"set another output in {path}")
    folders = {stage.name: _stage_folder(output, stage.name, path) for stage in stages}
    for stage in stages:
        folder = folders[stage.name]
        remedy = f"give the stage another name, or move {folder} away"
        check_kind(folder, STAGE_KINDS[stage.kind], f"{path}:{stage.line}: stages.{stage.name}", remedy)
    check_stages(path, stages, folders)
    with holding(output, "pipeline", f"{path}: output"):
        try:
            rows = _run_stages(path, stages, folders, (start, only), say)
        except KeyboardInterrupt:
            raise StopRequested("interrupted", 130, _again(path)) from None
        result = {"output": str(output), "stages": rows}
        write_json(output / "summary.json", result)
    say(_table(rows))
    return result


def _again(path: Path, stage: str | None = None) -> str:
    """What to do in a pipeline where a command would be run again with ``--resume``."""
    resumes = f"stage {stage} resumes" if stage else "an interrupted stage resumes"
    return (
        f"run `preftune pipeline run {path}` again with the file unchanged: complete stages are skipped "
        f"and {resumes} from its last checkpoint"
    )


def _diverged(path: Path, stage: str) -> str:
    """What to do in a pipeline when a stage's training stopped being finite."""
    return (
        f"Change stages.{stage}.train in {path} (a lower learning_rate, a max_grad_norm, or nonfinite: "
        f"skip) and run `preftune pipeline run {path}` again: the changed stage starts over, the complete "
        "stages before it are skipped"
    )


def _stage_folder(output: Path, name: str, path: Path) -> Path:
    """``OUTPUT/NAME``, refused when it leads elsewhere (a link out of the output folder)."""
    folder = output / name
    if folder.resolve().parent != output.resolve():
        raise ConfigError(
            f"{path}: stages.{name}: {folder} leads outside the pipeline's output ({folder.resolve()})"
        )
    return folder


def _run_stages(
    path: Path,
    stages: list[Stage],
    folders: dict[str, Path],
    selected: tuple[str | None, str | None],
    say: Any,
) -> list[dict[str, Any]]:
    """Each stage in order: skipped when complete with the same fingerprint (or not asked for),
    else run or resumed; one summary row per stage. ``selected``: ``--from`` and ``--only``."""
    start, only = selected
    prints: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    reached = start is None
    for stage in stages:
        reached = reached or stage.name == start
        tree = _resolve(stage.tree, folders)
        inputs = [prints[name] for name in sorted(_references(stage.tree))]
        fingerprint = _fingerprint(tree, inputs)
        prints[stage.name] = fingerprint
        folder = folders[stage.name]
        record_path = folder / "stage.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        wanted = (only is None or only == stage.name) and reached
        same = record.get("fingerprint") == fingerprint
        # --only and --from name the stages to run again, complete or not.
        forced = only is not None or start is not None
        if not wanted or (same and record.get("status") == "complete" and not forced):
            status = "skipped" if same and record.get("status") == "complete" else "not run"
            rows.append(
                {"stage": stage.name, "kind": stage.kind, "status": status, **record.get("summary", {})}
            )
            say(f"pipeline: {stage.name} {status}")
            continue
        resume = same and record.get("status") == "running"
        rows.append(_run_stage(path, stage, tree, folder, (fingerprint, resume), say))
    return rows


def _run_stage(
    path: Path, stage: Stage, tree: dict[str, Any], folder: Path, state: tuple[str, bool], say: Any
) -> dict[str, Any]:
    """Run (or resume) one stage in ``folder``; its summary row. ``state``: its fingerprint, and
    whether it resumes. An error names the stage, and what to do says how, in a pipeline."""
    fingerprint, resume = state
    say(f"pipeline: {stage.name} ({stage.kind}) {'resuming' if resume else 'running'} in {folder}")
    say("\n".join(f"  {key}: {setting_text(value)}" for key, value in _dotted(stage.tree).items()))
    record_kind(folder.parent, "pipeline")
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "stage.json"
    write_json(record_path, {"fingerprint": fingerprint, "status": "running", "kind": stage.kind})
    started = time.perf_counter()
    try:
        metrics = KINDS[stage.kind](stage_config(stage.kind, tree, folder, resume), tree, folder)
    except StopRequested as stop:  # a signal: the exit code stays 128 + the signal
        raise StopRequested(
            f"stage {stage.name}: {stop.problem}", stop.exit_code, _again(path, stage.name)
        ) from None
    except KeyboardInterrupt:  # before or after the training loop, which stops on a signal itself
        raise StopRequested(f"stage {stage.name}: interrupted", 130, _again(path, stage.name)) from None
    except NonFiniteError as err:
        remedy = _diverged(path, stage.name) if err.remedy else ""
        raise NonFiniteError(f"stage {stage.name}: {err.problem}", remedy) from None
    except PreftuneError as err:
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
