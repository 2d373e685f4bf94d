"""Sum up a gpu_check.sh output folder into summary.json (and print it).

    python benchmarks/gpu_summary.py OUT
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

GOALS = {"resnet": (80_000, "img/s"), "gpt2": (450_000, "tok/s")}


def jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def main(folder: Path) -> dict:
    summary: dict = {"device": None, "stages": jsonl(folder / "stages.jsonl"), "throughput": [], "goals": {}}
    dev = folder / "device.txt"
    if dev.exists():
        summary["device"] = next((l for l in dev.read_text().splitlines() if l.startswith("torch ")), None)
    summary["presets_default"] = {}   # what a user gets without flags: compile = "auto" (the presets' default)
    for rec in jsonl(folder / "throughput.jsonl"):
        summary["throughput"].append(rec)
        if str(rec.get("compile_why", "")).startswith("compile = auto"):
            kind = rec["bench"].split()[0]
            key = " ".join([kind, f"bs{rec.get('batch')}", *rec.get("set", [])])
            goal = GOALS.get(kind, (None, None))[0]
            summary["presets_default"][key] = {"rate": rec["rate"], "unit": rec["unit"], "compile": rec["compile"],
                                               "hold": rec.get("hold"), "mfu": rec.get("mfu_bf16_989"),
                                               "host_syncs": rec.get("host_syncs"), "graphs": rec.get("graphs"),
                                               "peak_gib": rec.get("peak_gib"),
                                               "ratio_to_goal": round(rec["rate"] / goal, 3) if goal else None}
        kind = rec["bench"].split()[0]
        if kind in GOALS and " x" not in rec["bench"] and rec.get("batch") in (512, 64):
            goal, unit = GOALS[kind]
            best = summary["goals"].get(kind, {}).get("best", 0)
            if rec["rate"] > best:
                summary["goals"][kind] = {"best": rec["rate"], "unit": unit, "goal": goal,
                                          "ratio": round(rec["rate"] / goal, 3), "compile": rec["compile"]}
    tests = folder / "gpu_tests.txt"
    if tests.exists():
        text = tests.read_text()
        m = re.findall(r"^=+ (.*(?:passed|failed|error).*) in [\d.]+s", text, re.M)
        summary["gpu_tests"] = m[-1] if m else text.strip().splitlines()[-1:] or None
        summary["gpu_tests_failed"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    tv = folder / "tv_throughput.txt"
    if tv.exists():
        m = re.search(r"TV / plain throughput \(best of \d+\): ([\d.]+)", tv.read_text())
        summary["tv_over_plain"] = float(m.group(1)) if m else None
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
