"""Analytic cost in MACs (the papers' "FLOPs"), per block, with the reduction's own work kept apart.

Per block with N tokens entering and N' leaving the reduction (D width, mlp hidden width H):
attention 4*N*D^2 + 2*N^2*D, MLP 2*N'*D*H. Plus the patch embedding n0 * (C * p^2) * D and the head.
Only matrix products are counted, as ``torch.utils.flop_counter.FlopCounterMode`` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..adapters.timm_vit import ModelInfo
from ..methods.base import Method, Plan


@dataclass(frozen=True)
class BlockCost:
    index: int
    tokens_in: int
    tokens_out: int
    attn_gmacs: float
    mlp_gmacs: float

    @property
    def gmacs(self) -> float:
        return self.attn_gmacs + self.mlp_gmacs


@dataclass(frozen=True)
class FlopsReport:
    """The cost of one image through a (possibly patched) model.

    ``gmacs`` counts the network itself (embedding, blocks at their reduced token counts, head);
    ``overhead_gmacs`` the reduction's own products (similarities, graph, score rows);
    ``total_gmacs`` both; ``baseline_gmacs`` the same model unreduced.
    """

    method: str | None
    img_size: tuple[int, int]
    gmacs: float
    overhead_gmacs: float
    baseline_gmacs: float
    embed_gmacs: float
    head_gmacs: float
    blocks: list[BlockCost] = field(default_factory=list)
    notes: tuple[str, ...] = ()

    @property
    def total_gmacs(self) -> float:
        return self.gmacs + self.overhead_gmacs

    @property
    def ratio(self) -> float:
        """Unreduced cost over reduced cost: the ceiling of the speed-up."""
        return self.baseline_gmacs / self.total_gmacs

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "img_size": list(self.img_size),
            "gmacs": self.gmacs,
            "overhead_gmacs": self.overhead_gmacs,
            "total_gmacs": self.total_gmacs,
            "baseline_gmacs": self.baseline_gmacs,
            "ratio": self.ratio,
            "embed_gmacs": self.embed_gmacs,
            "head_gmacs": self.head_gmacs,
            "tokens_in": [b.tokens_in for b in self.blocks],
            "tokens_out": [b.tokens_out for b in self.blocks],
            "block_gmacs": [b.gmacs for b in self.blocks],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [f"{'block':>5} {'tokens in':>9} {'tokens out':>10} {'GMACs':>8}"]
        lines += [f"{b.index:>5} {b.tokens_in:>9} {b.tokens_out:>10} {b.gmacs:>8.4f}" for b in self.blocks]
        lines.append(f"method {self.method}: {self.gmacs:.3f} GMACs + {self.overhead_gmacs:.4f} overhead "
                     f"(unreduced {self.baseline_gmacs:.3f}, ratio {self.ratio:.2f}x)")
        return "\n".join(lines)


def block_macs(tokens_in: int, tokens_out: int, dim: int, mlp_hidden: int) -> tuple[int, int]:
    """MACs of one block's attention and MLP."""
    return 4 * tokens_in * dim * dim + 2 * tokens_in * tokens_in * dim, 2 * tokens_out * dim * mlp_hidden


def unreduced_plan(info: ModelInfo) -> Plan:
    n = (info.num_tokens,) * info.depth
    return Plan((0,) * info.depth, n, n)


def plan_macs(info: ModelInfo, plan: Plan) -> tuple[float, list[BlockCost], float, float]:
    """(total MACs, per-block costs, embed MACs, head MACs) of ``plan`` on ``info``."""
    embed = info.num_patches * info.in_chans * info.patch_size[0] * info.patch_size[1] * info.dim
    blocks = []
    for i, (n_in, n_out) in enumerate(zip(plan.tokens_in, plan.tokens_out, strict=True)):
        attn, mlp = block_macs(n_in, n_out, info.dim, info.mlp_hidden)
        blocks.append(BlockCost(i, n_in, n_out, attn / 1e9, mlp / 1e9))
    total = embed + info.head_macs + sum(b.gmacs for b in blocks) * 1e9
    return total, blocks, embed, info.head_macs


def analytic_flops(info: ModelInfo, method: Method | None) -> FlopsReport:
    """The analytic cost report of ``method`` (None: unreduced) on a model described by ``info``."""
    baseline, *_ = plan_macs(info, unreduced_plan(info))
    plan = unreduced_plan(info) if method is None else method.plan(info.num_tokens, info.num_prefix, info.depth)
    total, blocks, embed, head = plan_macs(info, plan)
    overhead = 0.0 if method is None else method.overhead_macs(plan, info.dim, info.heads, info.num_prefix)
    img = (info.grid[0] * info.patch_size[0], info.grid[1] * info.patch_size[1])
    return FlopsReport(
        method=None if method is None else method.name,
        img_size=img,
        gmacs=total / 1e9,
        overhead_gmacs=overhead / 1e9,
        baseline_gmacs=baseline / 1e9,
        embed_gmacs=embed / 1e9,
        head_gmacs=head / 1e9,
        blocks=blocks,
        notes=plan.notes,
    )


def built_model_report(method: str, info: ModelInfo, blocks: list[BlockCost], baseline_depth: int,
                       overhead_macs: float, notes: tuple[str, ...] = ()) -> FlopsReport:
    """The report of a model built on a plain ViT (STViT, STViT-R): the host's embedding and head, the given
    blocks, and as baseline the host unreduced with ``baseline_depth`` full blocks."""
    embed = info.num_patches * info.in_chans * info.patch_size[0] * info.patch_size[1] * info.dim
    full_block = sum(block_macs(info.num_tokens, info.num_tokens, info.dim, info.mlp_hidden))
    baseline = embed + info.head_macs + baseline_depth * full_block
    return FlopsReport(
        method=method,
        img_size=(info.grid[0] * info.patch_size[0], info.grid[1] * info.patch_size[1]),
        gmacs=(embed + info.head_macs) / 1e9 + sum(b.gmacs for b in blocks),
        overhead_gmacs=overhead_macs / 1e9,
        baseline_gmacs=baseline / 1e9,
        embed_gmacs=embed / 1e9,
        head_gmacs=info.head_macs / 1e9,
        blocks=blocks,
        notes=notes,
    )
