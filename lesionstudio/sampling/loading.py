"""Find and load the stack of VQ-VAE + prior levels for a latent size.

A checkpoints source is a folder (or a Hugging Face Hub repo laid out the same way) holding
``vqvae-{latent}/`` and ``pixelcnn-{latent}/`` model folders, each with config.json and
model.safetensors (plus ``codebook_usage.json`` beside a VQ-VAE). A hierarchical prior (one
conditioned on a coarser grid, e.g. ``pixelcnn-64`` on the codes of ``vqvae-32``) needs the
coarser levels from the same source, loaded with it as ``ModelStack.coarse`` (recursively).
Where no source is given it is, in order: ``$LESIONSTUDIO_CHECKPOINTS``, then the bundled
``checkpoints/``. A Hub repo is fetched with one ``snapshot_download`` at one revision, so it
honours ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and the cache. Only safetensors and
JSON are ever read.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from ..models.codedecoder import CodeDecoder
from ..models.critic import RealismCritic
from ..models.hubmodel import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from ..models.pixelcnn import GatedPixelCNN
from ..models.vqvae import VQVAE
from .stack import ModelStack

ENV_VAR = "LESIONSTUDIO_CHECKPOINTS"
BUNDLED = Path(__file__).resolve().parents[2] / "checkpoints"
LATENTS = (16, 32, 64, 128)  # code-grid sides for a 256 px image
USAGE_NAME = "codebook_usage.json"
CRITIC_NAME = "critic"  # the realism critic's folder in a checkpoints source
SNAPSHOT_FILES = [f"*/{name}" for name in (CONFIG_NAME, WEIGHTS_NAME, USAGE_NAME)]


def default_source() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else BUNDLED


def _is_local(source: str | Path) -> bool:
    """A Path, an existing folder, or anything not shaped like a Hub repo id (owner/name)."""
    if isinstance(source, Path) or os.path.isdir(source):
        return True
    return source.startswith((".", "/", "~")) or source.count("/") != 1


def _local_model_dir(source: str | Path, name: str, revision: str | None) -> Path | None:
    """The folder of model `name` in a source (a Hub repo is downloaded first); None if absent."""
    root = Path(source).expanduser() if _is_local(source) else hub_snapshot(str(source), revision)
    if not root.is_dir():
        raise CheckpointError(f"checkpoints folder {root} does not exist")
    folder = root / name
    return folder if folder.is_dir() else None


@functools.cache
def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """One download of a Hub repo at one revision: every model folder's weights, config and usage
    file (not cards or images); later calls reuse it, so a running app never mixes revisions."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=SNAPSHOT_FILES))
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"Hub repo {repo_id} not found (or private without a token)") from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"Hub repo {repo_id} has no revision {revision!r}") from exc
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"cannot reach the Hub for {repo_id} and it is not in the cache (HF_HUB_OFFLINE is "
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}): {exc}"
        ) from exc


def available_latents(
    source: str | Path | None = None, revision: str | None = None, require_prior: bool = True
) -> list[int]:
    """Latent sizes for which the source has a VQ-VAE (and a prior, unless require_prior=False)."""
    source = default_source() if source is None else source
    return [
        latent
        for latent in LATENTS
        if _local_model_dir(source, f"vqvae-{latent}", revision)
        and (not require_prior or _local_model_dir(source, f"pixelcnn-{latent}", revision))
    ]


def check_pair(vq: VQVAE, prior: GatedPixelCNN, vq_dir: Path | str, prior_dir: Path | str) -> None:
    """Raise CheckpointError when a prior was not made for this VQ-VAE."""
    problems = []
    if prior.num_codes != vq.num_codes:
        problems.append(f"codebook size K: prior {prior.num_codes} vs VQ-VAE {vq.num_codes}")
    if prior.grid_size != vq.latent_size:
        problems.append(f"grid size: prior {prior.grid_size} vs VQ-VAE {vq.latent_size}")
    if prior.code_dim and prior.code_dim != vq.code_dim:
        problems.append(f"code dimension: prior {prior.code_dim} vs VQ-VAE {vq.code_dim}")
    if problems:
        raise CheckpointError(f"prior {prior_dir} does not match VQ-VAE {vq_dir}: " + "; ".join(problems))


def check_coarse_stack(prior: GatedPixelCNN, prior_dir: Path | str, coarse: ModelStack) -> None:
    """Raise CheckpointError when a hierarchical prior cannot fill in this coarse stack."""
    problems = []
    cvq = coarse.vqvae
    if cvq.num_codes != prior.cond_num_codes:
        problems.append(f"coarse codebook size K: prior expects {prior.cond_num_codes}, VQ-VAE has {cvq.num_codes}")
    if cvq.latent_size != prior.cond_grid_size:
        problems.append(f"coarse grid: prior expects {prior.cond_grid_size}, VQ-VAE makes {cvq.latent_size}")
    if coarse.prior is not None and coarse.prior.class_names != prior.class_names:
        problems.append(f"classes: {prior.class_names} vs coarse prior's {coarse.prior.class_names}")
    if problems:
        raise CheckpointError(
            f"prior {prior_dir} does not fit the coarse stack {coarse.vqvae_dir}: " + "; ".join(problems)
        )


def read_usage(folder: Path, num_codes: int) -> list[int] | None:
    path = folder / USAGE_NAME
    if not path.exists():
        return None
    try:
        counts = json.loads(path.read_text())["counts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid codebook usage file: {exc}") from exc
    if len(counts) != num_codes or any(not isinstance(c, int) or c < 0 for c in counts):
        raise CheckpointError(f"{path} must hold {num_codes} non-negative counts")
    return counts


