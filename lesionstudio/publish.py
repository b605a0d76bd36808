"""Publish checkpoint folders to a Hugging Face Hub model repo, laid out the way the app reads it.

    python -m lesionstudio.publish --repo OWNER/NAME [--checkpoints DIR] [--private] [--revision R]

Every model folder of DIR (``vqvae-N/``, ``pixelcnn-N/``, ``critic/``: a config.json beside a
model.safetensors) goes into the subfolder of the same name, with its codebook usage file, model
card and the images the card shows, in one commit. ``python app.py --hub OWNER/NAME`` then serves
it. The token comes from ``HF_TOKEN`` or ``hf auth login``; ``HF_ENDPOINT`` picks another Hub.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from .cli import HelpFormatter
from .models.hubmodel import CONFIG_NAME, WEIGHTS_NAME
from .sampling.loading import USAGE_NAME, default_source

CARD_NAME = "README.md"
PUBLISHED_FILES = (CONFIG_NAME, WEIGHTS_NAME, USAGE_NAME, CARD_NAME)
CARD_IMAGES = (".png", ".jpg")  # sample sheets a card shows


class PublishError(ValueError):
    """A folder that cannot be published as it stands."""


def model_folders(root: Path) -> list[Path]:
    """The model folders (config + weights) directly under `root`, by name."""
    if not root.is_dir():
        raise PublishError(f"checkpoints folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file())
    if not folders:
        raise PublishError(f"{root} holds no model folder (a config.json beside a model.safetensors)")
    return folders


def folder_operations(folder: Path, name: str | None = None) -> list[CommitOperationAdd]:
    """Uploads of one model folder's published files into `name/` (by default the folder's name)."""
    for required in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / required).is_file():
            raise PublishError(f"{folder} has no {required}")
    name = name or folder.name
    files = [folder / f for f in PUBLISHED_FILES if (folder / f).is_file()]
    files += sorted(p for p in folder.iterdir() if p.suffix.lower() in CARD_IMAGES)
    return [CommitOperationAdd(path_in_repo=f"{name}/{f.name}", path_or_fileobj=f) for f in files]


def publish(
    operations: list[CommitOperationAdd],
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    message: str = "Upload LesionStudio checkpoints",
    api: HfApi | None = None,
) -> CommitInfo:
    """Create the model repo (and branch) if needed, then upload `operations` in one commit."""
    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.create_commit(repo_id, operations, commit_message=message, revision=revision)


def publish_folder(folder: Path, repo_id: str, name: str, private: bool = False) -> CommitInfo:
    """One trained model's folder into `name/` of a repo (the trainers' ``--push-to-hub``)."""
    return publish(folder_operations(folder, name), repo_id, private, message=f"Upload {name}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lesionstudio.publish", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--repo", required=True, help="Hub model repo id, OWNER/NAME (created if missing)")
    p.add_argument("--checkpoints", type=Path, default=None, help="folder of model folders (default: the app's)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    args = p.parse_args(argv)
    root = args.checkpoints or Path(default_source())
    try:
        folders = model_folders(root)
        operations = [op for folder in folders for op in folder_operations(folder)]
        info = publish(operations, args.repo, args.private, args.revision)
    except (PublishError, HfHubHTTPError, OSError) as exc:
        sys.exit(f"error: {exc}")
    print(f"uploaded {', '.join(f.name for f in folders)} ({len(operations)} files) to {args.repo}: {info.commit_url}")


if __name__ == "__main__":
    main()
