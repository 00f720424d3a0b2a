"""What every adapter shares: the patched subclass of a model's class (and how it pickles), the loop that
carries a token state through a family's blocks with a method's plan, checkpointing and a per-block hook, and
what an adapter's ``load`` returns (:class:`Loaded`: the model and its :class:`Preprocessing`).

An adapter supplies only what is its family's own: how to embed, one block step, the entry points, and how its
models are loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import InputError
from ..core.restore import RestoreRule
from ..core.state import TokenState

BlockHook = Callable[[int, TokenState], None]
#: ``step(block_module, index, state, method, plan) -> state``: one block of a family on a token state.
BlockStep = Callable[[nn.Module, int, TokenState, Any, Any], TokenState]

_PATCHED: dict[tuple[type, type], type] = {}


class Reduced:
    """Base of every adapter's mixin: a patched model pickles (``pickle``, ``torch.save``, ``deepcopy``, spawned
    workers) as "the original class, patched again on load", since the patched class is made at run time and
    pickle cannot find it by name."""

    def __reduce_ex__(self, protocol: int) -> tuple:
        mixin = type(self).__bases__[0]
        return new_patched, (mixin, self._tokenreduce.original_class), self.__dict__


def family_rule(method: Any, fallback: str) -> RestoreRule:
    """The restore rule of a family whose blocks restore inside (Swin windows, PVT blocks): the caller's when they
    chose one, the method's when it is ``departure`` (ToMe), else ``fallback``, the rule measured for that family
    whatever the method's default for a plain ViT's dense output is."""
    if getattr(method, "restore_chosen", False) or method.restore_rule.name == "departure":
        return method.restore_rule
    return RestoreRule(fallback)


def patched_subclass(mixin: type, cls: type) -> type:
    """The subclass ``TokenReduced<cls>`` of ``cls`` with ``mixin`` in front, made once per pair.

    >>> class Mixin(Reduced): pass
    >>> made = patched_subclass(Mixin, nn.Linear)
    >>> made.__name__, made is patched_subclass(Mixin, nn.Linear)
    ('TokenReducedLinear', True)
    """
    key = (mixin, cls)
    made = _PATCHED.get(key)
    if made is None:
        qualname = f"TokenReduced{cls.__name__}"
        # A mixin may keep the original name (transformers' save_pretrained writes it as the architecture).
        name = cls.__name__ if getattr(mixin, "keep_class_name", False) else qualname
        made = _PATCHED[key] = type(name, (mixin, cls), {"__module__": mixin.__module__, "__qualname__": qualname})
    return made


def new_patched(mixin: type, original: type) -> nn.Module:
    """An empty instance of the patched subclass (pickle then restores its ``__dict__``)."""
    cls = patched_subclass(mixin, original)
    return cls.__new__(cls)


def run_blocks(blocks: Sequence[nn.Module], state: TokenState, method: Any, step: BlockStep,
               on_block: BlockHook | None = None, stop: int | None = None,
               grad_checkpointing: bool | Callable[[nn.Module], bool] = False) -> TokenState:
    """Run ``blocks`` (all, or 0..``stop``) on ``state`` with ``method`` (None: unreduced) through the family's
    ``step``: the method's plan for this input, its ``begin``, then every block, recomputed in the backward pass
    when ``grad_checkpointing`` (a flag, or a test of each block) and gradients are on (``torch.utils.checkpoint``,
    non-reentrant). Returns the
    state after the last block, before any final norm; ``on_block(i, state)`` sees the state after block i."""
    plan = None
    if method is not None:
        plan = method.plan(state.num_tokens, state.num_prefix, len(blocks))
        if state.left is not None:  # a dense output: the method's restore rule decides what left patches get
            state = state.replace(rule=method.restore_rule)
        state = method.begin(state, plan)
    grad = torch.is_grad_enabled()
    for i, block in enumerate(blocks if stop is None else list(blocks)[: stop + 1]):
        wanted = grad_checkpointing(block) if callable(grad_checkpointing) else grad_checkpointing
        if wanted and grad:
            state = checkpoint(step, block, i, state, method, plan, use_reentrant=False)
        else:
            state = step(block, i, state, method, plan)
        if on_block is not None:
            on_block(i, state)
    return state


def refuse_masks(entry: str, attn_mask: torch.Tensor | None, is_causal: bool = False) -> None:
    """Attention masks cannot be honoured on tokens that are merged or removed: say so instead of ignoring them."""
    if attn_mask is not None or is_causal:
        from ..core.errors import InputError

        raise InputError(f"{entry}: attn_mask / is_causal are not supported on a token-reduced model (the tokens "
                         "they would mask are merged or removed); tr.unpatch(model) first")


def on_empty_batch(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)``; for an empty batch, ``fn`` of one zero row, emptied: the model libraries' embeddings reshape with
    ``-1`` (timm's ``_pos_embed`` with a dynamic size, open_clip's ``_embeds``), which 0 elements cannot infer.

    >>> on_empty_batch(lambda t: t.reshape(t.shape[0], -1), torch.zeros(0, 2, 3)).shape
    torch.Size([0, 6])
    """
    return fn(x) if x.shape[0] else fn(x.new_zeros(1, *x.shape[1:]))[:0]


