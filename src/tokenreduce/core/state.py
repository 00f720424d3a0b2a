"""The token state that travels explicitly from block to block."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class TokenState:
    """Everything a patched model carries between blocks, per image.

    Attributes:
        x: features, ``B x N x C``.
        size: how many input patches each token stands for, ``B x N x 1``; ``None`` means all ones
            (nothing merged yet), which lets the unreduced path skip the size bias entirely.
        owner: for every input patch, the index of the token that now carries it (-1 once dropped),
            ``B x n0`` long; ``None`` unless tracking was asked for.
        num_prefix: leading tokens (CLS, distillation, registers) that are never removed or merged.
        grid: the (h, w) patch grid of the input image, or (t, h, w) for a video clip (t time steps of
            tubelets); image tokens are in raster order over it (time slowest), so ``owner``, ``left`` and
            :func:`tokenreduce.core.ops.restore` reshape to ``B x t x h x w`` per frame.
        left: for every input patch, whether it has left the sequence (pruned, propagated away, fused into
            EViT's inattentive token), ``B x n0`` bool; ``None`` unless dense output was asked for.
        left_x: the feature each patch's token had in the block where the patch left, ``B x n0 x C``
            (meaningless where ``left`` is False); ``None`` unless dense output was asked for.
        rule: the restore rule of dense output (``core.restore.RestoreRule``), set from the method when a dense
            state starts running; ``None`` reads as ``departure``.
        left_weights: for the rules that follow the tokens a patch left to, every left patch's weights over the
            current tokens, ``B x n0 x N`` float32 (``core.restore``); ``None`` until a patch leaves or when the
            rule needs none.
        extras: per-forward scratch a method may keep (e.g. GTP's graph, PPT's policy per block), never
            stored on a module.
    """

    x: torch.Tensor
    size: torch.Tensor | None = None
    owner: torch.Tensor | None = None
    num_prefix: int = 1
    grid: tuple[int, ...] = (0, 0)
    left: torch.Tensor | None = None
    left_x: torch.Tensor | None = None
    rule: Any = None
    left_weights: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def replace(self, **changes) -> TokenState:
        return replace(self, **changes)

    def sizes(self) -> torch.Tensor:
        """The sizes, materialised as ones when none are tracked yet."""
        if self.size is not None:
            return self.size
        # float32 so that merged sizes stay exact integers under bfloat16 / float16 features.
        return torch.ones(self.x.shape[0], self.x.shape[1], 1, device=self.x.device)

    def size_bias(self) -> torch.Tensor | None:
        """log(size) per key, ``B x 1 x 1 x N``, to add to attention logits (None when all sizes are 1)."""
        if self.size is None:
            return None
        # One reshape of the B x N x 1 log (two ops fewer than transpose + unsqueeze; the same values).
        return self.size.log().reshape(self.size.shape[0], 1, 1, self.size.shape[1])

    def tracked(self, dense: bool = False) -> TokenState:
        """This (unreduced) state with patch bookkeeping switched on: ``owner`` always, ``left``/``left_x``
        when ``dense`` (what :func:`tokenreduce.core.ops.restore` needs).

        >>> s = TokenState(torch.zeros(1, 3, 2), num_prefix=1).tracked(dense=True)
        >>> s.owner.tolist(), s.left.tolist()
        ([[1, 2]], [[False, False]])
        """
        batch, num_tokens = self.x.shape[:2]
        owner = torch.arange(self.num_prefix, num_tokens, device=self.x.device).expand(batch, -1).clone()
        if not dense:
            return self.replace(owner=owner)
        return self.replace(owner=owner, left=torch.zeros_like(owner, dtype=torch.bool),
                            left_x=torch.zeros_like(self.x[:, self.num_prefix:]))
