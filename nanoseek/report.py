"""Plots of training curves from `metrics.jsonl` files (matplotlib, written as PNG)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(runs: dict[str, str | Path], keys: list[str], out: str | Path, title: str = "") -> Path:
    """One panel per metric key, one line per run (label -> metrics.jsonl); steps on the x axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    loaded = {label: read_metrics(path) for label, path in runs.items()}
    for axis, key in zip(axes.flat, keys, strict=False):
        for label, metrics in loaded.items():
            points = [(m["step"], m[key]) for m in metrics if key in m]
            if points:
                axis.plot(*zip(*points, strict=True), label=label, linewidth=1.2)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
