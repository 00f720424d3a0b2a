"""Measurement: analytic FLOPs, throughput, accuracy and fidelity, pictures."""

from .flops import BlockCost, FlopsReport, analytic_flops

__all__ = ["BlockCost", "FlopsReport", "analytic_flops"]
