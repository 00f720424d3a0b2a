"""benchmarks/precision.py's decision replay: a bf16 pass given a float32 pass's decision inputs reduces exactly the
tokens float32 reduces (the probe that separates decision flips from feature noise, issue 22)."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import benchmark_script

import tokenreduce as tr

# Small random-weight ViTs (96 px, 4 blocks) and the first seed on which bf16 autocast, deciding for itself, gives
# some patches another owner than float32 (random-weight tokens are near-ties).
FLIPPING = {"tome": (0, dict(r=8)), "evit": (2, dict(keep_rate=0.6, layers=(1, 2))),
            "topk": (2, dict(keep_rate=0.6, layers=(1, 2))), "gtp": (1, dict(r=6)),
            "ppt": (0, dict(r=10, layers=(1, 2)))}


@pytest.fixture(scope="module")
def precision():
    return benchmark_script("precision.py")


def owners(precision, name: str, seed: int, options: dict, img: int = 96) -> tuple[torch.Tensor, ...]:
    """Final owners in float32, in bf16 autocast with float32's decisions replayed, and in bf16 deciding alone."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", img_size=img, depth=4, pretrained=False).eval()
    tr.patch(model, name, **options)
    x = torch.randn(4, 3, img, img)
    replay = precision.DecisionReplay(tr.method_of(model))
    try:
        with torch.inference_mode():
            full = tr.trace(model, x)[-1].owner
            with torch.autocast("cpu", dtype=torch.bfloat16):
                replay.mode = "replay"
                replayed = tr.trace(model, x)[-1].owner
                replay.mode = "own"
                alone = tr.trace(model, x)[-1].owner
    finally:
        replay.remove()
    assert "reduce" not in vars(tr.method_of(model))  # removed: the method is its class's again
    return full, replayed, alone


@pytest.mark.parametrize("name", sorted(FLIPPING))
def test_replay_reduces_the_float32_tokens_where_bf16_alone_does_not(precision, name):
    full, replayed, alone = owners(precision, name, *FLIPPING[name])
    assert (alone != full).any()  # bf16 deciding alone flips some patches here ...
    assert torch.equal(replayed, full)  # ... and none with the float32 decisions replayed


def test_report_gives_the_paired_change_and_its_mcnemar_p(precision, tmp_path):
    """The report's classify table: beside top-1, the images bf16 fixed and broke against float32 and the exact
    McNemar p-value of that split (a top-1 change within the flips both ways is noise)."""
    import json

    labels = [0] * 20
    float32 = [0] * 10 + [1] * 10            # 10 right
    bf16 = [1] + [0] * 9 + [0] * 6 + [1] * 4  # 1 broken, 6 fixed: 15 right
    run = {"kind": "classify", "label": "after", "images": 20, "level": 0.65, "cpu": "test", "threads": 1,
           "torch": "x", "labels": labels,
           "rows": [{"method": "tome", "float32": {"top1": 50.0, "predictions": float32},
                     "autocast": {"top1": 75.0, "predictions": bf16}}]}
    (tmp_path / "classify_after.json").write_text(json.dumps(run))
    precision.main(["report", "--dir", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    assert "| tome | bf16 autocast | 50.00 |  | 75.00 | 6 / 1 (0.12) |  | 65.00 |" in table
    change = json.loads((tmp_path / "precision.json").read_text())["summary"]["tome"]["autocast"]["after_change"]
    assert (change["fixed"], change["broken"]) == (6, 1)
    assert change["mcnemar_p"] == pytest.approx(2 * (1 + 7) / 2**7)
