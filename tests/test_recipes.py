"""The training recipes of the shipped checkpoints as files: each trainer's --config FILE, with
options on the command line overriding it, and every model card naming its recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lesionstudio.cli import parse_with_config, read_recipe
from train import critic, decoder, pixelcnn, vqvae

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.json"))
TRAINERS = {"vqvae": vqvae, "pixelcnn": pixelcnn, "critic": critic, "decoder": decoder}


def trainer_of(recipe: Path):
    return TRAINERS[recipe.stem.split("-")[0]]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_names_only_options_its_trainer_has(recipe: Path):
    settings = read_recipe(trainer_of(recipe).make_parser(), recipe)
    assert settings and "out" in settings
    text = json.loads(recipe.read_text())["#"]
    assert f"python -m {trainer_of(recipe).__name__} --config configs/recipes/{recipe.name}" in text


def test_a_recipe_gives_defaults_that_the_command_line_overrides(tmp_path: Path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"#": "a note", "data": "images", "out": "runs/x", "epochs": 3, "batch-size": 4}))
    args = parse_with_config(vqvae.make_parser(), ["--config", str(recipe), "--epochs", "5"])
    assert (args.data, args.out, args.epochs, args.batch_size) == (Path("images"), Path("runs/x"), 5, 4)
    assert parse_with_config(vqvae.make_parser(), ["--config", str(recipe)]).epochs == 3
    with pytest.raises(SystemExit):  # without the recipe, --data and --out are required again
        parse_with_config(vqvae.make_parser(), ["--epochs", "5"])


def test_a_bad_recipe_is_refused_with_its_reason(tmp_path: Path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": "x", "out": "y", "epocs": 3}))
    with pytest.raises(SystemExit):
        parse_with_config(vqvae.make_parser(), ["--config", str(bad)])
    assert "has no option epocs" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit):
        parse_with_config(pixelcnn.make_parser(), ["--config", str(broken)])
    assert "--config" in capsys.readouterr().err


def test_every_shipped_card_names_recipes_that_exist():
    for card in sorted((ROOT / "checkpoints").glob("*/README.md")):
        line = next(line for line in card.read_text().splitlines() if line.startswith("Recipe:"))
        named = [part.split("`")[0] for part in line.split("`configs/recipes/")[1:]]
        assert named and all((ROOT / "configs" / "recipes" / n).exists() for n in named), card
