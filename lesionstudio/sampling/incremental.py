"""The cached-activation sampler behind ``sample(method="incremental")``.

The idea of Ramachandran et al. ("Fast Generation for Convolutional Autoregressive Models",
2017): every layer's activations are cached, and each new code costs only what it changes.
Its two parts cost differently, so each runs where it is cheapest:

* **Once per row**, on the prior's device: the vertical stack. Each layer's window of the
  rows above is one matrix product over the whole row ([B * W, (p + 1) * k * C] by
  [(p + 1) * k * C, 2C]), the same arithmetic per row as a forward pass's convolution, and
  the conditions' part of every layer's gates comes from one product per coarse row.
* **Once per position**, on the CPU in NumPy: the horizontal stack and the head at one
  column. Its matrices are a few rows by a few hundred columns, so the cost is the calls, not
  the arithmetic, and a NumPy call on preallocated buffers costs a fraction of a torch one.
  A layer is six calls: two products, one tanh and three sums and products in place.

Two rewrites keep the per-position calls few. A gate's sigmoid is taken from the same tanh as
its other half, sigmoid(b) = (1 + tanh(b / 2)) / 2, so twice the gate is t_a + t_a * t_b with
(t_a, t_b) = tanh(a, b / 2): the gate half of every term is halved, and the output product
reads [t_a, t_a * t_b, 1] against its matrix halved and stacked twice over its bias (halving is
exact in binary floating point; only the sigmoid's rounding differs from the reference).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController

from ..models.pixelcnn import GatedPixelCNN

Progress = Callable[[float], None]
# The noise for one row's sampled positions: (count, batch, K) as the samplers share it.
RowNoise = Callable[[int], torch.Tensor]


@functools.cache
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()


def one_blas_thread() -> AbstractContextManager:
    """NumPy's BLAS held to one thread while sampling: its products here are small, and its
    threads would contend for the cores with torch's (docs/performance.md)."""
    return _threadpools().limit(limits=1, user_api="blas")


def one_blas_thread_while(fn: Callable) -> Callable:
    """``fn`` run with ``one_blas_thread``."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        with one_blas_thread():
            return fn(*args, **kwargs)

    return wrapper


def numpy_dtype(dtype: torch.dtype) -> type:
    """The CPU part's float type: float64 for a float64 prior (the tests), else float32."""
    return np.float64 if dtype == torch.float64 else np.float32


@dataclass(frozen=True)
class VerticalWeights:
    """One layer's vertical-stack weights as matrices for row-wide products (prior's device)."""

    # [(p + 1) * k * C, 2C] per ring phase: rows ordered (buffer slot, column, channel), the
    # slots holding the kernel's rows in turn (phase f: the newest row is in slot f).
    v: list[torch.Tensor]
    v_bias: torch.Tensor  # [2C]
    to_h: torch.Tensor  # [2C, 2C], gate half halved
    to_h_bias: torch.Tensor  # [2C], v_to_h's and h_conv's biases, gate half halved


@dataclass(frozen=True)
class HorizontalWeights:
    """One layer's horizontal-stack weights as NumPy matrices for per-position products."""

    width: int  # kernel width: p + 1, or p in the first layer (which must not see its own code)
    h_in: np.ndarray  # [width * C, 2C], rows ordered (column, channel), gate half halved
    h_out: np.ndarray  # [2C + 1, C]: halved, twice (the gate is t_a + t_a * t_g); last row the bias
    residual: bool


def gate_scale(channels: int, like: torch.Tensor) -> torch.Tensor:
    """[2C] of ones for the tanh half of a gate and halves for its sigmoid half."""
    return torch.cat([like.new_ones(channels), like.new_full((channels,), 0.5)])


def vertical_weights(prior: GatedPixelCNN) -> list[VerticalWeights]:
    out = []
    c = prior.channels
    for layer in prior.layers:
        scale = gate_scale(c, layer.v_conv.weight)
        rows = layer.v_conv.weight.detach().permute(2, 3, 1, 0)  # [p + 1, k, C, 2C], oldest row first
        n = rows.shape[0]
        phases = [rows[[(slot - f - 1) % n for slot in range(n)]].reshape(-1, 2 * c).contiguous() for f in range(n)]
        out.append(
            VerticalWeights(
                v=phases,
                v_bias=layer.v_conv.bias.detach(),
                to_h=(layer.v_to_h.weight.detach().reshape(2 * c, 2 * c).t() * scale).contiguous(),
                to_h_bias=(layer.v_to_h.bias.detach() + layer.h_conv.bias.detach()) * scale,
            )
        )
    return out


