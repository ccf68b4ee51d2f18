"""Plots of training curves from `metrics.jsonl` files (matplotlib, written as PNG)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(runs: dict[str, str | Path], keys: list[str], out: str | Path, title: str = "",
                smooth: int = 1) -> Path:
    """One panel per metric key, one line per run (label -> metrics.jsonl); steps on the x axis. With
    `smooth` > 1 each line with enough points is the trailing mean over that many, the raw values faint behind."""
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
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            if smooth > 1 and len(values) >= 3 * smooth:  # sparse series (validation) are drawn as they are
                raw = axis.plot(steps, values, linewidth=0.6, alpha=0.25)[0]
                means = [sum(values[max(0, i - smooth + 1): i + 1]) / len(values[max(0, i - smooth + 1): i + 1])
                         for i in range(len(values))]
                axis.plot(steps, means, label=label, linewidth=1.4, color=raw.get_color())
            else:
                axis.plot(steps, values, label=label, linewidth=1.2)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return _save(figure, out)


def plot_pass_at_k(curves: dict[str, dict[str, float]], out: str | Path, title: str = "") -> Path:
    """pass@k (percent) against k on a log axis, one line per model (label -> {k: pass@k})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.0, 3.4))
    for label, curve in curves.items():
        ks = sorted(curve, key=int)
        axis.plot([int(k) for k in ks], [curve[k] for k in ks], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("k")
    axis.set_ylabel("pass@k (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=9)
    return _save(figure, out)


def _save(figure, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (or LABEL=metrics.jsonl), one per line in the plots")
    parser.add_argument("--keys", default="loss,val_loss", help="comma-separated metric names, one panel each")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--smooth", type=int, default=1, help="trailing mean over this many points")


def run(args) -> int:
    runs = {}
    for item in args.runs:
        label, _, location = item.partition("=")
        path = Path(location or label)
        path = path / "metrics.jsonl" if path.is_dir() else path
        if not path.exists():
            raise ValueError(f"{item}: no metrics.jsonl at {path}")
        runs[label if location else path.parent.name] = path
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    print(plot_curves(runs, keys, args.out, args.title, args.smooth))
    return 0
