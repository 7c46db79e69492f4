"""``preftune config --from-trl FILE`` / ``--from-llamafactory FILE``: a TRL or LLaMA-Factory
config printed as the preftune YAML it runs as; ``preftune config --mapping trl``: the table."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from ..config import SECTIONS, RunConfig, load_config
from ..config.foreign import LABEL, plain
from ..config.load import config_tree, read_yaml
from ..config.translate import detect, mapping_markdown
from ..errors import ConfigError

_STAGE_COMMANDS = {"dpo": "train", "kto": "train", "rm": "rm train", "sft": "sft"}
_TRAINING = ("train", "sft", "rm train")


def add_foreign_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from-trl",
        metavar="FILE",
        help="print a TRL config (trl dpo/sft/reward/kto --config) as preftune's",
    )
    parser.add_argument(
        "--from-llamafactory", metavar="FILE", help="print a LLaMA-Factory config as preftune's"
    )
    parser.add_argument(
        "--command",
        choices=_TRAINING,
        help="the command that will run it (TRL: default train; LLaMA-Factory: its stage)",
    )
    parser.add_argument(
        "--mapping",
        choices=("trl", "llamafactory"),
        help="print the table of names and what each becomes (Markdown)",
    )


def show_foreign(args: argparse.Namespace) -> None:
    if args.mapping:
        print(mapping_markdown(args.mapping), end="")
        return
    path = args.from_trl or args.from_llamafactory
    asked = "trl" if args.from_trl else "llamafactory"
    flat = {k: v for k, v in read_yaml(path).items() if k not in SECTIONS}
    found = detect(flat)
    if found != asked:
        raise ConfigError(f"{path}: a {LABEL[found]} config (use --from-{found})")
    stage = plain(flat.get("stage", "sft")) if found == "llamafactory" else None
    command = args.command or (_STAGE_COMMANDS.get(str(stage), "train") if stage else "train")
    notices: list[str] = []
    config = load_config(path, command=command, notices=notices)
    tree = config_tree(path, (), None, command, [])
    for line in notices:
        print(f"preftune: {line}", file=sys.stderr)
    print(f"# preftune {command} --config THIS.yaml -- translated from {path} ({LABEL[found]})")
    if found == "llamafactory" and plain(flat.get("dataset")) is not None:
        print(
            "# data.path holds LLaMA-Factory records (dataset_info.json's format); preftune converts them when it "
            "runs the LLaMA-Factory file itself"
        )
    print(yaml.safe_dump(_typed(tree, config), sort_keys=False, allow_unicode=True), end="")


def _typed(tree: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """The keys the file set, with the values the config holds (typed and checked)."""
    return {
        section: {key: getattr(getattr(config, section), key) for key in tree[section]}
        for section in SECTIONS
        if isinstance(tree.get(section), dict) and tree[section]
    }
