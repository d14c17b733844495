"""The realism-vs-diversity study on the toy data (the analogue of Fig. 6 of arXiv:1711.11586).

Trains every method with the same budget and seeds by running its script as a user would, tests
it, and gathers the numbers each `--test` writes to metrics.json into a table and a figure:

    python notebooks/study.py --jobs 2              # paired methods, each on its toy schedule
    python notebooks/study.py --setting unpaired    # CycleGAN vs MUNIT
    python notebooks/study.py --iters 200 --seeds 0 --width 8 --methods BicycleGAN "pix2pix+noise"   # a taste
    python notebooks/study.py --seeds 0 1 2 3 --methods DivCo DivCo-featnorm --curve div   # raw against normalised features

On the toy data the truth is known: realism = share of samples that are right answers (one clean
palette colour, background kept, in the input's shape; README, What the toy's checks count), diversity = share of an input's four colour modes its samples
reach (and the pixel L1 between samples), faithfulness = IoU of the output shape with the input
outline. The course notebooks import `run_study` and `plot_study` from here.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (script, extra flags): the rows of the paper's Fig. 6, plus DivCo; and the unpaired pair.
PAIRED = {
    "pix2pix+noise": ("pix2pix_noise.py", []),
    "cAE-GAN": ("cvae_gan.py", ["--deterministic"]),
    "cVAE-GAN": ("cvae_gan.py", []),
    "cVAE-GAN++": ("bicyclegan.py", ["--lambda-latent", "0"]),
    "cLR-GAN": ("clr_gan.py", []),
    "BicycleGAN": ("bicyclegan.py", []),
    "DivCo": ("divco.py", []),
}
UNPAIRED = {
    "CycleGAN": ("cyclegan.py", []),
    "MUNIT": ("munit.py", []),
}
# Variants run only when named in --methods: DivCo with the paper's L2-normalised features (the
# default "DivCo" row uses the official raw ones).
VARIANTS = {
    "DivCo-featnorm": ("divco.py", ["--featnorm"]),
}


def run(script, flags, log, threads=None):
    command = [sys.executable, str(ROOT / script)] + [str(f) for f in flags]
    env = dict(os.environ, NO_PROGRESS="1", LPIPS=os.environ.get("LPIPS", "off"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        subprocess.run(command, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)


ENCODER_SCRIPTS = ("cvae_gan.py", "clr_gan.py", "bicyclegan.py", "divco.py")


def run_folder(out, name, seed):
    """Where run_study puts one method's run for one seed."""
    return Path(out) / f"{name.replace('++', 'pp').replace('+', '')}_seed{seed}"


