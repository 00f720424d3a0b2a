"""Load weights into a model from a ``.pth``/``.pt`` or ``.safetensors`` file, with errors that say what is wrong
(in ``core`` so that the adapters, which load their families' models, can use it; ``tokenreduce.measure.checkpoint``
re-exports it).

>>> import timm, tokenreduce.core.checkpoint as ckpt
>>> model = timm.create_model("deit_tiny_patch16_224", depth=2)
>>> ckpt.load_checkpoint(model, "weights.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.errors import InputError

#: Keys under which training scripts commonly nest the model's state dict.
NESTED_KEYS = ("model", "state_dict", "model_state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors stored in ``path`` (``.safetensors``, or a torch file read with ``weights_only=True``).

    A torch file holding a dict with a ``model``/``state_dict`` entry is unwrapped; a ``module.`` prefix
    (DistributedDataParallel) is removed. An unreadable file is a ``ValueError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: every reader raises its own type
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise InputError(f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {first_line}") from err
    for key in NESTED_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"checkpoint {str(path)!r} holds no state dict of tensors (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _listing(keys: list[str], shown: int = 5) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (strictly) and return the model.

    Missing or unexpected keys and shape mismatches are a ``ValueError`` naming the file and the first
    few keys with their counts; the model is left unchanged in that case.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                   for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches (file vs model): {_listing(wrong_shape)}")
    if problems:
        raise InputError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s state dict to ``path`` (``.safetensors`` or a torch file by suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path
