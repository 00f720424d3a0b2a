"""One serving table: PyTorch eager, ONNX Runtime and OpenVINO, float32 and int8, unreduced and every training-free
method at about 65% of the unreduced GMACs, on DeiT-S (random weights: speed only) and the benchmark classifier
(real DINOv2 ViT-S/14 + CIFAR-10 head: speed and accuracy), batch 1 and 32, measured side by side.

    python benchmarks/deploy.py                                   # everything -> benchmarks/results/deploy.json
    python benchmarks/deploy.py --images 500 --rounds 5           # smaller: 500 frontier images, 5 rounds
    python benchmarks/deploy.py --models classifier --runtimes onnxruntime,openvino --batch-sizes 32
    python benchmarks/deploy.py --table                           # the markdown table from the JSON (no run)

What runs where:

- **eager**: the patched PyTorch model; int8 = ``torch.ao.quantization.quantize_dynamic`` of its ``nn.Linear``
  layers (int8 weights, activations quantized per call; fbgemm / x86), applied after ``tr.patch``, in the
  ``--int8-recipe`` (default ``smooth``, the library's: SmoothQuant's rewrite, one weight scale per output channel,
  the Linears fed by an activation kept float; ``per-tensor``: every Linear, one scale each).
- **onnxruntime** (CPU execution provider, graph optimisation "all", ``tr.export.onnx_session``): the float32
  graph of ``tr.export_onnx`` (checked against PyTorch on the check batch); int8 = the graph
  ``tr.export_onnx(int8=--ort-int8, int8_recipe=--int8-recipe, calibration=...)`` writes (default dynamic, as
  ``tokenreduce export --int8``), calibrated on ``--calibration`` CIFAR-10 *training* images (never the evaluated
  ones); ``--ort-dynamic`` adds the dynamic graph beside a static one. Under ``--int8-recipe per-tensor`` the int8
  graph is ``tokenreduce.export.quantize_onnx`` of the checked float graph (no second export). Its output cosine
  and top-1 agreement against the float PyTorch model on the check batch are recorded, with a flag where it is
  below ``--min-cosine`` (the value under which ``tr.export_onnx`` would refuse to write it).
- **openvino** (CPU device, ``tr.export_openvino.openvino_model``: float32 inference-precision hint): the IR
  that ``tr.export_openvino(source="onnx")`` makes, ``openvino.convert_model`` of the same checked float32 ONNX
  graph (saved with float32 weights); int8 = the IR of the static QDQ graph in the same recipe, which OpenVINO
  runs in int8.

Schedules: ``tr.schedule_for_flops(model, method, --level x unreduced GMACs)`` per model (as
``benchmarks/frontier.py`` finds them); the share reached is recorded. Exports are cached in ``--cache`` by
model, schedule, the method's source and the calibration / check sizes, so a second run times without
re-exporting.

Speed (measurement.md): per model x runtime x batch size, every setting and precision timed interleaved in one
process on the same random batch: ``--warmup`` calls each, then ``--rounds`` rounds in which each runs once (several
calls per timing at small batches, ``--min-time`` seconds of the first, unreduced float32, variant), the order
rotated every round; the median images/s. Reported: the speed-up against the same runtime's unreduced float32
(for int8: int8 and reduction combined) and against the same runtime's unreduced model of the same precision
(the reduction alone), each the median over rounds of the ratio within a round (paired: a load change of the
shared machine hits both sides of a round alike), and the latter's share of the GMACs ceiling (unreduced GMACs /
the setting's GMACs).

Accuracy (the classifier only): top-1 on the first ``--images`` frontier images (the first 200 CIFAR-10 test
images of each class, sorted names, taken class by class in turn so that every N is balanced; 2,000 = the whole
frontier set) and agreement with the unreduced float32 PyTorch model, for every runtime x precision x setting;
per runtime and method, int8 top-1 minus float32 top-1. Fidelity: per runtime x setting x precision, the largest
|output - the same setting's float32 PyTorch output| on the check batch (``--check-images`` CIFAR-10 training
images after the calibration ones); the cosine for int8.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tokenreduce as tr  # noqa: E402
from tokenreduce.export import (  # noqa: E402
    INPUT_NAME,
    export_onnx,
    onnx_session,
    output_agreement,
    quantize_onnx,
    reads_value_norms,
)
from tokenreduce.measure.checkpoint import load_checkpoint  # noqa: E402
from tokenreduce.measure.data import data_root, portable_path  # noqa: E402
from tokenreduce.measure.speed import environment  # noqa: E402
from tokenreduce.methods.base import _REGISTRY  # noqa: E402
from tokenreduce.smoothquant import after_activation_linears, smooth_quant  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).parent / "results" / "deploy.json"
MODELS = ("deit_s", "classifier")
RUNTIMES = ("eager", "onnxruntime", "openvino")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: Per class in the frontier image set (benchmarks/frontier.py's default): 2,000 images in all.
FRONTIER_PER_CLASS = 200


# --------------------------------------------------------------------------------------------------- models, data

def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``depth=2,img_size=32`` -> {"depth": 2, "img_size": 32}."""
    pairs = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        pairs[key.strip()] = ast.literal_eval(value.strip())
    return pairs


