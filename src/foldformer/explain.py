"""Path-amplitude attribution through the folds (DESIGN.md §2; docs/explain.md).

The linear part of the path sum of one fold is the attention rollout
R = (½I + ½A_L) … (½I + ½A_1) over its m + w input positions (values and MLPs left out; A_l
is layer l's attention, averaged over heads). Row r of R is the share of path amplitude that
output r draws from each input: a token of the segment, or a memory row. A memory row is the
final state of one of the previous fold's positions, so its amplitude is that position's row
one fold back. The gated model mixes the old row back in, next = g·old + (1 − g)·new per
channel: gate="channels" (the default) carries each channel's amplitude apart and averages
them at the output (exact for the linear path when g differs by channel); gate="mean" carries
one amplitude per row with the channel mean of g (d times less storage, but it misses what a
gate holding some channels keeps: docs/explain.md). What is left after the first fold ended in the
initial memory M0.

Constant memory per fold: each completed fold leaves the rollout rows of the positions it
condenses, m × (m + w), and the gate's share g of every row ((1 or d) × m), and the rows of
the positions being explained; the per-layer attention of a fold is dropped when the fold
ends. The amplitude over every earlier token is assembled only for the explained positions,
by walking back through these transfers: no matrix grows with the history.

The weights are recomputed from the queries and keys the model's own attention computes (its
rotary positions, its causal mask over memory + segment, softmax(q kᵀ/√d) as in eager
attention), while the model's kernel still produces the states, so every kernel explains the
same model::

    amplitudes = explain(model, token_ids, positions=[100, 4095])
    amplitudes[0].amplitude      # (101,) float64 over tokens 0 … 100, sums to 1
    amplitudes[0].horizon(0.9)   # tokens back that hold 90% of it
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from foldformer.config import ConfigError
from foldformer.layers import attention_weights
from foldformer.model import FoldedTransformer

HEADS = ("mean", "keep")
# How the gated memory's mix g·old + (1 − g)·new enters: "mean", one scalar per row (the
# channel mean of g); "channels", each channel's amplitude carried apart and averaged at the
# end (exact for the linear path, d times the storage).
GATES = ("mean", "channels")
HORIZON_SHARES = (0.5, 0.9, 0.99)


@dataclass
class Amplitude:
    """The path amplitude of output position `position` over tokens 0 … position.

    amplitude: (position + 1,) float64, the head-averaged rollout, summing to 1 over tokens.
    initial_memory: the share of the rollout that ended in the initial memory M0 (not a
        token) before `amplitude` was normalised over the tokens; 0 when m = 0.
    heads: (heads, position + 1) with heads="keep": the same with the last layer's heads kept
        apart (earlier layers averaged), each row summing to 1; else None.
    """

    position: int
    amplitude: Tensor
    initial_memory: float
    heads: Tensor | None = None

    def by_distance(self) -> Tensor:
        """The amplitude at distance 0 (the token itself), 1, …, position."""
        return self.amplitude.flip(0)

    def horizon(self, share: float) -> int:
        """The smallest distance d such that tokens position − d … position hold `share`."""
        held = self.by_distance().cumsum(0)
        return int((held < share - 1e-12).sum().clamp(max=self.position))

    def to_dict(self) -> dict:
        record = {
            "position": self.position,
            "amplitude": self.amplitude.tolist(),
            "initial_memory": self.initial_memory,
            "horizon": {f"{round(100 * s)}%": self.horizon(s) for s in HORIZON_SHARES},
        }
        if self.heads is not None:
            record["heads"] = self.heads.tolist()
        return record


@contextmanager
def recorded_attention(blocks: nn.ModuleList) -> Iterator[list[Tensor]]:
    """While active, every attention call appends its weights (B, heads, N, S) to the list
    yielded (one entry per block and call, in order); outputs still come from each block's
    own kernel."""
    weights: list[Tensor] = []
    kernels = [block.attn.kernel for block in blocks]

    def recording(kernel):
        def run(q, k, v, mask=None, dropout_p=0.0):
            weights.append(attention_weights(q, k, mask))
            return kernel(q, k, v, mask, dropout_p)

        return run

    try:
        for block, kernel in zip(blocks, kernels, strict=True):
            block.attn.kernel = recording(kernel)
        yield weights
    finally:
        for block, kernel in zip(blocks, kernels, strict=True):
            block.attn.kernel = kernel


class Explainer:
    """Reads a stream, chunk by chunk, through the model's own per-segment steps and keeps
    what `amplitudes` needs for the chosen positions (absolute, 0-based). The model is put in
    eval mode (dropout would make the weights random)."""

    def __init__(
        self,
        model: nn.Module,
        positions: Iterable[int],
        heads: str = "mean",
        gate: str = "channels",
    ):
        if not isinstance(model, FoldedTransformer):
            kind = getattr(model, "model_type", type(model).__name__)
            raise ConfigError(
                f"explain follows path amplitude through the folded model's memory rows (final "
                f"token states fed back); a {kind!r} model carries another kind of state, which "
                "the rollout cannot follow: not supported"
            )
        if heads not in HEADS:
            raise ConfigError(f"heads={heads!r} is not one of {HEADS}")
        if gate not in GATES:
            raise ConfigError(f"gate={gate!r} is not one of {GATES}")
        self.positions = sorted(set(positions))
        bad = [p for p in self.positions if not isinstance(p, int) or p < 0]
        if bad:
            raise ConfigError(f"positions must be integers >= 0, got {bad[0]!r}")
        self.model, self.keep_heads = model.eval(), heads == "keep"
        self.gate_channels = gate == "channels"
        c = model.config
        self.m, self.w, self.n_layers, self.n_heads = (
            c.memory_len, c.segment_len, c.n_layers, c.n_heads,
        )  # fmt: skip
        self.state = model.initial_state(1)
        self.tokens_read = 0
        self.transfers: list[tuple[Tensor, Tensor]] = []  # per completed fold: see transfer
        self.rows: dict[int, Tensor] = {}  # position -> (1 or heads, m + w) rollout row
        self._new_fold()

    def _new_fold(self) -> None:
        # attention of every layer over the fold so far: (layers, heads, m + w, m + w)
        F = self.m + self.w
        self.fold_attention = torch.zeros(self.n_layers, self.n_heads, F, F, dtype=torch.float64)

    @torch.no_grad()
    def read(self, token_ids: Tensor | list[int]) -> None:
        """Continue the stream with a 1-D sequence of token ids."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)
        self.model.check_inputs(ids, None, None, None)  # ids in the vocabulary, one line if not
        ids = ids.to(self.model.initial_memory.device)
        t = 0
        while t < ids.shape[1]:
            p = self.state.tokens_in_segment()
            n = min(self.w - p, ids.shape[1] - t)
            x = self.model.inputs(ids[:, t : t + n])
            rope = self.model.chunk_context(x, self.state)
            with recorded_attention(self.model.blocks) as weights:
                _, self.state = self.model.partial_segment(self.state, x, rope)
            for layer, layer_weights in enumerate(weights):  # (1, heads, N, S)
                N, S = layer_weights.shape[-2:]
                self.fold_attention[layer, :, S - N : S, :S] = layer_weights[0].double().cpu()
            start = self.tokens_read - p  # the fold's first token
            for position in self.positions:
                if self.tokens_read <= position < self.tokens_read + n:
                    self.rows[position] = self.rollout_rows([self.m + position - start])[:, 0]
            t, self.tokens_read = t + n, self.tokens_read + n
            if p + n == self.w:
                self.transfers.append(self.transfer())
                self.state = self.model.condense(self.state)
                self._new_fold()

    def rollout_rows(self, rows: list[int], keep_heads: bool | None = None) -> Tensor:
        """Rows of the fold's rollout (½I + ½A_L) … (½I + ½A_1): (1 or heads, len(rows), m + w);
        with keep_heads the last layer's heads stay apart."""
        keep_heads = self.keep_heads if keep_heads is None else keep_heads
        F = self.m + self.w
        eye = torch.eye(F, dtype=torch.float64)
        v = eye[rows].unsqueeze(0)  # (1, rows, F)
        for layer in reversed(range(self.n_layers)):
            attention = self.fold_attention[layer]  # (heads, F, F)
            if not (keep_heads and layer == self.n_layers - 1):
                attention = attention.mean(0, keepdim=True)
            v = 0.5 * v + 0.5 * v @ attention  # v (½I + ½A)
        return v

    def transfer(self) -> tuple[Tensor, Tensor]:
        """How the next memory draws on this fold's inputs: the rollout rows of the positions
        it condenses, (m, m + w), and the share g of the old memory row kept, (1 or d, m)
        (per channel with gate="channels"; 0 without a gate): next = g·old + (1 − g)·rows."""
        m, F = self.m, self.m + self.w
        rows = self.rollout_rows(list(range(F - m, F)), keep_heads=False)[0]  # (m, F)
        gate = self.model.memory_gate
        if gate is None or m == 0:
            return rows, torch.zeros(1, m, dtype=torch.float64)
        state = self.state  # the completed fold, before condense
        g = gate.gate(state.memory, state.top[:, F - m :])[0].double().cpu().T  # (d, m)
        return rows, g if self.gate_channels else g.mean(0, keepdim=True)

    def amplitudes(self) -> list[Amplitude]:
        """The amplitude of every chosen position read so far, over tokens 0 … position."""
        positions = [p for p in self.positions if p < self.tokens_read]
        if not positions:
            return []
        m, w = self.m, self.w
        rows = torch.stack([self.rows[p] for p in positions])  # (P, H, m + w)
        P, H = rows.shape[:2]
        C = self.transfers[0][1].shape[0] if self.transfers else 1  # channels carried apart
        out = torch.zeros(P, H, self.tokens_read, dtype=torch.float64)
        memory = torch.zeros(P, H, C, m, dtype=torch.float64)  # on the fold's memory rows
        folds = [p // w for p in positions]
        for fold in reversed(range(max(folds) + 1)):
            entering = [i for i, f in enumerate(folds) if f == fold]
            if entering:
                tokens = min(w, self.tokens_read - fold * w)
                out[entering, :, fold * w : fold * w + tokens] = rows[entering, :, m : m + tokens]
                memory[entering] = rows[entering, :, None, :m]
            if fold > 0:  # memory rows of this fold = mixes of the previous fold's inputs
                condensed, g = self.transfers[fold - 1]  # (m, m + w), (C, m)
                new = memory * (1 - g)  # the share of each memory row that is new states
                tokens = torch.einsum("phcr,rw->phw", new, condensed[:, m:]) / C
                out[..., (fold - 1) * w : fold * w] += tokens
                memory = memory * g + torch.einsum("phcr,rk->phck", new, condensed[:, :m])
        initial = memory.sum(-1).mean(-1)  # (P, H): what ended in M0
        results = []
        for i, position in enumerate(positions):
            raw = out[i, :, : position + 1]
            mean = raw.mean(0)
            results.append(
                Amplitude(
                    position=position,
                    amplitude=mean / mean.sum(),
                    initial_memory=float(initial[i].mean()),
                    heads=raw / raw.sum(-1, keepdim=True) if self.keep_heads else None,
                )
            )
        return results


def explain(
    model: nn.Module,
    token_ids: Tensor | list[int],
    positions: Iterable[int],
    heads: str = "mean",
    gate: str = "channels",
) -> list[Amplitude]:
    """The amplitude of each of `positions` (0-based, in the text) over the tokens before it."""
    explainer = Explainer(model, positions, heads, gate)
    n_tokens = len(token_ids)
    late = [p for p in explainer.positions if p >= n_tokens]
    if late:
        raise ConfigError(f"position {late[0]} is past the end of the text ({n_tokens} tokens)")
    explainer.read(token_ids)
    return explainer.amplitudes()


# ---------------------------------------------------------------------------------------------
# Reports: the plot and the shaded text
# ---------------------------------------------------------------------------------------------

# Shading is logarithmic over this many decades below a position's largest amplitude, so a
# token a thousand times fainter than the brightest one still shows.
SHADE_DECADES = 4


def text_pieces(tokenizer, token_ids: list[int]) -> list[tuple[int, int, str]]:
    """(first, last, text) runs of tokens that decode to whole characters (a byte-level
    tokenizer splits a multi-byte character over several tokens), covering every token."""
    pieces, first = [], 0
    for last in range(len(token_ids)):
        text = tokenizer.decode(token_ids[first : last + 1])
        if "\ufffd" in text and last - first < 8:  # a cut character: wait for its end
            continue
        pieces.append((first, last, text))
        first = last + 1
    if first < len(token_ids):
        pieces.append((first, len(token_ids) - 1, tokenizer.decode(token_ids[first:])))
    return pieces


def render_html(amplitudes: list[Amplitude], pieces: list[tuple[int, int, str]]) -> str:
    """A self-contained page: for each explained position, the text up to it with every
    piece shaded by the amplitude it holds (title: the value)."""
    sections = []
    for record in amplitudes:
        a = record.amplitude
        shown = [(f, min(last, record.position), text) for f, last, text in pieces
                 if f <= record.position]  # fmt: skip
        held = [float(a[first : last + 1].sum()) for first, last, _ in shown]
        top = max(held)
        spans = []
        for (first, last, text), share in zip(shown, held, strict=True):
            alpha = max(0.0, 1 + math.log10(share / top) / SHADE_DECADES) if share > 0 else 0
            style = f' style="background-color: rgba(230, 80, 20, {alpha:.3f})"' if alpha else ""
            here = ' class="here"' if last == record.position else ""
            spans.append(
                f'<span data-first="{first}" data-last="{last}" data-amplitude="{share:.6g}"'
                f' title="tokens {first}-{last}: {share:.3g}"{here}{style}>{html.escape(text)}</span>'
            )
        horizons = ", ".join(f"{round(100 * s)}%: {record.horizon(s)}" for s in HORIZON_SHARES)
        sections.append(
            f'<section data-position="{record.position}"><h2>position {record.position}</h2>'
            f"<p>context horizon (tokens back holding a share of the amplitude): {horizons}; "
            f"ended in the initial memory: {record.initial_memory:.3g}</p>"
            f'<div class="text">{"".join(spans)}</div></section>'
        )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>foldformer explain</title>'
        "<style>body{font-family:sans-serif;margin:2em;max-width:60em}"
        ".text{font-family:monospace;white-space:pre-wrap;line-height:1.6}"
        ".here{outline:2px solid #1050c0}</style></head><body><h1>Path amplitude</h1>"
        f"<p>Shading: amplitude on a log scale over {SHADE_DECADES} decades below the brightest "
        "piece of each position; the explained token is outlined.</p>"
        + "".join(sections)
        + "</body></html>\n"
    )


