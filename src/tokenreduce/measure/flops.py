"""The old import path of the cost table; everything lives in :mod:`tokenreduce.core.cost`."""

from ..core.cost import BlockCost, FlopsReport, ModelInfo, analytic_flops, block_macs, built_model_report, plan_macs

__all__ = ["BlockCost", "FlopsReport", "ModelInfo", "analytic_flops", "block_macs", "built_model_report", "plan_macs"]
