"""``--device``, ``--dtype`` and ``--compile`` of the measuring tools on the CPU; the device-dependent choices
(CUDA timer, GPU peak memory, torchrun backend) as functions, with torch.cuda replaced where no GPU exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
from conftest import benchmark_script
from PIL import Image

from tokenreduce.cli import main
from tokenreduce.commands import _common
from tokenreduce.core.errors import InputError
from tokenreduce.measure import evaluate, speed

TINY = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "depth=2,embed_dim=32,num_heads=2,img_size=32"]
TOME = ["--method", "tome", "--r", "2"]
DTYPES = ("float32", "bfloat16", "float16")
NO_CUDA = not torch.cuda.is_available()
NO_MPS = not torch.backends.mps.is_available()


def run_json(tmp_path: Path, argv: list[str]) -> dict:
    out = tmp_path / "out.json"
    assert main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """2 classes x 2 random images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# --- parsing and validation --------------------------------------------------------------------------------


def test_resolve_device_and_dtype():
    assert _common.resolve_device("cpu") == torch.device("cpu")
    assert [_common.resolve_dtype(d) for d in DTYPES] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(InputError, match="unknown --device 'tpu'"):
        _common.resolve_device("tpu")
    with pytest.raises(InputError, match="unknown --device 'gpu!'"):
        _common.resolve_device("gpu!")
    with pytest.raises(InputError, match="only CUDA devices take an index"):
        _common.resolve_device("cpu:3")
    with pytest.raises(InputError, match="unknown --dtype 'float8'"):
        _common.resolve_dtype("float8")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_unavailable_cuda_is_named(device):
    with pytest.raises(InputError, match=f"--device '{device}': CUDA is not available"):
        _common.resolve_device(device)


@pytest.mark.skipif(not NO_MPS, reason="this machine has MPS")
def test_unavailable_mps_is_named():
    with pytest.raises(InputError, match="--device 'mps': MPS is not available"):
        _common.resolve_device("mps")


def test_cuda_index_beyond_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _common.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InputError, match="'cuda:2': this machine has 2 CUDA device"):
        _common.resolve_device("cuda:2")


@pytest.mark.parametrize("argv", [
    ["bench", *TINY, *TOME],
    ["eval", *TINY, *TOME, "--data", "nowhere"],
    ["flops", *TINY, *TOME, "--count"],
    ["viz", *TINY, *TOME, "--image", "x.png", "--out", "x.png"],
    ["demo"],
])
@pytest.mark.parametrize("flag,value,message", [
    ("--device", "tpu", "unknown --device 'tpu'"),
    ("--device", "cuda" if NO_CUDA else "cuda:99", "--device 'cuda"),
    ("--dtype", "float8", "unknown --dtype 'float8'"),
])
def test_cli_device_errors_exit_2_naming_the_value(argv, flag, value, message, capsys):
    assert main([*argv, flag, value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_cli_unknown_compile_mode(command, capsys):
    extra = ["--data", "nowhere"] if command == "eval" else []
    assert main([command, *TINY, *TOME, *extra, "--compile", "--compile-mode", "fast"]) == 2
    assert "unknown --compile-mode 'fast'" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown compile mode 'fast'"):
        speed.compile_model(torch.nn.Linear(2, 2), "fast")


def test_speed_benchmark_rejects_unknown_device(capsys):
    assert _speed_script().main(["--device", "tpu", "--out", "/nonexistent/speed.json"]) == 2
    assert "unknown --device 'tpu'" in capsys.readouterr().err


def _speed_script():
    return benchmark_script("speed.py")


# --- device-dependent choices ------------------------------------------------------------------------------


def test_timer_choice():
    assert speed.timer_for("cuda") is speed._cuda_seconds
    assert speed.timer_for(torch.device("cuda", 1)) is speed._cuda_seconds
    assert speed.timer_for("cpu") is speed._wall_seconds
    assert speed.timer_for("mps") is speed._wall_seconds


class FakeEvent:
    """``torch.cuda.Event`` on a fake clock: records the clock, ``elapsed_time`` in milliseconds."""

    clock = 0.0
    log: list[str] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at = None

    def record(self) -> None:
        self.at = FakeEvent.clock
        FakeEvent.log.append("record")

    def synchronize(self) -> None:
        FakeEvent.log.append("event sync")

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at - self.at) * 1000.0


def test_cuda_timer_records_events_around_the_call(monkeypatch):
    FakeEvent.log = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: FakeEvent.log.append("sync"))

    def call():
        FakeEvent.log.append("call")
        FakeEvent.clock += 0.25

    assert speed._cuda_seconds(call, torch.device("cuda")) == pytest.approx(0.25)
    assert FakeEvent.log == ["sync", "record", "call", "record", "event sync"]


