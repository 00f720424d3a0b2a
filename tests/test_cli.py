"""The ``tokenreduce`` command line on tiny models: exit codes, printed results, JSON fields; checkpoints."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from tokenreduce.cli import main
from tokenreduce.commands._common import parse_pairs, parse_value
from tokenreduce.measure.checkpoint import load_checkpoint, save_checkpoint

TINY = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "depth=3,embed_dim=32,num_heads=2,img_size=64"]


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=3, embed_dim=32, num_heads=2,
                             img_size=64).eval()


def run_json(tmp_path, argv: list[str]) -> dict:
    out = tmp_path / "out.json"
    assert main(argv + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_parse_values_and_pairs():
    assert parse_value("13") == 13 and parse_value("0.7") == 0.7 and parse_value("(8, -1)") == (8, -1)
    assert parse_value("spatial") == "spatial"
    assert parse_pairs("depth=2,embed_dim=64", "--x") == {"depth": 2, "embed_dim": 64}
    assert parse_pairs("r=(8,-1),layers=[3,6],graph=spatial", "--x") == {
        "r": (8, -1), "layers": [3, 6], "graph": "spatial"}
    with pytest.raises(ValueError, match="key=value"):
        parse_pairs("depth", "--model-kwargs")


def test_flops_tome_counts_tokens_per_block(tmp_path, capsys):
    # 64x64 / 16 = 16 patches + CLS = 17 tokens; ToMe r=2 per block: 17 -> 15 -> 13 -> 11.
    data = run_json(tmp_path, ["flops", *TINY, "--method", "tome", "--r", "2", "--count"])
    assert data["tokens_in"] == [17, 15, 13]
    assert data["tokens_out"] == [15, 13, 11]
    assert data["unreduced"]["tokens_out"] == [17, 17, 17]
    assert data["gmacs"] < data["baseline_gmacs"] == pytest.approx(data["unreduced"]["gmacs"])
    assert data["options"] == {"r": 2}
    # torch's FlopCounterMode (fused attention off) counts the same matrix products, overhead included.
    assert data["counted_gmacs"] == pytest.approx(data["total_gmacs"], rel=1e-6)
    printed = capsys.readouterr().out
    assert "unreduced" in printed and "ratio" in printed


def test_flops_unreduced_and_generic_options(tmp_path):
    none = run_json(tmp_path, ["flops", *TINY, "--method", "none"])
    assert none["gmacs"] == pytest.approx(none["baseline_gmacs"])
    assert none["method"] is None
    # --opt passes any option through, parsed as a literal; --layers makes a tuple.
    pruned = run_json(tmp_path, ["flops", *TINY, "--method", "topk", "--keep-rate", "0.5", "--layers", "1"])
    assert pruned["tokens_out"] == [17, 9, 9]  # 16 image tokens -> ceil(0.5 * 16) = 8 kept at block 1
    opt = run_json(tmp_path, ["flops", *TINY, "--method", "tome", "--opt", "r=[0, 3]"])
    assert opt["tokens_out"] == [17, 14, 14]


@pytest.mark.parametrize("argv, message", [
    (["flops", *TINY, "--method", "no_such_method"], "unknown method 'no_such_method'"),
    (["flops", "--model", "no_such_model", "--method", "tome"], "unknown timm model 'no_such_model'"),
    (["flops", *TINY, "--method", "tome", "--opt", "r"], "--opt expects key=value"),
    (["flops", *TINY, "--method", "none", "--r", "3"], "given with --method none"),
    (["flops", *TINY, "--method", "tome", "--r", "-1"], "r must be a non-negative integer"),
    (["bench", *TINY, "--method", "tome", "--batch-sizes", "a,b"], "--batch-sizes expects"),
])
def test_errors_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_round_trip(tmp_path, capsys):
    data = run_json(tmp_path, ["bench", *TINY, "--method", "tome", "--r", "2", "--batch-sizes", "1,2",
                               "--rounds", "1", "--warmup", "0"])
    assert [(r["img_size"], r["batch_size"]) for r in data["rows"]] == [(64, 1), (64, 2)]
    for row in data["rows"]:
        assert row["images_per_s"] > 0 and row["unreduced_images_per_s"] > 0
        assert row["speed_ratio"] == pytest.approx(row["images_per_s"] / row["unreduced_images_per_s"])
        assert row["ceiling"] == pytest.approx(row["baseline_gmacs"] / row["gmacs"]) and row["ceiling"] > 1
    assert data["environment"]["threads"] >= 1 and data["rounds"] == 1
    assert "ceiling" in capsys.readouterr().out


def test_bench_other_image_sizes(tmp_path):
    data = run_json(tmp_path, ["bench", *TINY, "--method", "tome", "--r", "2", "--batch-sizes", "1",
                               "--img-sizes", "64,96", "--rounds", "1", "--warmup", "0", "--no-memory"])
    assert [r["img_size"] for r in data["rows"]] == [64, 96]
    # 96 / 16 = 6 x 6 patches: more tokens, more GMACs.
    assert data["rows"][1]["baseline_gmacs"] > data["rows"][0]["baseline_gmacs"]


def test_checkpoint_round_trips(tmp_path):
    model = tiny_model()
    images = torch.randn(2, 3, 64, 64)
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        save_checkpoint(model, path)
        other = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=3, embed_dim=32, num_heads=2,
                                  img_size=64).eval()
        load_checkpoint(other, path)
        assert torch.equal(other(images), model(images))
    # A training script's dict with a "model" entry and DDP "module." prefixes.
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, tmp_path / "t.pth")
    other = load_checkpoint(timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=3, embed_dim=32,
                                              num_heads=2, img_size=64).eval(), tmp_path / "t.pth")
    assert torch.equal(other(images), model(images))


def test_checkpoint_errors_name_file_and_keys(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint .*corrupt.safetensors"):
        load_checkpoint(tiny_model(), corrupt)
    corrupt_pth = tmp_path / "corrupt.pth"
    corrupt_pth.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_checkpoint(tiny_model(), corrupt_pth)

    deeper = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=4, embed_dim=32, num_heads=2,
                               img_size=64)
    path = save_checkpoint(deeper, tmp_path / "deeper.pth")
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"deeper.pth.*12 unexpected keys: blocks\.3\.") as err:
        load_checkpoint(model, path)
    assert "missing" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched

    wider = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=3, embed_dim=48, num_heads=2,
                              img_size=64)
    mismatch = r"43 shape mismatches \(file vs model\): blocks\.0\.attn\.proj\.bias \(48,\) vs \(32,\)"
    with pytest.raises(ValueError, match=mismatch):
        load_checkpoint(model, save_checkpoint(wider, tmp_path / "wider.safetensors"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(model, tmp_path / "absent.pth")


def test_cli_checkpoint_error_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    assert main(["flops", *TINY, "--method", "tome", "--r", "2", "--checkpoint", str(bad)]) == 2
    assert "bad.pth" in capsys.readouterr().err
