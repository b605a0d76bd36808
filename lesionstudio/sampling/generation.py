"""What a generation request asks for: one settings object with the one set of defaults and
rules, and the one function that draws samples with it, ranked or plain.

The Generate tab and its API, ``Studio.generate``, the reader study and ``python -m
lesionstudio.synthesize`` all take a ``GenerationSettings``; left at its defaults, every one of
them draws the same image for the same per-sample seed.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

from .grid import Progress, make_generator, resolve_labels
from .stack import ModelStack, StackSample, sample_ranked, sample_stack

# The defaults: what measured best within the time limits (docs/experiments.md). Candidates and
# layouts need the critic (and its layout head); a stack without one draws 1 and 1.
DEFAULT_CANDIDATES = 4
DEFAULT_LAYOUTS = 8
MAX_CANDIDATES = 8  # per sample: the batch drawn is samples x candidates
MAX_LAYOUTS = 16  # per candidate: layouts are cheap, but not free
MAX_GUIDANCE = 4.0
MAX_TEMPERATURE = 4.0  # far past where samples fall apart (the Generate tab's sliders stop at 1.5)


class GenerationError(ValueError):
    """A setting that cannot be honoured, with a message meant for the user."""


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise GenerationError(f"{name} must be between {low:g} and {high:g}, got {value:g}")


@dataclass(frozen=True)
class GenerationSettings:
    """Every setting of a generation request but its grid and seeds. ``None`` candidates or
    layouts mean the defaults the stack can honour (``resolved``)."""

    temperature: float = 1.0  # of the coarsest level (the layout); 0 draws the likeliest code
    detail_temperature: float | None = None  # of every finer level; None: the same as temperature
    candidates: int | None = None  # drawn per kept sample, the critic keeping the most real-looking
    layouts: int | None = None  # drawn per candidate, the critic's layout head keeping one
    guidance: float = 1.0  # how closely each finer level follows the grid below (1: as trained)
    class_name: str = "any"  # "any": each sample's class drawn by the training frequencies

    def __post_init__(self) -> None:
        # Stored as plain numbers (so equal requests compare, and batch, as equal), then checked.
        def store(name: str, kind: type) -> None:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, kind(getattr(self, name)))

        for name, kind in (("temperature", float), ("detail_temperature", float), ("guidance", float)):
            store(name, kind)
        store("candidates", int)
        store("layouts", int)
        object.__setattr__(self, "class_name", self.class_name or "any")
        _check_range("Temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        if self.detail_temperature is not None:
            _check_range("Detail temperature", self.detail_temperature, 0.0, MAX_TEMPERATURE)
        _check_range("Layout guidance", self.guidance, 0.0, MAX_GUIDANCE)
        if self.candidates is not None:
            _check_range("Candidates per sample", self.candidates, 1, MAX_CANDIDATES)
        if self.layouts is not None:
            _check_range("Layouts per candidate", self.layouts, 1, MAX_LAYOUTS)

    @property
    def temperatures(self) -> tuple[float, float]:
        """(the coarsest level's, every finer level's)."""
        detail = self.temperature if self.detail_temperature is None else self.detail_temperature
        return self.temperature, detail

    @property
    def ranked(self) -> bool:
        """Whether the critic chooses among candidates or layouts (of resolved settings)."""
        return (self.candidates or 1) > 1 or (self.layouts or 1) > 1

    def resolved(self, stack: ModelStack) -> GenerationSettings:
        """These settings with the defaults filled in for ``stack``, checked against what it can
        do (a prior, a critic for candidates, a layout head for its coarsest grid, the class)."""
        prior = stack.prior
        if prior is None:
            raise GenerationError(
                f"No prior is installed for the {stack.latent}x{stack.latent} grid; generation needs one."
            )
        if self.class_name != "any" and (not prior.num_classes or self.class_name not in prior.class_names):
            known = ", ".join(["any", *prior.class_names]) if prior.num_classes else "any (the prior is unconditional)"
            raise GenerationError(f"Unknown class {self.class_name!r}; choose one of {known}.")
        critic, top = stack.critic, stack.levels[0].latent
        has_layout_head = critic is not None and critic.layout_head is not None and critic.layout_grid == top
        candidates = self.candidates or (DEFAULT_CANDIDATES if critic is not None else 1)
        layouts = self.layouts or (DEFAULT_LAYOUTS if has_layout_head else 1)
        if candidates > 1 and critic is None:
            raise GenerationError(f"Ranking candidates needs a realism critic (critic/) in {stack.source}.")
        if layouts > 1 and not has_layout_head:
            raise GenerationError(
                f"Choosing layouts needs a critic with a layout head for the {top}x{top} grid "
                f"(critic/) in {stack.source}."
            )
        return replace(self, candidates=candidates, layouts=layouts)


CLASS_SEED_OFFSET = 1  # a sample's class is drawn from seed + 1: not the stream its codes start from


def sample_labels(stack: ModelStack, settings: GenerationSettings, seeds: list[int]) -> list[int] | None:
    """Each sample's class: the requested one, or drawn from its own seed by the training
    frequencies, before any candidate is drawn, so ranking cannot change a set's class mix."""
    prior = stack.checked_prior()
    if not prior.num_classes:
        return None
    if settings.class_name != "any":
        return [prior.class_names.index(settings.class_name)] * len(seeds)
    gens = [make_generator(s + CLASS_SEED_OFFSET) for s in seeds]
    return resolve_labels(prior, len(seeds), None, gens).tolist()


def draw_samples(
    stack: ModelStack, settings: GenerationSettings, seeds: list[int], progress: Progress | None = None
) -> StackSample:
    """One sample per seed (each the image its seed gives alone), in one batch: the critic's
    pick of candidates and layouts where the settings ask for it, else plain draws."""
    settings = settings.resolved(stack)
    labels = sample_labels(stack, settings, seeds)
    temps = settings.temperatures
    if settings.ranked:
        return sample_ranked(
            stack,
            len(seeds),
            settings.candidates,
            temps,
            seeds,
            labels,
            progress,
            guidance=settings.guidance,
            layouts=settings.layouts,
        )
    return sample_stack(stack, len(seeds), temps, seeds, labels, progress, guidance=settings.guidance)


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of every ``GenerationSettings`` field."""
    g = parser.add_argument_group("generation settings (defaults: the Generate tab's)")
    g.add_argument("--class", dest="class_name", default="any", help="benign, malignant or any (training mix)")
    g.add_argument("--temperature", type=float, default=1.0, help="of the coarsest level (the layout)")
    g.add_argument(
        "--detail-temperature", type=float, default=None, help="of every finer level (default: --temperature)"
    )
    g.add_argument(
        "--candidates",
        type=int,
        default=None,
        help=f"keep the best of M candidates per image by the realism critic (default: {DEFAULT_CANDIDATES} "
        "with a critic, else 1)",
    )
    g.add_argument(
        "--layouts",
        type=int,
        default=None,
        help=f"draw K layouts per candidate, the critic's layout head keeping one (default: {DEFAULT_LAYOUTS} "
        "with a layout head, else 1)",
    )
    g.add_argument(
        "--guidance", type=float, default=1.0, help="how closely the finer levels follow the layout (1: as trained)"
    )


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The settings that ``add_generation_args``'s flags ask for (GenerationError if out of range)."""
    return GenerationSettings(
        temperature=args.temperature,
        detail_temperature=args.detail_temperature,
        candidates=args.candidates,
        layouts=args.layouts,
        guidance=args.guidance,
        class_name=args.class_name,
    )
