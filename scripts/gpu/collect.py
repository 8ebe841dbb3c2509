"""One step of scripts/gpu/run_checks.sh has ended: read its artifacts, append its figures to
$OUT/results.jsonl and rewrite $OUT/summary.txt from every line so far.

    python scripts/gpu/collect.py STEP EXIT_CODE SECONDS      # RUNS and OUT from the environment

Only the standard library: it must run even when the step that failed was the wheel install.
A missing artifact is reported as missing, never as a figure.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

RUNS = Path(os.environ.get("RUNS", "/tmp/runs"))
OUT = Path(os.environ.get("OUT") or RUNS / "out")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def train_figures(run: Path, skip_first: int, exclude: range = range(0)) -> dict:
    """Throughput of a harness run from its metrics.jsonl: the steps after the warm-up ones."""
    steps = [m for m in read_jsonl(run / "metrics.jsonl") if "tokens_per_s" in m]
    out: dict = {"steps_logged": len(steps)}
    config = read_json(run / "config.json")
    if config:
        out["attn"] = config["resolved"].get("attn_implementation")
        out["ds_optimizer"] = config["ds_config"].get("optimizer")
    timed = [m for m in steps[skip_first:] if m["step"] not in exclude]
    if not timed:
        return {**out, "missing": f"no timed step in {run / 'metrics.jsonl'}"}
    seconds = [m["step_time_s"] for m in timed]
    tokens = [m["tokens_per_s"] * m["step_time_s"] for m in timed]  # log_every 1: one step per line
    out.update(timed_steps=[timed[0]["step"], timed[-1]["step"]], step_time_s_median=statistics.median(seconds),
               tokens_per_s=sum(tokens) / sum(seconds), tokens_per_step=statistics.median(tokens),
               padding_efficiency=statistics.median(m["padding_efficiency"] for m in timed),
               loss_first=steps[0]["loss"], loss_last=steps[-1]["loss"])
    if all("mfu" in m for m in timed):  # time-weighted: total model FLOPs / total time / peak
        out["mfu"] = sum(m["mfu"] * m["step_time_s"] for m in timed) / sum(seconds)
        out["model_tflops_per_s"] = sum(m["model_tflops_per_s"] * m["step_time_s"] for m in timed) / sum(seconds)
    peaks = [m[k] for m in steps for k in ("peak_device_mem_gib", "peak_host_rss_gib") if k in m]
    if peaks:
        out["peak_mem_gib"] = max(peaks)
    phases = {k: statistics.median(m[k] for m in timed) for k in timed[0] if k.startswith("time_") and k.endswith("_s")}
    out["phase_s_median"] = phases
    return out


def env_figures() -> dict:
    return read_json(RUNS / "env.json") or {"missing": "env.json"}


def tests_figures() -> dict:
    path = RUNS / "pytest.xml"
    if not path.is_file():
        return {"missing": "pytest.xml"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    bad = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                bad.append(f"{case.get('classname')}::{case.get('name')} [{kind}] {(node.get('message') or '')[:200]}")
    out["not_passed"] = bad
    out["skipped_tests"] = [f"{c.get('name')}: {(c.find('skipped').get('message') or '')[:120]}"
                            for c in suite.iter("testcase") if c.find("skipped") is not None][:20]
    return out


def mfu_figures() -> dict:
    profile = os.environ.get("PROFILE_STEPS", "15:3")
    skip, n = (int(x) for x in profile.split(":"))
    out = train_figures(RUNS / "mfu" / "run", skip_first=2, exclude=range(skip, skip + n + 1))
    text = (RUNS / "mfu" / "profile.txt").read_text() if (RUNS / "mfu" / "profile.txt").is_file() else ""
    out["profile_categories"] = {m[1]: float(m[3].rstrip("%")) for m in
                                 re.finditer(r"^\| ([^|]+?) \| ([\d,.]+) \| ([\d.]+%) \|$", text, re.M)} or "missing"
    busy = re.search(r"device busy ([\d.]+)%", text)
    if busy:
        out["profile_device_busy_pct"] = float(busy.group(1))
    return out


def ce_figures() -> dict:
    rows = read_jsonl(RUNS / "ce.jsonl")
    return {"variants": [{k: r[k] for k in ("chunked_ce", "peak_gib", "seconds", "loss", "supervised")} for r in rows]} \
        if rows else {"missing": "ce.jsonl"}


def bench_figures() -> dict:
    report = read_json(RUNS / "bench" / "bench-1b.json")
    if not report:
        return {"missing": "bench-1b.json"}
    return {"ratios": report["ratios"], "sides": {
        name: {k: s[k] for k in ("real_tokens_per_s", "padding_efficiency", "mfu", "peak_memory_gib", "samples", "steps",
                                 "final_loss", "loss_last5_mean", "attn")} for name, s in report["sides"].items()},
        "versions": report.get("versions")}


def seven_b_figures() -> dict:
    out = train_figures(RUNS / "7b" / "run", skip_first=1)
    peaks = read_json(RUNS / "7b" / "peaks.json")
    out["peaks"] = peaks or "missing"
    plan = (RUNS / "7b" / "plan.txt").read_text() if (RUNS / "7b" / "plan.txt").is_file() else ""
    row = re.search(r"^\| zero3_offload[^|]*\| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", plan, re.M)
    out["plan_zero3_offload"] = ({"gpu": row.group(1).strip(), "host": row.group(2).strip(),
                                  "host_x1.5": row.group(3).strip(), "fits": row.group(4).strip()} if row else "missing")
    return out


FIGURES = {"env": env_figures, "tests": tests_figures, "mfu": mfu_figures, "ce": ce_figures, "bench": bench_figures,
           "7b": seven_b_figures}


def status(rc: int) -> str:
    return {0: "ok", 124: "timeout", 137: "timeout (killed)", -1: "skipped (no time left)"}.get(rc, "failed")


def summary_line(r: dict) -> str:
    head = f"{r['step']:<6} {r['status']:<18} rc={r['rc']:<4} {r['seconds']:>5}s"
    f = r.get("figures", {})
    bits = []
    if r["step"] == "env":
        bits = [f"{k}={f.get(k)}" for k in ("device", "torch", "transformers", "deepspeed", "trl", "varlen_attn")]
    elif r["step"] == "tests":
        bits = [f"passed={f.get('passed')} failed={f.get('failures')} errors={f.get('errors')} skipped={f.get('skipped')}"]
        bits += [f"\n         NOT PASSED {x}" for x in f.get("not_passed", [])]
    elif r["step"] in ("mfu", "7b"):
        for k in ("mfu", "tokens_per_s", "step_time_s_median", "tokens_per_step", "peak_mem_gib", "attn", "steps_logged",
                  "profile_device_busy_pct"):
            if k in f:
                v = f[k]
                bits.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        if isinstance(f.get("profile_categories"), dict):
            bits.append("profile: " + ", ".join(f"{c} {p}%" for c, p in list(f["profile_categories"].items())[:5]))
        if isinstance(f.get("peaks"), dict):
            bits.append("peaks: " + ", ".join(f"{k}={v:.1f}" for k, v in f["peaks"].items() if isinstance(v, float)))
        if isinstance(f.get("plan_zero3_offload"), dict):
            bits.append(f"plan zero3_offload: GPU {f['plan_zero3_offload']['gpu']}, host {f['plan_zero3_offload']['host']}")
    elif r["step"] == "ce":
        bits = [f"chunk {v['chunked_ce']}: {v['peak_gib']:.2f} GiB {v['seconds'] * 1e3:.0f} ms" for v in f.get("variants", [])]
    elif r["step"] == "bench":
        bits = [f"harness/{k} {v:.2f}x" for k, v in f.get("ratios", {}).items()]
        bits += [f"{k} {s['real_tokens_per_s']:,.0f} tok/s" for k, s in f.get("sides", {}).items()]
    if "missing" in f:
        bits.append(f"MISSING {f['missing']}")
    return head + "  " + "  ".join(bits)


def main(step: str, rc: str, seconds: str) -> None:
    try:
        figures = FIGURES[step]() if int(rc) != -1 else {}
    except Exception as err:  # a half-written artifact must not cost the steps after it their record
        figures = {"missing": f"collect failed: {type(err).__name__}: {err}"}
    record = {"step": step, "status": status(int(rc)), "rc": int(rc), "seconds": int(seconds), "figures": figures}
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    lines = [summary_line(r) for r in read_jsonl(OUT / "results.jsonl")]
    (OUT / "summary.txt").write_text("\n".join(lines) + "\n")
    print(lines[-1], flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
