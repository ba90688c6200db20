"""How an imbalance method's gain over plain training grows with the imbalance ratio ρ: one ``cvlab study`` per ρ
(and per option group: a sampler study and a loss study each start with their own plain baseline), read back from
the studies' ``study.json``, drawn as the gain in one metric against ρ with the standard error of the difference.

    python scripts/plot_imbalance_gain.py --study 10=runs/.../studies/A --study 10=runs/.../studies/B \\
        --study 50=... --study 100=... --out imbalance_gain.png

For each ρ the plain row is the baseline setting of the first study given at that ρ (list the study that starts with
sampler=none first); the gain of every other study's settings is its mean over the seeds minus the plain mean, the
error bar √(s²/n + s₀²/n₀), the p Welch's t-test from the same figures (what `cvlab study` reports against its own
baseline). Rows equal to the plain row (another study's plain baseline: the runs are deterministic) are left out.
Only the ρ axis is this script's: every figure comes from the studies.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)
from scipy.stats import ttest_ind_from_stats  # noqa: E402


def read_study(path: Path) -> dict:
    """A finished study's record: its directory or its study.json."""
    record = path / "study.json" if path.is_dir() else path
    study = json.loads(record.read_text())
    if not study.get("finished") or "rows" not in study:
        raise SystemExit(f"{record}: the study has not finished (run it again to complete it)")
    return study


def gains(study: dict, base: dict, metric: str) -> dict[str, tuple[float, float, float]]:
    """``{setting: (gain, standard error, Welch p)}`` of the study's rows against ``base`` (a plain row), from the
    rows' means, stds and counts. Rows equal to ``base`` (the same plain runs in another study) are left out."""
    out = {}
    base_mean, base_std, base_n = base[f"{metric} mean"], base[f"{metric} std"], base["n"]
    for row in study["rows"]:
        mean, std, n = row[f"{metric} mean"], row[f"{metric} std"], row["n"]
        if (mean, std, n) == (base_mean, base_std, base_n):
            continue
        p = ttest_ind_from_stats(mean, std, n, base_mean, base_std, base_n, equal_var=False).pvalue
        out[row["setting"]] = (mean - base_mean, math.sqrt(std ** 2 / n + base_std ** 2 / base_n), float(p))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", action="append", required=True, metavar="RHO=PATH",
                        help="a finished study at imbalance ratio RHO (repeat: several per ρ, several ρ)")
    parser.add_argument("--metric", default="test/balanced_acc", help="the study column (default: test/balanced_acc)")
    parser.add_argument("--out", default="imbalance_gain.png", help="the plot (default: imbalance_gain.png)")
    parser.add_argument("--settings", help="comma-separated settings to show (default: every one)")
    args = parser.parse_args(argv)

    table: dict[str, dict[float, tuple[float, float, float]]] = {}
    baselines: dict[float, dict] = {}
    for item in args.study:
        rho_text, _, path = item.partition("=")
        rho = float(rho_text)
        study = read_study(Path(path))
        if rho not in baselines:  # the first study of a ρ holds its plain row
            baselines[rho] = next(row for row in study["rows"] if row["setting"] == study["baseline"])
        for setting, figures in gains(study, baselines[rho], args.metric).items():
            if args.settings and setting not in args.settings.split(","):
                continue
            table.setdefault(setting, {})[rho] = figures

    ratios = sorted(baselines)
    print(f"{args.metric}: gain over plain training (± standard error; p Welch)")
    print("| method | " + " | ".join(f"ρ = {rho:g}" for rho in ratios) + " |")
    print("|---|" + "---:|" * len(ratios))
    print("| plain (absolute) | " + " | ".join(f"{baselines[rho][args.metric + ' mean']:.3f} ± "
                                             f"{baselines[rho][args.metric + ' std']:.3f}" for rho in ratios) + " |")
    for setting, by_rho in table.items():
        cells = [f"{by_rho[rho][0]:+.3f} ± {by_rho[rho][1]:.3f} (p {by_rho[rho][2]:.2g})" if rho in by_rho else "–"
                 for rho in ratios]
        print(f"| {setting} | " + " | ".join(cells) + " |")

    figure, ax = plt.subplots(figsize=(6, 4))
    for setting, by_rho in table.items():
        xs = [rho for rho in ratios if rho in by_rho]
        ax.errorbar(xs, [by_rho[rho][0] for rho in xs], yerr=[by_rho[rho][1] for rho in xs], marker="o",
                    capsize=3, label=setting)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{rho:g}" for rho in ratios])
    ax.set_xlabel("imbalance ratio ρ (largest / smallest training class)")
    ax.set_ylabel(f"gain in {args.metric} over plain")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
