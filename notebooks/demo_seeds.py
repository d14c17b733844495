"""The toy demo as a new user runs it, over seeds: `python <script> --seed S` with default options
(the run ends with its own --test), timed, and its test metrics gathered into one table.

    python notebooks/demo_seeds.py --seeds 0 1 2 3 --threads 1 --parallel 2   # two runs at a time
    python notebooks/demo_seeds.py --seeds 0 1 2 3 --threads 2                 # one run at a time

Writes <out>/<script>_seed<S>_threads<T>/ (the run folders) and prints, per run, the wall time of
the whole command (training and test), mode coverage, valid share and the share of test inputs
whose encoded output has the ground truth's colour, then mean +- sd and the worst seed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("mode_coverage", "valid_share", "encoded_colour_right")


def one_run(script, seed, threads, out, extra):
    folder = out / f"{Path(script).stem}_seed{seed}_threads{threads}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), NO_PROGRESS="1")
    start = time.time()
    with open(out / f"{folder.name}.log", "w") as log:
        code = subprocess.run([sys.executable, str(ROOT / script), "--seed", str(seed), "--out", str(folder), *extra],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    row = {"seed": seed, "threads": threads, "exit": code, "wall_s": round(time.time() - start)}
    metrics = folder / "test" / "metrics.json"
    if code == 0 and metrics.exists():
        toy = json.loads(metrics.read_text())["toy"]
        row |= {k: toy.get(k) for k in KEYS} | {"mode_counts": toy["mode_counts"]}
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", default="bicyclegan.py")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--out", default="runs/demo_seeds")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for every run")
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(a.parallel) as pool:
        rows = list(pool.map(lambda s: one_run(a.script, s, a.threads, out, a.extra), a.seeds))
    done = [r for r in rows if r.get("mode_coverage") is not None]
    (out / f"summary_threads{a.threads}.json").write_text(json.dumps(rows, indent=1) + "\n")
    for key in KEYS + ("wall_s",):
        values = [r[key] for r in done if r.get(key) is not None]
        if values:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            worst = max(values) if key == "wall_s" else min(values)
            print(f"{key}: {statistics.mean(values):.3f} +- {sd:.3f}, worst {worst:.3f} (n={len(values)})")


if __name__ == "__main__":
    main()