def load_stack(
    latent: int = 64,
    source: str | Path | None = None,
    device: torch.device | str = "cpu",
    require_prior: bool = True,
    revision: str | None = None,
) -> ModelStack:
    """Load the VQ-VAE and prior for a latent size from a folder, $LESIONSTUDIO_CHECKPOINTS, the
    bundled checkpoints or a Hub repo id; mismatched or broken checkpoints are clear errors."""
    if latent not in LATENTS:
        raise ValueError(f"latent size must be one of {LATENTS}, got {latent}")
    source = default_source() if source is None else source
    vq_dir = _local_model_dir(source, f"vqvae-{latent}", revision)
    if vq_dir is None:
        raise CheckpointError(f"{source} has no vqvae-{latent}/ checkpoint")
    vq = VQVAE.from_pretrained(vq_dir).to(device).eval()
    if vq.latent_size != latent:
        raise CheckpointError(f"{vq_dir} makes a {vq.latent_size}x{vq.latent_size} grid, not {latent}x{latent}")
    prior_dir = _local_model_dir(source, f"pixelcnn-{latent}", revision)
    if prior_dir is None and require_prior:
        raise CheckpointError(f"{source} has no pixelcnn-{latent}/ prior for its vqvae-{latent}")
    stack = _assemble(vq, vq_dir, prior_dir, source, device, revision)
    stack.critic = load_critic(source, device, revision)
    stack.decoder = load_decoder(vq, f"decoder-{latent}", source, device, revision)
    return stack


def load_decoder(
    vq: VQVAE, name: str, source: str | Path, device: torch.device | str = "cpu", revision: str | None = None
) -> CodeDecoder | None:
    """The post-trained decoder folder ``name`` of a source (None where there is none), checked
    to read this VQ-VAE's codebook bit for bit."""
    folder = _local_model_dir(source, name, revision)
    if folder is None:
        return None
    decoder = CodeDecoder.from_pretrained(folder).to(device).eval()
    decoder.check_fits(vq, str(folder))
    return decoder


def decoder_latents(source: str | Path | None = None, revision: str | None = None) -> list[int]:
    """Latent sizes for which a source holds a post-trained generation decoder (``decoder-N/``)."""
    source = default_source() if source is None else source
    return [latent for latent in LATENTS if _local_model_dir(source, f"decoder-{latent}", revision)]


def has_critic(source: str | Path | None = None, revision: str | None = None) -> bool:
    """Whether a checkpoints source holds a realism critic (without loading it)."""
    return _local_model_dir(default_source() if source is None else source, CRITIC_NAME, revision) is not None


def critic_layout_grid(source: str | Path | None = None, revision: str | None = None) -> int:
    """The grid of the layouts a source's critic can choose (its config's ``layout_grid``; 0: none),
    read without loading the critic."""
    folder = _local_model_dir(default_source() if source is None else source, CRITIC_NAME, revision)
    if folder is None or not (folder / CONFIG_NAME).is_file():
        return 0
    try:
        grid = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get("layout_grid", 0)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{folder}: {CONFIG_NAME} is not a valid JSON object: {exc}") from exc
    return grid if isinstance(grid, int) else 0


def load_critic(
    source: str | Path | None = None, device: torch.device | str = "cpu", revision: str | None = None
) -> RealismCritic | None:
    """The realism critic of a checkpoints source (``critic/``), or None when it has none."""
    source = default_source() if source is None else source
    folder = _local_model_dir(source, CRITIC_NAME, revision)
    return None if folder is None else RealismCritic.from_pretrained(folder).to(device).eval()


def load_stack_from(
    vqvae_dir: str | Path, prior_dir: str | Path, coarse_source: str | Path | None = None, device: str = "cpu"
) -> ModelStack:
    """A stack from a VQ-VAE folder and a prior folder; a hierarchical prior's coarser levels come
    from ``coarse_source`` (by default the folder that holds the prior)."""
    vq = VQVAE.from_pretrained(vqvae_dir).to(device).eval()
    source = Path(prior_dir).parent if coarse_source is None else coarse_source
    return _assemble(vq, Path(vqvae_dir), Path(prior_dir), source, device, None)


def _assemble(
    vq: VQVAE,
    vq_dir: Path,
    prior_dir: Path | None,
    source: str | Path,
    device: torch.device | str,
    revision: str | None,
) -> ModelStack:
    """The level of vq (with the prior in prior_dir, if any) on top of the coarser levels its prior needs."""
    prior, coarse = None, None
    if prior_dir is not None:
        prior = GatedPixelCNN.from_pretrained(prior_dir).to(device).eval()
        check_pair(vq, prior, vq_dir, prior_dir)
        if prior.hierarchical:
            try:
                coarse = load_stack(prior.cond_grid_size, source, device, require_prior=True, revision=revision)
            except (CheckpointError, ValueError) as exc:
                raise CheckpointError(
                    f"prior {prior_dir} fills in a {prior.cond_grid_size}x{prior.cond_grid_size} coarse grid, "
                    f"but its coarser levels cannot be loaded from {source}: {exc}"
                ) from exc
            check_coarse_stack(prior, prior_dir, coarse)
    usage = read_usage(vq_dir, vq.num_codes)
    return ModelStack(vq.latent_size, vq, prior, str(source), vq_dir, prior_dir, usage, coarse)
