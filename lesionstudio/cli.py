"""What the project's commands share on the command line."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every flag's default, also where the flag has no help text, except a
    ``None`` default: the flag's help says what happens then."""

    def add_argument(self, action: argparse.Action) -> None:
        if action.help is None and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            action = copy.copy(action)  # the parser's own action stays as it is
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a JSON recipe of this command's settings, keyed by option name (configs/recipes/); "
        "options given on the command line override it",
    )


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the defaults of ``--config FILE`` (see add_config_argument):
    a required option the recipe sets is no longer required on the command line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    config = pre.parse_known_args(argv)[0].config
    if config is not None:
        recipe = read_recipe(parser, config)
        for action in parser._actions:  # argparse has no public way to relax a required option
            if action.dest in recipe:
                action.default, action.required = recipe[action.dest], False
    return parser.parse_args(argv)


def read_recipe(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """A recipe's settings, by option name (``batch_size`` or ``batch-size``); a parser error
    for a file that cannot be read or names an option the command does not have."""
    try:
        recipe = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"--config {path}: {exc}")
    if not isinstance(recipe, dict):
        parser.error(f"--config {path}: expected a JSON object of option names and values")
    settings = {str(k).replace("-", "_"): v for k, v in recipe.items() if not str(k).startswith("#")}
    known = {a.dest for a in parser._actions} - {"help", "config"}
    unknown = sorted(set(settings) - known)
    if unknown:
        parser.error(f"--config {path}: {parser.prog} has no option {', '.join(unknown)}")
    return settings
