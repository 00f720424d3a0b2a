"""Model-family adapters. An adapter knows how a family embeds, runs and pools tokens, never which method runs."""

from .timm_vit import (
    ModelInfo,
    check_supported,
    dense_features,
    embed,
    forward_tokens,
    grid_for,
    model_info,
    run_blocks,
    unsupported_reason,
)

__all__ = ["ModelInfo", "check_supported", "dense_features", "embed", "forward_tokens", "grid_for", "model_info",
           "run_blocks", "unsupported_reason"]