def plot_amplitudes(amplitudes: list[Amplitude], path) -> None:
    """Amplitude against distance (log-log, distance >= 1), each curve marked at its context
    horizons (the legend gives them)."""
    from foldformer.evaluate.common import new_figure, save_figure

    fig, ax = new_figure(figsize=(7, 4.5))
    markers = ("o", "s", "^")
    for record in amplitudes:
        by_distance = record.by_distance()
        distance = torch.arange(len(by_distance))
        keep = (distance >= 1) & (by_distance > 0)
        horizons = [record.horizon(share) for share in HORIZON_SHARES]
        label = f"position {record.position}: horizons {'/'.join(map(str, horizons))}"
        (line,) = ax.loglog(distance[keep], by_distance[keep], lw=1, alpha=0.8, label=label)
        for horizon, marker in zip(horizons, markers, strict=True):
            if horizon >= 1:  # horizon 0: the token itself holds the share
                ax.plot(horizon, by_distance[horizon], marker, color=line.get_color(), ms=6)
    for share, marker in zip(HORIZON_SHARES, markers, strict=True):
        ax.plot([], [], marker, color="gray", label=f"{round(100 * share)}% horizon")
    ax.set_xlabel("distance (tokens back)")
    ax.set_ylabel("path amplitude")
    ax.set_title("Attention rollout through the folds (horizons: 50/90/99% of the amplitude)")
    ax.legend(fontsize=7, ncol=1 + len(amplitudes) // 10)
    save_figure(fig, path)
