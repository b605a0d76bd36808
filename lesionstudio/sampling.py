"""Sampling and inpainting code grids with a Gated PixelCNN prior.

Two samplers give the same codes for the same seed:

* ``method="naive"`` runs the whole network once per sampled code (h*w forward passes): simple,
  slow, kept as the reference for tests and benchmarks;
* ``method="incremental"`` (default) caches every layer's activations and computes for each new
  code only what that code changes (the idea of Ramachandran et al., "Fast Generation for
  Convolutional Autoregressive Models", 2017): the vertical stack once per row, the horizontal
  stack and the head once per position, batched over the samples.

Both draw one Gumbel noise vector per sampled position in raster order from a generator seeded
with ``seed`` (on the CPU, so a seed means the same noise on any device) and pick
argmax(logits / T + noise), which is a draw from softmax(logits / T); T = 0 is the argmax.
The two compute the same sums in a different order, so they agree to rounding (exactly, in
practice; in float64 the tests check it on many grids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .pixelcnn import GatedPixelCNN, gate

Progress = Callable[[float], None]
LabelsArg = int | Sequence[int] | torch.Tensor | None


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def resolve_labels(prior: GatedPixelCNN, n: int, labels: LabelsArg, gen: torch.Generator) -> torch.Tensor | None:
    """Class ids for n samples: given (int, sequence or tensor), or on a class-conditional prior
    drawn by the training class frequencies when None; None for an unconditional prior."""
    if prior.num_classes == 0:
        if labels is not None:
            raise ValueError("this prior is unconditional: it takes no class labels")
        return None
    if labels is None:
        return torch.multinomial(prior.class_probabilities(), n, replacement=True, generator=gen)
    lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if lab.numel() == 1:
        lab = lab.expand(n)
    if lab.numel() != n:
        raise ValueError(f"expected 1 or {n} labels, got {lab.numel()}")
    if int(lab.min()) < 0 or int(lab.max()) >= prior.num_classes:
        raise ValueError(f"labels must be in [0, {prior.num_classes}) ({', '.join(prior.class_names)})")
    return lab.clone()


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> torch.Tensor:
    """One code per row of logits [B, K]: Gumbel-max sampling at a temperature, with optional top-k."""
    noise = torch.rand(logits.shape, generator=gen, dtype=logits.dtype).to(logits.device)
    if top_k is not None and 0 < top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature <= 0:
        return logits.argmax(dim=1)
    tiny = torch.finfo(logits.dtype).tiny
    gumbel = -torch.log(-torch.log(noise.clamp(tiny, 1.0 - 1e-7)))
    return (logits / temperature + gumbel).argmax(dim=1)


@torch.no_grad()
def sample(
    prior: GatedPixelCNN,
    n: int,
    shape: tuple[int, int] | None = None,
    temperature: float = 1.0,
    seed: int | None = None,
    labels: LabelsArg = None,
    top_k: int | None = None,
    method: str = "incremental",
    progress: Progress | None = None,
) -> torch.Tensor:
    """Draw n code grids [n, h, w] from the prior (shape defaults to the grid it was trained on)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    h, w = shape or (prior.grid_size, prior.grid_size)
    device = prior.embedding.weight.device
    gen = make_generator(seed)
    lab = resolve_labels(prior, n, labels, gen)
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    mask = torch.ones(n, h, w, dtype=torch.bool, device=device)
    return _fill(prior, codes, mask, lab, temperature, top_k, gen, method, progress)


@torch.no_grad()
def inpaint(
    prior: GatedPixelCNN,
    codes: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    seed: int | None = None,
    labels: LabelsArg = None,
    n: int = 1,
    top_k: int | None = None,
    candidates: int = 4,
    method: str = "incremental",
    progress: Progress | None = None,
) -> torch.Tensor:
    """Resample the codes where mask is True, keep the others; n variants per input grid.

    codes and mask are [h, w] or [B, h, w]; the result is [B * n, h, w] (variants of one input
    are adjacent). Masked codes are drawn in raster order, each conditioned on all the codes
    before it. A causal prior cannot see the fixed codes after the hole, so each variant is
    the best of ``candidates`` fills, ranked by the prior's likelihood of the fixed codes that
    follow the hole (how well the fill leads into what is kept).
    """
    if codes.ndim == 2:
        codes, mask = codes[None], mask[None]
    if codes.shape != mask.shape or codes.ndim != 3:
        raise ValueError(f"codes and mask must have the same shape [B, h, w]; got {codes.shape}, {mask.shape}")
    if n < 1 or candidates < 1:
        raise ValueError("n and candidates must be at least 1")
    device = prior.embedding.weight.device
    codes = codes.to(device).long()
    prior.check_inputs(codes, None)
    mask = mask.to(device).bool()
    b = codes.shape[0]
    gen = make_generator(seed)
    lab = resolve_labels(prior, b * n, labels if labels is None else _per_variant(labels, b, n), gen)
    m = candidates
    rep = n * m  # candidates of one variant adjacent, variants of one input adjacent
    grid = codes.repeat_interleave(rep, dim=0)
    msk = mask.repeat_interleave(rep, dim=0)
    lab_all = None if lab is None else lab.repeat_interleave(m)
    filled = _fill(prior, grid, msk, lab_all, temperature, top_k, gen, method, progress)
    if m == 1:
        return filled
    score = _after_hole_loglik(prior, filled, msk, lab_all)
    best = score.view(b * n, m).argmax(dim=1)
    return filled.view(b * n, m, *filled.shape[1:])[torch.arange(b * n, device=device), best]


