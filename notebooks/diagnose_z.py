"""Why does BicycleGAN's G ignore z on the toy data? Controlled probes, one factor at a time.

Trains bicyclegan.py's own train_step and networks on the toy task and, every --probe-every
iterations, measures:
- z_effect: mean L1 (images in [0, 1]) between G(A, z1) and G(A, z2) for prior codes, over 16
  training inputs (eval mode): how much the output moves when z moves;
- enc_train / enc_test: share of inputs whose encoded output G(A, mu(E(B))) has the ground
  truth's colour, on 40 training and the 20 test pairs;
- probe: accuracy of a nearest-centroid classifier of the target colour on E's mu (fitted on
  training pairs, scored on test pairs): does E's code carry the colour at all;
- coverage / valid: the toy metrics of 10 prior samples per test input;
- enc_train_batchstats (batch norm only): enc_train with batch statistics instead of running ones;
- enc_train_as_trained: enc_train as the training L1 sees it (training mode, z drawn from E(B));
  sigma: E's mean sigma on training targets; mu_sd: the spread of E's mean over them (per dimension);
- pull_l1 / pull_gan / pull_kl: how hard each term of the encoded half pulls on E's mean.

    python notebooks/diagnose_z.py --seeds 0 1 --iters 2000 --probe-every 500 --flags --norm instance
    python notebooks/diagnose_z.py --seeds 0 1 --iters 2000 --probe-every 500 --flags --norm batch
    python notebooks/diagnose_z.py --encoded-confusion runs/bicyclegan_toy   # a trained run's encoded colours

The networks and losses take bicyclegan.py's toy defaults (16-channel nets, batch norm, 16 pairs
a step, lambda_KL 0.01 / 8; common.TOY_PAIRED_TRAINING) unless --flags changes them; the old toy
run is --flags --norm instance --batch-size 2 --lambda-kl 0.01. The schedule is the script's own:
--iters iterations, linear decay over the second half. Variants change the data: fixed<N> (N
fixed training pairs, default 400) or fresh (new pairs every epoch). --gan-after N turns G's two
GAN terms off until iteration N, --gan-ramp N ramps them in linearly over N iterations (the
discriminators train throughout); both are probes of the training order, not options of the script.
--norm-d builds the two Ds with another norm than G and E.
"""
import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bicyclegan  # noqa: E402
import common  # noqa: E402


def toy_pairs(count, seed):
    """count (A, B, colour) toy pairs drawn by the toy data's own generator."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        shape, colour = common._toy_shape(rng), rng.randrange(len(common.TOY_PALETTE))
        shade = rng.uniform(-common.TOY_SHADE, common.TOY_SHADE)
        A = common.to_tensor(common.draw_toy(shape), 3)
        B = common.to_tensor(common.draw_toy(shape, colour, shade), 3)
        pairs.append((A, B, colour))
    return pairs


def next_batch(train, order, batch_size, stream):
    """The next batch_size training pairs (A, B) of the shuffled order (a new pass when it runs out),
    flipped together half of the time as the toy data's loader does; returns A, B and what is left."""
    if len(order) < batch_size:
        order = torch.randperm(len(train), generator=stream).tolist()
    idx, order = order[:batch_size], order[batch_size:]
    A, B = torch.stack([train[j][0] for j in idx]), torch.stack([train[j][1] for j in idx])
    if torch.rand((), generator=stream) < 0.5:  # the toy's horizontal flip
        A, B = A.flip(-1), B.flip(-1)
    return A, B, order