def build_model(name: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, str, bool]:
    """(model in eval mode, description, whether its accuracy means anything)."""
    torch.manual_seed(0)
    if name == "deit_s":
        model = timm.create_model("deit_small_patch16_224", pretrained=False, **kwargs)
        size = f" {kwargs}" if kwargs else ""
        return model.eval(), f"deit_small_patch16_224{size} (random weights: speed only)", False
    if name == "classifier":
        if kwargs:  # tests: the classifier's architecture at a tiny size, random weights
            model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=10, **kwargs)
            return model.eval(), f"vit_small_patch14_dinov2 {kwargs} (random weights, a test size)", True
        model_file = data_root(start=ROOT) / "models" / "dinov2_s14_cifar10.safetensors"
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=10)
        load_checkpoint(model, model_file)
        return model.eval(), f"vit_small_patch14_dinov2 + CIFAR-10 linear head ({portable_path(model_file)})", True
    raise SystemExit(f"unknown model {name!r}; valid: {', '.join(MODELS)}")


def cifar_images(split: str, count: int, img_size: tuple[int, int], skip: int = 0,
                 per_class_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """CIFAR-10 ``split`` images in the classifier's preprocessing (bicubic resize, no crop, ImageNet mean/std):
    the sorted files of every class taken class by class in turn (image 0 of each class, then image 1, ...),
    ``skip`` of them skipped, then ``count``; labels; the folder named portably."""
    folder = data_root(start=ROOT) / "data" / "cifar10" / split
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    per_class = math.ceil((skip + count) / len(classes))
    if per_class_limit is not None and per_class > per_class_limit:
        raise SystemExit(f"at most {per_class_limit * len(classes)} images of this set, asked for {skip + count}")
    lists = [sorted((folder / c).iterdir())[:per_class] for c in classes]
    order = [(label, lists[label][i]) for i in range(per_class) for label in range(len(classes))
             if i < len(lists[label])][skip:skip + count]
    preprocess = transforms.Compose([
        transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    images = torch.stack([preprocess(Image.open(path).convert("RGB")) for _, path in order])
    return images, torch.tensor([label for label, _ in order]), portable_path(folder)


def training_free_methods() -> list[str]:
    return [name for name in tr.methods() if getattr(_REGISTRY[name], "training_free", True)]


def module_source(thing: Any) -> str:
    """A short hash of the source file that defines ``thing`` (a cache key part: edit the file, export again)."""
    import inspect

    return hashlib.sha1(inspect.getsource(sys.modules[thing.__module__]).encode()).hexdigest()[:12]


def method_source(name: str) -> str:
    return module_source(_REGISTRY[name])


def settings_for(model: torch.nn.Module, methods: list[str], level: float) -> tuple[dict, dict]:
    """label -> (method, options) or None for unreduced, at ``level`` x the unreduced GMACs; and what failed."""
    base = tr.flops(model).total_gmacs
    settings: dict[str, tuple[str, dict] | None] = {"unreduced": None}
    failed = {}
    for name in methods:
        try:
            settings[name] = (name, tr.schedule_for_flops(model, name, level * base))
        except (ValueError, TypeError) as err:
            failed[name] = str(err)
    return settings, failed


def int8_eager(model: torch.nn.Module, recipe: str = "per-tensor", calibration: torch.Tensor | None = None
               ) -> torch.nn.Module:
    """``quantize_dynamic`` of the nn.Linear layers (a copy; the float model is kept) in one of
    ``tr.export.INT8_RECIPES``, as close to the ONNX recipe as eager allows: ``per-tensor`` every Linear, one
    weight scale each; ``per-channel`` one scale per output channel; ``smooth`` SmoothQuant's rewrite (ranges from
    ``calibration``) first and the Linears fed by an activation kept float."""
    linear_only, per_channel, float_after_activation, alpha = tr.export.INT8_RECIPES[recipe]
    if recipe == "per-tensor":
        spec: Any = {torch.nn.Linear}
    else:
        kept = after_activation_linears(model, calibration[:2]) if float_after_activation else set()
        if alpha is not None:
            model = smooth_quant(model, calibration, alpha, values=not reads_value_norms(model))
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig if per_channel \
            else torch.ao.quantization.default_dynamic_qconfig
        spec = {name: qconfig for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and name not in kept}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (-> torchao)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)


# ----------------------------------------------------------------------------------------------------- exports

def exports_for(model_name: str, model_kwargs: dict, label: str, variant: torch.nn.Module, setting: Any,
                calibration: torch.Tensor, check: torch.Tensor, args: argparse.Namespace, runtimes: list[str],
                ) -> dict[str, Any]:
    """The ONNX graphs (float32, static int8, dynamic int8 with ``--ort-dynamic``) and OpenVINO IRs (float32, int8)
    of one setting, from the cache or made now; {"paths": {...}, "meta": {...}}."""
    key = hashlib.sha1(json.dumps({
        "model": model_name, "kwargs": model_kwargs, "setting": repr(setting),
        "source": None if setting is None else method_source(setting[0]), "calibration": len(calibration),
        "check": len(check), "opset": tr.export.DEFAULT_OPSET, "torch": torch.__version__,
        "int8_recipe": args.int8_recipe, "smoothquant": module_source(smooth_quant), "ort_int8": args.ort_int8,
    }, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(args.cache) / key
    folder.mkdir(parents=True, exist_ok=True)
    meta_file = folder / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    paths = {"float32": folder / "float32.onnx", "static": folder / "int8-static.onnx",
             "dynamic": folder / "int8-dynamic.onnx"}
    meta["cache_key"] = key
    if not paths["float32"].is_file():
        started = time.perf_counter()
        result = export_onnx(variant, paths["float32"], images=check)
        meta["float32"] = {"export_s": time.perf_counter() - started, "max_abs_diff_at_export": result.max_abs_diff}
    else:
        meta.setdefault("float32", {})["from_cache"] = True
    # ONNX Runtime runs the --ort-int8 graph as "int8" (and the dynamic one as "int8-dynamic" with --ort-dynamic);
    # OpenVINO runs the static QDQ graph in int8.
    modes = {args.ort_int8} | ({"static"} if "openvino" in runtimes else set()) \
        | ({"dynamic"} if args.ort_dynamic else set())
    for mode in sorted(modes):
        if not paths[mode].is_file():
            started = time.perf_counter()
            if args.int8_recipe == "per-tensor":  # from the float graph above: no second export
                quantize_onnx(paths["float32"], paths[mode], mode, calibration if mode == "static" else None)
            else:  # as tr.export_onnx makes it (SmoothQuant rewrites the model before its export); flagged, not refused
                export_onnx(variant, paths[mode], images=check, int8=mode, calibration=calibration,
                            int8_recipe=args.int8_recipe, min_cosine=-1.0)
            meta[f"int8-{mode}"] = {"quantize_s": time.perf_counter() - started, "mode": mode,
                                    "recipe": args.int8_recipe, "calibration_images": len(calibration)}
        else:
            meta.setdefault(f"int8-{mode}", {})["from_cache"] = True
    out = {"onnxruntime": {"float32": paths["float32"], "int8": paths[args.ort_int8]}}
    if args.ort_dynamic and args.ort_int8 != "dynamic":
        out["onnxruntime"]["int8-dynamic"] = paths["dynamic"]
    if "openvino" in runtimes:
        import openvino as ov

        out["openvino"] = {}
        for precision, source in (("float32", paths["float32"]), ("int8", paths["static"])):
            xml = folder / f"openvino-{precision}.xml"
            if not xml.is_file():
                started = time.perf_counter()
                ov.save_model(ov.convert_model(str(source)), str(xml), compress_to_fp16=False)
                meta.setdefault(precision, {})["openvino_convert_s"] = time.perf_counter() - started
            out["openvino"][precision] = xml
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return {"paths": out, "meta": meta}


# ------------------------------------------------------------------------------------------------------ runners

def eager_runner(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()
    return run


def ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    session = onnx_session(path, threads=threads, optimization="all")

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: batch})[0]
    return run


def openvino_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    from tokenreduce.export_openvino import openvino_model

    compiled = openvino_model(path, threads=threads)
    request = compiled.create_infer_request()

    def run(batch: np.ndarray) -> np.ndarray:
        return request.infer({0: batch})[compiled.output(0)]
    return run


def time_group(runners: dict[str, Callable[[np.ndarray], Any]], batch: np.ndarray, rounds: int, warmup: int,
               min_time: float, progress: tqdm | None = None) -> dict[str, dict[str, Any]]:
    """Images/s of every runner on ``batch``, per round: warm-up, then interleaved rounds with the order rotated;
    the median (min, max) and every round's rate, so that ratios can be taken round by round."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name](batch)
    start = time.perf_counter()
    runners[names[0]](batch)
    calls = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-6)))
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            run = runners[name]
            start = time.perf_counter()
            for _ in range(calls):
                run(batch)
            rates[name].append(calls * batch.shape[0] / (time.perf_counter() - start))
        if progress is not None:
            progress.update(1)
    return {name: {"images_per_s": statistics.median(r), "min": min(r), "max": max(r), "calls_per_timing": calls,
                   "rounds": r} for name, r in rates.items()}


def paired_ratio(timing: dict[str, Any], base: dict[str, Any]) -> float:
    """The median over rounds of (this variant's rate / the base's rate in the same round): a load change on a
    shared machine hits both sides of a round's ratio alike, where a ratio of two medians can mix slow and fast
    rounds."""
    return statistics.median(a / b for a, b in zip(timing["rounds"], base["rounds"], strict=True))


def predict(run: Callable[[np.ndarray], np.ndarray], images: torch.Tensor, batch_size: int) -> np.ndarray:
    return np.concatenate([run(images[i:i + batch_size].numpy()) for i in range(0, len(images), batch_size)])


# ---------------------------------------------------------------------------------------------------------- run

def cpu_name() -> dict[str, Any]:
    """The processor as lscpu names it, and whether it has the int8 / bf16 instructions that matter here."""
    info: dict[str, Any] = {"model_name": platform.processor() or platform.machine()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    flags = set(fields.get("Flags", "").split())
    info.update({"model_name": fields.get("Model name", info["model_name"]), "cpus": fields.get("CPU(s)"),
                 "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
                 "int8_dot_product (avx512_vnni / avx_vnni)": bool({"avx512_vnni", "avx_vnni"} & flags),
                 "bf16 (avx512_bf16 / amx_bf16)": bool({"avx512_bf16", "amx_bf16"} & flags)})
    return info


def run_model(model_name: str, args: argparse.Namespace, runtimes: list[str], batch_sizes: list[int],
              result: dict[str, Any]) -> None:
    kwargs = parse_kwargs(args.deit_kwargs if model_name == "deit_s" else args.classifier_kwargs)
    model, description, has_accuracy = build_model(model_name, kwargs)
    img_size = tr.export.default_img_size(model)
    base_gmacs = tr.flops(model).total_gmacs
    methods = args.methods.split(",") if args.methods else training_free_methods()
    settings, failed = settings_for(model, methods, args.level)
    calibration, _, calibration_folder = cifar_images("train", args.calibration, img_size)
    check, _, _ = cifar_images("train", args.check_images, img_size, skip=args.calibration)
    info: dict[str, Any] = {
        "description": description, "img_size": list(img_size), "gmacs": base_gmacs, "settings": {},
        "schedule_failed": failed, "int8_eager_failed": {}, "exports": {},
        "calibration": f"{calibration_folder}: the first {args.calibration} images, class by class in turn",
        "check_batch": f"{calibration_folder}: the {args.check_images} images after the calibration ones",
    }
    result["models"][model_name] = info
    info.update({"command": result["command"], "size": result["size"], "load_average_start": list(os.getloadavg())})
    started = time.time()
    print(f"\n== {model_name}: {description}, {base_gmacs:.2f} GMACs, {img_size[0]}x{img_size[1]}", flush=True)

    runners: dict[tuple[str, str, str], Callable[[np.ndarray], np.ndarray]] = {}
    floats: dict[str, torch.nn.Module] = {}
    for label, setting in tqdm(settings.items(), desc=f"{model_name}: variants and exports", file=sys.stdout):
        variant = model if setting is None else tr.patch(copy.deepcopy(model), setting[0], **setting[1])
        gmacs = tr.flops(variant).total_gmacs
        info["settings"][label] = {"method": None if setting is None else setting[0],
                                   "options": {} if setting is None else setting[1], "gmacs": gmacs,
                                   "gmacs_share": gmacs / base_gmacs, "ceiling": base_gmacs / gmacs}
        floats[label] = variant
        if "eager" in runtimes:
            runners[("eager", "float32", label)] = eager_runner(variant)
            try:
                quantized = int8_eager(variant, args.int8_recipe, calibration)
                eager_runner(quantized)(check[:2].numpy())
                runners[("eager", "int8", label)] = eager_runner(quantized)
            except Exception as err:  # noqa: BLE001  (recorded: why this method cannot run int8 in eager)
                info["int8_eager_failed"][label] = f"{type(err).__name__}: {err}"
                print(f"eager int8 fails for {label}: {err}", flush=True)
        if {"onnxruntime", "openvino"} & set(runtimes):
            made = exports_for(model_name, kwargs, label, variant, setting, calibration, check, args, runtimes)
            info["exports"][label] = made["meta"]
            for runtime in ("onnxruntime", "openvino"):
                if runtime in runtimes:
                    make = ort_runner if runtime == "onnxruntime" else openvino_runner
                    for precision, path in made["paths"][runtime].items():
                        runners[(runtime, precision, label)] = make(path, args.threads)

    if args.export_only:
        return
    # Fidelity on the check batch: against the same setting's float32 PyTorch model.
    expected = {label: eager_runner(m)(check.numpy()) for label, m in floats.items()}
    for (runtime, precision, label), run in runners.items():
        got = run(check.numpy())
        cosine, agreement = output_agreement([expected[label]], [got])
        row = {"model": model_name, "runtime": runtime, "precision": precision, "setting": label,
               "max_abs_diff": float(np.abs(got - expected[label]).max()), "cosine": cosine,
               "top1_agreement": agreement}
        if precision != "float32":
            row["below_min_cosine"] = cosine < args.min_cosine
        result["fidelity"].append(row)

    # Speed: per runtime and batch size, every setting and precision interleaved.
    for runtime in runtimes:
        group = {key: run for key, run in runners.items() if key[0] == runtime}
        if not group:
            continue
        for batch_size in batch_sizes:
            batch = torch.randn(batch_size, 3, *img_size, generator=torch.Generator().manual_seed(0)).numpy()
            named = {f"{p}|{label}": run for (_, p, label), run in group.items()}
            named = {"float32|unreduced": named.pop("float32|unreduced"), **named}  # the calls count comes from it
            with tqdm(total=args.rounds, desc=f"{model_name} {runtime} batch {batch_size}", file=sys.stdout) as bar:
                timings = time_group(named, batch, args.rounds, args.warmup, args.min_time, bar)
            for name, timing in timings.items():
                precision, label = name.split("|", 1)
                ceiling = info["settings"][label]["ceiling"]
                same = timings.get(f"{precision}|unreduced")
                reduction = None if same is None else paired_ratio(timing, same)
                result["speed"].append({
                    "model": model_name, "runtime": runtime, "precision": precision, "setting": label,
                    "batch_size": batch_size, **timing,
                    "speedup_vs_float32_unreduced": paired_ratio(timing, timings["float32|unreduced"]),
                    "speedup_vs_same_precision_unreduced": reduction, "ceiling": ceiling,
                    "share_of_ceiling": None if reduction is None else reduction / ceiling,
                })

    # Accuracy: the classifier only, every runner on the frontier images.
    if has_accuracy and args.images > 0:
        images, labels, folder = cifar_images("test", args.images, img_size, per_class_limit=FRONTIER_PER_CLASS)
        result["accuracy_data"] = (f"{folder}: the first {args.images} of the frontier set (first "
                                   f"{FRONTIER_PER_CLASS} per class, sorted names), taken class by class in turn")
        labels_np = labels.numpy()
        reference = runners.get(("eager", "float32", "unreduced")) or eager_runner(floats["unreduced"])
        eval_batch = args.eval_batch or max(batch_sizes)  # default: a batch size the timings already ran
        base_pred = predict(reference, images, eval_batch).argmax(-1)
        preds = {}
        for runtime, precision, label in tqdm(list(runners), desc=f"{model_name}: accuracy", file=sys.stdout):
            # Each runner is freed once evaluated: ONNX Runtime's arenas and OpenVINO's per-shape buffers of 36
            # variants together outgrew this machine's 23 GB in a run that kept them all.
            run = runners.pop((runtime, precision, label))
            pred = preds[(runtime, precision, label)] = predict(run, images, eval_batch).argmax(-1)
            del run
            result["accuracy"].append({
                "model": model_name, "runtime": runtime, "precision": precision, "setting": label,
                "images": len(images), "top1": 100.0 * float((pred == labels_np).mean()),
                "agreement": 100.0 * float((pred == base_pred).mean())})
        by_key = {(r["runtime"], r["precision"], r["setting"]): r for r in result["accuracy"]
                  if r["model"] == model_name}
        for (runtime, precision, label), row in by_key.items():
            fp = by_key.get((runtime, "float32", label))
            if precision != "float32" and fp is not None:
                delta = row["top1"] - fp["top1"]
                result["int8_delta"].append({"model": model_name, "runtime": runtime, "precision": precision,
                                             "setting": label, "top1_float32": fp["top1"], "top1_int8": row["top1"],
                                             "delta": delta, "within_0.5": abs(delta) <= 0.5,
                                             "agreement_with_float32": 100.0 * float(
                                                 (preds[(runtime, precision, label)]
                                                  == preds[(runtime, "float32", label)]).mean())})
    info["run_s"] = time.time() - started
    info["load_average_end"] = list(os.getloadavg())


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, read from the rows: int8 top-1 within 0.5 points of float32 per method; OpenVINO
    float32 within 1e-4 of PyTorch; OpenVINO at the largest batch at least 0.9 of the GMACs ceiling."""
    out: dict[str, Any] = {}
    deltas = [r for r in result["int8_delta"] if r["precision"] == "int8"]
    if deltas:
        out["int8_top1_within_0.5"] = {f"{r['runtime']} {r['setting']}": round(r["delta"], 2) for r in deltas
                                       if not r["within_0.5"]} or "all"
    ov = [r for r in result["fidelity"] if r["runtime"] == "openvino" and r["precision"] == "float32"]
    if ov:
        out["openvino_float32_within_1e-4"] = {f"{r['model']} {r['setting']}": r["max_abs_diff"] for r in ov
                                               if r["max_abs_diff"] > 1e-4} or "all"
    speed = [r for r in result["speed"] if r["runtime"] == "openvino" and r["setting"] != "unreduced"]
    if speed:
        largest = max(r["batch_size"] for r in speed)
        out[f"openvino_batch{largest}_share_of_ceiling_at_least_0.9"] = {
            f"{r['model']} {r['precision']} {r['setting']}": round(r["share_of_ceiling"], 3)
            for r in speed if r["batch_size"] == largest and r["share_of_ceiling"] < 0.9} or "all"
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    runtimes = args.runtimes.split(",")
    unknown = set(runtimes) - set(RUNTIMES) | set(args.models.split(",")) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown runtime or model {sorted(unknown)}; runtimes: {RUNTIMES}, models: {MODELS}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    import onnxruntime
    import openvino

    started = time.time()
    result: dict[str, Any] = {
        "command": "python benchmarks/deploy.py " + " ".join(args.argv),
        "size": {"images": args.images, "rounds": args.rounds, "warmup": args.warmup, "min_time": args.min_time,
                 "batch_sizes": batch_sizes, "models": args.models.split(","), "runtimes": runtimes,
                 "methods": args.methods or "every training-free method", "level": args.level,
                 "calibration": args.calibration, "check_images": args.check_images, "eval_batch": args.eval_batch,
                 "threads": args.threads, "ort_dynamic": args.ort_dynamic, "int8_recipe": args.int8_recipe,
                 "ort_int8": args.ort_int8},
        "protocol": "per model x runtime x batch size, every setting and precision timed interleaved in one process "
                    "on the same random batch (warm-up, then rounds with the order rotated; median images/s; "
                    "speed-ups = median over rounds of the ratio within a round)",
        "environment": {**environment(), "cpu": cpu_name(), "onnxruntime": onnxruntime.__version__,
                        "openvino": openvino.__version__, "timm": timm.__version__,
                        "onnxruntime_session": "CPUExecutionProvider, graph optimisation all, sequential, "
                                               f"{args.threads} intra-op threads",
                        "openvino_config": f"CPU, INFERENCE_PRECISION_HINT f32, {args.threads} inference threads",
                        "eager_int8": "torch.ao.quantization.quantize_dynamic(nn.Linear, qint8), engine "
                                      f"{torch.backends.quantized.engine}",
                        "load_average_start": list(os.getloadavg())},
        "models": {}, "fidelity": [], "speed": [], "accuracy": [], "int8_delta": [],
    }
    previous = Path(args.out)
    if args.keep_other_models and previous.is_file():
        old = json.loads(previous.read_text())
        for name, info in old["models"].items():
            if name not in args.models.split(","):
                info.setdefault("command", old.get("command"))  # a file written before sizes were per model
                info.setdefault("size", old.get("size"))
                info.setdefault("run_s", old.get("run_s"))
                result["models"][name] = info
                for rows in ("fidelity", "speed", "accuracy", "int8_delta"):
                    result[rows] += [r for r in old[rows] if r["model"] == name]
                print(f"kept {name} from {portable_path(previous)} ({info['command']})", flush=True)
    for model_name in args.models.split(","):
        run_model(model_name, args, runtimes, batch_sizes, result)
        if not args.export_only:  # what is done so far, in case a later model fails
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({**result, "partial": True}, indent=2) + "\n")
    result["environment"]["load_average_end"] = list(os.getloadavg())
    result["run_s"] = time.time() - started
    result["targets"] = targets(result)
    return result


# -------------------------------------------------------------------------------------------------------- table

def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def table(result: dict[str, Any]) -> str:
    """One row per model x runtime x setting; float32 and int8 side by side: speed-up against the runtime's
    unreduced float32 (int8: int8 and reduction combined) per batch size, share of the ceiling at the largest
    batch (against the same precision's unreduced), top-1 and agreement (classifier), max |diff| (float32)."""
    batches = sorted({r["batch_size"] for r in result["speed"]})
    largest = batches[-1] if batches else None
    speed = {(r["model"], r["runtime"], r["precision"], r["setting"], r["batch_size"]): r for r in result["speed"]}
    acc = {(r["model"], r["runtime"], r["precision"], r["setting"]): r for r in result["accuracy"]}
    fid = {(r["model"], r["runtime"], r["precision"], r["setting"]): r for r in result["fidelity"]}
    head = (["model", "runtime", "setting", "GMACs %", "ceiling"]
            + [f"b{b} fp32 / int8" for b in batches]
            + ([f"b{largest} share of ceiling fp32 / int8"] if batches else [])
            + ["top-1 fp32 / int8", "agreement fp32 / int8", "max diff fp32"])
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for model_name, info in result["models"].items():
        runtimes = [rt for rt in RUNTIMES if any(k[0] == model_name and k[1] == rt for k in fid)]
        for runtime in runtimes:
            for label, s in info["settings"].items():
                def pair(table_rows: dict, field: str, spec: str, suffix: str = "", batch: int | None = None,
                         key: tuple = (model_name, runtime, label)) -> str:
                    cells = []
                    for precision in ("float32", "int8"):
                        full = (key[0], key[1], precision, key[2]) + (() if batch is None else (batch,))
                        cells.append(_fmt(table_rows.get(full, {}).get(field), spec, suffix) or "–")
                    return " / ".join(cells)

                cells = [model_name, runtime, label, f"{100 * s['gmacs_share']:.0f}", f"{s['ceiling']:.2f}x"]
                cells += [pair(speed, "speedup_vs_float32_unreduced", ".2f", "x", b) for b in batches]
                if batches:
                    cells.append(pair(speed, "share_of_ceiling", ".2f", batch=largest))
                cells += [pair(acc, "top1", ".1f"), pair(acc, "agreement", ".1f")]
                cells.append(_fmt(fid.get((model_name, runtime, "float32", label), {}).get("max_abs_diff"), ".1e"))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma list of {', '.join(RUNTIMES)}")
    parser.add_argument("--methods", default=None, help="comma list (default: every training-free method)")
    parser.add_argument("--level", type=float, default=0.65, help="target GMACs as a share of unreduced (0.65)")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per group (median)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls of every variant before the rounds")
    parser.add_argument("--min-time", type=float, default=0.3,
                        help="seconds per timing of the unreduced float32 variant (several calls at small batches)")
    parser.add_argument("--images", type=int, default=2000,
                        help="frontier images for accuracy (classifier), at most 2000; 0: no accuracy")
    parser.add_argument("--eval-batch", type=int, default=None,
                        help="batch size of the accuracy pass (default the largest of --batch-sizes)")
    parser.add_argument("--calibration", type=int, default=64, help="CIFAR-10 training images to calibrate int8")
    parser.add_argument("--check-images", type=int, default=8, help="CIFAR-10 training images of the check batch")
    parser.add_argument("--min-cosine", type=float, default=0.99,
                        help="flag an int8 graph whose output cosine on the check batch is below this")
    parser.add_argument("--keep-other-models", action="store_true",
                        help="keep the models of the existing --out that this run does not measure (each model "
                             "records its own command and size)")
    parser.add_argument("--export-only", action="store_true",
                        help="only fill --cache with the exported graphs (e.g. before a timed run)")
    parser.add_argument("--ort-dynamic", action="store_true", help="also ONNX Runtime's dynamic int8 graph")
    parser.add_argument("--ort-int8", choices=tr.export.INT8_MODES, default="dynamic",
                        help="ONNX Runtime's int8 graph: dynamic (default, tr.export_onnx's --int8) or static "
                             "(the QDQ graph OpenVINO runs)")
    parser.add_argument("--int8-recipe", choices=tuple(tr.export.INT8_RECIPES), default=tr.export.DEFAULT_INT8_RECIPE,
                        help="int8 recipe of every runtime (tr.export.INT8_RECIPES; default the library's)")
    parser.add_argument("--threads", type=int, default=2, help="threads of torch, onnxruntime and OpenVINO")
    parser.add_argument("--deit-kwargs", default=None, help="timm.create_model overrides of DeiT-S (tests)")
    parser.add_argument("--classifier-kwargs", default=None,
                        help="a random-weight classifier of this size instead of the real one (tests), "
                             "e.g. depth=2,embed_dim=32,num_heads=2,img_size=28")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "tokenreduce" / "deploy"),
                        help="folder of the exported graphs, reused across runs")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--table", action="store_true", help="print the markdown table from --out and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return 0
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['run_s'] / 60:.1f} min)\n")
    print(table(result))
    print("\ntargets:", json.dumps(result["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
