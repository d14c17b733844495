"""Does a batch-norm D reward diversity? pix2pix+noise on the toy data, G's norm and D's norm apart.

pix2pix+noise has no term that pays for using z, so the paper expects one output per input. With
the toy's batch norm it reached three colours per input in the study (README). A batch-norm D
normalises each batch it sees (16 reals, then 16 fakes) by that batch's own statistics, so it can
tell a batch of one colour from a batch of four, as minibatch discrimination does; a batch-norm G
is the other candidate. This trains pix2pix_noise.py's own train_step with G built with --norm-g
and D with --norm-d (every other option: the script's toy defaults, common.TOY_PAIRED_TRAINING)
and scores 10 prior samples for each of the 20 test inputs (eval mode), every --probe-every steps.

    python notebooks/diagnose_d_norm.py --seeds 0 1 --norm-g batch --norm-d layer
    python notebooks/diagnose_d_norm.py --seeds 0 1 --norm-g layer --norm-d batch
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "notebooks"))
import common  # noqa: E402
import pix2pix_noise  # noqa: E402
from diagnose_z import next_batch, toy_pairs  # noqa: E402


@torch.no_grad()
def scores(netG, test, nz, generator):
    """Mode coverage and valid share of 10 prior samples per test input, eval mode."""
    netG.eval()
    cover, valid = [], []
    for a, _, _ in test:
        s = common.toy_scores(a, list(netG(a[None].expand(10, -1, -1, -1), torch.randn(10, nz, generator=generator))))
        cover.append(s["coverage"]), valid.append(s["valid"])
    netG.train()
    return {"coverage": round(sum(cover) / len(cover), 3), "valid": round(sum(valid) / len(valid), 3)}


def run(seed, norm_g, norm_d, iters, probe_every, flags, epoch_size=200):
    args = pix2pix_noise.parse_args(["--seed", str(seed)] + flags)
    common.seed_everything(seed)
    args.norm, args.norm_g, args.norm_d = norm_g, None, None  # G and D set apart below, through --norm
    netG = pix2pix_noise.build_networks(args, torch.device("cpu"))[0]
    args.norm = norm_d
    netD = pix2pix_noise.build_networks(args, torch.device("cpu"))[1]
    nets = [netG, netD]
    optims = [common.adam(net, args.lr, (args.beta1, 0.999)) for net in nets]
    epochs = iters // epoch_size
    schedulers = [common.linear_decay(opt, epochs // 2, epochs - epochs // 2) for opt in optims]
    train, test = toy_pairs(400, seed), toy_pairs(20, 10_000 + seed)
    generator, stream = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(seed * 100003)
    history, order, step, start = [], [], 0, time.process_time()
    for epoch in range(epochs):
        for _ in range(epoch_size):
            A, B, order = next_batch(train, order, args.batch_size, stream)
            pix2pix_noise.train_step(nets, optims, A, B, args)
            step += 1
            if step % probe_every == 0:
                history.append(dict(step=step, **scores(netG, test, args.nz, generator)))
                print(f"G {norm_g}, D {norm_d}, seed {seed}", history[-1], f"cpu {time.process_time() - start:.0f}s",
                      flush=True)
        for s in schedulers:
            s.step()
    return history


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--norm-g", default="batch", choices=["instance", "batch", "layer", "none"])
    p.add_argument("--norm-d", default="batch", choices=["instance", "batch", "layer", "none"])
    p.add_argument("--iters", type=int, default=3000, help="3000: the toy schedule when its figures were "
                   "measured (60 + 60 epochs of 25 steps; 90 + 90 since 2026-12-07)")
    p.add_argument("--probe-every", type=int, default=1000)
    p.add_argument("--out", default="runs/diagnose_d_norm")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="pix2pix_noise.py flags for every run")
    a = p.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        history = run(seed, a.norm_g, a.norm_d, a.iters, a.probe_every, a.flags)
        name = f"G{a.norm_g}_D{a.norm_d}{'_'.join(a.flags).replace('--', '_')}_seed{seed}.json"
        (out / name).write_text(json.dumps({"norm_g": a.norm_g, "norm_d": a.norm_d, "flags": a.flags, "seed": seed,
                                            "history": history}, indent=1) + "\n")


if __name__ == "__main__":
    main()