def pulls_on_mu(netG, netE, netD, train, generator, args):
    """What each loss term of the encoded half asks of E's mean: the mean |d term / d mu| over
    16 training pairs (two half-batches of 8, training mode, z = mu + sigma * eps as in training),
    for the image L1, D's GAN term and the KL, each with the run's weight (--lambda-l1, --lambda-gan,
    --lambda-kl; L1 a mean over the 8, KL a sum, as in train_step)."""
    G, E, D = copy.deepcopy(netG).train(), copy.deepcopy(netE).train(), copy.deepcopy(netD).train()
    pulls = {"pull_l1": 0.0, "pull_gan": 0.0, "pull_kl": 0.0}
    for i in (0, 8):
        A = torch.stack([a for a, _, _ in train[i:i + 8]])
        B = torch.stack([b for _, b, _ in train[i:i + 8]])
        with torch.enable_grad():
            mu, logvar = E(B)
            mu = mu.detach().requires_grad_()
            eps = torch.randn(mu.shape, generator=generator)
            fake = G(A, mu + eps * torch.exp(0.5 * logvar.detach()))
            terms = {"pull_l1": args.lambda_l1 * bicyclegan.image_l1(fake, B),
                     "pull_gan": args.lambda_gan * common.gan_loss(D(fake), True, args.gan_mode),
                     "pull_kl": args.lambda_kl * bicyclegan.kl_loss(mu, logvar.detach())}
            for name, term in terms.items():
                grad, = torch.autograd.grad(term, mu, retain_graph=True)
                pulls[name] += float(grad.abs().mean()) / 2
    return {k: float(f"{v:.2e}") for k, v in pulls.items()}


def batch_norm_on_batch_statistics(net):
    """Eval mode (no dropout) except the batch norms, which normalise with the batch's own statistics."""
    net.eval()
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()


@torch.no_grad()
def probes(netG, netE, netD, train, test, generator, args):
    nz = args.nz
    netG.eval(), netE.eval()
    A = torch.stack([a for a, _, _ in train[:16]])
    z1, z2 = torch.randn(16, nz, generator=generator), torch.randn(16, nz, generator=generator)
    z_effect = float(((netG(A, z1) - netG(A, z2)).abs() / 2).mean())

    def encoded_accuracy(pairs, G=netG, E=netE):
        A = torch.stack([a for a, _, _ in pairs])
        B = torch.stack([b for _, b, _ in pairs])
        mu, _ = E(B)
        out = G(A, mu)
        right = [common.toy_mode(o) == c for o, (_, _, c) in zip(out, pairs)]
        per_colour.append([round(sum(r for r, (_, _, c) in zip(right, pairs) if c == k)
                                 / max(1, sum(c == k for _, _, c in pairs)), 2) for k in range(4)])
        return sum(right) / len(pairs), mu

    per_colour = []  # encoded right per target colour (red, green, blue, yellow), first call: train pairs
    enc_train, mu_train = encoded_accuracy(train[:200])
    enc_per_colour = per_colour[0]
    enc_test, mu_test = encoded_accuracy(test)
    batch_stats = {}
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in netG.modules()):
        # the same encoded output with batch norm on batch statistics (8 pairs at a time, as in
        # training) instead of its running averages: tells an eval-mode artefact from a real miss
        G, E = copy.deepcopy(netG), copy.deepcopy(netE)
        batch_norm_on_batch_statistics(G), batch_norm_on_batch_statistics(E)
        right = sum(encoded_accuracy(train[i:i + 8], G, E)[0] * 8 for i in range(0, 200, 8))
        batch_stats = {"enc_train_batchstats": round(right / 200, 3)}
    # the encoded output as the L1 of training sees it: every layer in training mode (dropout,
    # batch statistics of 8 pairs) and z drawn from E(B) by the reparameterisation, not its mean
    G, E = copy.deepcopy(netG).train(), copy.deepcopy(netE).train()
    right, sigma = 0, []
    for i in range(0, 200, 8):
        A = torch.stack([a for a, _, _ in train[i:i + 8]])
        B = torch.stack([b for _, b, _ in train[i:i + 8]])
        mu, logvar = E(B)
        out = G(A, bicyclegan.reparameterize(mu, logvar))
        right += sum(common.toy_mode(o) == c for o, (_, _, c) in zip(out, train[i:i + 8]))
        sigma.append(torch.exp(0.5 * logvar).mean())
    batch_stats |= {"enc_train_as_trained": round(right / 200, 3), "sigma": round(float(torch.stack(sigma).mean()), 3),
                    "mu_sd": round(float(mu_train.std(0).mean()), 3)}
    batch_stats |= pulls_on_mu(netG, netE, netD, train, generator, args)
    colours_train = torch.tensor([c for _, _, c in train[:200]])
    centroids = torch.stack([mu_train[colours_train == k].mean(0) if (colours_train == k).any()
                             else torch.full((nz,), float("inf")) for k in range(4)])
    # are E's codes for the four colours apart? (the smallest distance between two colours' centroids)
    gaps = torch.cdist(centroids, centroids) + torch.diag(torch.full((4,), float("inf")))
    batch_stats["mu_min_gap"] = round(float(gaps.min()), 3)
    batch_stats["enc_train_per_colour"] = enc_per_colour
    guess = torch.cdist(mu_test, centroids).argmin(1)
    probe = float((guess == torch.tensor([c for _, _, c in test])).float().mean())
    cover, valid = [], []
    for a, _, _ in test:
        z = torch.randn(10, nz, generator=generator)
        s = common.toy_scores(a, list(netG(a[None].expand(10, -1, -1, -1), z)))
        cover.append(s["coverage"]), valid.append(s["valid"])
    netG.train(), netE.train()
    return {"z_effect": round(z_effect, 4), "enc_train": round(enc_train, 3), "enc_test": round(enc_test, 3),
            "probe": round(probe, 3), "coverage": round(sum(cover) / len(cover), 3),
            "valid": round(sum(valid) / len(valid), 3), **batch_stats}