def _per_variant(labels: LabelsArg, b: int, n: int) -> torch.Tensor:
    lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if lab.numel() == b and b != b * n:
        lab = lab.repeat_interleave(n)
    return lab


def _after_hole_loglik(
    prior: GatedPixelCNN, codes: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """Sum of log p over the kept codes that come after the first masked position of each grid."""
    ll = prior.log_likelihood(codes, labels).flatten(1)
    flat_mask = mask.flatten(1)
    idx = torch.arange(flat_mask.shape[1], device=codes.device)
    first = torch.where(flat_mask.any(1), flat_mask.float().argmax(1), flat_mask.shape[1])
    after = (idx[None, :] > first[:, None]) & ~flat_mask
    return (ll * after).sum(1)


def _fill(
    prior: GatedPixelCNN,
    codes: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    top_k: int | None,
    gen: torch.Generator,
    method: str,
    progress: Progress | None,
) -> torch.Tensor:
    codes = codes.clone()
    if labels is not None:
        labels = labels.to(codes.device)
    if method == "naive":
        positions = torch.nonzero(mask.any(0)).tolist()  # raster order
        for i, (r, c) in enumerate(positions):
            logits = prior(codes, labels)[:, :, r, c]
            new = pick(logits, temperature, top_k, gen)
            codes[:, r, c] = torch.where(mask[:, r, c], new, codes[:, r, c])
            if progress and (c == codes.shape[2] - 1 or i == len(positions) - 1):
                progress((i + 1) / len(positions))
        return codes
    if method != "incremental":
        raise ValueError(f"method must be 'incremental' or 'naive', got {method!r}")
    sampler = IncrementalSampler(prior, codes.shape[0], codes.shape[1], codes.shape[2], labels)
    with _one_thread(codes.device):
        return sampler.fill(codes, mask, temperature, top_k, gen, progress)


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run on one CPU thread: the per-code products are too small to gain from more, and
    thread hand-offs on every tiny operation made sampling several times slower on 2 cores."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class IncrementalSampler:
    """Cached-activation sampler for one batch of grids (see the module docstring).

    Per layer it keeps the last p+1 rows of the vertical stack's input, the vertical stack's
    contribution to the current row of the horizontal stack, and the current row of the
    horizontal stack's input. The horizontal convolutions become matrix products over a
    window of p(+1) cached columns.
    """

    def __init__(self, prior: GatedPixelCNN, batch: int, height: int, width: int, labels: torch.Tensor | None):
        self.prior, self.b, self.h, self.w = prior, batch, height, width
        self.p = prior.kernel_size // 2
        self.c = prior.channels
        weight = prior.embedding.weight
        self.emb = weight.detach()
        self.layers = []
        for layer in prior.layers:
            cond = layer.class_bias(labels)
            cond = cond[:, :, 0, 0] if isinstance(cond, torch.Tensor) else None
            kw = layer.h_width
            self.layers.append(
                {
                    "layer": layer,
                    "kw": kw,
                    "wh": layer.h_conv.weight.detach().reshape(2 * self.c, self.c * kw).t().contiguous(),
                    "bh": layer.h_conv.bias.detach(),
                    "wo": layer.h_out.weight.detach().reshape(self.c, self.c).t().contiguous(),
                    "bo": layer.h_out.bias.detach(),
                    "cond": cond,
                }
            )
        head = prior.head
        self.w1, self.b1 = head[1].weight.detach().reshape(self.c, self.c).t(), head[1].bias.detach()
        k = prior.num_codes
        self.w2, self.b2 = head[3].weight.detach().reshape(k, self.c).t(), head[3].bias.detach()
        opts = {"dtype": weight.dtype, "device": weight.device}
        n_layers = len(self.layers)
        # Vertical-stack inputs of each layer: rows r-p..r (zeros above the grid).
        self.vbuf = [torch.zeros(batch, self.c, self.p + 1, width, **opts) for _ in range(n_layers)]
        # Horizontal-stack rows, left-padded by p zero columns: hbuf[l] is layer l's input.
        self.hbuf = [torch.zeros(batch, self.c, width + self.p, **opts) for _ in range(n_layers + 1)]
        self.vh: list[torch.Tensor] = []  # per layer: [B, W, 2C] added to the horizontal pre-activation

    def _first_row(self) -> None:
        self.vh = []
        for spec in self.layers:
            layer = spec["layer"]
            base = (layer.v_to_h.bias + spec["bh"]).detach()[None, None, :].expand(self.b, self.w, -1)
            if spec["cond"] is not None:
                base = base + spec["cond"][:, None, :]
            self.vh.append(base.contiguous())

    def _push_row(self, row_codes: torch.Tensor) -> None:
        """Feed a finished row to the vertical stack; compute its contribution to the next row."""
        x = F.embedding(row_codes, self.emb).permute(0, 2, 1)[:, :, None, :]  # [B, C, 1, W]
        p = self.p
        self.vh = []
        for i, spec in enumerate(self.layers):
            layer = spec["layer"]
            self.vbuf[i] = torch.cat([self.vbuf[i][:, :, 1:], x], dim=2)
            v_pre = F.conv2d(F.pad(self.vbuf[i], (p, p, 0, 0)), layer.v_conv.weight, layer.v_conv.bias)
            if spec["cond"] is not None:
                v_pre = v_pre + spec["cond"][:, :, None, None]
            vh = layer.v_to_h(v_pre)[:, :, 0, :].permute(0, 2, 1) + spec["bh"]
            if spec["cond"] is not None:
                vh = vh + spec["cond"][:, None, :]
            self.vh.append(vh.contiguous())
            x = gate(v_pre)

    def _prefix(self, row_codes: torch.Tensor, end: int) -> None:
        """Horizontal stack for the known columns [0, end) of the current row, all at once."""
        p = self.p
        self.hbuf[0][:, :, p:] = F.embedding(row_codes, self.emb).permute(0, 2, 1)
        if end == 0:
            return
        for i, spec in enumerate(self.layers):
            kw = spec["kw"]
            windows = self.hbuf[i][:, :, : end + kw - 1].unfold(2, kw, 1)  # [B, C, end, kw]
            x = windows.permute(0, 2, 1, 3).reshape(self.b, end, self.c * kw)
            pre = x @ spec["wh"] + self.vh[i][:, :end]
            out = gate(pre.transpose(1, 2)).transpose(1, 2) @ spec["wo"] + spec["bo"]
            if i > 0:
                out = out + self.hbuf[i][:, :, p : p + end].transpose(1, 2)
            self.hbuf[i + 1][:, :, p : p + end] = out.transpose(1, 2)

    def _position(self, col: int) -> torch.Tensor:
        """Horizontal stack and head at one column of the current row: logits [B, K]."""
        p, c = self.p, self.c
        for i, spec in enumerate(self.layers):
            x = self.hbuf[i][:, :, col : col + spec["kw"]].reshape(self.b, -1)
            pre = torch.addmm(self.vh[i][:, col], x, spec["wh"])
            g = torch.tanh(pre[:, :c]) * torch.sigmoid(pre[:, c:])
            res = spec["bo"] if i == 0 else self.hbuf[i][:, :, col + p] + spec["bo"]
            self.hbuf[i + 1][:, :, col + p] = torch.addmm(res, g, spec["wo"])
        hid = torch.relu(torch.addmm(self.b1, torch.relu(self.hbuf[-1][:, :, col + p]), self.w1))
        return torch.addmm(self.b2, hid, self.w2)

    def fill(
        self,
        codes: torch.Tensor,
        mask: torch.Tensor,
        temperature: float,
        top_k: int | None,
        gen: torch.Generator,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        any_mask = mask.any(0)
        rows = torch.nonzero(any_mask.any(1)).flatten().tolist()
        if not rows:
            return codes
        last_row = rows[-1]
        total = int(any_mask.sum())
        done = 0
        self._first_row()
        for r in range(last_row + 1):
            if r > 0:
                self._push_row(codes[:, r - 1])
            cols = torch.nonzero(any_mask[r]).flatten().tolist()
            if not cols:
                continue  # nothing to sample in this row: only the vertical stack needs it
            self._prefix(codes[:, r], cols[0])
            for col in range(cols[0], cols[-1] + 1):
                logits = self._position(col)
                if any_mask[r, col]:
                    new = pick(logits, temperature, top_k, gen)
                    codes[:, r, col] = torch.where(mask[:, r, col], new, codes[:, r, col])
                    done += 1
                self.hbuf[0][:, :, col + self.p] = self.emb[codes[:, r, col]]
            if progress:
                progress(done / total)
        return codes
