"""How far is a set of generated lesions from real ones? Distribution distances, offline.

    python -m lesionstudio.quality --real HELD_OUT_DIR --generated synth/ [--json]
        [--inception-weights pt_inception-2015-12-05-6726825d.pth]

Always reported (no download needed): **FD-VQ** and **KID-VQ**, the Frechet distance and kernel
inception distance computed on LesionStudio VQ-VAE encoder statistics (per-channel mean and
standard deviation of the shipped 32x32 encoder's activations, 128 numbers per image). They rank
sample sets of this domain against each other, and ``fd_vq_real_split`` gives their floor: the
same distance between two disjoint sets of real images. They are **not comparable to Inception
FID** or to any published number.

With ``--inception-weights PATH`` (the standard FID Inception weights file, which this tool never
downloads), also the standard **Inception FID** and KID on 2048-d pool features (torchmetrics,
torch-fidelity's port of the TensorFlow FID network). The file is read as tensors only
(safetensors, or a PyTorch state dict loaded with ``weights_only=True``).

With ``--c2st``, also a classifier two-sample test (``lesionstudio.measure.twosample``): accuracy of a
small CNN telling real from generated on held-out halves, by layout (whole image downscaled)
and by texture (full-resolution crops, beside their fine detail); 0.5 = indistinguishable.
``--c2st-calibrate`` prints what it scores for known differences instead: two halves of the
real set, real vs the other half blurred (sigma 1 px), with ``--reconstruct-with VQVAE`` real
vs that VQ-VAE's reconstructions of the other half, and with ``--teacher-forced LATENT`` real
vs the other half's codes redrawn teacher-forced by that stack's prior and decoded as its
samples are (``--no-controls`` leaves out the first two rows).

Frechet distances are biased upwards for small sets, so the floor and the comparison use sets
of equal size n = min(real / 2, generated): give at least twice as many real images as
generated ones where you can.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance

from .cli import HelpFormatter
from .data import ImageLoadError, as_uint8, eval_transform, find_images, load_image, split_files
from .measure.features import EncoderFeatures, compute, feature_model
from .measure.metrics import psnr
from .measure.twosample import YARDSTICK, TestDesign, TwoSampleResult, blurred, load_uint8, two_sample_test
from .models.critic import FitSettings
from .models.hubmodel import CheckpointError
from .models.vqvae import VQVAE
from .sampling.loading import LATENTS, load_stack
from .sampling.stack import ModelStack
from .sampling.teacherforcing import likeliest_classes, teacher_forced_draws


class _Given(nn.Module):
    """Feature 'extractor' for features computed beforehand: torchmetrics then only does the maths."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_kid(real: torch.Tensor, fake: torch.Tensor, kid_subset: int = 100) -> tuple[float, float, float]:
    """(Frechet distance, KID mean, KID std) between two feature sets [N, F]."""
    dims = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Given(dims))
    subset = max(2, min(kid_subset, len(real), len(fake)))
    with warnings.catch_warnings():  # "KID keeps all features in memory": these are small
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Given(dims), subset_size=subset)
    for metric in (fid, kid):
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
    kid_mean, kid_std = kid.compute()
    return float(fid.compute()), float(kid_mean), float(kid_std)


def load_inception_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The Inception weights as tensors, without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inception-weights {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path} is not a tensor-only weights file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def inception_fid(
    real_files: list[Path], fake_files: list[Path], weights: str | Path, batch_size: int = 16
) -> tuple[float, float, float]:
    """Standard Inception FID and KID (2048-d pool features) of two image lists, from a local
    weights file."""
    state = load_inception_state(weights)
    with tempfile.TemporaryDirectory() as tmp:
        # torch-fidelity reads the path itself (with full unpickling): hand it our own re-save of
        # tensors that were already loaded safely, never the user's file.
        clean = Path(tmp) / "inception.pth"
        torch.save(state, clean)
        try:
            net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(clean))
        except RuntimeError as exc:
            raise ValueError(f"{weights} does not fit the FID Inception network: {exc}") from exc
    transform = eval_transform(256)
    feats = []
    with torch.no_grad():
        for files in (real_files, fake_files):
            out = []
            for s in range(0, len(files), batch_size):
                x = torch.stack([transform(load_image(f)) for f in files[s : s + batch_size]])
                out.append(net((x * 255).round().to(torch.uint8)).reshape(len(x), -1))  # resized to 299 inside
            feats.append(torch.cat(out))
    return frechet_kid(feats[0], feats[1])


