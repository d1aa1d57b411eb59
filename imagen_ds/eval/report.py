"""The sweep's outputs: results.json, results.md (a Markdown table) and fid_vs_clip.png.

`results` is the dict the sweep builds: {"protocol": {...}, "results": [{"checkpoint",
"label", "guidance", "fid", "clip_score", "num_images", ...}, ...]}.
"""
from __future__ import annotations

import json
from pathlib import Path


def write_results(results: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "results.md", "plot": out / "fid_vs_clip.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["table"].write_text(results_markdown(results))
    plot_fid_vs_clip(results, paths["plot"])
    return paths


def results_markdown(results: dict) -> str:
    proto = results["protocol"]
    fid, clip = proto["fid"], proto["clip"]
    lines = [
        "# FID / CLIP-score sweep",
        "",
        f"- prompts: {proto['prompts']} ({proto['num_images']} images per point, seed {proto['seed']})",
        f"- sampling: {proto['sampling']}",
        f"- FID: {fid['feature_network']}; {fid['num_reference']} reference images from {fid['reference']}; "
        f"{fid['resize']}",
        f"- CLIP score: {clip['model']}; {clip['definition']}; {clip['resize']}",
        "",
        "| checkpoint | guidance | FID ↓ | CLIP score ↑ | images |",
        "|---|---:|---:|---:|---:|",
    ]
    best_fid = min((r["fid"] for r in results["results"]), default=None)
    for r in results["results"]:
        fid_s = f"{r['fid']:.4g}"
        if r["fid"] == best_fid:
            fid_s = f"**{fid_s}**"
        lines.append(f"| {r['label']} | {r['guidance']:g} | {fid_s} | {r['clip_score']:.3f} | {r['num_images']} |")
    return "\n".join(lines) + "\n"


def plot_fid_vs_clip(results: dict, path: str | Path) -> None:
    """FID (y) against CLIP score (x), one line per checkpoint, points labelled by guidance weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    labels = list(dict.fromkeys(r["label"] for r in results["results"]))
    for label in labels:
        rows = sorted((r for r in results["results"] if r["label"] == label), key=lambda r: r["guidance"])
        xs, ys = [r["clip_score"] for r in rows], [r["fid"] for r in rows]
        ax.plot(xs, ys, marker="o", label=label)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"w={r['guidance']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    proto = results["protocol"]
    ax.set_xlabel(f"CLIP score (x100, {proto['clip']['model_short']})")
    ax.set_ylabel(f"FID ({proto['num_images']} images)")
    ax.set_title("FID vs CLIP score over guidance weights")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
