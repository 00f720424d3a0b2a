"""Video: the transformers video ViTs (adapters/hf_video.py: VideoMAE, ViViT) under the engine's promises, the
space-time token grid and GTP's space-time graph (checked by hand on a 2 x 3 x 3 grid), the refusals (TimeSformer,
clips of the wrong frame count), and STViT on Video Swin (shapes, gradients, FLOPs)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
from tokenreduce.core.errors import InputError, InputTypeError
from tokenreduce.methods.gtp import build_graph, spatial_adjacency, spatial_graph

SMALL = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96, image_size=32,
             num_frames=4, num_labels=5)
CONFIGS = {"VideoMAE": dict(patch_size=8, tubelet_size=2), "Vivit": dict(tubelet_size=[2, 8, 8])}
CASES = ["VideoMAEModel", "VideoMAEForVideoClassification", "VivitModel", "VivitForVideoClassification"]
REDUCING = {"tome": dict(r=4), "topk": dict(keep_rate=0.7, layers=(1, 2)), "evit": dict(keep_rate=0.7, layers=(1, 2)),
            "gtp": dict(r=4), "ppt": dict(r=4, layers=(1, 2), threshold=2e-6)}
NO_OP = {"tome": dict(r=0), "topk": dict(keep_rate=1.0, layers=(1, 2)), "evit": dict(keep_rate=1.0, layers=(1, 2)),
         "gtp": dict(r=0), "ppt": dict(r=0, layers=(1, 2))}
METHODS = sorted(REDUCING)
GRID = (2, 4, 4)  # 4 frames / 2-frame tubelets, 32 px / 8 px patches

_BUILT: dict[tuple[str, str], torch.nn.Module] = {}


def make(case: str, impl: str = "eager") -> torch.nn.Module:
    """A small, seeded, eval-mode video model (a deep copy of one built once)."""
    if (case, impl) not in _BUILT:
        family = "VideoMAE" if case.startswith("VideoMAE") else "Vivit"
        config = getattr(transformers, f"{family}Config")(**SMALL, **CONFIGS[family])
        config._attn_implementation = impl
        torch.manual_seed(0)
        model = getattr(transformers, case)(config).eval()
        with torch.no_grad():  # spread the CLS and position embeddings so that tokens differ and reductions matter
            for name, p in model.named_parameters():
                if name.endswith(("cls_token", "position_embeddings")):
                    p.normal_(0, 0.5)
        _BUILT[case, impl] = model
    return copy.deepcopy(_BUILT[case, impl])


def clips(batch: int = 2, frames: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def main(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def counted_gmacs(model, x) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


@pytest.fixture(params=CASES)
def case(request):
    return request.param


# --- the engine's promises on each video family ---------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_nothing_to_remove_equals_unpatched_and_unpatch_restores(case, impl):
    model = make(case, impl)
    x = clips()
    with torch.no_grad():
        expected = model(x, output_hidden_states=True)
        for method in METHODS:
            tr.patch(model, method, **NO_OP[method])
            got = model(x, output_hidden_states=True)
            torch.testing.assert_close(main(got), main(expected), atol=1e-5, rtol=0, msg=method)
            for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            tr.patch(model, method, **REDUCING[method])
            assert not torch.allclose(main(model(x)), main(expected), atol=1e-4), method
        tr.unpatch(model)
        assert type(model) is getattr(transformers, case)
        assert torch.equal(main(model(x)), main(expected))


def test_token_counts_grid_and_prefix_as_described(case):
    model = make(case)
    prefix = 0 if case.startswith("VideoMAE") else 1
    for method in METHODS:
        tr.patch(model, method, **REDUCING[method])
        described = tr.describe(model)
        assert described["grid"] == list(GRID) and described["num_prefix"] == prefix
        states = tr.trace(model, clips())
        assert [s.x.shape[1] for s in states] == described["tokens_out"], method
        assert all(s.grid == GRID for s in states)
        last = states[-1]
        # Per frame: every tubelet of every time step has an owner (-1 once it left) among the image tokens.
        owner = last.owner.view(2, *GRID)
        assert bool(((owner == -1) | (owner >= prefix)).all())
        assert tuple(tr.restore(last).shape) == (2, prefix + 32, 48)
        if method == "tome":  # merges conserve the total size: every tubelet is carried by one token
            assert torch.equal(last.sizes()[:, prefix:].sum(dim=(1, 2)), torch.full((2,), 32.0))


def test_batch_independence(case):
    model = make(case)
    x = clips(batch=4)
    with torch.no_grad():
        for method in METHODS:
            tr.patch(model, method, **REDUCING[method])
            torch.testing.assert_close(main(model(x))[1:2], main(model(x[1:2])), atol=1e-5, rtol=0, msg=method)


@pytest.mark.parametrize("method,options", [
    ("tome", dict(r=[6, 0, 2, 5])), ("topk", dict(keep_rate=0.5, layers=(0, 2))),
    ("evit", dict(keep_rate=0.7, layers=(1, 2, 3))), ("gtp", dict(r=3, sparsity=0.8)),
    ("ppt", dict(r=5, layers=(0, 3), threshold=0.0)),
])
def test_analytic_flops_match_flop_counter(case, method, options):
    model = make(case)
    assert tr.flops(model).gmacs == pytest.approx(counted_gmacs(model, clips(batch=1)), rel=0.01)
    tr.patch(model, method, **options)
    assert tr.flops(model).total_gmacs == pytest.approx(counted_gmacs(model, clips(batch=1)), rel=0.01)


def test_classifier_pools_the_restored_grid_size_weighted():
    """VideoMAE's mean-pooling head on a merged model is the size-weighted mean of the reduced tokens, i.e. the
    mean of the restored grid: ``forward == head(pool(features))``."""
    model = tr.patch(make("VideoMAEForVideoClassification"), "tome", r=4)
    x = clips()
    with torch.no_grad():
        logits = model(x).logits
        state = tr.trace(model, x)[-1]
        weighted = (state.x * state.sizes()).sum(dim=1) / state.sizes().sum(dim=1)
        torch.testing.assert_close(logits, model.classifier(model.fc_norm(weighted)), atol=1e-5, rtol=0)
        torch.testing.assert_close(logits, model.classifier(model.fc_norm(tr.restore(state).mean(dim=1))),
                                   atol=1e-5, rtol=0)


def test_train_mode_gradients_and_labels():
    for case in ("VideoMAEForVideoClassification", "VivitForVideoClassification"):
        model = make(case).train()
        for method in METHODS:
            model.zero_grad(set_to_none=True)
            tr.patch(model, method, **REDUCING[method])
            out = model(clips(), labels=torch.tensor([0, 3]))
            out.loss.backward()
            grads = [p.grad for p in model.parameters()]
            assert out.loss.ndim == 0 and sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 20


def test_patched_model_pickles_deep_copies_and_saves(tmp_path):
    model = tr.patch(make("VideoMAEForVideoClassification"), "gtp", r=4)
    x = clips()
    with torch.no_grad():
        expected = model(x).logits
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert tr.describe(clone)["method"] == "gtp"
            assert torch.equal(clone(x).logits, expected)
        model.save_pretrained(tmp_path)
        loaded = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path).eval()
        assert type(loaded) is transformers.VideoMAEForVideoClassification
        assert torch.equal(tr.patch(loaded, "gtp", r=4)(x).logits, expected)


# --- bad input and refused models -----------------------------------------------------------------------------


def test_a_clip_of_the_wrong_frame_count_is_a_clear_error(case):
    model = tr.patch(make(case), "tome", r=2)
    with pytest.raises(InputError, match=r"takes clips of 4 frames .* got a clip of 6 frames"):
        model(clips(frames=6))
    with pytest.raises(InputTypeError, match=r"B x T x C x H x W .* \(2, 3, 32, 32\)"):
        model(torch.zeros(2, 3, 32, 32))
    with pytest.raises(InputError, match="bool_masked_pos|not supported"):
        model(clips(), bool_masked_pos=torch.zeros(2, 32, dtype=torch.bool))
    with pytest.raises(InputError, match="output_attentions"):
        model(clips(), output_attentions=True)


def test_timesformer_is_refused_with_the_reason():
    config = transformers.TimesformerConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                                            intermediate_size=96, image_size=32, patch_size=8, num_frames=4)
    model = transformers.TimesformerModel(config)
    with pytest.raises(InputTypeError, match="divided space-time attention.*frame alignment"):
        tr.patch(model, "tome", r=2)
    assert type(model) is transformers.TimesformerModel


# --- the space-time graph -------------------------------------------------------------------------------------


def test_space_time_graph_by_hand_on_2x3x3():
    """26-neighbourhood on t=2, h=3, w=3. Worked on paper: a cell's neighbours are the cells of the 2 x a x b box
    around it (both time steps), minus itself, where a, b = 2 at a border row/column and 3 inside. Corner cells:
    2*2*2 - 1 = 7; edge cells: 2*2*3 - 1 = 11; the centre: 2*3*3 - 1 = 17. Per frame 4*7 + 4*11 + 17 = 89 edges
    ends, 178 in all."""
    adjacency = spatial_adjacency((2, 3, 3))
    assert adjacency.shape == (18, 18) and not bool(adjacency.diagonal().any())
    assert torch.equal(adjacency, adjacency.T)
    frame_degrees = [7, 11, 7, 11, 17, 11, 7, 11, 7]
    assert adjacency.sum(dim=1).tolist() == frame_degrees * 2
    assert int(adjacency.sum()) == 178
    # Cell (t=0, 0, 0) = index 0 touches (0,0,1), (0,1,0), (0,1,1) and the same three plus itself at t=1.
    assert adjacency[0].nonzero().flatten().tolist() == [1, 3, 4, 9, 10, 12, 13]
    # The centre of frame 0 (index 4) touches every other cell of both frames.
    assert adjacency[4].nonzero().flatten().tolist() == [i for i in range(18) if i != 4]
    # Normalisation unchanged: G_ij = 1 / sqrt(d_i d_j) on the edges; corner 0 - centre 4: 1 / sqrt(7 * 17).
    graph = spatial_graph((2, 3, 3))
    assert graph[0, 4].item() == pytest.approx(1 / (7 * 17) ** 0.5, rel=1e-6)
    assert graph[0, 2].item() == 0.0  # (0,0,0) and (0,0,2): Chebyshev distance 2
    assert graph[0, 13].item() == pytest.approx(1 / (7 * 17) ** 0.5, rel=1e-6)  # the centre of frame 1
    tokens = torch.randn(2, 18, 8)
    assert torch.equal(build_graph(tokens, (2, 3, 3), "spatial"), graph.expand(2, -1, -1))
    assert bool((build_graph(tokens, (2, 3, 3), "mixed", k=3) >= 0).all())
    with pytest.raises(InputError, match=r"grid \(2, 3, 3\) has 18 cells but there are 17"):
        build_graph(tokens[:, :17], (2, 3, 3))


@pytest.mark.parametrize("grid", [(3, 4), (14, 14), (1, 5), (7, 3)])
def test_2d_spatial_graph_is_bit_identical_to_the_8_neighbourhood(grid):
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    expected = torch.maximum((rows[:, None] - rows[None, :]).abs(), (cols[:, None] - cols[None, :]).abs()) == 1
    assert torch.equal(spatial_adjacency(grid), expected)
    a = expected.float()
    inv = a.sum(dim=-1).clamp(min=1).rsqrt()
    assert torch.equal(spatial_graph(grid), a * inv.unsqueeze(-1) * inv.unsqueeze(-2))


# --- STViT on Video Swin --------------------------------------------------------------------------------------


def small_video_swin(num_classes: int = 7) -> torch.nn.Module:
    """torchvision's Video Swin structure (tubelets 2 x 4 x 4, windows 8 x 7 x 7) at a small width and depth."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(0)
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=24, depths=[1, 1, 6, 1], num_heads=[1, 2, 4, 8],
                             window_size=[8, 7, 7], num_classes=num_classes, stochastic_depth_prob=0.0).eval()


