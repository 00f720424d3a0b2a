"""Checkpoint files: :mod:`tokenreduce.core.checkpoint` (kept under this name for existing imports)."""

from ..core.checkpoint import NESTED_KEYS, load_checkpoint, read_state_dict, save_checkpoint

__all__ = ["NESTED_KEYS", "load_checkpoint", "read_state_dict", "save_checkpoint"]