def mean_sd(values):
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def run_study(methods, iters, seeds, out, n_samples=10, width=None, extra=(), retrain=False, jobs=1):
    """Train and test each method for each seed; returns {method: [metrics per seed]}.
    iters: None trains each script on its own toy schedule (paired scripts: 90 + 90 epochs at 16
    pairs a step, 72000 images; cyclegan.py and munit.py: 15 + 15 epochs at batch 1, 12000), a
    number trains that many iterations at a constant learning rate.
    width: --ngf/--nef/--ndf for every script (None: the scripts' defaults). jobs: runs at once."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = PAIRED | UNPAIRED | VARIANTS

    def one(name, seed):
        script, flags = table[name]
        run_dir = run_folder(out, name, seed)
        metrics_file = run_dir / "test" / ("AtoB" if script == "cyclegan.py" else "") / "metrics.json"
        if retrain or not metrics_file.exists():
            start = time.time()
            common = ["--out", run_dir, "--seed", seed, "--num-workers", 0, *extra]
            if width:
                common += ["--ngf", width, "--ndf", width] + (["--nef", width] if script in ENCODER_SCRIPTS else [])
            budget = [] if iters is None else ["--max-iters", iters, "--epochs", 10 ** 6, "--epochs-decay", 0]
            log = run_dir.with_suffix(".log")
            threads = 1 if jobs > 1 else None  # parallel runs: one thread each
            run(script, flags + common + budget, log, threads)
            run(script, flags + common + ["--test", "--n-samples", n_samples], log, threads)
            print(f"{name} seed {seed}: {time.time() - start:.0f} s", flush=True)
        return json.loads(metrics_file.read_text())

    jobs_list = [(name, seed) for name in methods for seed in seeds]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        metrics = list(pool.map(lambda job: one(*job), jobs_list))
    results = {name: [] for name in methods}
    for (name, _), m in zip(jobs_list, metrics):
        results[name].append(m)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def summarise(results):
    """{method: {metric: (mean, std over seeds, worst seed)}} for the numbers of the figure and the
    table; the worst seed is the lowest value (every metric here is better when higher)."""
    keys = {"coverage": ("toy", "mode_coverage"), "valid": ("toy", "valid_share"),
            "faithful_iou": ("toy", "faithfulness_iou"), "entropy": ("toy", "mode_entropy_vs_uniform"),
            "pixel_l1": (None, "pixel_diversity_l1"), "encoded": ("toy", "encoded_colour_right")}
    summary = {}
    for name, runs in results.items():
        summary[name] = {}
        for key, (group, field) in keys.items():
            parts = [r.get(group, {}) if group else r for r in runs]  # "toy": only on the toy data
            values = [part[field] for part in parts if field in part]  # "encoded...": only with an E
            if values:
                mean, std = mean_sd(values)
                summary[name][key] = (mean, std if len(values) > 1 else None, min(values))  # no spread from one seed
    return summary


def markdown_table(summary):
    lines = ["| method | realism: valid samples | diversity: modes covered per input | mode entropy / uniform "
             "| pixel L1 between samples | faithfulness (IoU) | encoded colour right |", "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        cells = [("–" if k not in s else f"{s[k][0]:.3f}"
                  + (f" ± {s[k][1]:.3f} (worst {s[k][2]:.3f})" if s[k][1] is not None else ""))
                 for k in ("valid", "coverage", "entropy", "pixel_l1", "faithful_iou", "encoded")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_curves(out, methods, seeds, column):
    """{method: [(step, mean, sd over seeds), ...]} of one losses.csv column (e.g. "div", DivCo's
    weighted contrastive term) at the steps every seed logged."""
    sys.path.insert(0, str(ROOT))
    import common

    curves = {}
    for name in methods:
        per_seed = [{int(r["step"]): r[column] for r in common.read_losses(run_folder(out, name, seed) / "losses.csv")
                     if column in r} for seed in seeds]
        steps = sorted(set.intersection(*(set(d) for d in per_seed)))
        curves[name] = [(step, *mean_sd([d[step] for d in per_seed])) for step in steps]
    return curves


def plot_curves(curves, path, ylabel, title, chance=None):
    """Mean over seeds with a band of one standard deviation, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in curves.items():
        steps, mean, sd = zip(*points)
        ax.plot(steps, mean, label=name)
        ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.25)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance {chance:.3f}")
    ax.set_xlabel("iteration"), ax.set_ylabel(ylabel), ax.set_title(title)
    ax.legend(fontsize=9), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_study(summary, path, x="coverage", y="valid", title="Toy data: realism against diversity"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"coverage": "diversity: share of the 4 modes reached per input",
              "pixel_l1": "diversity: pixel L1 between samples of one input",
              "valid": "realism: share of samples that are right answers",
              "faithful_iou": "faithfulness: IoU of output shape and input outline"}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = "osD^vP*X"
    for i, (name, s) in enumerate(summary.items()):
        if x in s and y in s:  # error bars: std over seeds
            ax.errorbar(s[x][0], s[y][0], xerr=s[x][1], yerr=s[y][1], fmt=markers[i % len(markers)], capsize=3,
                        markersize=8, label=name)
    ax.legend(loc="lower right", fontsize=9)
    if x in ("coverage", "valid", "faithful_iou"):
        ax.set_xlim(0, 1.02)
    if y in ("coverage", "valid", "faithful_iou"):
        ax.set_ylim(0, 1.05)
    ax.set_xlabel(labels.get(x, x)), ax.set_ylabel(labels.get(y, y)), ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="paired", choices=["paired", "unpaired"])
    p.add_argument("--methods", nargs="+", help="default: every method of the setting")
    p.add_argument("--iters", type=int, help="iterations per run at a constant learning rate (default: each "
                   "script's toy schedule: 90 + 90 epochs at batch 16 for the paired scripts, 15 + 15 at batch 1 "
                   "for the unpaired ones)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one CPU thread each when > 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--width", type=int, help="--ngf/--nef/--ndf for every script (default: the scripts' own)")
    p.add_argument("--retrain", action="store_true", help="train again even where results exist")
    p.add_argument("--curve", help="also plot this losses.csv column over training (e.g. div for DivCo)")
    p.add_argument("extra", nargs="*", help="flags passed to every script, after --")
    args = p.parse_args()
    methods = args.methods or list(PAIRED if args.setting == "paired" else UNPAIRED)
    out = Path(args.out) / args.setting
    start = time.time()
    results = run_study(methods, args.iters, args.seeds, out, args.n_samples, args.width, args.extra, args.retrain,
                        args.jobs)
    summary = summarise(results)
    table = markdown_table(summary)
    (out / "table.md").write_text(table + "\n")
    x, y = ("coverage", "valid") if args.setting == "paired" else ("coverage", "faithful_iou")
    plot_study(summary, out / "realism_vs_diversity.png", x, y,
               title=f"Toy data, {args.iters or 'default'} iterations, seeds {args.seeds}")
    print(table)
    print(f"figure: {out / 'realism_vs_diversity.png'}; {time.time() - start:.0f} s in all")
    if args.curve:  # e.g. --curve div: DivCo's weighted contrastive term over training, mean +- sd over seeds
        curves = loss_curves(out, methods, args.seeds, args.curve)
        (out / f"curve_{args.curve}.json").write_text(json.dumps(curves) + "\n")
        print(f"curve: {plot_curves(curves, out / f'curve_{args.curve}.png', args.curve, title=f'{args.curve}, seeds {args.seeds}')}")


if __name__ == "__main__":
    main()