def counted_macs_unfused(model, x) -> float:
    for module in model.modules():  # FlopCounterMode does not see the fused CPU attention kernel
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return counted_gmacs(model, x)


def test_video_swin_and_stvit_flops_at_32_frames_224_px():
    from torchvision.models.video import swin3d_s, swin3d_t

    from tokenreduce.stvit.video_swin import build_video_swin, video_swin_flops

    with torch.device("meta"):
        tiny, small = swin3d_t(), swin3d_s()
        reports = {name: (video_swin_flops(m).gmacs, build_video_swin(m).tokenreduce_flops())
                   for name, m in (("T", tiny), ("S", small))}
    # Video Swin's own figures at 32 x 224: 88 and 166 GFLOPs (i.e. GMACs).
    assert reports["T"][0] == pytest.approx(87.76, abs=0.01) and reports["S"][0] == pytest.approx(165.68, abs=0.01)
    for base, stvit in reports.values():
        assert stvit.baseline_gmacs == pytest.approx(base, rel=1e-12)
    assert reports["T"][1].total_gmacs == pytest.approx(70.74, abs=0.01)  # -19.4% with the image-Swin placement
    assert reports["S"][1].total_gmacs == pytest.approx(127.34, abs=0.01)  # -23.1%


def test_stvit_video_swin_shapes_gradients_and_flops_on_a_small_clip():
    from tokenreduce import stvit
    from tokenreduce.stvit.video_swin import STViTVideoSwin, video_swin_flops

    host = small_video_swin()
    model = stvit.build(host, tokens_per_window=9, full_blocks=2)
    assert isinstance(model, STViTVideoSwin) and len(model.semantic.semantic_blocks) == 2
    x = torch.randn(2, 3, 16, 112, 112)  # 8 time steps; stage 3 on 8 x 7 x 7, one 8 x 7 x 7 window
    with torch.no_grad():
        features = model.forward_features(x)
        assert tuple(features.shape) == (2, 8, 2, 2, 192)  # 8 x 3 x 3 semantic grid, merged to 8 x 2 x 2
        assert tuple(model(x).shape) == (2, 7)
        assert tuple(host(x).shape) == (2, 7)  # the host is not changed
    # Analytic cost within 1% of FlopCounterMode, for the build and the host, on the same clip.
    report = model.tokenreduce_flops(112, frames=16)
    assert report.total_gmacs == pytest.approx(counted_macs_unfused(model, x[:1]), rel=0.01)
    assert video_swin_flops(host, (16, 112, 112)).gmacs == pytest.approx(counted_gmacs(host, x[:1]), rel=0.01)
    assert report.baseline_gmacs == pytest.approx(video_swin_flops(host, (16, 112, 112)).gmacs, rel=1e-9)
    # Trainable: every new part and the kept host layers get gradients.
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 5])).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    # The learned scorer's last conv starts at zero (average pooling before training), so the convs before it
    # get no gradient on the first step; everything else does.
    assert missing == [f"semantic.pool.scorer.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")], missing
    for name in ("semantic.global_centres", "semantic.generation.0.attn.q.weight", "semantic.pool.scorer.3.weight",
                 "semantic.semantic_blocks.1.qkv.weight", "swin.patch_embed.proj.weight", "swin.head.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_stvit_video_swin_refuses_clips_its_windows_cannot_tile():
    from tokenreduce.stvit import build_video_swin

    model = build_video_swin(small_video_swin(), full_blocks=2)
    with pytest.raises(InputError, match=r"stage 3 has 12 time steps, which 8-step windows do not tile"):
        model(torch.randn(1, 3, 24, 112, 112))
    with pytest.raises(InputTypeError, match="B x C x T x H x W"):
        model(torch.randn(1, 3, 112, 112))
    with pytest.raises(InputError, match=r"full_blocks=5 must be an integer in \[0, 4\]"):
        build_video_swin(small_video_swin(), full_blocks=5)


def test_stvit_video_swin_learns_a_fixed_batch():
    from tokenreduce.stvit import build_video_swin

    torch.manual_seed(0)
    model = build_video_swin(small_video_swin(num_classes=3), full_blocks=2, pooling="avg").train()
    x, y = torch.randn(2, 3, 16, 112, 112), torch.tensor([0, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_clip_pictures_colour_a_token_the_same_in_every_frame():
    pytest.importorskip("matplotlib")
    import numpy as np

    from tokenreduce.measure.viz import render_clip_tokens

    # 2 time steps of 2 x 2 tubelets: token 0 carries tubelet (0,0,0) and (1,0,0); tubelet (1,1,1) is pruned.
    owner = torch.tensor([0, 1, 2, 3, 0, 4, 5, -1])
    frames = np.full((2, 8, 8, 3), 0.5)
    pictures, counts = render_clip_tokens(frames, owner, (2, 2, 2))
    assert counts == {"tokens": 6, "kept": 5, "groups": 1, "grouped_patches": 2, "pruned": 1}
    assert np.array_equal(pictures[0][1, 1], pictures[1][1, 1])  # the shared token's colour in both frames
    assert not np.allclose(pictures[0][1, 1], 0.5)
    assert pictures[1][6, 6].sum() < pictures[0][6, 6].sum()  # the pruned tubelet is darkened


def test_bfloat16_autocast_runs_reduced_and_matches_at_r0():
    model = make("VideoMAEForVideoClassification")
    x = clips()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x).logits
        for method in METHODS:
            tr.patch(model, method, **NO_OP[method])
            nothing = model(x).logits
            tr.patch(model, method, **REDUCING[method])
            reduced = model(x).logits
            assert bool(torch.isfinite(reduced).all()), method
            torch.testing.assert_close(nothing.float(), expected.float(), atol=0.05, rtol=0.02)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tr.patch(make("VivitForVideoClassification").train(), "tome", r=4)
    x = clips()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.vivit.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_tokenreduce_train_fine_tunes_stvit_video_swin_on_a_clip_folder(tmp_path):
    import json

    from tokenreduce.cli import main as cli_main
    from tokenreduce.train import clip_folder

    generator = torch.Generator().manual_seed(0)
    for label, name in enumerate(("red", "blue")):
        (tmp_path / "clips" / name).mkdir(parents=True)
        for i in range(4):
            clip = torch.randn(3, 8, 64, 64, generator=generator) * 0.5
            clip[2 * label] += 1.0  # channel 0 bright for class 0, channel 2 for class 1
            torch.save(clip, tmp_path / "clips" / name / f"{i}.pt")
    assert len(clip_folder(str(tmp_path / "clips"))) == 8
    out = tmp_path / "run"
    code = cli_main(["train", "--model", "swin3d_t", "--stvit", "--clips", "--data", str(tmp_path / "clips"),
                     "--val-data", str(tmp_path / "clips"), "--out", str(out), "--epochs", "2", "--batch-size", "4",
                     "--lr", "1e-3", "--warmup-epochs", "0", "--workers", "0", "--no-progress"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["steps"] == 4 and result["train_images"] == 8 and result["val"]["images"] == 8
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    with pytest.raises(InputError, match="video model: train it on clips"):
        _build(["train", "--model", "swin3d_t", "--data", str(tmp_path / "clips"), "--out", str(out)])
    with pytest.raises(InputError, match="--clips trains a video model"):
        _build(["train", "--model", "deit_tiny_patch16_224", "--clips", "--data", str(tmp_path / "clips"),
                "--out", str(out)])


def _build(argv: list[str]):
    from tokenreduce.cli import build_parser
    from tokenreduce.commands.train import build_model

    return build_model(build_parser().parse_args(argv))
