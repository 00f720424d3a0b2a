"""Measurement: throughput, accuracy and fidelity, pictures (the analytic FLOPs live in ``core.cost``)."""

from ..core.cost import BlockCost, FlopsReport, analytic_flops

__all__ = ["BlockCost", "FlopsReport", "analytic_flops"]
