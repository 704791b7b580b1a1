"""The results page's figure: top-1 per network and target, and mNRG against Net-S."""
from __future__ import annotations

import numpy as np

from common.atomic import atomic_open

GROUP_COLOURS = {"single network": "tab:blue", "combination": "tab:green", "control": "tab:gray",
                 "outside reference": "tab:orange"}


def network_group(name: str) -> str:
    """A row's kind in the legend (by display name, as the reports name rows)."""
    if name.startswith("control"):
        return "control"
    if name.startswith(("EfficientNet", "Lite0")):
        return "outside reference"
    return "combination" if "(" in name and "+" in name else "single network"


def _heatmap(ax, models: dict, names: list[str], targets: list[str]) -> None:
    table = np.array([[100 * models[n]["targets"][t]["top1"] for t in targets]
                      + [100 * models[n]["mean"]] for n in names])
    # colour each column by its own range, so small differences on a target stay visible
    span = table.max(0) - table.min(0)
    shade = (table - table.min(0)) / np.where(span > 0, span, 1)
    ax.imshow(shade, cmap="YlGn", aspect="auto", vmin=-0.3, vmax=1.2)
    for (i, j), v in np.ndenumerate(table):
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(targets) + 1),
                  [t.split(":")[0].replace("emoji-twitter-", "twitter ") for t in targets]
                  + ["mean"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("top-1 accuracy (%) per target; colour per column", fontsize=9)


def _mnrg_bars(ax, models: dict, names: list[str]) -> None:
    from matplotlib.patches import Patch
    values = [models[n]["mnrg"] or 0.0 for n in names]
    ax.barh(range(len(names)), values, color=[GROUP_COLOURS[network_group(n)] for n in names])
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:+.1f} ", va="center", ha="left" if v >= 0 else "right", fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_yticks([])
    ax.set_title("mNRG x100 vs Net-S specific", fontsize=9)
    ax.margins(x=0.25)
    ax.legend(handles=[Patch(color=c, label=g) for g, c in GROUP_COLOURS.items()],
              fontsize=7, loc="lower right")


def plot_results(report: dict, path: str) -> None:
    """Left: top-1 per network and target (heatmap, mean last). Right: mNRG vs Net-S, bars
    coloured by kind (single network, combination, control, outside reference)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, targets = report["models"], list(report["targets"])
    names = list(models)
    fig, (ax_map, ax_bar) = plt.subplots(
        1, 2, figsize=(6 + 1.1 * len(targets), 0.38 * len(names) + 2.2),
        gridspec_kw={"width_ratios": [len(targets) + 1, 4]})
    _heatmap(ax_map, models, names, targets)
    _mnrg_bars(ax_bar, models, names)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)

