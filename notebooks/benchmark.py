"""Throughput of the seven scripts, and whether the fast flags train the same (README, 'Speed').

Runs each script as a user would, with --max-iters, and reads the images/s and peak GPU memory
that it prints after its warm-up iterations. Six parts, each writing a Markdown table
(<part>.md), the raw numbers (<part>.json) and the scripts' output (<part>.log) to --out:

    python notebooks/benchmark.py table   --data datasets/facades   # 7 scripts, default and fast flags
    python notebooks/benchmark.py scaling --data datasets/facades   # bicyclegan.py: batch size, resolution
    python notebooks/benchmark.py losses  --data datasets/facades   # fp32 vs fast flags, first iterations
    python notebooks/benchmark.py count   --data datasets/facades   # FLOPs and operator calls per iteration (CPU)
    python notebooks/benchmark.py gpu                               # the whole GPU check, at most 8 minutes
    python notebooks/benchmark.py layout --size 64 --iters 5        # --channels-last against NCHW (CPU)

Settings are the paper's: 256 px (load 286), each method's official batch size (1 for pix2pix,
CycleGAN and MUNIT, 2 for the BicycleGAN family and DivCo). --iters stays below one epoch
(200 batches of facades at batch 2), so no epoch-end preview enters the timing.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

# script -> (official batch size, the official throughput on one H100 in images/s, reference §8)
SCRIPTS = {
    "pix2pix_noise.py": (1, 67.0),  # against the official pix2pix
    "cvae_gan.py": (2, None),
    "clr_gan.py": (2, None),
    "bicyclegan.py": (2, 30.0),
    "divco.py": (2, None),
    "cyclegan.py": (1, 10.5),
    "munit.py": (1, 7.5),
}
FAST = ["--amp", "--channels-last", "--compile"]  # the README's recommended GPU flags
EXTRA = []  # flags for every run (any flag benchmark.py does not know, e.g. --num-workers 8)
THROUGHPUT = re.compile(r"throughput: ([\d.]+) images/s.*?(?:peak GPU memory ([\d.]+) GiB)?$", re.M)


def run(script, flags, out, log):
    """Train with flags; returns (images/s, peak GiB or None, wall seconds)."""
    command = [sys.executable, str(ROOT / script), *map(str, flags), *EXTRA, "--out", str(out)]
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, NO_PROGRESS="1"))
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n" + result.stdout + result.stderr + "\n")
    if result.returncode != 0:
        print(f"failed: {' '.join(command)} (see {log})\n{result.stderr[-2000:]}", flush=True)
        return None, None, time.time() - start
    found = THROUGHPUT.findall(result.stdout)
    rate, memory = found[-1]
    return float(rate), float(memory) if memory else None, time.time() - start


def size_flags(size):
    return ["--load-size", round(size * 286 / 256), "--crop-size", size]  # 286 -> 256, as the official scripts


def table(args, out, log):
    rows = []
    for script, (batch, official) in SCRIPTS.items():
        if args.scripts and script not in args.scripts:
            continue
        base = ["--dataset", args.data, "--batch-size", batch, "--max-iters", args.iters, *size_flags(256)]
        row = {"script": script, "batch": batch, "official": official}
        for name, flags in [("default", []), ("fast", FAST)]:
            rate, memory, wall = run(script, base + flags, out / f"{Path(script).stem}_{name}", log)
            row |= {f"{name}_img_s": rate, f"{name}_gib": memory, f"{name}_wall_s": round(wall)}
            print(script, name, rate, memory, f"{wall:.0f} s", flush=True)
        rows.append(row)
    lines = ["| script | batch | official img/s | default img/s | peak GiB | fast img/s | peak GiB | fast / official |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['fast_img_s'] / r['official']:.1f}x" if r["official"] and r["fast_img_s"] else "")
        lines.append(f"| {r['script']} | {r['batch']} | {r['official'] or ''} | {fmt(r['default_img_s'])} | "
                     f"{fmt(r['default_gib'], 2)} | {fmt(r['fast_img_s'])} | {fmt(r['fast_gib'], 2)} | {ratio} |")
    return rows, lines


def scaling(args, out, log):
    rows = []
    settings = [(b, 256) for b in (2, 8, 32)] + [(2, s) for s in (128, 512)]
    for batch, size in settings:
        for name, flags in [("default", []), ("fast", FAST)]:
            iters = max(20, min(args.iters, args.iters * 2 // batch))  # about the same number of images
            base = ["--dataset", args.data, "--batch-size", batch, "--max-iters", iters, *size_flags(size)]
            rate, memory, _ = run("bicyclegan.py", base + flags, out / f"scale_{batch}_{size}_{name}", log)
            rows.append({"batch": batch, "size": size, "flags": name, "img_s": rate, "gib": memory})
            print(batch, size, name, rate, memory, flush=True)
    lines = ["| batch | size | default img/s | peak GiB | fast img/s | peak GiB |", "|---|---|---|---|---|---|"]
    for batch, size in settings:
        d, f = [next(r for r in rows if (r["batch"], r["size"], r["flags"]) == (batch, size, n))
                for n in ("default", "fast")]
        lines.append(f"| {batch} | {size} | {fmt(d['img_s'])} | {fmt(d['gib'], 2)} | {fmt(f['img_s'])} | "
                     f"{fmt(f['gib'], 2)} |")
    return rows, lines


def count(args, out, log):
    """Work per training iteration, counted on the CPU: floating-point operations
    (torch.utils.flop_counter: convolutions and matrix products), ATen operator calls that compute
    (views excluded; each is about one GPU kernel launch in eager mode) and host syncs (reads of a
    tensor's value by Python, e.g. .item()). Adam runs fused, as on a GPU. The count for one
    iteration is the difference between runs of k + 1 and k iterations, so set-up, data
    decoding and checkpoints cancel; neither iteration logs, so a sync counted is a stray one."""
    import runpy
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.syncs = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.syncs += 1
            elif not func.is_view and func is not torch.ops.aten.detach.default:
                self.ops += 1
            return func(*args, **(kwargs or {}))

    plain_adam = common.adam

    def fused_adam(*a, **k):  # common.adam takes fused Adam for CUDA parameters only
        optimizer = plain_adam(*a, **k)
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = True, False
        return optimizer

    def measure(script, batch, iters):
        sys.argv = [script, "--dataset", args.data, "--batch-size", str(batch), "--max-iters", str(iters),
                    *map(str, size_flags(args.size)), "--device", "cpu", "--num-workers", "0", "--log-every", "1000",
                    *EXTRA, "--out", str(out / f"count_{Path(script).stem}")]
        ops, flops = CountOps(), FlopCounterMode(display=False)
        common.adam = fused_adam
        try:
            with ops, flops:
                runpy.run_path(str(ROOT / script), run_name="__main__")
        finally:
            common.adam = plain_adam
        return ops.ops, ops.syncs, flops.get_total_flops()

    rows = []
    for script, (batch, _) in SCRIPTS.items():
        if args.scripts and script not in args.scripts:
            continue
        one, two = measure(script, batch, 2), measure(script, batch, 3)
        ops, syncs, flops = (b - a for a, b in zip(one, two))
        rows.append({"script": script, "batch": batch, "ops": ops, "syncs": syncs, "gflop": flops / 1e9})
        print(rows[-1], flush=True)
    lines = ["| script | batch | GFLOP per iteration | GFLOP per image | operator calls per iteration | host syncs |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['script']} | {r['batch']} | {r['gflop']:.0f} | {r['gflop'] / r['batch']:.0f} | {r['ops']} | "
              f"{r['syncs']} |" for r in rows]
    return rows, lines


def losses(args, out, log):
    """fp32 seed 0, fp32 seed 1 (the run-to-run spread) and the fast flags, seed 0: the mean of
    each loss over windows of iterations, and for each loss the largest gap between window means
    of the fast run and fp32 seed 0, next to the same gap between the two fp32 seeds."""
    script = args.scripts[0] if args.scripts else "bicyclegan.py"
    base = ["--dataset", args.data, "--max-iters", args.iters, "--log-every", 1, *size_flags(args.size)]
    runs = {"fp32, seed 0": ["--seed", 0], "fp32, seed 1": ["--seed", 1], "fast flags, seed 0": ["--seed", 0, *FAST]}
    curves = {}
    for i, (name, flags) in enumerate(runs.items()):
        run(script, base + flags, out / f"losses_{i}", log)
        curves[name] = common.read_losses(out / f"losses_{i}" / "losses.csv")
    keys = [k for k in curves["fp32, seed 0"][0] if k not in ("step", "epoch", "lr")]
    window = max(1, args.iters // 5)
    rows = []
    for name, curve in curves.items():
        for start in range(0, len(curve), window):
            part = curve[start:start + window]
            rows.append({"run": name, "from": start + 1, "to": start + len(part)}
                        | {k: sum(r[k] for r in part) / len(part) for k in keys})
    lines = ["| run | iterations | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    lines += [f"| {r['run']} | {r['from']}-{r['to']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |" for r in rows]

    def largest_gap(name, k):
        pairs = zip([r for r in rows if r["run"] == name], [r for r in rows if r["run"] == "fp32, seed 0"])
        return max(abs(a[k] - b[k]) for a, b in pairs)

    lines += ["", f"| loss (mean over {window}-iteration windows) | largest gap, fast flags vs fp32 (seed 0) "
              "| largest gap, fp32 seed 1 vs seed 0 |", "|---|---|---|"]
    lines += [f"| {k} | {largest_gap('fast flags, seed 0', k):.3f} | {largest_gap('fp32, seed 1', k):.3f} |"
              for k in keys]
    plot_losses(curves, keys, out / "losses.png", window)
    return rows, lines


def plot_losses(curves, keys, path, window):
    """One panel per loss, each curve a running mean over the last window // 2 + 1 iterations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols, n_rows = 4, -(-len(keys) // 4)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3 * cols, 2.4 * n_rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[len(keys):]:
        ax.axis("off")
    for ax, k in zip(axes, keys):
        for name, curve in curves.items():
            values = [r[k] for r in curve]
            recent = [values[max(0, i - window // 2):i + 1] for i in range(len(values))]
            ax.plot(range(1, len(values) + 1), [sum(v) / len(v) for v in recent], label=name, lw=1)
        ax.set_title(k), ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def attempt(script, flags, out, log, timeout):
    """One run for the gpu part -> {ok, img_s, gib, wall_s}; a run past `timeout` seconds is
    stopped and counts as failed."""
    command = [sys.executable, str(ROOT / script), *map(str, flags), *EXTRA, "--out", str(out)]
    start = time.time()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=max(1, timeout),
                                env=dict(os.environ, NO_PROGRESS="1", LPIPS="off"))
        text, ok = result.stdout + result.stderr, result.returncode == 0
    except subprocess.TimeoutExpired as e:
        text, ok = f"{e.stdout or ''}{e.stderr or ''}\nstopped after {timeout:.0f} s (the time budget)", False
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n" + text + "\n")
    found = THROUGHPUT.findall(text) if ok else []  # none when the run had no iteration after warm-up
    rate, memory = found[-1] if found else (None, None)
    print(f"{'ok' if ok else 'FAILED'}: {' '.join(command[1:])} ({time.time() - start:.0f} s)", flush=True)
    return {"ok": ok, "img_s": float(rate) if rate else None, "gib": float(memory) if memory else None,
            "wall_s": round(time.time() - start, 1)}


def gpu(args, out, log):
    """The whole GPU check in one call, within --budget seconds of wall time (compilation and
    start-up included; what does not fit is marked 'not run'). On a copy of the data set, per
    script: train --iters iterations with the default flags; continue that checkpoint (--resume)
    for --iters more with the fast flags, which also moves it to another layout and precision;
    --test the result, whose grid.png is copied next to the table. Writes gpu.md: images/s and
    peak memory of both runs, the official figure, fast / official, and the grids."""
    import shutil
    import torch
    deadline = time.time() + args.budget
    data = out / "data" / Path(args.data).name  # under --out, so never inside the repository's tracked files
    if not data.is_dir():
        shutil.copytree(args.data, data)
    fast = [f for f in FAST if not (args.no_compile and f == "--compile")]
    rows = []
    for script, (batch, official) in SCRIPTS.items():
        if args.scripts and script not in args.scripts:
            continue
        stem, row = Path(script).stem, {"script": script, "batch": batch, "official": official}
        base = ["--dataset", data, "--batch-size", batch, *size_flags(args.size), "--log-every", args.iters]
        first, second = out / f"gpu_{stem}_default", out / f"gpu_{stem}_fast"
        runs = [("default", base + ["--max-iters", args.iters], first),
                ("fast", base + ["--max-iters", 2 * args.iters, "--resume", "--checkpoint", first / "latest.pt", *fast],
                 second),
                ("test", ["--dataset", data, "--test", "--num-test", 8, "--n-samples", 5], second)]
        for name, flags, folder in runs:
            left = deadline - time.time()
            result = attempt(script, flags, folder, log, left) if left > 1 else {"ok": None}
            row |= {f"{name}_{k}": v for k, v in result.items()}
            if not result["ok"]:
                break  # what follows needs this run's checkpoint
        if row.get("test_ok"):  # test/grid.png (CycleGAN: test/AtoB/grid.png and test/BtoA/grid.png)
            shutil.copy(sorted((second / "test").rglob("grid.png"))[0], out / f"grid_{stem}.png")
        rows.append(row)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and "cpu" not in EXTRA else "CPU"
    lines = [f"{device}, {args.size} px, {args.iters} + {args.iters} iterations per script, fast flags "
             f"{' '.join(fast)} (the fast run resumes the default run's checkpoint), "
             f"{time.time() - deadline + args.budget:.0f} s in all.", "",
             "| script | batch | official img/s | default img/s | peak GiB | fast img/s | peak GiB | fast / official "
             "| resume | test | samples |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    status = {True: "ok", False: "failed", None: "not run"}
    for r in rows:
        ratio = f"{r['fast_img_s'] / r['official']:.2f}x" if r["official"] and r.get("fast_img_s") else ""
        grid = f"![{r['script']}](grid_{Path(r['script']).stem}.png)" if r.get("test_ok") else ""
        lines.append(f"| {r['script']} | {r['batch']} | {r['official'] or ''} | {fmt(r.get('default_img_s'))} | "
                     f"{fmt(r.get('default_gib'), 2)} | {fmt(r.get('fast_img_s'))} | {fmt(r.get('fast_gib'), 2)} | "
                     f"{ratio} | {status[r.get('fast_ok')]} | {status[r.get('test_ok')]} | {grid} |")
    return rows, lines


def layout(args, out, log):
    """--channels-last against the default layout on the CPU: each script's own networks and
    train_step at --size px, default widths, in this process. The two layouts alternate
    iteration by iteration and each iteration is timed in CPU seconds of this process, so that
    other load on the machine weighs on both alike; the median of --iters iterations per layout."""
    import runpy
    import statistics
    import torch
    rows = []
    for script, (batch, _) in SCRIPTS.items():
        if args.scripts and script not in args.scripts:
            continue
        module = runpy.run_path(str(ROOT / script))
        # a data set name gives the default widths (64 channels); nothing is downloaded to parse options
        script_args = module["parse_args"](["--dataset", "facades", "--load-size", str(args.size),
                                            "--crop-size", str(args.size)])
        script_args.amp = False
        times = {}
        for name in ("default", "channels_last"):
            torch.manual_seed(0)
            nets = module["build_networks"](script_args, torch.device("cpu"))
            if name == "channels_last":
                nets = [net.to(memory_format=torch.channels_last) for net in nets]
            optims = ([common.adam([nets[0], nets[1]], 1e-4), common.adam([nets[2], nets[3]], 1e-4)]
                      if script in ("cyclegan.py", "munit.py") else [common.adam(net, 1e-4) for net in nets])
            pools = [common.ImagePool(0), common.ImagePool(0)]
            times[name] = (nets, optims, pools, [])
        real = torch.rand(batch, 3, args.size, args.size) * 2 - 1
        for i in range(args.iters + 1):  # the first iteration of each layout is a warm-up
            for name, (nets, optims, pools, spent) in times.items():
                start = time.process_time()
                step_args = (nets, optims, pools, real, real, script_args) if script == "cyclegan.py" else \
                    (nets, optims, real, real, script_args)
                module["train_step"](*step_args)
                if i:
                    spent.append(time.process_time() - start)
        medians = {name: statistics.median(spent) for name, (_, _, _, spent) in times.items()}
        rows.append({"script": script, "batch": batch, "size": args.size} | medians)
        print(rows[-1], flush=True)
    lines = ["| script | batch | default layout, s per iteration | channels-last, s per iteration | channels-last / default |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['script']} | {r['batch']} | {r['default']:.2f} | {r['channels_last']:.2f} | "
              f"{r['channels_last'] / r['default']:.2f} |" for r in rows]
    return rows, lines


def fmt(x, digits=1):
    return "" if x is None else f"{x:.{digits}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["table", "scaling", "losses", "count", "gpu", "layout"])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "facades"),
                   help="a paired data set folder (default ../shared/data/facades)")
    p.add_argument("--iters", type=int, default=150, help="iterations per run (losses: 300 recommended; gpu: 100)")
    p.add_argument("--scripts", nargs="+", help="only these scripts (losses: the first; default bicyclegan.py)")
    p.add_argument("--size", type=int, default=256, help="crop size for 'losses' and 'count'")
    p.add_argument("--out", default="runs/benchmark")
    p.add_argument("--budget", type=float, default=480, help="gpu: seconds of wall time for the whole check")
    p.add_argument("--no-compile", action="store_true", help="gpu: fast flags without --compile (a CPU check)")
    args, extra = p.parse_known_args()  # flags this script does not know go to every run
    if args.part == "gpu" and "--iters" not in sys.argv:
        args.iters = 100
    EXTRA[:] = [f for f in extra if f != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"table": table, "scaling": scaling, "losses": losses, "count": count, "gpu": gpu, "layout": layout}
    rows, lines = parts[args.part](args, out, out / f"{args.part}.log")
    (out / f"{args.part}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / f"{args.part}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
