"""Restore rules: which final feature a patch gets when its token left the sequence (dense output).

A merged patch always takes its merged token's feature. A patch whose token *left* (pruned, propagated away,
fused) gets, by rule:

- ``departure``: the feature its token had in the block where it left (no extra work);
- ``nearest``: the final feature of the remaining image token most similar to its token there (cosine of the
  features the state has at that block), followed through later departures;
- ``reconstruct`` (Expedit, Liang et al. 2022): the weighted sum of the final features of its ``k`` most
  similar remaining image tokens there, weights ``softmax(tau * cosine)`` (``weights="cosine"``) or Expedit's
  ``softmax(-tau * ||f_i - s_j||^2)`` on the raw features (``weights="distance"``); followed through later
  departures;
- ``ridge``: the final feature the remaining image tokens predict by linear ridge regression with an intercept,
  fitted on them at that block (their normalised features there -> their final features, strength ``lam``):
  a weighted sum of their final features whose weights sum to 1, solved by ``RIDGE_STEPS`` Chebyshev steps
  (matrix products only, so it compiles and exports); followed through later departures. Its work grows
  with the square of the remaining tokens: a step where more than ``RIDGE_MAX_TOKENS`` (256) image tokens remain
  links as ``reconstruct`` (``k`` and ``tau``);
- ``graph`` (GTP only): the final features of the tokens it was propagated into, with the weights of GTP's
  graph normalised to sum to 1 (its departure feature when it had no kept neighbour).

"Followed through later departures" is exact: every left patch carries a row of weights over the current
tokens (``TokenState.left_weights``, ``B x n0 x N``); when tokens leave, their columns are passed on with the
weights of their own links, when tokens merge, their columns add. :func:`restore` then reads
``left_weights @ x`` for the left patches. The links of one reduction step are a ``B x d x N'`` matrix (``d``
leaving tokens, ``N'`` tokens after the step); nothing here syncs with the host.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import InputError
from .precision import decide

#: Every rule the core knows; a method lists those it supports (``graph`` is GTP's).
RULES = ("departure", "nearest", "reconstruct", "ridge", "graph")
WEIGHTS = ("cosine", "distance")
#: Options of ``tr.patch`` / ``create_method`` that choose the rule (all the others go to the method).
OPTION_NAMES = ("restore", "restore_k", "restore_tau", "restore_weights", "restore_lambda")
DEFAULT_K, DEFAULT_TAU, DEFAULT_LAMBDA = 4, 20.0, 0.1
#: Chebyshev steps of ``ridge``: a fixed count keeps the work free of host syncs and the graph static (an ad hoc
#: check on 50 of the dense benchmark's photos at 65%: 24 steps come within 0.002 IoU of the exact solve for
#: Top-K, EViT, GTP and PPT, 16 lose up to 0.01). Below ``lam`` of about 0.01 they under-solve: the result is
#: then a more strongly regularised regression than asked for.
RIDGE_STEPS = 24
#: ``ridge`` fits its regression when at most this many image tokens remain at a step; with more, the step links
#: as ``reconstruct`` does. The regression's work grows with their square (a Gram and products ``m x m``): on a
#: 16-frame VideoMAE (1,568 tokens, mean-pooled, so every forward restores) it would cost several times
#: ``reconstruct``'s, while up to 256 tokens (a 224 px ViT-S/14, ViT-B/16) it stays near 2% of the model.
RIDGE_MAX_TOKENS = 256


@dataclass(frozen=True)
class RestoreRule:
    """A restore rule and its options (``k``, ``tau`` and ``weights`` are read by ``reconstruct`` only, ``lam``
    by ``ridge`` only).

    >>> RestoreRule("reconstruct", k=2).tracks_weights
    True
    """

    name: str = "departure"
    k: int = DEFAULT_K
    tau: float = DEFAULT_TAU
    weights: str = "cosine"
    lam: float = DEFAULT_LAMBDA

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise InputError(f"unknown restore rule {self.name!r}; valid rules: {', '.join(RULES)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"restore_k must be an integer >= 1, got {self.k!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int | float) or not math.isfinite(self.tau) \
                or self.tau <= 0:
            raise InputError(f"restore_tau must be a positive number, got {self.tau!r}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, int | float) or not math.isfinite(self.lam) \
                or self.lam <= 0:
            raise InputError(f"restore_lambda must be a positive number, got {self.lam!r}")
        if self.weights not in WEIGHTS:
            raise InputError(f"unknown restore_weights {self.weights!r}; valid: {', '.join(WEIGHTS)}")

    @property
    def tracks_weights(self) -> bool:
        """Whether the rule needs ``left_weights`` (every rule but ``departure``)."""
        return self.name != "departure"

    def as_dict(self) -> dict:
        if self.name == "ridge":
            return {"name": self.name, "lam": self.lam}
        if self.name != "reconstruct":
            return {"name": self.name}
        return {key: value for key, value in asdict(self).items() if key != "lam"}


def make_rule(method_name: str, supported: tuple[str, ...], default: str, restore: str | RestoreRule | None = None,
              restore_k: int | None = None, restore_tau: float | None = None,
              restore_weights: str | None = None, restore_lambda: float | None = None) -> RestoreRule:
    """The rule asked for by ``tr.patch``'s restore options, checked against the rules a method supports.

    >>> make_rule("topk", ("departure", "nearest"), "departure", "nearest").name
    'nearest'
    """
    if isinstance(restore, RestoreRule):
        if any(v is not None for v in (restore_k, restore_tau, restore_weights, restore_lambda)):
            raise InputError("give restore_k / restore_tau / restore_weights / restore_lambda inside the RestoreRule, "
                             "not beside it")
        rule = restore
    else:
        if restore is not None and not isinstance(restore, str):
            raise InputError(f"restore must be a rule name or a RestoreRule, got {restore!r}")
        extra = {key: value for key, value in (("k", restore_k), ("tau", restore_tau), ("weights", restore_weights),
                                               ("lam", restore_lambda)) if value is not None}
        rule = RestoreRule(default if restore is None else restore, **extra)
    if rule.name not in supported:
        raise InputError(f"{method_name}: restore rule {rule.name!r} is not available for this method; "
                         f"valid: {', '.join(supported)}")
    return rule


# --- links of one reduction step ------------------------------------------------------------------------------

def similarity_links(x: torch.Tensor, keep_index: torch.Tensor, leave_index: torch.Tensor, num_prefix: int,
                     rule: RestoreRule) -> torch.Tensor:
    """Each leaving token's weights over the tokens that remain, ``B x d x N'`` (float32, rows sum to 1), for
    ``nearest`` (its most similar remaining image token), ``reconstruct`` (its ``k`` most similar, softmax
    weights) and ``ridge`` (:func:`ridge_weights` over every remaining image token). ``x`` holds the tokens
    before the step (``B x N x C``), ``keep_index`` (``B x N'``, prefix first) the remaining ones in their new
    order, ``leave_index`` (``B x d``) the leaving ones. Prefix tokens are never linked to. Decided in float32
    whatever the model's dtype.

    >>> x = torch.tensor([[[0., 0.], [1., 0.], [0., 1.], [1., .1]]])
    >>> similarity_links(x, torch.tensor([[0, 1, 2]]), torch.tensor([[3]]), 1, RestoreRule("nearest")).tolist()
    [[[0.0, 1.0, 0.0]]]
    """
    from .ops import gather_tokens

    leaving = gather_tokens(x, leave_index).float()
    remaining = gather_tokens(x, keep_index[:, num_prefix:]).float()
    with decide(x):
        if rule.name == "ridge" and remaining.shape[1] <= RIDGE_MAX_TOKENS:
            weights = ridge_weights(leaving, remaining, rule.lam)
            return F.pad(weights, (num_prefix, 0))  # never linked to the prefix
        if rule.name == "reconstruct" and rule.weights == "distance":
            logits = -rule.tau * torch.cdist(leaving, remaining).square()
        else:
            logits = F.normalize(leaving, dim=-1) @ F.normalize(remaining, dim=-1).transpose(1, 2)
            if rule.name != "nearest":  # reconstruct, and ridge past RIDGE_MAX_TOKENS
                logits = rule.tau * logits
        k = 1 if rule.name == "nearest" else min(rule.k, remaining.shape[1])
        top = logits.topk(k, dim=-1)
        weights = top.values.softmax(dim=-1) if k > 1 else torch.ones_like(top.values)
        links = torch.zeros(*leaving.shape[:2], keep_index.shape[1], device=x.device)
        return links.scatter(2, top.indices + num_prefix, weights)


def ridge_weights(leaving: torch.Tensor, remaining: torch.Tensor, lam: float, steps: int | None = None
                  ) -> torch.Tensor:
    """Weights ``B x d x n`` (rows sum to 1) that give each leaving token the prediction of a linear ridge
    regression with an intercept, fitted on the ``n`` remaining tokens: on unit-length features centred on the
    remaining tokens' mean, ``W = (A + lam I)^-1 A_lr`` (the dual form: the ``n x n`` Gram ``A`` of the remaining
    tokens, ``A_lr`` their products with the leaving ones), then recentred so the intercept is the remaining
    tokens' mean. Float32 in, float32 out.

    The solve is ``steps`` (default ``RIDGE_STEPS``) Chebyshev iterations on the spectrum bounds
    ``[lam, lam + ||A||_F]`` (the Frobenius norm bounds the largest eigenvalue from above): a fixed polynomial in
    the Gram, so the weights move smoothly with the features. Conjugate gradients, stopped before they converge,
    do not: their step sizes are ratios of inner products, and an image alone or in a batch (float32 rounding)
    came out 0.05-0.09 apart in the restored features of the real saliency backbone.

    >>> remaining = torch.tensor([[[1., 0.], [0., 1.]]])
    >>> ridge_weights(torch.tensor([[[1., 0.]]]), remaining, lam=1.0).round(decimals=6).tolist()
    [[[0.75, 0.25]]]
    """
    a, b = F.normalize(leaving, dim=-1), F.normalize(remaining, dim=-1)
    mean = b.mean(dim=1, keepdim=True)
    a, b = a - mean, b - mean
    gram = b @ b.transpose(1, 2)
    rhs = b @ a.transpose(1, 2)  # B x n x d: one right-hand side per leaving token
    top = gram.square().sum(dim=(1, 2), keepdim=True).sqrt()  # B x 1 x 1, >= the largest eigenvalue
    centre, radius = lam + top / 2, top / 2  # the spectrum of A + lam I lies in centre +- radius
    gram = gram + lam * torch.eye(b.shape[1], device=b.device)
    steps = RIDGE_STEPS if steps is None else steps
    # Chebyshev iteration in its three-term form (Barrett et al., Templates for the Solution of Linear Systems, 1994).
    solution, residual, direction = torch.zeros_like(rhs), rhs, rhs
    step = 1.0 / centre
    for k in range(steps):
        if k:
            beta = (radius * step) ** 2 / (2.0 if k == 1 else 4.0)
            step = 1.0 / (centre - beta / step)
            direction = residual + beta * direction
        solution = solution + step * direction
        residual = residual - step * (gram @ direction)
    weights = solution.transpose(1, 2)
    return weights - weights.mean(dim=-1, keepdim=True) + 1.0 / max(b.shape[1], 1)


def carry_weights(left_weights: torch.Tensor | None, newly_left: torch.Tensor, carrier: torch.Tensor,
                  keep_index: torch.Tensor, leave_index: torch.Tensor, links: torch.Tensor) -> torch.Tensor:
    """The left patches' weights after a step that keeps ``keep_index`` and lets ``leave_index`` go with
    ``links`` (``B x d x N'``): kept columns move to their new place, a leaving column is passed on along its
    links, and every patch leaving now (``newly_left``, ``B x n0``, carried by ``carrier``) starts from its token.

    >>> w = carry_weights(None, torch.tensor([[True, False]]), torch.tensor([[1, 2]]), torch.tensor([[0, 2]]),
    ...                   torch.tensor([[1]]), torch.tensor([[[0., 1.]]]))
    >>> w.tolist()
    [[[0.0, 1.0], [0.0, 0.0]]]
    """
    batch, n0 = carrier.shape
    if left_weights is None:
        left_weights = torch.zeros(batch, n0, leave_index.shape[1] + keep_index.shape[1], device=carrier.device)
    start = left_weights.scatter_add(2, carrier.unsqueeze(-1), newly_left.to(left_weights.dtype).unsqueeze(-1))
    kept = start.gather(2, keep_index.unsqueeze(1).expand(-1, n0, -1))
    leaving = start.gather(2, leave_index.unsqueeze(1).expand(-1, n0, -1))
    with decide(links):
        return kept + leaving @ links.float()


def merge_weights(left_weights: torch.Tensor | None, destination: torch.Tensor, num_tokens: int
                  ) -> torch.Tensor | None:
    """The left patches' weights after a merge (``destination``, ``B x N``: every old token's new position):
    the columns of merged tokens add."""
    if left_weights is None:
        return None
    batch, n0 = left_weights.shape[:2]
    out = torch.zeros(batch, n0, num_tokens, dtype=left_weights.dtype, device=left_weights.device)
    return out.scatter_add(2, destination.unsqueeze(1).expand(-1, n0, -1), left_weights)


def append_weights(left_weights: torch.Tensor | None, count: int = 1) -> torch.Tensor | None:
    """The left patches' weights after ``count`` new tokens are appended (nobody links to them yet)."""
    return None if left_weights is None else F.pad(left_weights, (0, count))