@torch.no_grad()
def pathways(size=64, ngf=16, norm="instance", seed=0):
    """At initialisation: how much the output moves when z moves, with z reaching G through all
    levels or through one down level only (the z weights of the other levels set to zero)."""
    torch.manual_seed(seed)
    netG = common.init_weights(common.UNetGenerator(3, 3, 8, size, ngf, norm, use_dropout=False), "xavier", 0.02)
    A = torch.rand(4, 3, size, size) * 2 - 1
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    result = {"all": float((netG(A, z1) - netG(A, z2)).abs().mean())}
    state = {k: v.clone() for k, v in netG.state_dict().items()}
    for keep in range(len(netG.downs)):
        netG.load_state_dict(state)
        for d, down in enumerate(netG.downs):
            conv = next(m for m in down if isinstance(m, torch.nn.Conv2d))
            if d != keep:
                conv.weight[:, conv.in_channels - 8:] = 0  # the last 8 input channels are the tiled z
        result[f"level {keep}"] = float((netG(A, z1) - netG(A, z2)).abs().mean())
    return result


@torch.no_grad()
def encoded_confusion(out, flags, e_train_mode=False, g_train_mode=False):
    """For a trained toy run folder: per target colour, which colour the encoded output G(A, mu(E(B)))
    shows on the 400 training pairs, how far apart E's mean codes of the four colours are, E's mean
    sigma, the centroids' distances from the origin, whether each code lies nearest its own colour's centroid, the share right by the target's
    coloured area (thirds of the pairs, smallest first) and, per colour, the correlation between that
    area and the code's distance from the mean of all codes.
    e_train_mode: E normalises with the statistics of 8 targets at a time (shuffled), as in
    train_step's encoded half-batch, instead of its running averages (G stays in eval mode).
    g_train_mode: G's batch norms likewise use the statistics of the 8 pairs (dropout stays off), as G
    saw its encoded half-batch in training; the running averages also hold the prior-code passes."""
    args = bicyclegan.parse_args(["--out", str(out)] + flags)
    ckpt = common.load_checkpoint(Path(out) / "latest.pt", "cpu", args)
    netG, netE, _, _ = bicyclegan.build_networks(args, torch.device("cpu"))
    netG.load_state_dict(ckpt["netG"]), netE.load_state_dict(ckpt["netE"])
    netG.eval(), netE.train(e_train_mode)
    if g_train_mode:
        batch_norm_on_batch_statistics(netG)
    dataset = common.paired_dataset(args, train=True)
    confusion = [[0] * 5 for _ in range(4)]  # rows: target colour; columns: output colour, last: no clean colour
    sigmas = []  # E's sigma per target and dimension
    rows = []  # per pair: target colour, coloured area (share of the image), encoded right, mu
    batch_statistics = e_train_mode or g_train_mode
    step = 8 if batch_statistics else 20
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist() if batch_statistics \
        else list(range(len(dataset)))
    for i in range(0, len(dataset), step):
        items = [dataset[j] for j in order[i:i + step]]
        mu, logvar = netE(torch.stack([it["B"] for it in items]))
        sigmas.append(torch.exp(0.5 * logvar))
        for item, m, output in zip(items, mu, netG(torch.stack([it["A"] for it in items]), mu)):
            target = common.toy_mode(item["B"])
            confusion[target][common.toy_mode(output)] += 1
            area = float(common.toy_foreground(item["B"]).float().mean())
            rows.append((target, area, common.toy_mode(output) == target, m))
    centroids = torch.stack([torch.stack([r[3] for r in rows if r[0] == colour]).mean(0) for colour in range(4)])
    by_area = sorted(rows, key=lambda r: r[1])
    thirds = [by_area[k * len(rows) // 3:(k + 1) * len(rows) // 3] for k in range(3)]
    mean_code = torch.stack([r[3] for r in rows]).mean(0)
    correlation = []
    for colour in range(4):
        area = torch.tensor([r[1] for r in rows if r[0] == colour])
        distance = torch.stack([(r[3] - mean_code).norm() for r in rows if r[0] == colour])
        correlation.append(round(float(torch.corrcoef(torch.stack([area, distance]))[0, 1]), 2))
    # can E's codes tell the colours apart at all? (each code nearest its own colour's centroid)
    nearest = sum(int(torch.cdist(r[3][None], centroids).argmin()) == r[0] for r in rows) / len(rows)
    return {"confusion": confusion,
            "centroid_distances": [[round(float(d), 2) for d in row] for row in torch.cdist(centroids, centroids)],
            "centroid_norms": [round(float(c.norm()), 2) for c in centroids],  # the prior's samples lie ~sqrt(nz) out
            "codes_nearest_own_centroid": round(nearest, 3), "sigma": round(float(torch.cat(sigmas).mean()), 3),
            "area_thirds": [round(sum(r[1] for r in t) / len(t), 3) for t in thirds],
            "right_by_area_third": [round(sum(r[2] for r in t) / len(t), 3) for t in thirds],
            "area_vs_code_distance_per_colour": correlation}


def run(variant, seed, iters, probe_every, flags, epoch_size=200, gan_after=0, gan_ramp=0, norm_d=None):
    args = bicyclegan.parse_args(["--seed", str(seed)] + flags)
    lambda_gans = args.lambda_gan, args.lambda_gan2
    common.seed_everything(seed)
    nets = bicyclegan.build_networks(args, torch.device("cpu"))
    if norm_d:  # the two Ds with another norm than G and E (notebooks/when_g_ignores_z.md, A correction)
        norm, args.norm = args.norm, norm_d
        nets[2:] = bicyclegan.build_networks(args, torch.device("cpu"))[2:]
        args.norm = norm
    optims = [common.adam(net, args.lr, (args.beta1, 0.999)) for net in nets]
    epochs = iters // epoch_size
    schedulers = [common.linear_decay(opt, epochs // 2, epochs - epochs // 2) for opt in optims]
    test = toy_pairs(20, 10_000 + seed)
    fresh = variant == "fresh"
    n_pairs = 400 if fresh else int(variant.removeprefix("fixed"))
    train = toy_pairs(n_pairs, seed)
    generator = torch.Generator().manual_seed(1234)
    history = [dict(step=0, **probes(nets[0], nets[1], nets[2], train, test, generator, args))]
    step, start = 0, time.process_time()
    stream = torch.Generator().manual_seed(seed * 100003)
    order = []
    for epoch in range(epochs):
        if fresh and epoch > 0:
            train, order = toy_pairs(n_pairs, seed * 1000 + epoch), []
        for _ in range(epoch_size):
            A, B, order = next_batch(train, order, args.batch_size, stream)
            if gan_after or gan_ramp:  # G's two GAN terms off until gan_after, or ramped in over gan_ramp
                weight = float(step >= gan_after) if gan_after else min(1.0, step / gan_ramp)
                args.lambda_gan, args.lambda_gan2 = weight * lambda_gans[0], weight * lambda_gans[1]
            bicyclegan.train_step(nets, optims, A, B, args)
            args.lambda_gan, args.lambda_gan2 = lambda_gans  # the probes (pull_gan) use the full weights
            step += 1
            if step % probe_every == 0:
                history.append(dict(step=step, **probes(nets[0], nets[1], nets[2], train, test, generator, args)))
                print(variant, " ".join(flags), seed, history[-1], f"cpu {time.process_time() - start:.0f}s",
                      flush=True)
        for s in schedulers:
            s.step()
    return history


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", help="fixed<N> or fresh (repeatable; default fixed400)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--iters", type=int, default=6000)
    p.add_argument("--probe-every", type=int, default=1000)
    p.add_argument("--out", default="runs/diagnose_z")
    p.add_argument("--gan-after", type=int, default=0, help="G's two GAN terms off until this iteration, then on")
    p.add_argument("--gan-ramp", type=int, default=0, help="G's two GAN terms ramped in linearly over these iterations")
    p.add_argument("--norm-d", choices=["instance", "batch", "layer", "none"], help="the Ds' norm (default: --norm's)")
    p.add_argument("--palette", type=int, nargs=12, help="trial: the toy's four colours (12 RGB values)")
    p.add_argument("--encoded-confusion", metavar="RUN", help="only the encoded output's colours of a trained "
                   "bicyclegan.py toy run folder (its flags after --flags)")
    p.add_argument("--e-train-mode", action="store_true", help="with --encoded-confusion: E with batch statistics "
                   "of 8 targets, as in training")
    p.add_argument("--g-train-mode", action="store_true", help="with --encoded-confusion: G's batch norms with "
                   "the statistics of 8 pairs, as G's encoded half-batch in training (dropout off)")
    p.add_argument("--pathways", action="store_true", help="only the per-level z pathways at initialisation")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="bicyclegan.py flags for every run")
    a = p.parse_args()
    if a.palette:
        common.TOY_PALETTE = tuple(tuple(a.palette[i:i + 3]) for i in (0, 3, 6, 9))
    torch.set_num_threads(1)
    if a.encoded_confusion:
        print(json.dumps(encoded_confusion(a.encoded_confusion, a.flags, a.e_train_mode, a.g_train_mode)))
        return
    if a.pathways:
        for size, ngf in ((64, 16), (256, 64)):
            for norm in ("instance", "batch", "none"):
                print(f"{size} px, ngf {ngf}, {norm}:", {k: f"{v:.1e}" for k, v in pathways(size, ngf, norm).items()})
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for variant in a.variant or ["fixed400"]:
        for seed in a.seeds:
            name = f"{variant}{'_'.join(a.flags).replace('--', '_')}_seed{seed}"
            history = run(variant, seed, a.iters, a.probe_every, a.flags, gan_after=a.gan_after, gan_ramp=a.gan_ramp,
                          norm_d=a.norm_d)
            (out / f"{name}.json").write_text(json.dumps({"variant": variant, "flags": a.flags, "seed": seed,
                                                          "history": history}, indent=1) + "\n")


if __name__ == "__main__":
    main()