def report(
    real_files: list[Path],
    fake_files: list[Path],
    extractor: EncoderFeatures,
    inception_weights: str | Path | None = None,
    seed: int = 0,
) -> dict:
    real = compute(real_files, extractor, desc="real images").features
    fake = compute(fake_files, extractor, desc="generated images").features
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    n = min(len(real) // 2, len(fake))  # equal set sizes: the Frechet distance's bias depends on them
    half_a, half_b = real[perm[:n]], real[perm[n : 2 * n]]
    out: dict = {
        "real_images": len(real),
        "generated_images": len(fake),
        "feature_dims": real.shape[1],
        "compared_set_size": n,
    }
    out["fd_vq"], out["kid_vq"], out["kid_vq_std"] = frechet_kid(real, fake)
    # The floor: the same distances between two disjoint sets of n real images, and n real vs n generated.
    out["fd_vq_real_split"], out["kid_vq_real_split"], _ = frechet_kid(half_a, half_b)
    out["fd_vq_real_half_vs_generated"], _, _ = frechet_kid(half_a, fake[:n])
    out["inception_fid"] = out["inception_kid"] = None
    if inception_weights:
        out["inception_fid"], out["inception_kid"], _ = inception_fid(real_files, fake_files, inception_weights)
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}


@torch.no_grad()
def reconstructions(images: torch.Tensor, vqvae: VQVAE, batch_size: int = 16) -> torch.Tensor:
    """uint8 images through a VQ-VAE and back."""
    out = [vqvae.reconstruct(images[i : i + batch_size].float() / 255)[0] for i in range(0, len(images), batch_size)]
    return as_uint8(torch.cat(out))


@torch.no_grad()
def rendered_reconstructions(images: torch.Tensor, stack: ModelStack, batch_size: int = 16) -> torch.Tensor:
    """uint8 images encoded by the stack's VQ-VAE and decoded as samples are (``ModelStack.render``)."""
    out = [
        stack.render(stack.vqvae.encode(images[i : i + batch_size].float() / 255))
        for i in range(0, len(images), batch_size)
    ]
    return as_uint8(torch.cat(out))


@torch.no_grad()
def decoded_teacher_forced(
    images: torch.Tensor, stack: ModelStack, seed: int = 0, batch_size: int = 16
) -> torch.Tensor:
    """uint8 images whose finest codes are one teacher-forced draw of the stack's prior (given
    the real codes before each position and the real coarse grid), decoded as samples are
    (``ModelStack.render``): the layout is the real one, the detail what the prior would draw."""
    prior = stack.checked_prior()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float() / 255
        levels = stack.encode(x)
        coarse = levels[-2] if prior.hierarchical else None
        labels = likeliest_classes(prior, levels[-1], coarse) if prior.num_classes else None
        drawn = teacher_forced_draws(prior, levels[-1], labels, coarse, generator=gen)[0]
        out.append(stack.render(drawn))
    return as_uint8(torch.cat(out))


@dataclass(frozen=True)
class Transplant:
    """Reconstructions given back ``share`` x another image's lost detail, and the mean PSNR of
    each image against its real one, beside the reconstructions' own."""

    images: torch.Tensor
    psnr: float
    recon_psnr: float


def detail_transplanted(images: torch.Tensor, recon: torch.Tensor, share: float, seed: int = 0) -> Transplant:
    """Reconstructions plus ``share`` x the detail they lost (image minus reconstruction) of another
    image of the set: real texture that the codes do not determine, as a decoder that invents
    perfect texture would add it. Since that detail is unrelated to the image's own, its error
    adds to the reconstruction's (share 1: twice the squared error, 3 dB less PSNR)."""
    if len(images) < 2:
        raise ValueError("a transplant needs at least 2 images")
    gen = torch.Generator().manual_seed(seed)
    donor = (torch.arange(len(images)) + torch.randint(1, len(images), (), generator=gen)) % len(images)
    lost = images.float() - recon.float()
    out = (recon.float() + share * lost[donor]).round().clamp(0, 255).to(torch.uint8)
    return Transplant(out, psnr(out, images, 255).mean().item(), psnr(recon, images, 255).mean().item())


