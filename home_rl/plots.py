"""PNG plots of a run's metrics.jsonl: one panel per curve people look at (reward, accuracy, length, ...)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

DEFAULT_PANELS = (("reward/mean", "reward"), ("accuracy", "accuracy"), ("format", "format rate"),
                  ("response_length/mean", "response length (tokens)"), ("actor/kl", "KL to reference"),
                  ("timing/step_s", "step time (s)"))


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
    return rows


def plot_metrics(metrics_path: str | Path, out_dir: str | Path,
                 panels: Sequence[tuple[str, str]] = DEFAULT_PANELS) -> list[Path]:
    """Write one PNG per metric present in the file, plus `overview.png` with all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    present = [(key, title) for key, title in panels if any(key in r for r in rows)]
    if not present:
        return []
    written = []
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        steps = [r["step"] for r in rows if key in r]
        values = [r[key] for r in rows if key in r]
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        single, sax = plt.subplots(figsize=(5, 3.5))
        sax.plot(steps, values, marker="o", markersize=3)
        sax.set_title(title)
        sax.set_xlabel("step")
        sax.grid(alpha=0.3)
        single.tight_layout()
        path = out / f"{key.replace('/', '_')}.png"
        single.savefig(path, dpi=110)
        plt.close(single)
        written.append(path)
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=110)
    plt.close(fig)
    return [out / "overview.png", *written]
