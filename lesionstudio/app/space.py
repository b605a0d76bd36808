"""The Hugging Face Space configuration: README.md's front matter, and the model repo it serves.

A Space serves the model repo named by ``$LESIONSTUDIO_HUB_REPO``, else the first ``models:``
entry of the front matter; with neither, the checkpoints bundled with the app.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import SpaceCard, SpaceCardData

README = Path(__file__).resolve().parents[2] / "README.md"
HUB_REPO_VAR = "LESIONSTUDIO_HUB_REPO"
MAX_SHORT_DESCRIPTION = 60  # the Hub refuses a longer one
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SpaceConfigError(ValueError):
    """Front matter the Hub would refuse."""


def space_card_data(readme: Path = README) -> SpaceCardData:
    """The front matter of a Space's README.md."""
    try:
        data = SpaceCard.load(readme).data
    except (OSError, ValueError) as exc:
        raise SpaceConfigError(f"{readme}: no readable front matter: {exc}") from exc
    if not isinstance(data, SpaceCardData) or not data.to_dict():
        raise SpaceConfigError(f"{readme} has no front matter (a --- block of Space settings at the top)")
    return data


def pinned_version(requirements: Path, package: str) -> str | None:
    """The exact version `package==X` pins in a requirements file; None when it is not pinned exactly."""
    pattern = re.compile(rf"^{re.escape(package)}\s*==\s*([\w.]+)\s*(#.*)?$", re.IGNORECASE)
    for line in requirements.read_text().splitlines():
        if match := pattern.match(line.strip()):
            return match.group(1)
    return None


def config_problems(readme: Path = README) -> list[str]:
    """What in a Space's front matter (beside its app and requirements) the Hub would refuse."""
    data, root = space_card_data(readme), readme.parent
    problems = []
    if data.sdk != "gradio":
        problems.append(f"sdk is {data.sdk!r}, not 'gradio'")
    if len(data.short_description or "") > MAX_SHORT_DESCRIPTION:
        problems.append(f"short_description has {len(data.short_description)} characters (at most 60)")
    gradio = pinned_version(root / "requirements.txt", "gradio")
    if gradio is None or data.sdk_version != gradio:
        problems.append(f"sdk_version {data.sdk_version} is not the gradio=={gradio} requirements.txt pins")
    if not data.app_file or not (root / data.app_file).is_file():
        problems.append(f"app_file {data.app_file!r} is not a file beside README.md")
    if not data.python_version:
        problems.append("python_version is missing")
    problems += [f"models: {m!r} is not a Hub repo id" for m in data.models or [] if not REPO_ID.match(m)]
    return problems


def model_repo(readme: Path = README, environ: Mapping[str, str] = os.environ) -> str | None:
    """The model repo a Space serves ($LESIONSTUDIO_HUB_REPO, else the front matter's first
    `models:` entry); None outside a Space or when none is configured."""
    if repo := environ.get(HUB_REPO_VAR):
        return repo
    if "SPACE_ID" not in environ or not readme.is_file():
        return None
    models = space_card_data(readme).models or []
    return models[0] if models else None
