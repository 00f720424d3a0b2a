"""The leaderboard: the committed benchmark JSONs of ``benchmarks/results/`` in one sortable table, method x model
at equal GMACs, every cell linked to the JSON it comes from and the commit that JSON names.

    python benchmarks/leaderboard.py            # writes docs/leaderboard.md, docs/_generated/*.md and README's table
    python benchmarks/leaderboard.py --check    # exit 1 (and name the files) if any of them is not up to date

Nothing is measured here: every number is read from a JSON a benchmark script wrote (``frontier.py``,
``speed.py``, ``onnx_speed.py``, ``dense.py``, ``hierarchical.py``, ``video.py``, ``flops_table.py``,
``stvit_finetune.py``). The commit of a cell is the one stamped in its JSON (a row's ``commit`` or ``source``,
else the file's ``commit``); a JSON that stamps none gets the last commit that changed it (``git log``), and
"uncommitted" while it has changes git has not recorded.

Outputs:

- ``docs/leaderboard.md``: the page (table, how to read it, the plots);
- ``docs/_generated/<method>.md``: each method's rows and its analytic cost against the published one, included
  in the method's page;
- ``docs/_generated/headline.md`` and the block between the ``headline`` markers of ``README.md``: the headline
  table (links relative to the site root and to the repository root respectively).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "leaderboard.md"
GENERATED = ROOT / "docs" / "_generated"
README = ROOT / "README.md"
HEADLINE_START = "<!-- headline:start (benchmarks/leaderboard.py writes this table) -->"
HEADLINE_END = "<!-- headline:end -->"

METHODS = ("unreduced", "gtp", "ppt", "stvit", "stvit-r", "tome", "topk", "evit")
NAMES = {"unreduced": "unreduced", "gtp": "GTP", "ppt": "PPT", "stvit": "STViT", "stvit-r": "STViT-R",
         "tome": "ToMe", "topk": "Top-K", "evit": "EViT"}
#: Each method page includes the rows of these methods (STViT's page shows STViT-R too).
PAGE_METHODS = {"gtp": ("gtp",), "ppt": ("ppt",), "stvit": ("stvit", "stvit-r"), "tome": ("tome",),
                "topk": ("topk",), "evit": ("evit",)}
PLOTS = (
    ("frontier/frontier.png", "Accuracy against GMACs, DINOv2-S/14 + CIFAR-10 head"),
    ("speed_batch.png", "DeiT-S speed-up as a share of the GMACs ceiling, per batch size"),
    ("dense/dense.png", "Dense output (saliency) against GMACs"),
    ("hierarchical/swin.png", "Swin test bed: accuracy against GMACs"),
    ("hierarchical/pvt.png", "PVTv2-b0 test bed: accuracy against GMACs"),
)


# --- where a number comes from ------------------------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


_COMMITS: dict[str, str] = {}


def file_commit(rel: str) -> str:
    """The last commit that changed ``rel`` (7 hex digits), "uncommitted" if it has unrecorded changes."""
    if rel not in _COMMITS:
        if _git("status", "--porcelain", "--", rel):
            _COMMITS[rel] = "uncommitted"
        else:
            full = _git("log", "-1", "--format=%H", "--", rel)
            _COMMITS[rel] = full[:7] if full else "unknown"
    return _COMMITS[rel]


def stamped(*objects: dict | None) -> str | None:
    for obj in objects:
        for key in ("commit", "source"):
            value = (obj or {}).get(key)
            if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{7,40}", value):
                return value[:7]
    return None


@dataclass(frozen=True)
class Source:
    rel: str        # path from the repository root, e.g. benchmarks/results/speed.json
    commit: str

    @property
    def name(self) -> str:
        return self.rel.removeprefix("benchmarks/results/")


def source(rel_to_results: str, *objects: dict | None) -> Source:
    rel = f"benchmarks/results/{rel_to_results}"
    return Source(rel, stamped(*objects) or file_commit(rel))


@dataclass(frozen=True)
class Cell:
    text: str
    src: Source

    def render(self, prefix: str) -> str:
        return f'[{self.text}]({prefix}{self.src.rel} "{self.src.name} @ {self.src.commit}")'


def load(rel_to_results: str) -> dict:
    return json.loads((RESULTS / rel_to_results).read_text())


# --- formatting ---------------------------------------------------------------------------------------------------

def fmt_options(options: dict) -> str:
    parts = []
    for key, value in options.items():
        if key == "layers":
            layers = list(value)
            consecutive = len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1))
            parts.insert(0, f"@{layers[0]}-{layers[-1]}" if consecutive else "@" + ",".join(map(str, layers)))
        elif isinstance(value, float):
            parts.append(f"{key}={value:.3f}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def spread_pct(low: float, high: float) -> float:
    """Half the min-max range of the rounds, relative to its middle (percent)."""
    return 100 * (high - low) / (high + low)


def speed_text(ratio: float, low: float, high: float) -> str:
    spread = spread_pct(low, high)
    return f"{ratio:.2f}x ±{spread:.0f}%" if spread >= 1 else f"{ratio:.2f}x ±{spread:.1f}%"


def pct(share: float) -> str:
    return f"{100 * share:.0f}%"


# --- the rows -----------------------------------------------------------------------------------------------------

KEYS = ("gmacs", "top1", "agreement", "speed1", "speed32", "iou", "cosine", "onnx1", "onnx32")
#: The table's columns in order: the row's own fields, then the measured values (keys of ``Row.cells``).
COLUMNS = ("model", "method", "target", "gmacs", "options", "top1", "agreement", "speed1", "speed32", "iou", "cosine",
           "onnx1", "onnx32")
HEADERS = {"model": "model", "method": "method", "target": "target", "gmacs": "GMACs", "options": "options",
           "top1": "top-1", "agreement": "agreement", "speed1": "speed-up, batch 1", "speed32": "speed-up, batch 32",
           "iou": "dense IoU@0.5", "cosine": "dense cosine", "onnx1": "ONNX Runtime, batch 1",
           "onnx32": "ONNX Runtime, batch 32"}
TEXT_COLUMNS = ("model", "method", "options")


@dataclass
class Row:
    model: str
    method: str                      # a key of NAMES
    target: float                    # share of the unreduced GMACs aimed at (1.0 unreduced)
    options: str = ""
    mark: str = ""                   # a footnote mark after the method's name
    cells: dict[str, Cell] = field(default_factory=dict)
    setting: bool = False            # a fixed setting whose GMACs differ per method (DeiT-S speed), not a target

    def sort_key(self, model_order: list[str]) -> tuple:
        level = 0.0 if self.setting else -self.target
        return model_order.index(self.model), level, METHODS.index(self.method), self.options


def frontier_rows() -> list[Row]:
    data = load("frontier/frontier.json")
    model = "DINOv2-S/14 + CIFAR-10 head"
    base = data["unreduced"]
    src = source("frontier/frontier.json", data)
    rows = [Row(model, "unreduced", 1.0, cells={
        "gmacs": Cell(f"100% ({base['gmacs']:.2f})", src), "top1": Cell(f"{base['top1']:.2f}", src),
        "agreement": Cell(f"{base['agreement']:.2f}", src)})]
    for point in data["points"]:
        src = source("frontier/frontier.json", point, data)
        low, high = point["speed_spread"]
        rows.append(Row(model, point["method"], point["level"], fmt_options(point["options"]),
                        mark="*" if point.get("kept_from_previous_run") else "", cells={
            "gmacs": Cell(f"{pct(point['gmacs'] / base['gmacs'])} ({point['gmacs']:.2f})", src),
            "top1": Cell(f"{point['top1']:.2f}", src),
            "agreement": Cell(f"{point['agreement']:.2f}", src),
            "speed32": Cell(speed_text(point["speed_ratio"], low, high), src)}))
    stvit = load("stvit/stvit_cifar10.json")
    src = source("stvit/stvit_cifar10.json", stvit)
    run = stvit["stvit"]
    options = {k: v for k, v in run["options"].items() if k in ("num_semantic", "full_blocks")}
    rows.append(Row(model, "stvit", 0.4, fmt_options(options) + ", fine-tuned", cells={
        "gmacs": Cell(f"{pct(run['gmacs'] / stvit['unreduced']['gmacs'])} ({run['gmacs']:.2f})", src),
        "top1": Cell(f"{run['top1']:.2f}", src),
        "agreement": Cell(f"{run['agreement_with_unreduced']:.2f}", src)}))
    return rows


def dense_rows() -> list[Row]:
    data = load("dense/dense.json")
    model = "DINOv2-S/14 + saliency decoder"
    rows = []
    for row in data["rows"]:
        if not row["default_rule"] or row["name"] == "stvit-r untrained":
            continue
        src = source("dense/dense.json", row, data)
        options = fmt_options(row["options"])
        if row["method"] == "stvit-r":
            options = fmt_options({k: row["options"][k] for k in ("num_semantic", "unit_depth")}) + ", distilled"
        elif row["restore"]:
            options = f"{options}, restore={row['restore']}"
        target = 1.0 if row["method"] == "unreduced" else int(row["level"].rstrip("%")) / 100
        rows.append(Row(model, row["method"], target, options, cells={
            "gmacs": Cell(f"{pct(row['gmacs_ratio'])} ({row['gmacs']:.2f})", src),
            "iou": Cell(f"{row['map_iou_0.5']:.3f}", src),
            "cosine": Cell(f"{row['cosine_mean']:.3f}", src)}))
    return rows


def deit_rows() -> list[Row]:
    """DeiT-S at the settings of the speed tables (their GMACs differ: the target is each setting's own)."""
    speed = load("speed.json")
    onnx = load("onnx_speed.json")
    model = "DeiT-S (speed settings)"
    rows: dict[str, Row] = {}
    s_src = source("speed.json", speed)
    o_src = source("onnx_speed.json", onnx)
    for r in speed["rows"]:
        if r["compile"] is not None or r["batch_size"] not in (1, 32):
            continue
        method = r["method"] or "unreduced"
        row = rows.setdefault(r["label"], Row(model, method, 1 / r["gmacs_ratio"], fmt_options(r["options"]),
                                              setting=method != "unreduced"))
        row.cells["gmacs"] = Cell(f"{pct(1 / r['gmacs_ratio'])} ({r['gmacs']:.2f})", s_src)
        row.cells[f"speed{r['batch_size']}"] = Cell(speed_text(r["speedup"], *r["spread"]), s_src)
    for r in onnx["rows"]:
        if r["label"] in rows and r["batch_size"] in (1, 32):
            rows[r["label"]].cells[f"onnx{r['batch_size']}"] = Cell(speed_text(r["speedup"], r["min"], r["max"]), o_src)
    return list(rows.values())


def hierarchical_rows(name: str, model: str, real_model: str) -> list[Row]:
    data = load(f"hierarchical/{name}.json")
    src = source(f"hierarchical/{name}.json", data)
    base = data["unreduced"]
    unreduced = Row(model, "unreduced", 1.0, cells={"gmacs": Cell(f"100% ({base['gmacs']:.4f})", src),
                                                   "top1": Cell(f"{base['top1']:.2f}", src),
                                                   "agreement": Cell("100.00", src)})
    rows = {("unreduced", 1.0): unreduced}
    for r in data["rows"]:
        if r["label"] != r["method"]:  # the forced-branch and other-rule variants: on the model families page
            continue
        rows[(r["method"], r["level"])] = Row(model, r["method"], r["level"], fmt_options(r["options"]), cells={
            "gmacs": Cell(f"{pct(r['gmacs_ratio'])} ({r['gmacs']:.4f})", src),
            "top1": Cell(f"{r['top1']:.2f}", src), "agreement": Cell(f"{r['agreement']:.2f}", src)})
    level = data["speed_level"]
    for r in data["speed"]:
        key = ("unreduced", 1.0) if r["method"] is None else (r["method"], level)
        if key in rows and r["batch_size"] in (1, 32):
            rows[key].cells[f"speed{r['batch_size']}"] = Cell(speed_text(r["speedup"], *r["spread"]), src)
    real: dict[str, Row] = {}
    for r in data["speed_real"]["rows"]:
        method = r["method"] or "unreduced"
        target = 1.0 if method == "unreduced" else level
        row = real.setdefault(method, Row(real_model, method, target, fmt_options(r["options"])))
        row.cells["gmacs"] = Cell(f"{pct(1 / r['gmacs_ratio'])} ({r['gmacs']:.2f})", src)
        if r["batch_size"] in (1, 32):
            row.cells[f"speed{r['batch_size']}"] = Cell(speed_text(r["speedup"], *r["spread"]), src)
    return list(rows.values()) + list(real.values())


def video_rows() -> list[Row]:
    data = load("video.json")
    src = source("video.json", data)
    model = "VideoMAE-S (16 frames)"
    base = data["settings"][0]["video_baseline_gmacs"]
    rows = {"unreduced": Row(model, "unreduced", 1.0, cells={"gmacs": Cell(f"100% ({base:.2f})", src)})}
    for s in data["settings"]:
        rows[s["label"]] = Row(model, s["method"], int(s["label"].split()[-1].rstrip("%")) / 100,
                               fmt_options(s["options"]), cells={
            "gmacs": Cell(f"{pct(s['video_gmacs_share'])} ({s['video_gmacs']:.2f})", src)})
    for r in data["speed"]["rows"]:
        if r["kind"] == "video" and r["label"] in rows:
            column = "speed1" if r["batch_size"] == 1 else "speed32"
            rows[r["label"]].cells[column] = Cell(speed_text(r["speed_ratio"], *r["spread_s"]), src)
            rows["unreduced"].cells[column] = Cell("1.00x", src)
    return list(rows.values())


def all_rows() -> list[Row]:
    rows = (frontier_rows() + dense_rows() + deit_rows()
            + hierarchical_rows("swin", "Swin test bed (CIFAR-10, 64 px)", "Swin-T at 224 (random weights)")
            + hierarchical_rows("pvt", "PVTv2-b0 test bed (CIFAR-10, 64 px)", "PVTv2-b0 at 224 (random weights)")
            + video_rows())
    order = list(dict.fromkeys(r.model for r in rows))
    return sorted(rows, key=lambda r: r.sort_key(order))


# --- the tables ---------------------------------------------------------------------------------------------------

def table(rows: list[Row], prefix: str, with_model: bool = True, with_method: bool = True) -> str:
    columns = [c for c in COLUMNS if (c in KEYS and any(c in r.cells for r in rows))
               or c in ("target", "options") or (c == "model" and with_model) or (c == "method" and with_method)]
    lines = ["| " + " | ".join(HEADERS[c] for c in columns) + " |",
             "|" + "|".join("---" if c in TEXT_COLUMNS else "---:" for c in columns) + "|"]
    for r in rows:
        cells = []
        for c in columns:
            if c == "model":
                cells.append(r.model)
            elif c == "method":
                cells.append(NAMES[r.method] + (f" {r.mark}" if r.mark else ""))
            elif c == "target":
                cells.append("setting" if r.setting else pct(r.target))
            elif c == "options":
                cells.append(r.options)
            else:
                cells.append(r.cells[c].render(prefix) if c in r.cells else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sources_list(rows: list[Row], prefix: str) -> str:
    seen = sorted({cell.src for r in rows for cell in r.cells.values()}, key=lambda s: (s.rel, s.commit))
    return "; ".join(f"[{s.name}]({prefix}{s.rel}) @ `{s.commit}`" for s in seen)


def sortable(markdown_table: str) -> str:
    return f'<div class="sortable" markdown>\n\n{markdown_table}\n\n</div>'


GUIDE = """\
How to read it:

- **target**: the share of the unreduced model's GMACs each method was scheduled to
  (`tr.schedule_for_flops`); **GMACs** is what it reached (% of unreduced, and the GMACs). DeiT-S rows are the
  fixed settings of the speed tables (ToMe r=13, Top-K / EViT keep 0.7, GTP P=8, PPT r=50), whose costs differ.
- **top-1 / agreement**: accuracy (%) and the share of images (%) whose prediction equals the unreduced model's,
  on the same images. The DINOv2 classifier is a linear probe on a saliency backbone (2,000 CIFAR-10 test images,
  bfloat16 autocast); the Swin and PVTv2 test beds are trained here from scratch on CIFAR-10 at 64 px.
- **speed-up**: images/s against the unreduced model timed in the same run (interleaved rounds, median; CPU of
  this machine, 2 threads unless the JSON says otherwise), **±** half the min-max range of the reduced model's
  rounds relative to its middle. VideoMAE: 1 and 4 clips. The classifier's speed (batch 32, 2 rounds, machine
  under load) is indicative only; speed.json is the speed measurement.
- **dense IoU@0.5 / cosine**: the unchanged saliency decoder on the restored token grid against the unreduced
  model (1,000 ImageNet photos), each method with its default restore rule ([Dense output](dense.md) has every
  rule).
- **ONNX Runtime**: the same DeiT-S settings exported with `tr.export_onnx`, timed in ONNX Runtime.
- Each number links to the JSON it was read from; hover for the commit that JSON names (or the commit that
  last changed it, when it names none).
"""


def page(rows: list[Row]) -> str:
    marks = "\n\\* kept from a previous frontier run (`--keep-other-methods`), computed against that run's " \
            "unreduced logits: see [Benchmarks](benchmarks.md#accuracy-against-cost).\n"
    plots = "\n\n".join(f"![{title}](benchmarks/results/{path})" for path, title in PLOTS)
    return (
        "---\nhide:\n  - navigation\n  - toc\n---\n\n"   # the whole width for the table (mkdocs-material)
        "<!-- Generated by benchmarks/leaderboard.py from benchmarks/results/: do not edit, rerun it. -->\n\n"
        "# Leaderboard\n\n"
        "Every committed benchmark result in one table: method x model at equal GMACs. Click a column's "
        "header to sort by it (again to reverse). Regenerate with `python benchmarks/leaderboard.py`.\n\n"
        + sortable(table(rows, "/")) + "\n" + marks + "\n" + GUIDE + "\n"
        + "Sources: " + sources_list(rows, "/") + ".\n\n## Plots\n\n" + plots + "\n")


def cost_table(method: str, prefix: str) -> str:
    data = load("flops.json")
    src = source("flops.json", data)
    lines = ["| model | options | ours: GMACs (+ reduction overhead) | unreduced | saving | published |",
             "|---|---|---:|---:|---:|---|"]
    for r in data["rows"]:
        if r["method"] != method:
            continue
        ours = Cell(f"{r['gmacs']:.3f} (+{r['overhead_gmacs']:.3f})", src).render(prefix)
        lines.append(f"| {r['model']} | {fmt_options(r['options'])} | {ours} | {r['baseline_gmacs']:.3f} | "
                     f"{100 * r['saving']:.1f}% | {r['published'] or ''} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def method_snippet(method: str, rows: list[Row]) -> str:
    mine = [r for r in rows if r.method in PAGE_METHODS[method]]
    parts = ["<!-- Generated by benchmarks/leaderboard.py: do not edit, rerun it. -->\n",
             "Every measurement of this method in the [leaderboard](../leaderboard.md) (sortable; each number "
             "links to its JSON, hover for the commit):\n", sortable(table(mine, "/", with_method=method == "stvit"))]
    cost = cost_table(method, "/")
    if cost:
        parts += ["\nAnalytic cost against the published one (`benchmarks/flops_table.py` -> "
                  "[flops.json](/benchmarks/results/flops.json)):\n", cost]
    return "\n".join(parts) + "\n"


def headline(rows: list[Row], prefix: str) -> str:
    """One row per method: the classifier at about 70% GMACs, DeiT-S and ONNX speed at batch 32, dense at 65%."""
    def find(model: str, method: str, target: float | None = None) -> Row | None:
        return next((r for r in rows if r.model.startswith(model) and r.method == method
                     and (target is None or abs(r.target - target) < 1e-9)), None)

    def cell(row: Row | None, key: str, suffix: str = "") -> str:
        if row is None or key not in row.cells:
            return ""
        return row.cells[key].render(prefix) + suffix

    lines = ["| method | top-1 at ~70% GMACs | agreement | DeiT-S speed-up, batch 32 | ONNX Runtime, batch 32 | "
             "dense IoU / cosine at 65% |", "|---|---:|---:|---:|---:|---:|"]
    for method in ("unreduced", "tome", "topk", "evit", "gtp", "ppt", "stvit"):
        if method == "unreduced":
            cls, dense, deit = (find("DINOv2-S/14 + CIFAR", method), find("DINOv2-S/14 + saliency", method),
                                find("DeiT-S", method))
        elif method == "stvit":
            cls, dense, deit = find("DINOv2-S/14 + CIFAR", method), find("DINOv2-S/14 + saliency", "stvit-r"), None
        else:
            # The dense rows of every level share the method: the headline's column is the 65% one.
            cls, dense, deit = (find("DINOv2-S/14 + CIFAR", method, 0.7),
                                find("DINOv2-S/14 + saliency", method, 0.65), find("DeiT-S", method))
        name = {"stvit": "STViT (fine-tuned, 40%) / STViT-R (distilled)"}.get(method, NAMES[method])
        gmacs = f" ({cls.cells['gmacs'].text.split()[0]})" if cls is not None and method != "unreduced" else ""
        speed = cell(deit, "speed32", f" at {deit.cells['gmacs'].text.split()[0]}" if deit else "")
        iou = f"{cell(dense, 'iou')} / {cell(dense, 'cosine')}" if dense is not None else ""
        lines.append(f"| {name} | {cell(cls, 'top1', gmacs)} | {cell(cls, 'agreement')} | {speed} | "
                     f"{cell(deit, 'onnx32')} | {iou} |")
    return "\n".join(lines)


def readme_with(headline_table: str, readme: str) -> str:
    start, end = readme.index(HEADLINE_START) + len(HEADLINE_START), readme.index(HEADLINE_END)
    return readme[:start] + "\n" + headline_table + "\n" + readme[end:]


def outputs() -> dict[Path, str]:
    rows = all_rows()
    out = {PAGE: page(rows), GENERATED / "headline.md": headline(rows, "/") + "\n"}
    for method in PAGE_METHODS:
        out[GENERATED / f"{method}.md"] = method_snippet(method, rows)
    out[README] = readme_with(headline(rows, ""), README.read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if an output is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if not path.exists() or path.read_text() != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if args.check and stale:
        print("out of date (run python benchmarks/leaderboard.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    print(("up to date" if not stale else "wrote " + ", ".join(stale)) if not args.check else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