def test_cuda_peak_memory_is_the_allocator_peak_above_the_start(monkeypatch):
    state = {"allocated": 100 * 2**20, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    state["peak"] = 10**12  # a stale peak from before: must be reset

    def forward():
        state["peak"] = max(state["peak"], state["allocated"] + 48 * 2**20)

    assert speed.peak_memory(forward, "cuda") == pytest.approx(48.0)
    assert speed.memory_measure("cuda") == speed.CUDA_MEMORY_WHAT
    assert speed.peak_memory(forward, "mps") is None and speed.memory_measure("mps") is None


def test_cpu_peak_memory_sees_a_warmed_up_forward():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval()
    images = torch.randn(8, 3, 224, 224)
    with torch.inference_mode():
        model(images)
        model(images)  # the allocator now holds the memory a forward needs: without malloc_trim, 0 MB grow
        measured = [speed.peak_memory(lambda: model(images), "cpu") for _ in range(3)]
    if None in measured:
        pytest.skip("no /proc/self/clear_refs here")
    assert min(measured) > 10  # activations of 8 x 197 tokens x 192 channels, MLP 4x, attention maps


def test_backend_choice_and_process_device():
    assert evaluate.dist_backend("cuda") == "nccl" and evaluate.dist_backend(torch.device("cuda", 3)) == "nccl"
    assert evaluate.dist_backend("cpu") == "gloo" and evaluate.dist_backend("mps") == "gloo"
    assert evaluate.process_device("cuda", {"LOCAL_RANK": "3"}) == torch.device("cuda", 3)
    assert evaluate.process_device("cuda:1", {"LOCAL_RANK": "3"}) == torch.device("cuda", 1)
    assert evaluate.process_device("cpu", {"LOCAL_RANK": "3"}) == torch.device("cpu")


@pytest.fixture
def fake_torchrun(monkeypatch):
    """WORLD_SIZE=2, LOCAL_RANK=1 and a process group that records its backend instead of connecting."""
    calls: dict[str, object] = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: "backend" in calls)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(cuda_device=torch.device(device)))
    return calls


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_eval_under_torchrun_picks_the_backend(fake_torchrun, device, backend):
    context = evaluate.init_distributed(device)
    assert fake_torchrun["backend"] == backend
    assert (context.rank, context.world_size, context.initialized_here) == (1, 2, True)
    if device == "cuda":
        assert context.device == torch.device("cuda", 1) == fake_torchrun["cuda_device"]
    else:
        assert context.device == torch.device("cpu") and "cuda_device" not in fake_torchrun


@pytest.mark.parametrize("cuda,backend", [(False, "gloo"), (True, "nccl")])
def test_train_under_torchrun_picks_the_backend(fake_torchrun, monkeypatch, cuda, backend):
    from tokenreduce import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    rank, world, device, joined = train._distributed()
    assert (rank, world, joined, fake_torchrun["backend"]) == (1, 2, True, backend)
    assert device == (torch.device("cuda", 1) if cuda else torch.device("cpu"))


def test_environment_names_the_device():
    env = speed.environment(torch.bfloat16, "default", "cpu")
    assert (env["device"], env["dtype"], env["compile"]) == ("cpu", "bfloat16", "default")
    assert env["device_name"] == speed.device_name(torch.device("cpu"))


# --- every flag on the CPU ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_bench_device_and_dtype(tmp_path, dtype):
    data = run_json(tmp_path, ["bench", *TINY, *TOME, "--batch-sizes", "2", "--rounds", "1", "--warmup", "0",
                               "--device", "cpu", "--dtype", dtype])
    assert (data["environment"]["device"], data["environment"]["dtype"]) == ("cpu", dtype)
    (row,) = data["rows"]
    assert row["compile"] is None and row["batch_size"] == 2 and row["images_per_s"] > 0
    assert row["first_call_s"] > 0  # the warm-up's first call is made even with --warmup 0, timed apart
    assert {t["dtype"] for t in data["timings"]} == {dtype}