@dataclass(frozen=True)
class BlockPlan:
    """A method's schedule on a hierarchical family whose blocks each restore their grid (Swin, PVTv2): per block,
    the amount removed from every sequence the block reduces (a Swin window, a PVTv2 stage grid) and the tokens
    of that sequence before and after. Quacks like ``methods.base.Plan`` for the method's hooks."""

    amounts: tuple[int, ...]
    tokens_in: tuple[int, ...]
    tokens_out: tuple[int, ...]
    notes: tuple[str, ...] = ()

    def reduces(self, block: int) -> bool:
        return self.amounts[block] > 0

    def block(self, i: int) -> BlockPlan:
        """The one-block plan of block ``i`` (what a method's cost hooks read per sequence)."""
        return BlockPlan((self.amounts[i],), (self.tokens_in[i],), (self.tokens_out[i],))


def block_plan(method: Any, family: str, depths: Sequence[int], tokens: Sequence[int],
               check: Callable[[int], None] | None = None, unit: str = "") -> BlockPlan:
    """The plan of ``method`` over blocks numbered across stages of ``depths``, block i reducing sequences of
    ``tokens[i]`` tokens without prefix; ``check(i)`` may refuse a reducing block; ``unit`` names the sequence
    in the notes (e.g. " (per 7x7 window)").

    >>> from tokenreduce.methods.base import create_method
    >>> block_plan(create_method("tome", r=3), "Swin", [1, 1], [16, 4]).tokens_out
    (13, 2)
    """
    try:
        requested = method.amounts(sum(depths))
    except InputError as err:
        raise InputError(f"{err} (this {family} numbers its {sum(depths)} blocks across the stages, "
                         f"{' + '.join(map(str, depths))}: name the reducing blocks with layers= or give r per block)"
                         ) from err
    amounts, tokens_out, notes = [], [], []
    for i, (count, want) in enumerate(zip(tokens, requested, strict=True)):
        used, out = 0, count
        if want:
            if check is not None:
                check(i)
            used, out, note = method.step(i, count, 0, want)
            if note:
                notes.append(note + unit)
        amounts.append(used)
        tokens_out.append(out)
    return BlockPlan(tuple(amounts), tuple(tokens), tuple(tokens_out), tuple(notes))


@dataclass(frozen=True)
class Preprocessing:
    """How a model expects its images, in timm's data-config terms (``timm.data.resolve_data_config``).

    ``input_size`` is (channels, height, width); ``interpolation`` the resize kind ("bicubic", "bilinear",
    "nearest"); ``crop_pct`` and ``crop_mode`` timm's eval crop ("center": resize the short side to
    ``size / crop_pct``, then crop ``size``; "squash": resize to ``size``; "border": fit and pad); ``mean`` and
    ``std`` the normalisation; ``frames`` the clip length of a video model (None for images); ``source`` where
    the settings come from.

    >>> prep = Preprocessing((3, 64, 64), "bilinear", (0.5,) * 3, (0.25,) * 3, crop_pct=1.0, crop_mode="squash")
    >>> prep.data_config(crop_pct=0.9)["crop_pct"], prep.img_size
    (0.9, (64, 64))
    """

    input_size: tuple[int, int, int]
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    frames: int | None = None
    source: str = ""

    @classmethod
    def from_data_config(cls, config: dict[str, Any], source: str = "", frames: int | None = None) -> Preprocessing:
        """From a timm data config (``resolve_data_config``'s dict, or a ``pretrained_cfg``)."""
        return cls(tuple(config["input_size"]), config["interpolation"], tuple(config["mean"]), tuple(config["std"]),
                   config["crop_pct"], config["crop_mode"], frames, source)

    @property
    def img_size(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        return tuple(self.input_size[1:])

    def data_config(self, **overrides: Any) -> dict[str, Any]:
        """timm's data config of these settings with ``overrides`` (``input_size``, ``interpolation``, ``crop_pct``,
        ``crop_mode``, ``mean``, ``std``; None or empty values are ignored) applied, as
        ``timm.data.resolve_data_config(overrides, pretrained_cfg=...)`` resolves it."""
        from timm.data import resolve_data_config

        base = {k: v for k, v in asdict(self).items() if k not in ("frames", "source")}
        return resolve_data_config(overrides, pretrained_cfg=base)

    def transform(self, is_training: bool = False, **overrides: Any) -> Callable[[Any], torch.Tensor]:
        """timm's transform (PIL image -> normalised tensor) of :meth:`data_config` with ``overrides``."""
        from timm.data import create_transform

        return create_transform(**self.data_config(**overrides), is_training=is_training)


def refuse_sizes(spec: str, kwargs: dict[str, Any]) -> None:
    """``img_size`` / ``dynamic_img_size`` (timm's options) are an ``InputError`` for a ``load`` whose models are
    built for one input size; removed from ``kwargs`` when None."""
    for key in ("img_size", "dynamic_img_size"):
        if kwargs.pop(key, None) is not None:
            raise InputError(f"{spec}: other image sizes are not supported for this model ({key}; its position "
                             f"embeddings are built for one size)")


class Loaded(NamedTuple):
    """What ``tokenreduce.load`` and every adapter's ``load`` return: the model (eval mode) and its preprocessing."""

    model: nn.Module
    preprocessing: Preprocessing
