"""Pictures of what a method did to the tokens: one panel per chosen block, from the ``owner`` field.

``owner[p]`` is the index of the token that carries input patch ``p`` after a block (-1: dropped). A patch
whose token carries only itself is *kept* (drawn as is); patches sharing a token form a *group* (merged,
pooled or propagated into one token: one colour per group, outlined); dropped patches are *pruned*
(darkened).

>>> import timm, torch, tokenreduce as tr
>>> model = tr.patch(timm.create_model("deit_tiny_patch16_224").eval(), "tome", r=13)
>>> states = tr.trace(model, torch.randn(1, 3, 224, 224))
>>> kinds = patch_kinds(states[5].owner[0])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.errors import require

KEPT, GROUPED, PRUNED = 0, 1, 2


def patch_kinds(owner: torch.Tensor) -> dict[str, np.ndarray]:
    """Per patch: kind (kept / grouped / pruned), group id (dense, -1 if not grouped) and group size."""
    owner = owner.detach().cpu().numpy().astype(np.int64)
    alive = owner >= 0
    counts = np.zeros(owner.max() + 2 if alive.any() else 1, dtype=np.int64)
    np.add.at(counts, owner[alive], 1)
    size = np.where(alive, counts[np.where(alive, owner, 0)], 0)
    kind = np.where(~alive, PRUNED, np.where(size > 1, GROUPED, KEPT))
    group = np.full_like(owner, -1)
    grouped_tokens = np.unique(owner[kind == GROUPED])
    for dense, token in enumerate(grouped_tokens):
        group[owner == token] = dense
    return {"kind": kind, "group": group, "size": size}


def _group_colours(count: int, seed: int = 0) -> np.ndarray:
    """Distinct, saturated colours (golden-ratio hues, shuffled so neighbours differ)."""
    require("matplotlib", "viz")
    import matplotlib.colors as mcolors

    hues = (np.arange(count) * 0.61803398875) % 1.0
    rng = np.random.default_rng(seed)
    sat = 0.55 + 0.35 * rng.random(count)
    val = 0.75 + 0.25 * rng.random(count)
    return mcolors.hsv_to_rgb(np.stack([hues, sat, val], axis=-1)) if count else np.zeros((0, 3))


def render_tokens(image: np.ndarray, owner: torch.Tensor, grid: tuple[int, int]) -> tuple[np.ndarray, dict[str, int]]:
    """The image (H x W x 3 floats in [0, 1]) coloured by token groups, and the counts of each kind."""
    info = patch_kinds(owner)
    gh, gw = grid
    colours = _group_colours(int(info["group"].max()) + 1)
    token = _token_ids(owner, gh, gw)
    out = _paint(image, info["kind"].reshape(gh, gw), info["group"].reshape(gh, gw), token, colours)
    return out, _counts(info)


def render_clip_tokens(frames: np.ndarray, owner: torch.Tensor, grid: tuple[int, int, int]
                       ) -> tuple[list[np.ndarray], dict[str, int]]:
    """One picture per time step of a clip: ``frames`` (t x H x W x 3 floats in [0, 1], one frame per time step
    of the ``(t, h, w)`` token grid) coloured by token groups over the whole clip, so a token that carries
    tubelets of several frames has the same colour in each; and the counts of each kind over the clip."""
    info = patch_kinds(owner)
    steps, gh, gw = grid
    colours = _group_colours(int(info["group"].max()) + 1)
    kind, group = info["kind"].reshape(steps, gh, gw), info["group"].reshape(steps, gh, gw)
    token = owner.detach().cpu().numpy().astype(np.int64).reshape(steps, gh, gw)
    pictures = [_paint(frames[t], kind[t], group[t], token[t].copy(), colours) for t in range(steps)]
    return pictures, _counts(info)


def _counts(info: dict[str, np.ndarray]) -> dict[str, int]:
    groups = int(len(np.unique(info["group"][info["kind"] == GROUPED])))
    return {
        "tokens": groups + int((info["kind"] == KEPT).sum()),
        "kept": int((info["kind"] == KEPT).sum()),
        "groups": groups,
        "grouped_patches": int((info["kind"] == GROUPED).sum()),
        "pruned": int((info["kind"] == PRUNED).sum()),
    }


def _paint(image: np.ndarray, kind: np.ndarray, group: np.ndarray, token: np.ndarray, colours: np.ndarray
           ) -> np.ndarray:
    """Overlay one gh x gw grid of patch kinds on an image: groups in their colour, pruned patches darkened,
    a light line between patches of different tokens."""
    gh, gw = kind.shape
    height, width = image.shape[:2]
    ph, pw = height // gh, width // gw
    image = image[: gh * ph, : gw * pw]
    # Per-patch overlay colour and opacity, then upsampled to pixels.
    overlay = np.zeros((gh, gw, 3))
    alpha = np.zeros((gh, gw))
    grouped = kind == GROUPED
    overlay[grouped] = colours[group[grouped]]
    alpha[grouped] = 0.6
    alpha[kind == PRUNED] = 0.82
    overlay_px = np.repeat(np.repeat(overlay, ph, 0), pw, 1)
    alpha_px = np.repeat(np.repeat(alpha, ph, 0), pw, 1)[..., None]
    out = image * (1 - alpha_px) + overlay_px * alpha_px
    # Outline groups: a pixel line wherever two neighbouring patches belong to different tokens.
    token[kind == PRUNED] = -2
    edge_v = token[:, 1:] != token[:, :-1]
    edge_h = token[1:, :] != token[:-1, :]
    edges = np.zeros(out.shape[:2], dtype=bool)
    for r, c in zip(*np.nonzero(edge_v), strict=True):
        edges[r * ph:(r + 1) * ph, (c + 1) * pw - 1:(c + 1) * pw] = True
    for r, c in zip(*np.nonzero(edge_h), strict=True):
        edges[(r + 1) * ph - 1:(r + 1) * ph, c * pw:(c + 1) * pw] = True
    out[edges] = 0.35 * out[edges] + 0.65  # a light line that still lets the image show
    return np.clip(out, 0, 1)


def _token_ids(owner: torch.Tensor, gh: int, gw: int) -> np.ndarray:
    return owner.detach().cpu().numpy().astype(np.int64).reshape(gh, gw)


def draw_token_panels(
    image: np.ndarray,
    owners: Sequence[torch.Tensor],
    blocks: Sequence[int],
    grid: tuple[int, int],
    out_path: str | Path,
    title: str = "",
    panel_inches: float = 3.2,
    dpi: int = 110,
) -> dict[str, dict[str, int]]:
    """Write a PNG: the original image, then one panel per block; returns the counts per block."""
    require("matplotlib", "viz")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = len(blocks) + 1
    fig, axes = plt.subplots(1, panels, figsize=(panel_inches * panels, panel_inches + 0.9), dpi=dpi)
    axes = np.atleast_1d(axes)
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=10)
    counts_per_block = {}
    for ax, block, owner in zip(axes[1:], blocks, owners, strict=True):
        picture, counts = render_tokens(image, owner, grid)
        counts_per_block[str(block)] = counts
        ax.imshow(picture)
        ax.set_title(f"after block {block}: {counts['tokens']} image tokens\n"
                     f"{counts['kept']} kept, {counts['groups']} groups, {counts['pruned']} pruned", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    legend = [Patch(facecolor="white", edgecolor="0.5", label="kept (one patch per token)"),
              Patch(facecolor="tab:orange", alpha=0.6, label="merged / propagated group (one colour each)"),
              Patch(facecolor="black", alpha=0.82, label="pruned")]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11, fontweight="bold")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95 if title else 1))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return counts_per_block