def test_bench_compile_reports_eager_and_compiled(tmp_path, capsys):
    # Batch 4, as in the eval test below: the same graphs, so one of the two tests finds inductor's cache filled.
    data = run_json(tmp_path, ["bench", *TINY, *TOME, "--batch-sizes", "4", "--rounds", "1", "--no-memory",
                               "--compile"])
    assert [row["compile"] for row in data["rows"]] == [None, "default"]
    eager, compiled = data["rows"]
    assert eager["ceiling"] == compiled["ceiling"] and compiled["images_per_s"] > 0
    assert compiled["first_call_s"] > 0 and compiled["first_call_s_unreduced"] > 0
    assert data["environment"]["compile"] == "default"
    printed = capsys.readouterr().out
    assert "   eager " in printed and " default " in printed


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_device_and_dtype(tmp_path, image_folder, dtype):
    data = run_json(tmp_path, ["eval", *TINY, "--model-kwargs", "depth=2,embed_dim=32,num_heads=2,img_size=32,"
                               "num_classes=2", *TOME, "--data", str(image_folder), "--batch-size", "2",
                               "--no-progress", "--device", "cpu", "--dtype", dtype])
    assert (data["device"], data["dtype"], data["images"], data["compiled"]) == ("cpu", dtype, 4, None)
    assert data["seconds"] >= data["first_batch_s"] > 0


def test_eval_compile_matches_the_eager_pass(tmp_path, image_folder, capsys):
    data = run_json(tmp_path, ["eval", *TINY, "--model-kwargs", "depth=2,embed_dim=32,num_heads=2,img_size=32,"
                               "num_classes=2", *TOME, "--data", str(image_folder), "--batch-size", "4",
                               "--no-progress", "--compile"])
    compiled = data["compiled"]
    assert compiled["mode"] == "default" and compiled["images"] == data["images"] == 4
    for key in ("top1", "top1_unreduced", "agreement"):
        assert compiled[key] == data[key]
    assert compiled["kl_unreduced_to_reduced"] == pytest.approx(data["kl_unreduced_to_reduced"], abs=1e-5)
    assert "compiled (default)" in capsys.readouterr().out


def test_flops_count_on_device_and_dtype(tmp_path):
    counted = {}
    for dtype in DTYPES:
        data = run_json(tmp_path, ["flops", *TINY, *TOME, "--count", "--device", "cpu", "--dtype", dtype])
        assert data["counted_on"] == {"device": "cpu", "dtype": dtype}
        counted[dtype] = data["counted_gmacs"]
    # Autocast changes the precision, not the operations: the same count in every dtype.
    assert counted["bfloat16"] == counted["float16"] == counted["float32"] > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_viz_device_and_dtype(tmp_path, dtype):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "viz.png"
    data = run_json(tmp_path, ["viz", *TINY, *TOME, "--image", str(image), "--out", str(out), "--blocks", "0,1",
                               "--device", "cpu", "--dtype", dtype])
    assert out.is_file() and (data["device"], data["dtype"]) == ("cpu", dtype)
    # ToMe r=2 on 4 patches: 2 image tokens after block 0, 1 after block 1, whatever the precision.
    assert [data["counts"][str(b)]["tokens"] for b in (0, 1)] == [2, 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_demo_device_and_dtype(tmp_path, monkeypatch, dtype):
    from tokenreduce.commands import demo

    def tiny(_name):
        torch.manual_seed(0)
        model = timm.create_model("deit_tiny_patch16_224", depth=4, embed_dim=32, num_heads=2, img_size=64).eval()
        return model, "tiny DeiT"

    rng = np.random.default_rng(0)
    monkeypatch.setattr(demo, "_model", tiny)
    monkeypatch.setattr(demo, "load_photos", lambda: {
        name: Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for name in ("chelsea", "cat")})
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--target", "0.8", "--batch-size", "2", "--rounds", "1",
                 "--device", "cpu", "--dtype", dtype]) == 0
    data = json.loads((out / "demo.json").read_text())
    assert (data["environment"]["device"], data["environment"]["dtype"]) == ("cpu", dtype)
    assert len(data["methods"]) >= 2 and all(Path(row["picture"]).is_file() for row in data["methods"])
    assert {row["dtype"] for row in data["speed"]} == {dtype}
    for row in data["methods"]:
        assert -1.0 <= row["cosine_min"] <= row["cosine_mean"] <= 1.0 + 1e-3
