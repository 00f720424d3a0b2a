"""Model-family adapters. An adapter knows how a family embeds, runs and pools tokens, never which method runs."""

from .timm_vit import ModelInfo, check_supported, forward_tokens, model_info, pool_head, unsupported_reason

__all__ = ["ModelInfo", "check_supported", "forward_tokens", "model_info", "pool_head", "unsupported_reason"]