def horizontal_weights(prior: GatedPixelCNN, dtype: type) -> list[HorizontalWeights]:
    out = []
    c = prior.channels
    for i, layer in enumerate(prior.layers):
        scale = gate_scale(c, layer.h_conv.weight)
        w = layer.h_conv.weight.detach()[:, :, 0, :]  # [2C, C, width]
        h_in = w.permute(2, 1, 0).reshape(-1, 2 * c) * scale
        half = layer.h_out.weight.detach().reshape(c, c).t() * 0.5
        h_out = torch.cat([half, half, layer.h_out.bias.detach()[None]])
        out.append(HorizontalWeights(layer.h_width, as_numpy(h_in, dtype), as_numpy(h_out, dtype), residual=i > 0))
    return out


def as_numpy(t: torch.Tensor, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False))


class RowTerms(NamedTuple):
    """The conditions' part of every layer's gates for one row: per layer, [B, W or 1, 2C]."""

    gates: list[torch.Tensor]  # as the vertical stack adds it
    scaled: list[torch.Tensor]  # its gate half halved, as the horizontal stack's rewritten gates take it


class RowConditions:
    """What the class and the coarse grid add inside every layer's gates, one row at a time,
    on the prior's device (None for an unconditioned prior). A coarse row's terms are made
    once, for all layers in one product, and kept while the fine rows below it use them."""

    def __init__(
        self,
        prior: GatedPixelCNN,
        labels: torch.Tensor | None,
        coarse: torch.Tensor | None,
        height: int,
        width: int,
        guidance: float,
    ) -> None:
        n_layers, c2 = len(prior.layers), 2 * prior.channels
        self.scale = gate_scale(prior.channels, prior.embedding.weight)
        self.class_term = None
        if prior.num_classes and labels is not None:
            per_layer = [layer.class_embed(labels) for layer in prior.layers]  # each [B, 2C]
            self.class_term = torch.stack(per_layer, 1)[:, None]  # [B, 1, L, 2C]
        self.constant = None if self.class_term is None else self.terms(self.class_term)
        self.feats = None
        self.cached: tuple[int, RowTerms] | None = None
        if coarse is not None and prior.condition is not None:
            # At the coarse grid's size: nearest upsampling commutes with the 1x1 projections.
            self.feats = prior.coarse_features(coarse, tuple(coarse.shape[1:]), guidance).detach()
            rows = torch.arange(coarse.shape[1], dtype=torch.float32)[None, None, :, None]
            self.source_rows = F.interpolate(rows, size=(height, 1), mode="nearest").long().flatten().tolist()
            self.repeat = width // coarse.shape[2]
            self.proj = torch.cat([layer.cond_proj.weight.detach().reshape(c2, -1) for layer in prior.layers]).t()
            self.proj_bias = torch.cat([layer.cond_proj.bias.detach() for layer in prior.layers])
            self.shape = (n_layers, c2)

    def terms(self, gates: torch.Tensor) -> RowTerms:
        """[B, W or 1, L, 2C] to the per-layer terms."""
        return RowTerms(list(gates.unbind(2)), list((gates * self.scale).unbind(2)))

    def row(self, r: int) -> RowTerms | None:
        if self.feats is None:
            return self.constant
        src = self.source_rows[r]
        if self.cached is None or self.cached[0] != src:
            f = self.feats[:, :, src, :].transpose(1, 2)  # [B, wc, C]
            term = torch.addmm(self.proj_bias, f.reshape(-1, f.shape[2]), self.proj)
            term = term.view(f.shape[0], f.shape[1], *self.shape).repeat_interleave(self.repeat, dim=1)
            if self.class_term is not None:
                term = self.class_term + term
            self.cached = (src, self.terms(term))
        return self.cached[1]


class LayerStep(NamedTuple):
    """One layer at one column: views of the sampler's buffers and the layer's matrices."""

    window: np.ndarray  # [B, width * C], the layer's input columns up to this one
    h_in: np.ndarray
    vh: np.ndarray  # [B, 2C], the vertical stack's contribution here
    h_out: np.ndarray
    out: np.ndarray  # [B, C], where the layer's output goes (the next layer's input)
    residual: np.ndarray | None  # [B, C], the layer's own input here (all but the first layer)


