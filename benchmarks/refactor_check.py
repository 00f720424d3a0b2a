"""A refactor changes no output: the logits and every per-block token state (x, size, owner) of every method at
several schedules, on fixed-seed small models of 6 families, from this checkout against another commit's.

    git worktree add /tmp/base 148600f                       # the commit before the refactor
    python benchmarks/refactor_check.py save /tmp/base /tmp/base.pt
    python benchmarks/refactor_check.py compare . /tmp/base.pt  # -> benchmarks/results/refactor_check.json
    python benchmarks/refactor_check.py compare . /tmp/base.pt benchmarks/results/other.json   # another output

``save`` imports tokenreduce and the tests' model factory from the given checkout (run it with this repo's
venv); ``compare`` runs this checkout and writes the max differences per case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

CASES = ["deit_small_patch16_224", "deit_base_distilled_patch16_224", "vit_small_patch14_dinov2",
         "vit_medium_patch16_reg4_gap_256", "vit_base_patch16_gap_224", "vit_small_patch16_224:qk_norm"]
AVG_POOLED = ("vit_medium_patch16_reg4_gap_256", "vit_base_patch16_gap_224")
SCHEDULES = [("tome", dict(r=4)), ("tome", dict(r=(6, -1))), ("tome", dict(r=20)),
             ("topk", dict(keep_rate=0.7, layers=(1, 3))), ("topk", dict(keep_rate=0.5, layers=(1, 2))),
             ("evit", dict(keep_rate=0.7, layers=(0, 2))), ("evit", dict(r=[0, 5, 5, 5], layers=None)),
             ("gtp", dict(r=4)), ("gtp", dict(r=6, graph="spatial")),
             ("gtp", dict(r=5, selection="cls_attn", sparsity=0.5)), ("ppt", dict(r=8, layers=(1, 2))),
             ("ppt", dict(r=8, layers=(1, 2), threshold=0.0)),
             ("ppt", dict(r=8, layers=(1, 2), threshold=float("inf"))),
             ("ppt", dict(r=10, layers=(1, 3), threshold=1e-3))]


def outputs(root: Path) -> dict:
    sys.path[:0] = [str(root / "src"), str(root / "tests")]
    from conftest import images, make_model

    import tokenreduce as tr

    out = {}
    for case in CASES:
        model = make_model(case)
        x = images(model, batch=4, seed=1)
        for name, options in SCHEDULES:
            tr.patch(model, name, **options)
            with torch.no_grad():
                logits = model(x)
                states = tr.trace(model, x)
            out[f"{case} {name} {options}"] = {"logits": logits, "x": [s.x for s in states],
                                               "size": [s.size for s in states], "owner": [s.owner for s in states]}
        tr.unpatch(model)
    return out


def max_diff(a: list, b: list) -> float:
    return max(((p - q).abs().max().item() if p is not None else 0.0) for p, q in zip(a, b, strict=True))


def main(argv: list[str]) -> int:
    mode, root, path = argv[0], Path(argv[1]).resolve(), Path(argv[2])
    if mode == "save":
        torch.save(outputs(root), path)
        return 0
    reference, current = torch.load(path, weights_only=False), outputs(root)
    rows = []
    for key, ref in reference.items():
        new = current[key]
        rows.append({"case": key, "avg_pooled": key.split()[0] in AVG_POOLED,
                     "logits": (ref["logits"] - new["logits"]).abs().max().item(),
                     "states": max_diff(ref["x"], new["x"]), "sizes": max_diff(ref["size"], new["size"]),
                     "owners_equal": all(torch.equal(p, q) for p, q in zip(ref["owner"], new["owner"], strict=True))})
    unchanged = [r for r in rows if " evit " not in r["case"]]
    token = [r for r in unchanged if not r["avg_pooled"]]
    summary = {"cases": len(rows),
               "all_max_logits": max(r["logits"] for r in rows), "all_max_state": max(r["states"] for r in rows),
               "all_max_size": max(r["sizes"] for r in rows), "all_owners_equal": all(r["owners_equal"] for r in rows),
               "token_pooled_non_evit_max_logits": max(r["logits"] for r in token),
               "non_evit_max_state": max(r["states"] for r in unchanged),
               "non_evit_owners_equal": all(r["owners_equal"] for r in unchanged),
               "avg_pooled_merge_max_logits": max(r["logits"] for r in unchanged if r["avg_pooled"]
                                                  and (" tome " in r["case"] or "'threshold': inf" in r["case"]))}
    out = Path(argv[3]) if len(argv) > 3 else Path(__file__).parent / "results" / "refactor_check.json"
    out.write_text(json.dumps({"reference": str(path), "summary": summary, "rows": rows}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