def c2st_calibration(
    real_files: list[Path],
    settings: FitSettings,
    vqvae: VQVAE | None = None,
    stack: ModelStack | None = None,
    design: TestDesign | None = None,
    controls: bool = True,
    transplants: Sequence[float] = (),
) -> dict[str, TwoSampleResult]:
    """The test on known differences: real vs real and vs blurred real (the ``controls``), vs
    reconstructions, vs decoded teacher-forced draws of ``stack`` and, where it has a post-trained
    decoder, vs that decoder's reconstructions (halves of the real set, so
    no image is compared with its own copy; the halves depend on the seed only)."""
    real = load_uint8(real_files)
    gen = torch.Generator().manual_seed(settings.seed)
    perm = torch.randperm(len(real), generator=gen)
    a, b = real[perm[: len(real) // 2]], real[perm[len(real) // 2 :]]
    rows = {}
    if controls:
        rows["real vs real"] = two_sample_test(a, b, settings, design)
        rows["real vs blurred real (sigma 1 px)"] = two_sample_test(a, blurred(b, 1.0), settings, design)
    if vqvae is not None:
        side = f"{vqvae.latent_size}x{vqvae.latent_size}"
        recon = reconstructions(b, vqvae)
        rows[f"real vs {side} VQ-VAE reconstructions"] = two_sample_test(a, recon, settings, design)
        for share in transplants:
            t = detail_transplanted(b, recon, share, settings.seed)
            name = (
                f"real vs {side} reconstructions + {share:g} x another image's lost detail "
                f"(PSNR {t.psnr:.2f} dB; the reconstructions' {t.recon_psnr:.2f} dB)"
            )
            rows[name] = two_sample_test(a, t.images, settings, design)
    if stack is not None:
        which = "post-trained" if stack.decoder is not None else "VQ-VAE's own"
        name = f"real vs decoded {stack.latent}x{stack.latent} teacher-forced draws ({which} decoder)"
        rows[name] = two_sample_test(a, decoded_teacher_forced(b, stack, settings.seed), settings, design)
        if stack.decoder is not None:
            name = f"real vs {stack.latent}x{stack.latent} reconstructions (post-trained decoder)"
            rows[name] = two_sample_test(a, rendered_reconstructions(b, stack), settings, design)
    return rows


def print_c2st(name: str, r: TwoSampleResult) -> None:
    print(
        f"C2ST {name}: layout {r.layout_accuracy:.3f}, texture {r.texture_accuracy:.3f} "
        f"(+- {r.standard_error:.3f}; {r.train_per_set} + {r.train_per_set} to train, "
        f"{r.test_per_set} + {r.test_per_set} to test, {r.seconds:.0f} s)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lesionstudio.quality", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--real", type=Path, required=True, help="held-out real images (not the training set)")
    p.add_argument(
        "--real-split",
        choices=("all", "train", "val"),
        default="all",
        help="the trainers' split of --real (val: the images they held out)",
    )
    p.add_argument("--generated", type=Path, default=None, help="generated images")
    p.add_argument("--limit", type=int, default=None, help="use at most N images of each folder")
    p.add_argument(
        "--feature-model", default=None, help="VQ-VAE folder (default: shipped vqvae-32, or vqvae-64 for 32x32 samples)"
    )
    p.add_argument("--checkpoints", default=None, help="checkpoints folder or Hub repo for the default model")
    p.add_argument("--inception-weights", default=None, help="local FID Inception weights: adds Inception FID")
    p.add_argument("--c2st", action="store_true", help="add the classifier two-sample test")
    p.add_argument("--c2st-only", action="store_true", help="the classifier two-sample test alone (no FD-VQ)")
    p.add_argument("--c2st-calibrate", action="store_true", help="C2ST of the real set against known differences")
    p.add_argument("--reconstruct-with", default=None, help="VQ-VAE folder for the calibration's reconstructions")
    p.add_argument(
        "--no-controls",
        action="store_true",
        help="calibration without its real-vs-real and blur rows (to add a row to an earlier run: same --seed)",
    )
    p.add_argument(
        "--transplant",
        type=float,
        nargs="+",
        default=[],
        metavar="SHARE",
        help="calibration rows: --reconstruct-with's reconstructions plus SHARE x another image's lost detail",
    )
    p.add_argument("--c2st-epochs", type=int, default=YARDSTICK.epochs, help="the test classifier's epochs")
    p.add_argument("--c2st-crops", type=int, default=YARDSTICK.crops, help="random texture crops per image and step")
    p.add_argument(
        "--c2st-plain-texture",
        action="store_true",
        help="the earlier test classifier (texture branch without the fine-detail input; with --c2st-crops 1, "
        "the yardstick before the post-trained decoders)",
    )
    p.add_argument(
        "--teacher-forced",
        type=int,
        choices=LATENTS,
        default=None,
        metavar="LATENT",
        help="calibration row: real vs decoded teacher-forced draws of that stack (from --checkpoints)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    args = p.parse_args(argv)
    if args.transplant and not (args.c2st_calibrate and args.reconstruct_with):
        p.error("--transplant is a calibration row: it needs --c2st-calibrate and --reconstruct-with")
    if args.generated is None and not args.c2st_calibrate:
        p.error("--generated is required (except with --c2st-calibrate)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = replace(YARDSTICK, epochs=args.c2st_epochs, crops=args.c2st_crops, seed=args.seed)
    design = TestDesign(texture_highpass=not args.c2st_plain_texture)
    try:
        real_files = split_files(find_images(args.real), args.real_split)[: args.limit]
        if args.c2st_calibrate:
            vq = VQVAE.from_pretrained(args.reconstruct_with).eval() if args.reconstruct_with else None
            stack = None if args.teacher_forced is None else load_stack(args.teacher_forced, args.checkpoints)
            rows = c2st_calibration(
                real_files, settings, vq, stack, design, controls=not args.no_controls, transplants=args.transplant
            )
            for name, r in rows.items():
                print_c2st(name, r)
            if args.json:
                print(json.dumps({name: r.as_dict() for name, r in rows.items()}))
            return
        fake_files = find_images(args.generated)[: args.limit]
        if len(real_files) < 4 or len(fake_files) < 2:
            raise ValueError("need at least 4 real and 2 generated images")
        out: dict = {}
        if not args.c2st_only:
            chosen = feature_model(args.feature_model, args.checkpoints, args.generated)
            print(chosen.describe())
            extractor = EncoderFeatures(chosen.vqvae, pooling="stats")
            out = report(real_files, fake_files, extractor, args.inception_weights)
            print_distances(out)
        if args.c2st or args.c2st_only:
            r = two_sample_test(load_uint8(real_files), load_uint8(fake_files), settings, design)
            print_c2st(f"{len(real_files)} real vs {len(fake_files)} generated", r)
            out["c2st"] = r.as_dict()
    except (FileNotFoundError, ValueError, CheckpointError, ImageLoadError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if args.json:
        print(json.dumps(out))


def print_distances(out: dict) -> None:
    print(f"{out['real_images']} real vs {out['generated_images']} generated images")
    n = out["compared_set_size"]
    print(f"FD-VQ  (VQ-VAE encoder statistics, not Inception FID): {out['fd_vq']:.4f}")
    print(f"  {n} real vs {n} other real images (the floor):  {out['fd_vq_real_split']:.4f}")
    print(f"  the same {n} real vs {n} generated images:      {out['fd_vq_real_half_vs_generated']:.4f}")
    print(f"KID-VQ: {out['kid_vq']:.5f} +- {out['kid_vq_std']:.5f} (real halves: {out['kid_vq_real_split']:.5f})")
    if out["inception_fid"] is not None:
        print(f"Inception FID: {out['inception_fid']:.3f}   Inception KID: {out['inception_kid']:.5f}")
    else:
        print("Inception FID: not computed (pass --inception-weights PATH to a local FID Inception weights file)")


if __name__ == "__main__":
    main()
