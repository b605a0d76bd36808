"""Start the LesionStudio web app.

    python app.py [--host H] [--port P] [--checkpoints DIR | --hub REPO_ID] [--examples DIR]
                  [--data DIR] [--reader-images DIR] [--quiz-log FILE] [--timings FILE] [--share]

Models: --checkpoints or --hub; else $LESIONSTUDIO_HUB_REPO or, inside a Space, the first
`models:` entry of README.md's front matter; else $LESIONSTUDIO_CHECKPOINTS or the bundled
checkpoints/. Examples: the bundled examples/. Host: 127.0.0.1:7860, or 0.0.0.0 inside a
Hugging Face Space or a container.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
from pathlib import Path

from lesionstudio.app.readerstudy import ReaderStudyError, check_log
from lesionstudio.app.serving import TimingLog, set_thread_budget
from lesionstudio.app.space import SpaceConfigError, model_repo
from lesionstudio.app.studio import MAX_UPLOAD_BYTES, Studio, StudioError
from lesionstudio.app.ui import build
from lesionstudio.cli import HelpFormatter
from lesionstudio.data import IMAGE_EXTENSIONS
from lesionstudio.models.hubmodel import WEIGHTS_NAME, CheckpointError

EXAMPLES = Path(__file__).resolve().parent / "examples"


def default_host() -> str:
    in_space = "SPACE_ID" in os.environ
    in_container = Path("/.dockerenv").exists() or os.environ.get("LESIONSTUDIO_IN_CONTAINER") == "1"
    return "0.0.0.0" if in_space or in_container else "127.0.0.1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or default_host())
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoints", type=Path, default=None, help="folder with vqvae-N/ and pixelcnn-N/")
    src.add_argument("--hub", metavar="REPO_ID", default=None, help="Hugging Face Hub repo laid out the same way")
    p.add_argument("--examples", type=Path, default=EXAMPLES, help="folder of example images (default: examples/)")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the training images: where a code occurs, and each sample's nearest training image",
    )
    p.add_argument(
        "--reader-images",
        type=Path,
        default=None,
        help="real images for the reader study (Real or synthetic?); best ones the models never saw",
    )
    p.add_argument(
        "--quiz-log",
        type=Path,
        default=None,
        help="append every reader-study answer to this CSV (nothing is stored without it)",
    )
    p.add_argument("--data-limit", type=int, default=256, help="images of --data scanned (encoded once)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--sampler-processes",
        type=int,
        default=None,
        help="processes that draw samples, each request's seeds shared among them (default: one a core)",
    )
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--timings", type=Path, default=None, help="append each request's timings to this JSON-lines file")
    args = p.parse_args(argv)
    if args.sampler_processes is not None and args.sampler_processes < 1:
        p.error("--sampler-processes must be at least 1")
    return args


def open_studio(args: argparse.Namespace) -> Studio:
    """The Studio on the chosen models; a configured Space repo that fails falls back to the bundled ones."""
    options = {"device": args.device, "data_dir": args.data, "data_limit": args.data_limit}
    options["reader_dir"] = args.reader_images
    source = args.checkpoints or args.hub
    if source is None and (repo := model_repo()):
        try:
            return Studio(repo, **options)
        except (StudioError, CheckpointError, OSError) as exc:
            print(f"warning: cannot serve {repo} ({exc}); serving the bundled checkpoints", file=sys.stderr)
    return Studio(source, **options)


def example_images(folder: Path | None) -> list[str]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:12]


def examples_cache(studio: Studio) -> Path:
    """A cache folder for the Generate examples' results, one per set of model files, so results of
    other (or retrained) models are never served."""
    stack = studio.stack(studio.default_latent)
    files = [Path(d) / WEIGHTS_NAME for level in stack.levels for d in (level.vqvae_dir, level.prior_dir) if d]
    stamp = "".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in files if f.exists())
    return Path(".gradio") / "cached_examples" / hashlib.sha256(stamp.encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_thread_budget()  # once, before any request: the setting is process-wide
    try:
        if args.quiz_log:
            check_log(args.quiz_log)
        studio = open_studio(args)
        studio.preload()
    except (StudioError, CheckpointError, SpaceConfigError, ReaderStudyError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    # A container's stop (SIGTERM) exits like Ctrl-C, through the exit handlers that also stop the
    # sampler process.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    os.environ.setdefault("GRADIO_EXAMPLES_CACHE", str(examples_cache(studio)))
    demo = build(
        studio,
        example_images(args.examples),
        quiz_log=args.quiz_log,
        timings=TimingLog(args.timings),
        sampler_processes=args.sampler_processes,
    )
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_UPLOAD_BYTES,
        show_error=True,
    )


if __name__ == "__main__":
    main()
