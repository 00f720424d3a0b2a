"""Token-reduction methods; importing this package registers every built-in method."""

from . import evit, gtp, ppt, tome, topk  # noqa: F401
from .base import Method, Plan, create_method, method_names, register

__all__ = ["Method", "Plan", "create_method", "method_names", "register"]
