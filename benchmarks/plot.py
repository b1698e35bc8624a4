"""A bar chart of generated tokens/s per engine and decoding, one PNG per results file.

    python benchmarks/plot.py benchmarks/results/cpu-mt5-small.json [more.json ...]

Writes each file's chart beside it (same name, .png). Each bar is labelled with its tokens/s and its
ratio to the CTranslate2 reference of that run (int8 on CPU, bfloat16 on GPU), the issue's target.
Needs matplotlib (pip install matplotlib); it is not a dependency of the project.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"ours": "#1f77b4", "pipeline": "#17becf", "transformers": "#ff7f0e", "ct2": "#2ca02c"}


def colour(engine: str) -> str:
    if "vocab" in engine or "+" in engine:  # a restricted vocabulary, or a fix prototyped in an earlier run
        return "#9467bd"
    return next((c for prefix, c in COLOURS.items() if engine.startswith(prefix)), "#7f7f7f")


def plot(path: Path) -> Path:
    report = json.loads(path.read_text(encoding="utf-8"))
    decodings = list(dict.fromkeys(r["decoding"] for r in report["results"]))
    ct2_ref = report["setup"]["baselines"]["ctranslate2"]
    rows_per = max(sum(r["decoding"] == d for r in report["results"]) for d in decodings)
    fig, axes = plt.subplots(len(decodings), 1, figsize=(10, 0.45 * rows_per * len(decodings) + 1.6), squeeze=False)
    for ax, decoding in zip(axes[:, 0], decodings):
        rows = [r for r in report["results"] if r["decoding"] == decoding][::-1]
        values = [r["tokens_per_second"] for r in rows]
        ax.barh([r["engine"] for r in rows], values, color=[colour(r["engine"]) for r in rows])
        for y, r in enumerate(rows):
            label = f" {r['tokens_per_second']:.1f}"
            if "vs_ct2" in r:
                label += f"  ({r['vs_ct2']:.2f}x {ct2_ref})"
            ax.text(r["tokens_per_second"], y, label, va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.45)
        ax.set_title(f"{decoding}", fontsize=10, loc="left")
        ax.set_xlabel("generated tokens / s (median of repeats)")
        ax.tick_params(axis="y", labelsize=8)
    m, s = report["machine"], report["setup"]
    where = m["accelerator"] or f"{m['cpu']}, {m['threads']} thread(s)"
    fig.suptitle(
        f"mt5-{s['shape']} (random weights), batch {s['batch_size']}, {s['documents']} docs of "
        f"{s['input_tokens']['min']}-{s['input_tokens']['max']} tokens, "
        f"max {next(iter(s['decodings'].values()))['max_new_tokens']} new tokens\n"
        f"{where}, torch {m['torch']}, {report['date'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    for path in p.parse_args().results:
        print(plot(path))


if __name__ == "__main__":
    main()
