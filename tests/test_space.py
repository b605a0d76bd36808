"""The Space configuration the Hub accepts: front matter, the Gradio pin, LFS routing of binary files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from lesionstudio.app.space import (
    HUB_REPO_VAR,
    MAX_SHORT_DESCRIPTION,
    SpaceConfigError,
    config_problems,
    model_repo,
    pinned_version,
    space_card_data,
)

FRONT = """---
title: T
sdk: gradio
sdk_version: {version}
python_version: "3.11"
app_file: app.py
short_description: {short}
{extra}---
# T
"""


def _space(tmp_path: Path, version="6.31.0", short="Generate lesions", extra="", pin="gradio==6.31.0") -> Path:
    (tmp_path / "app.py").write_text("")
    (tmp_path / "requirements.txt").write_text(f"torch==2.14.1\n{pin}  # the Space's sdk_version\n")
    readme = tmp_path / "README.md"
    readme.write_text(FRONT.format(version=version, short=short, extra=extra))
    return readme


def test_the_repository_is_a_space_the_hub_accepts():
    assert config_problems(ROOT / "README.md") == []
    data = space_card_data(ROOT / "README.md")
    assert len(data.short_description) <= MAX_SHORT_DESCRIPTION
    assert data.sdk_version == pinned_version(ROOT / "requirements.txt", "gradio")
    import gradio

    assert gradio.__version__ == data.sdk_version  # what the tests ran is what the Space runs


def test_refused_front_matter_is_named(tmp_path: Path):
    assert config_problems(_space(tmp_path)) == []
    problems = config_problems(_space(tmp_path, version="6.0.0", short="x" * 71, extra="models: [not a repo]\n"))
    assert any("short_description has 71 characters" in p for p in problems)
    assert any("sdk_version 6.0.0" in p for p in problems)
    assert any("'not a repo' is not a Hub repo id" in p for p in problems)
    assert any("not the gradio" in p for p in config_problems(_space(tmp_path, pin="gradio>=6,<7")))
    (tmp_path / "app.py").unlink()
    assert any("app_file" in p for p in config_problems(tmp_path / "README.md"))
    (tmp_path / "README.md").write_text("no front matter at all")
    with pytest.raises(SpaceConfigError):
        config_problems(tmp_path / "README.md")


def test_model_repo_from_the_environment_or_the_front_matter(tmp_path: Path):
    readme = _space(tmp_path, extra="models:\n- lesion/models\n")
    assert model_repo(readme, {}) is None  # outside a Space: the bundled checkpoints
    assert model_repo(readme, {"SPACE_ID": "lesion/app"}) == "lesion/models"
    assert model_repo(readme, {"SPACE_ID": "x/y", HUB_REPO_VAR: "other/models"}) == "other/models"
    assert model_repo(_space(tmp_path), {"SPACE_ID": "lesion/app"}) is None  # none configured


def _tracked_files() -> list[str]:
    res = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if res.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in res.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


def _is_binary(path: Path) -> bool:
    return b"\0" in path.read_bytes()[:8000]


def test_every_tracked_binary_file_goes_through_lfs():
    binary = [f for f in _tracked_files() if _is_binary(ROOT / f)]
    assert any(f.endswith(".safetensors") for f in binary) and any(f.endswith(".png") for f in binary)
    res = subprocess.run(["git", "check-attr", "filter", "--", *binary], cwd=ROOT, capture_output=True, text=True)
    not_lfs = [line for line in res.stdout.splitlines() if not line.endswith(": filter: lfs")]
    assert res.returncode == 0 and not not_lfs, f"binary files .gitattributes does not route through LFS: {not_lfs}"


def test_the_app_serves_the_configured_repo_or_falls_back(tmp_path: Path, monkeypatch, capsys):
    from conftest import make_pair

    import app

    make_pair(tmp_path / "ck", 32)
    args = app.parse_args([])
    monkeypatch.delenv("LESIONSTUDIO_CHECKPOINTS", raising=False)
    monkeypatch.setenv(HUB_REPO_VAR, str(tmp_path / "ck"))  # a local folder stands in for the repo
    assert app.open_studio(args).latents == [32]
    monkeypatch.setenv(HUB_REPO_VAR, str(tmp_path / "gone"))
    studio = app.open_studio(args)  # the bundled checkpoints, and a warning
    assert studio.source == Path(app.__file__).parent / "checkpoints" and 64 in studio.latents
    assert "serving the bundled checkpoints" in capsys.readouterr().err
