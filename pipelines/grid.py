"""The framework grid's comparison: mean +- std over seeds per framework, as a table and a figure.

``python pipelines/two_stage.py --frameworks all --seeds 42 43 44`` logs both to its MLflow parent
run (``comparison.md``, ``comparison_table.json``, ``comparison.png``).
"""
from __future__ import annotations

import numpy as np

# The printed table's columns (test split of the dimensional set, and the categorical accuracy); every
# test metric of every row is summarised, logged to MLflow and written to result.json.
COMPARE = ("test_pearson_v", "test_pearson_a", "test_ccc_v", "test_ccc_a", "test_mse", "test_categorical_accuracy")


def summarize(rows: list[dict]) -> dict:
    """``{framework: {metric: {"mean", "std", "n"}}}`` over seeds for every ``test_*`` metric of the rows
    (sample std, ddof 1; 0 for one seed)."""
    out: dict = {}
    metrics = dict.fromkeys(k for r in rows for k in r if k.startswith("test_"))
    for framework in dict.fromkeys(r["framework"] for r in rows):
        mine = [r for r in rows if r["framework"] == framework]
        out[framework] = {}
        for key in metrics:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            if values:
                arr = np.asarray(values, dtype=np.float64)
                out[framework][key] = {"mean": float(arr.mean()),
                                       "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}
    return out


def comparison_table(summary: dict) -> str:
    """The grid's comparison as a Markdown table (mean +- std over seeds when there are several)."""
    heads = ["framework", "Pearson V", "Pearson A", "CCC V", "CCC A", "MSE", "cat. accuracy"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for framework, metrics in summary.items():
        cells = [framework]
        for key in COMPARE:
            m = metrics.get(key)
            cells.append("–" if m is None else (f"{m['mean']:.3f} ± {m['std']:.3f}" if m["n"] > 1
                                                 else f"{m['mean']:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_figure(summary: dict, title: str = ""):
    """Bars of test Pearson V / A and CCC V / A per framework, with the std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ("test_pearson_v", "test_pearson_a", "test_ccc_v", "test_ccc_a")
    frameworks = list(summary)
    x = np.arange(len(frameworks))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(1.6 * len(frameworks) + 2, 3.6))
    for i, key in enumerate(keys):
        means = [summary[f].get(key, {}).get("mean", np.nan) for f in frameworks]
        stds = [summary[f].get(key, {}).get("std", 0.0) for f in frameworks]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=key.replace("test_", "").replace("_", " "))
    ax.set_xticks(x, frameworks, rotation=15)
    ax.set_ylabel("test score (dimensional set)")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    if title:
        ax.set_title(title, fontsize=9, pad=22)
    fig.tight_layout()
    return fig