# --- cost -----------------------------------------------------------------------------------------------------

def restore_macs(rule: RestoreRule, leaving: list[int], tokens_in: list[int], num_prefix: int, num_patches: int,
                 dim: int, final_tokens: int) -> int:
    """MACs of a rule's extra work for one image, counted as ``FlopCounterMode`` counts them: per step with
    ``d`` leaving tokens of ``n`` the similarities ``d x (n - d - prefix) x C`` (nearest, reconstruct), the
    passing on of the left weights ``n0 x d x (n - d)``, and once the final ``n0 x N_final x C`` product;
    ``ridge`` adds, with ``m = n - d - prefix`` remaining image tokens (at most ``RIDGE_MAX_TOKENS``; past it the
    step is ``reconstruct``'s), the Gram ``m x m x C`` and ``RIDGE_STEPS`` products ``m x m x d`` (its Frobenius
    norm is not a product).

    >>> restore_macs(RestoreRule("departure"), [2], [5], 1, 4, 8, 3)
    0
    >>> restore_macs(RestoreRule("nearest"), [2], [5], 1, 4, 8, 3) == 2 * 2 * 8 + 4 * 2 * 3 + 4 * 3 * 8
    True
    """
    if not rule.tracks_weights or not any(leaving):
        return 0
    macs = 0
    for d, n in zip(leaving, tokens_in, strict=True):
        if d:
            remaining = n - d - num_prefix
            if rule.name in ("nearest", "reconstruct", "ridge"):
                macs += d * remaining * dim
            if rule.name == "ridge" and remaining <= RIDGE_MAX_TOKENS:
                macs += remaining * remaining * dim + RIDGE_STEPS * remaining * remaining * d
            macs += num_patches * d * (n - d)
    return macs + num_patches * final_tokens * dim
