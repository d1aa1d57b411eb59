"""Collect scripts/gpu_check.sh's per-model JSON into gpu_results.json and a Markdown table.

    python -m imagen_ds.bench.gpu_report --work DIR --out DIR --models "a b c" [--cap 80]

DIR holds bench_<model>.json (benchmark-throughput --json) and plan_<model>.json (plan --json)
for each model; a missing or broken file becomes a row saying so. The table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path
from typing import Optional

GIB = 2**30
MFU_GOAL, GOAL_MODEL, GOAL_MICRO_BATCH = 0.50, "2b_res_64", 32


def _read(path: Path) -> tuple[Optional[dict], Optional[str]]:
    if not path.is_file():
        return None, f"{path.name} missing"
    text = path.read_text().strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None, f"{path.name} is not JSON ({len(text)} bytes)"
    if isinstance(obj, dict) and set(obj) == {"error"}:  # gpu_check.sh's note of a failed command
        return None, obj["error"]
    return obj, None


def model_row(name: str, bench: Optional[dict], plan: Optional[dict]) -> dict:
    """One model's numbers, with the plan's prediction for the benchmark's exact case (1 GPU)."""
    row = {"model": name, "benchmark": bench, "plan": plan, "predicted_peak_gib_1gpu": None, "plan_error": None}
    if bench and plan:
        from imagen_ds.bench.planner import predict_peak_bytes

        pred = predict_peak_bytes(plan, gpus=bench["world_size"], micro_batch=bench["micro_batch"],
                                  checkpointing=bench["checkpoint_activations"]) / GIB
        row["predicted_peak_gib_1gpu"] = pred
        # only the CUDA allocator's peak is comparable (on CPU the benchmark reports RSS)
        if bench.get("peak_mem_gb") and "cuda" in bench.get("peak_mem_method", ""):
            row["plan_error"] = pred / bench["peak_mem_gb"] - 1
    return row


def goal(rows: list[dict], cap_gib: Optional[float]) -> str:
    """The issue's goal: 2b_res_64 at micro-batch 32 under the memory cap at >= 50% MFU."""
    r = next((r for r in rows if r["model"] == GOAL_MODEL), None)
    b = r and r["benchmark"]
    if not b:
        return f"goal ({GOAL_MODEL}): not measured"
    fits = cap_gib is None or b["peak_mem_gb"] <= cap_gib
    mfu = b.get("mfu")
    ok = fits and b["micro_batch"] >= GOAL_MICRO_BATCH and mfu is not None and mfu >= MFU_GOAL
    return (f"goal ({GOAL_MODEL}, micro-batch {b['micro_batch']}, want >= {GOAL_MICRO_BATCH} under "
            f"{cap_gib or '-'} GiB at >= {MFU_GOAL:.0%} MFU): peak {b['peak_mem_gb']:.1f} GiB, MFU "
            f"{'n/a' if mfu is None else f'{mfu:.1%}'} -> {'MET' if ok else 'NOT met'}")


def _f(x, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x * scale, fmt)


def markdown(rows: list[dict], header: dict) -> str:
    lines = [
        f"GPU check {header['date']} on {header['device']} (torch {header['torch']}, deepspeed "
        f"{header['deepspeed']}, CUDA {header['cuda']}); memory cap {header['cap_gib'] or 'none'} GiB; "
        f"{header['steps']} timed steps per model.",
        "",
        "| model | micro-batch | ckpt | samples/s | step ms (median, IQR) | TFLOP/s | MFU | peak alloc GiB "
        "| reserved GiB | plan predicted GiB (error) | overhead vs bare | attention | plan: 8x80GB micro-batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, p = r["benchmark"], r["plan"]
        if not b:
            lines.append(f"| {r['model']} | failed: {r.get('error', 'no result')} | | | | | | | | | | | "
                         f"{p['micro_batch'] if p else 'n/a'} |")
            continue
        st = b["step_time_s"]
        attn = ", ".join(k.replace("aten::_scaled_dot_product_", "").replace("aten::_", "")
                         for k in b["attention_kernels"] if "backward" not in k) or "none"
        pred = "n/a" if r["predicted_peak_gib_1gpu"] is None else f"{r['predicted_peak_gib_1gpu']:.1f}"
        if r["plan_error"] is not None:
            pred += f" ({r['plan_error']:+.1%})"
        lines.append(
            f"| {r['model']} | {b['micro_batch']} | {'on' if b['checkpoint_activations'] else 'off'} "
            f"| {b['samples_per_s']:.1f} | {st['median'] * 1e3:.0f} ({st['iqr'] * 1e3:.0f}) | {_f(b['tflops'], '.3g')} "
            f"| {_f(b['mfu'], '.1%')} | {b['peak_mem_gb']:.1f} | {_f(b['peak_reserved_gb'], '.1f')} | {pred} "
            f"| {_f(b['overhead_vs_bare'], '.3f')} | {attn} | {p['micro_batch'] if p else 'n/a'} |")
    lines += ["", header["goal"]]
    return "\n".join(lines)


def collect(work: Path, models: list[str], cap_gib: Optional[float], steps: Optional[int] = None) -> tuple[dict, str]:
    rows = []
    for m in models:
        bench, berr = _read(work / f"bench_{m}.json")
        plan, perr = _read(work / f"plan_{m}.json")
        row = model_row(m, bench, plan)
        errors = list(dict.fromkeys(e for e in (berr, perr) if e))  # once when both failed alike
        if errors:
            row["error"] = "; ".join(errors)
        rows.append(row)
    first = next((r["benchmark"] for r in rows if r["benchmark"]), {}) or {}
    versions = first.get("versions", {})
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": first.get("device", "unknown"), "torch": versions.get("torch"),
              "deepspeed": versions.get("deepspeed"), "cuda": versions.get("cuda"), "cap_gib": cap_gib,
              "steps": first.get("steps", steps), "host": platform.node()}
    header["goal"] = goal(rows, cap_gib)
    return {"header": header, "models": rows}, markdown(rows, header)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--models", required=True)
    ap.add_argument("--cap", type=float, default=None)
    a = ap.parse_args(argv)
    results, table = collect(a.work, a.models.split(), a.cap)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (a.out / "gpu_results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
