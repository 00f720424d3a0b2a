"""Summarise a finished ``mutmut run`` (``make mutate``) into reports/mutation/: a JSON of every mutant's status and
a markdown summary with the kill rate per file, the survivors with their diffs, and the mutants listed as
equivalent in ``equivalent.json`` (name -> one-line reason).

Run from the repository root after ``mutmut run``:

    python reports/mutation/summarise.py [--label after] [--seconds 2940]

Score: killed (timeouts count as killed, as mutmut counts them) over all mutants except the equivalent ones and
those not checked (an interrupted run); "no tests" mutants (no test of the selection reaches the function) count as
not killed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def diff(name: str, path: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    lines = get_diff_for_mutant(name, path=path).splitlines()
    return "\n".join(line for line in lines[2:] if line[:1] in "+-")  # the changed lines only


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="after", help="file name suffix: before / after")
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the run, for the record")
    parser.add_argument("--note", default="", help="a line on how the run was made (selection, partial run)")
    parser.add_argument("--commit", default=None, help="the commit the run tested (default: HEAD)")
    args = parser.parse_args()
    equivalent = json.loads((HERE / "equivalent.json").read_text()) if (HERE / "equivalent.json").exists() else {}

    mutants = {}
    for meta in sorted(Path("mutants/src").rglob("*.py.meta")):
        source = str(meta.relative_to("mutants"))[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            status = STATUS.get(code, "suspicious")
            if name in equivalent:
                status = "equivalent"
            mutants[name] = {"file": source, "status": status}
    for name, info in mutants.items():
        if info["status"] in ("survived", "no tests", "equivalent", "suspicious"):
            info["diff"] = diff(name, info["file"])
            if name in equivalent:
                info["reason"] = equivalent[name]

    per_file: dict[str, Counter] = defaultdict(Counter)
    for info in mutants.values():
        per_file[info["file"]][info["status"]] += 1
    total = Counter()
    for counts in per_file.values():
        total.update(counts)

    def rate(c: Counter) -> float:
        relevant = sum(c.values()) - c["equivalent"] - c["skipped"] - c["not checked"]
        return (c["killed"] + c["timeout"]) / relevant if relevant else 1.0

    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "src", "tests"], capture_output=True,
                                text=True).stdout.strip())
    record = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "uncommitted_changes_in_src_or_tests": dirty,
        "tool": "mutmut " + importlib.metadata.version("mutmut"),
        "run_seconds": args.seconds,
        "note": args.note,
        "totals": dict(total),
        "non_equivalent_kill_rate": rate(total),
        "per_file": {f: {**dict(c), "non_equivalent_kill_rate": rate(c)} for f, c in sorted(per_file.items())},
        "mutants": mutants,
    }
    (HERE / f"mutmut-{args.label}.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")

    cols = ["killed", "timeout", "survived", "no tests", "not checked", "equivalent"]
    lines = [f"# Mutation score ({args.label})", "",
             f"{record['date']}, commit {commit[:10]}{' + uncommitted tests' if dirty else ''}, {record['tool']}"
             + (f", run {args.seconds / 60:.0f} min" if args.seconds else ""), "",
             *([args.note, ""] if args.note else []),
             "| file | " + " | ".join(cols) + " | non-equivalent killed |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for f, c in sorted(per_file.items()):
        lines.append(f"| {f} | " + " | ".join(str(c[k]) for k in cols) + f" | {rate(c):.1%} |")
    lines.append("| **total** | " + " | ".join(str(total[k]) for k in cols) + f" | **{rate(total):.1%}** |")
    unchecked = sorted(n for n, i in mutants.items() if i["status"] == "not checked")
    if unchecked:
        per_function = Counter(n.split("__mutmut_")[0] for n in unchecked)
        lines += ["", f"## Not checked ({len(unchecked)}: the run was stopped before them)", "",
                  *(f"- `{f}`: {c}" for f, c in sorted(per_function.items()))]
    for title, wanted in (("Surviving mutants", ("survived", "no tests", "suspicious")),
                          ("Equivalent mutants", ("equivalent",))):
        chosen = [(n, i) for n, i in mutants.items() if i["status"] in wanted]
        lines += ["", f"## {title} ({len(chosen)})", ""]
        for name, info in chosen:
            reason = f": {info['reason']}" if "reason" in info else f" ({info['status']})"
            lines += [f"- `{name}`{reason}", "", "  ```diff", *("  " + d for d in info["diff"].splitlines()),
                      "  ```"]
    (HERE / f"mutmut-{args.label}.md").write_text("\n".join(lines) + "\n")
    print(f"{args.label}: {dict(total)}; non-equivalent kill rate {rate(total):.1%}")


if __name__ == "__main__":
    main()