class IncrementalSampler:
    """Cached-activation sampler for one batch of grids (see the module docstring).

    Per layer it keeps the last p + 1 input rows of the vertical stack, that stack's
    contribution to every column of the current row of the horizontal stack, and the
    horizontal stack's input row, with the views each column reads made once.
    """

    def __init__(
        self,
        prior: GatedPixelCNN,
        batch: int,
        height: int,
        width: int,
        labels: torch.Tensor | None,
        coarse: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> None:
        self.prior, self.b, self.w = prior, batch, width
        self.p, self.c, self.k = prior.kernel_size // 2, prior.channels, prior.kernel_size
        weight = prior.embedding.weight
        self.device, dtype = weight.device, numpy_dtype(weight.dtype)
        self.emb = weight.detach()
        self.emb_np = as_numpy(weight, dtype)
        self.vertical = vertical_weights(prior)
        self.horizontal = horizontal_weights(prior, dtype)
        self.conditions = RowConditions(prior, labels, coarse, height, width, guidance)
        self._vertical_buffers(weight)
        self._horizontal_buffers(dtype)

    def _vertical_buffers(self, weight: torch.Tensor) -> None:
        b, w, c, p = self.b, self.w, self.c, self.p
        opts = {"dtype": weight.dtype, "device": self.device}
        # Input rows r-p..r of each layer (a ring of p + 1 slots), channels last, p zero columns each side.
        self.vbuf = [torch.zeros(b, p + 1, w + 2 * p, c, **opts) for _ in self.vertical]
        # Per ring phase, each layer's slot for the newest row (between the zero columns).
        self.slots = [[buf[:, f, p : p + w] for buf in self.vbuf] for f in range(p + 1)]

    def _horizontal_buffers(self, dtype: type) -> None:
        b, w, c, p = self.b, self.w, self.c, self.p
        # Input rows (hbuf[l] is layer l's input, hbuf[-1] the last output), p zero columns on
        # the left; and each layer's vertical contribution [B, W, 2C], which torch writes.
        self.hbuf = [np.zeros((b, p + w, c), dtype) for _ in range(len(self.horizontal) + 1)]
        self.vh = [np.zeros((b, w, 2 * c), dtype) for _ in self.horizontal]
        self.vh_t = [torch.from_numpy(v) for v in self.vh]  # the same memory
        self.vh_flat = [v.view(b * w, 2 * c) for v in self.vh_t]
        self.direct = self.device.type == "cpu" and self.vh_t[0].dtype == self.emb.dtype
        self.pre = np.zeros((b, 2 * c), dtype)
        self.gated = np.ones((b, 2 * c + 1), dtype)  # [t_a, t_b then t_a * t_b, 1]
        self.gates, self.a, self.g = self.gated[:, : 2 * c], self.gated[:, :c], self.gated[:, c : 2 * c]
        self.out = np.zeros((b, c), dtype)
        head = self.prior.head
        self.head_in = np.ones((b, c + 1), dtype)
        self.hidden_pre = np.zeros((b, c), dtype)
        self.hidden = np.ones((b, c + 1), dtype)
        self.head_view, self.hidden_view = self.head_in[:, :c], self.hidden[:, :c]  # the last columns stay 1
        self.w1 = as_numpy(torch.cat([head[1].weight.reshape(c, c).t(), head[1].bias[None]]), dtype)
        self.w2 = as_numpy(torch.cat([head[3].weight.reshape(-1, c).t(), head[3].bias[None]]), dtype)
        self.logits = np.zeros((b, self.prior.num_codes), dtype)

    def steps(self, col: int) -> list[LayerStep]:
        """Every layer's views for one column, made once per fill."""
        q, out = col + self.p, []
        for i, hw in enumerate(self.horizontal):
            window = self.hbuf[i][:, col : col + hw.width].reshape(self.b, -1)
            residual = self.hbuf[i][:, q] if hw.residual else None
            out.append(LayerStep(window, hw.h_in, self.vh[i][:, col], hw.h_out, self.hbuf[i + 1][:, q], residual))
        return out

    def store_vh(self, i: int, vh: torch.Tensor) -> None:
        """Layer i's vertical contribution [B, W or 1, 2C] into its CPU buffer."""
        self.vh_t[i].copy_(vh.expand(self.b, self.w, -1))

    def first_row(self) -> None:
        """Row 0 sees no row above: its vertical contribution is the biases and conditions."""
        cond = self.conditions.row(0)
        for i, vw in enumerate(self.vertical):
            self.store_vh(i, vw.to_h_bias if cond is None else vw.to_h_bias + cond.scaled[i])

    def push_row(self, row_codes: torch.Tensor, r: int) -> None:
        """Feed finished row r - 1 to the vertical stack; compute its contribution to row r.

        Each layer's last p + 1 input rows sit in a ring of slots; the newest row overwrites
        the oldest, and the weights for the ring's phase read the slots in kernel order."""
        b, w, c2 = self.b, self.w, 2 * self.c
        phase = (r - 1) % (self.p + 1)
        above, here = self.conditions.row(r - 1), self.conditions.row(r)
        slots = self.slots[phase]
        slots[0].copy_(F.embedding(row_codes.to(self.device), self.emb))
        for i, vw in enumerate(self.vertical):
            cols = self.vbuf[i].unfold(2, self.k, 1).permute(0, 2, 1, 4, 3).reshape(b * w, -1)
            v_pre = torch.addmm(vw.v_bias, cols, vw.v[phase]).view(b, w, c2)
            if above is not None:
                v_pre += above.gates[i]
            if self.direct:  # straight into the buffer the positions read
                vh = torch.addmm(vw.to_h_bias, v_pre.view(b * w, c2), vw.to_h, out=self.vh_flat[i])
                if here is not None:
                    self.vh_t[i] += here.scaled[i]
            else:
                vh = torch.addmm(vw.to_h_bias, v_pre.view(b * w, c2), vw.to_h).view(b, w, c2)
                self.store_vh(i, vh if here is None else vh + here.scaled[i])
            if i + 1 < len(self.vertical):
                a, g = v_pre.chunk(2, dim=2)
                torch.mul(torch.tanh(a), torch.sigmoid(g), out=slots[i + 1])

    def start_row(self, row_codes: np.ndarray) -> None:
        self.hbuf[0][:, self.p :] = self.emb_np[row_codes]

    def position(self, steps: list[LayerStep], head: bool) -> np.ndarray | None:
        """The horizontal stack at one column (its steps), and with ``head`` the logits [B, K].

        ``np.dot`` is the cheapest product call but writes only to C-contiguous buffers, so
        the products land in scratch rows and the sums carry them into the strided columns."""
        pre, gated, out, gates, a, g = self.pre, self.gated, self.out, self.gates, self.a, self.g
        dot, add, tanh, multiply = np.dot, np.add, np.tanh, np.multiply  # looked up once, not per layer
        for window, h_in, vh, h_out, column, residual in steps:
            dot(window, h_in, out=pre)
            add(pre, vh, out=pre)
            tanh(pre, out=gates)
            multiply(g, a, out=g)
            dot(gated, h_out, out=out)
            if residual is None:
                np.copyto(column, out)
            else:
                add(out, residual, out=column)
        if not head:
            return None
        np.maximum(steps[-1].out, 0.0, out=self.head_view)
        dot(self.head_in, self.w1, out=self.hidden_pre)
        np.maximum(self.hidden_pre, 0.0, out=self.hidden_view)
        return dot(self.hidden, self.w2, out=self.logits)

    @one_blas_thread_while
    def fill(
        self,
        codes: torch.Tensor,
        mask: torch.Tensor,
        temperature: float,
        top_k: int | None,
        noise: RowNoise,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """codes [B, H, W] with every position where mask is True drawn, in raster order."""
        codes_np = codes.cpu().numpy().copy()
        mask_np = mask.cpu().numpy()
        any_mask = mask_np.any(0)
        rows = np.flatnonzero(any_mask.any(1)).tolist()
        if not rows:
            return codes
        total, done = int(any_mask.sum()), 0
        steps = [self.steps(col) for col in range(self.w)]
        emb_in = [self.hbuf[0][:, col + self.p] for col in range(self.w)]
        pick = Picker(temperature, top_k)
        self.first_row()
        for r in range(rows[-1] + 1):
            if r > 0:
                self.push_row(torch.from_numpy(codes_np[:, r - 1]), r)
            cols = np.flatnonzero(any_mask[r]).tolist()
            if not cols:
                continue  # nothing to sample in this row: only the vertical stack needs it
            row, row_mask = codes_np[:, r], mask_np[:, r]
            full = bool(row_mask.all())
            gumbel = noise(len(cols)).cpu().numpy()
            self.start_row(row)
            for col in range(cols[0]):  # known codes before the first drawn one
                self.position(steps[col], head=False)
            j, masked = 0, set(cols)
            for col in range(cols[0], cols[-1] + 1):
                logits = self.position(steps[col], head=col in masked)
                if logits is not None:
                    new = pick(logits, gumbel[j])
                    j += 1
                    row[:, col] = new if full else np.where(row_mask[:, col], new, row[:, col])
                np.take(self.emb_np, row[:, col], axis=0, out=emb_in[col])
            done += len(cols)
            if progress:
                progress(done / total)
        return torch.from_numpy(codes_np).to(codes.device)


@dataclass(frozen=True)
class Picker:
    """One code per row of logits [B, K], as ``grid.choose`` picks it: top-k, then Gumbel-max
    at a temperature (0: argmax). Works in place on the logits buffer."""

    temperature: float
    top_k: int | None

    def __call__(self, logits: np.ndarray, gumbel: np.ndarray) -> np.ndarray:
        k = logits.shape[1]
        if self.top_k is not None and 0 < self.top_k < k:
            kth = np.partition(logits, k - self.top_k, axis=1)[:, k - self.top_k : k - self.top_k + 1]
            logits[logits < kth] = -np.inf
        if self.temperature <= 0:
            return logits.argmax(axis=1)
        if self.temperature != 1.0:  # x / 1 is x
            np.divide(logits, self.temperature, out=logits)
        np.add(logits, gumbel, out=logits)
        return logits.argmax(axis=1)
