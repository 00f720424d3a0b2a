"""What every token-reduction method is: options, a per-block schedule, and a ``reduce`` step.

A method knows nothing of model families. The adapter runs each block as

    h, stats = attention(norm1(x), size bias if method.prop_attn, stats in method.needs(i))
    x = x + h
    state = method.reduce(i, state, stats, amount)     # only where the schedule reduces
    x = x + mlp(norm2(x))

and calls ``method.begin(state)`` once before block 0.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..core.errors import InputError
from ..core.restore import OPTION_NAMES as RESTORE_OPTIONS
from ..core.restore import RestoreRule, make_rule
from ..core.state import TokenState

_REGISTRY: dict[str, type[Method]] = {}
#: Plans are cached per input shape (python ints only, never tensors); the cache is cleared beyond this.
MAX_CACHED_PLANS = 32


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` to ``tr.patch``."""
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def option_names(name: str) -> list[str]:
    """The options a registered method takes (its keyword arguments), then the restore options.

    >>> option_names("topk")[4:]
    ['restore', 'restore_k', 'restore_tau', 'restore_weights', 'restore_lambda']
    """
    parameters = inspect.signature(_REGISTRY[name].__init__).parameters
    own = [p.name for p in parameters.values() if p.name != "self" and p.kind in
           (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return own + list(RESTORE_OPTIONS)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``' (did you mean 'x'?)'`` for the closest of ``choices`` to a mistyped ``word``, else ``''``.

    >>> did_you_mean("kep_rate", ["keep_rate", "r"])
    " (did you mean 'keep_rate'?)"
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_options(name: str, options: dict[str, Any]) -> None:
    """An :class:`InputError` naming the first option ``name`` does not take, its valid options and the closest.

    >>> try:
    ...     check_options("topk", {"kep_rate": 0.5})
    ... except InputError as err:
    ...     print(str(err).split(";")[0])
    topk: unknown option 'kep_rate' (did you mean 'keep_rate'?)
    """
    parameters = inspect.signature(_REGISTRY[name].__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return  # a method that takes any keyword checks its options itself
    valid = option_names(name)
    for option in options:
        if option not in valid:
            raise InputError(f"{name}: unknown option {option!r}{did_you_mean(option, valid)}; valid options: "
                             f"{', '.join(valid)}")


def create_method(name: str, **options: Any) -> Method:
    """Build a registered method by name; an unknown name is a ``ValueError`` listing the known ones.

    The restore options (``restore``, ``restore_k``, ``restore_tau``, ``restore_weights``, ``restore_lambda``: how
    a dense output restores the patches whose token left, ``core.restore``) are taken here; the rest go to the
    method.

    >>> create_method("topk", keep_rate=0.5, restore="nearest").restore_rule.name
    'nearest'
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InputError(f"unknown token-reduction method {name!r}; known methods: {', '.join(method_names())}"
                         f"{did_you_mean(name, method_names()) if isinstance(name, str) else ''}")
    check_options(name, options)
    restore_options = {key: options.pop(key) for key in RESTORE_OPTIONS if key in options}
    method = _REGISTRY[name](**options)
    if restore_options:
        method.restore_rule = method.make_restore_rule(**restore_options)
        method.restore_chosen = True
    return method


@dataclass(frozen=True)
class Plan:
    """A schedule resolved for one input: what each block removes and the token counts it produces.

    ``amounts[i]`` is the method's own reduction at block i (r, or tokens dropped); ``tokens_in[i]`` and
    ``tokens_out[i]`` count all tokens (prefix included) entering block i and leaving its reduction
    (the MLP runs on ``tokens_out[i]``).
    """

    amounts: tuple[int, ...]
    tokens_in: tuple[int, ...]
    tokens_out: tuple[int, ...]
    notes: tuple[str, ...] = field(default=())

    def reduces(self, block: int) -> bool:
        return self.amounts[block] > 0


def check_count(name: str, what: str, value: Any) -> int:
    """A non-negative whole number of tokens, or a ``ValueError`` naming the value."""
    if isinstance(value, bool) or not isinstance(value, int | torch.SymInt) or value < 0:
        if isinstance(value, float) and value.is_integer() and value >= 0:
            return int(value)
        raise InputError(f"{name}: {what} must be a non-negative integer, got {value!r}")
    return int(value)


def check_keep_rate(name: str, keep_rate: Any) -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, int | float) or not 0 < keep_rate <= 1:
        raise InputError(f"{name}: keep_rate must be in (0, 1], got {keep_rate!r}")
    return float(keep_rate)


def check_layers(name: str, layers: Sequence[int] | None, depth: int) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, int):
        layers = (layers,)
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth:
            raise InputError(f"{name}: layer {layer!r} is outside the model's blocks 0..{depth - 1}")
        out.append(int(layer))
    return tuple(sorted(set(out)))


def resolve_r(name: str, r: Any, depth: int, layers: tuple[int, ...] | None) -> list[int]:
    """Turn an ``r`` option into one count per block.

    - ``int``: that count at every block of ``layers`` (all blocks when ``layers`` is None);
    - ``list`` of ``depth`` ints: one per block (shorter lists are padded with zeros);
    - ``dict`` {block: r}: the named blocks;
    - ``tuple`` (r, inflection), inflection in [-1, 1]: r decreasing (-1), constant (0) or increasing (+1)
      linearly across the blocks with the same total (ToMe's schedule).

    >>> resolve_r("tome", (8, -1), 4, None)
    [16, 10, 5, 0]
    """
    blocks = layers if layers is not None else tuple(range(depth))
    if isinstance(r, tuple) and len(r) == 2 and not isinstance(r[1], bool) and isinstance(r[1], int | float):
        base, inflection = check_count(name, "r", r[0]), float(r[1])
        if not -1 <= inflection <= 1:
            raise InputError(f"{name}: schedule inflection must be in [-1, 1], got {inflection!r}")
        low = int(base * (1.0 - inflection))
        high = 2 * base - low
        step = (high - low) / max(len(blocks) - 1, 1)
        per = [int(low + step * i) for i in range(len(blocks))]
        out = [0] * depth
        for block, value in zip(blocks, per, strict=True):
            out[block] = value
        return out
    if isinstance(r, dict):
        out = [0] * depth
        for block, value in r.items():
            check_layers(name, [block], depth)
            out[block] = check_count(name, f"r[{block}]", value)
        return out
    if isinstance(r, list | tuple):
        if len(r) > depth:
            raise InputError(f"{name}: r lists {len(r)} blocks but the model has {depth}")
        return [check_count(name, f"r[{i}]", v) for i, v in enumerate(r)] + [0] * (depth - len(r))
    value = check_count(name, "r", r)
    return [value if i in blocks else 0 for i in range(depth)]


def validate_r(name: str, r: Any) -> None:
    """Type and sign checks of an ``r`` option before the model (and so its depth) is known."""
    if isinstance(r, dict):
        depth = max([k + 1 for k in r if isinstance(k, int)] + [1])
    elif isinstance(r, list) or (isinstance(r, tuple) and len(r) != 2):
        depth = max(len(r), 1)
    else:
        depth = 1
    resolve_r(name, r, depth, None)


class Method:
    """Base class of a token-reduction method. Subclasses set ``name`` and override the hooks."""

    name: ClassVar[str] = ""
    #: Whether the method's own definition clamps r (ToMe, PPT) instead of refusing a too-large r.
    clamps: ClassVar[bool] = False
    #: The option ``schedule_for_flops`` searches: "r" (tokens per block) or "keep_rate".
    search_knob: ClassVar[str] = "r"
    #: The restore rules of a dense output this method supports (``core.restore``) and its default, the one the
    #: dense benchmark shows best (``benchmarks/dense.py``).
    restore_rules: ClassVar[tuple[str, ...]] = ("departure", "nearest", "reconstruct", "ridge")
    default_restore: ClassVar[str] = "ridge"

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._plans: dict[tuple[int, int, int], Plan] = {}
        self.restore_rule = RestoreRule(self.default_restore)
        #: Whether the caller chose the rule (``restore=...``) rather than taking the method's default.
        self.restore_chosen = False

    def make_restore_rule(self, **restore_options: Any) -> RestoreRule:
        """The rule asked for by ``restore`` / ``restore_k`` / ``restore_tau`` / ``restore_weights`` /
        ``restore_lambda``, checked
        against :attr:`restore_rules` (a ``ValueError`` naming the valid ones)."""
        return make_rule(self.name, self.restore_rules, self.default_restore, **restore_options)

    def with_restore(self, **restore_options: Any) -> Method:
        """A copy of this method with another restore rule (the schedule and options shared)."""
        other = copy.copy(self)
        other.restore_rule = self.make_restore_rule(**restore_options)
        other.restore_chosen = True
        return other

    def leaving(self, plan: Plan) -> list[int]:
        """Tokens that leave the sequence at each block (their patches depart; merges leave nothing): what a
        restore rule works on. Default: the planned amounts (worst case for a per-image policy)."""
        return list(plan.amounts)

    def diagnostics(self, states: list[TokenState]) -> dict[str, Any]:
        """Diagnostics of one traced forward pass (the states after every block, ``tr.trace``), as plain
        numbers; read by ``tr.diagnostics``. Nothing is written on the method during a forward pass."""
        return {}

    # --- schedule -------------------------------------------------------------------------------
    def amounts(self, depth: int) -> list[int]:
        """The requested reduction per block, before it meets the token counts."""
        raise NotImplementedError

    def step(self, block: int, num_tokens: int, num_prefix: int, amount: int) -> tuple[int, int, str]:
        """Resolve ``amount`` at a block entered by ``num_tokens``: (amount used, tokens after, note).

        Default: remove ``amount`` image tokens and refuse to remove all of them.
        """
        image_tokens = num_tokens - num_prefix
        if amount >= image_tokens:
            raise InputError(
                f"{self.name}: block {block} would remove {amount} of its {image_tokens} image tokens "
                f"({num_tokens} tokens with {num_prefix} prefix); at least one must stay"
            )
        return amount, num_tokens - amount, ""

    def plan(self, num_tokens: int, num_prefix: int, depth: int) -> Plan:
        """The schedule for an input of ``num_tokens`` tokens (cached per shape)."""
        key = (num_tokens, num_prefix, depth)
        cached = self._plans.get(key)  # one lookup: another thread may clear the cache between two
        if cached is not None:
            return cached
        amounts, tokens_in, tokens_out, notes = [], [], [], []
        n = num_tokens
        for block, requested in enumerate(self.amounts(depth)):
            tokens_in.append(n)
            used, n, note = self.step(block, n, num_prefix, requested) if requested else (0, n, "")
            amounts.append(used)
            tokens_out.append(n)
            if note:
                notes.append(note)
        plan = Plan(tuple(amounts), tuple(tokens_in), tuple(tokens_out), tuple(notes))
        if len(self._plans) >= MAX_CACHED_PLANS:  # one entry per input shape: bounded, cheap to rebuild
            self._plans.clear()
        self._plans[key] = plan
        return plan

    # --- forward hooks --------------------------------------------------------------------------
    def needs(self, block: int, plan: Plan) -> frozenset[str]:
        """Attention statistics this method needs at ``block`` (see ``core.attention``)."""
        return frozenset()

    def prop_attn(self, block: int) -> bool:
        """Whether the attention of ``block`` adds log(size) to the key logits."""
        return False

    def attn_transform(self, block: int, plan: Plan) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """An optional change of the post-softmax map (forces the full-map attention)."""
        return None

    def begin(self, state: TokenState, plan: Plan) -> TokenState:
        """Called once before block 0."""
        return state

    def reduce(self, block: int, state: TokenState, stats: dict[str, torch.Tensor], amount: int) -> TokenState:
        """Remove ``amount`` (as planned) tokens after the attention of ``block``."""
        raise NotImplementedError

    # --- cost -----------------------------------------------------------------------------------
    def overhead_macs(self, plan: Plan, dim: int, heads: int, num_prefix: int) -> float:
        """MACs of the reduction's own matrix products (similarities, graphs, score rows)."""
        return 0.0

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "options": dict(self.options)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


def keep_count(keep_rate: float, image_tokens: int) -> int:
    """Image tokens kept at a keep rate (rounded up, as EViT does)."""
    return math.ceil(keep_rate * image_tokens)
