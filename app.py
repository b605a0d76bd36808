"""Start the LesionStudio web app.

    python app.py [--host H] [--port P] [--checkpoints DIR | --hub REPO_ID] [--examples DIR] [--data DIR] [--share]

Defaults: the bundled checkpoints/ (or $LESIONSTUDIO_CHECKPOINTS), 127.0.0.1:7860, or 0.0.0.0
inside a Hugging Face Space or a container.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lesionstudio.data import IMAGE_EXTENSIONS
from lesionstudio.hubmodel import CheckpointError
from lesionstudio.studio import MAX_UPLOAD_BYTES, Studio, StudioError
from lesionstudio.ui import build


def default_host() -> str:
    in_space = "SPACE_ID" in os.environ
    in_container = Path("/.dockerenv").exists() or os.environ.get("LESIONSTUDIO_IN_CONTAINER") == "1"
    return "0.0.0.0" if in_space or in_container else "127.0.0.1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or default_host())
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoints", type=Path, default=None, help="folder with vqvae-N/ and pixelcnn-N/")
    src.add_argument("--hub", metavar="REPO_ID", default=None, help="Hugging Face Hub repo laid out the same way")
    p.add_argument("--examples", type=Path, default=None, help="folder of example images")
    p.add_argument("--data", type=Path, default=None,
                   help="training-image folder: where a code occurs, and each sample's nearest training image")
    p.add_argument("--data-limit", type=int, default=256, help="images of --data scanned (encoded once)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        studio = Studio(
            args.checkpoints or args.hub, device=args.device, data_dir=args.data, data_limit=args.data_limit
        )
    except (StudioError, CheckpointError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    examples = None
    if args.examples:
        examples = sorted(str(p) for p in args.examples.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:12]
    demo = build(studio, examples)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_UPLOAD_BYTES,
        show_error=True,
    )


if __name__ == "__main__":
    main()
