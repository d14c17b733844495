"""Started by tests/test_distributed.py under torchrun (2 CPU processes, gloo): a few training
steps of each script's own networks, optimizers and train_step, wrapped as the script's main()
wraps them, on fixed random images. After every step rank 0 records whether the weights are
bitwise equal on all ranks, the losses averaged over ranks, and the gradients and weights.

    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_check.py OUT.pt
"""
import importlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

STEPS = 3
# name: (script, flags, what its main() passes to common.distribute). The deterministic ones (no
# random draws: no z, no dropout, no image pool) are also compared with one process in the test,
# in float64: at the --quick sizes CycleGAN's float32 gradients differ from float64 ones by ~2e-3
# (relative), so float32 runs of the same sum in two orders differ as much and prove nothing.
COMPARED = {"cyclegan_no_pool", "cvae_gan_deterministic"}
CONFIGS = {
    "pix2pix_noise": ("pix2pix_noise", [], {}),
    "cvae_gan": ("cvae_gan", [], {}),
    "cvae_gan_deterministic": ("cvae_gan", ["--deterministic", "--no-dropout"], {"find_unused": [1]}),
    "clr_gan": ("clr_gan", [], {"find_unused": [1]}),
    "bicyclegan": ("bicyclegan", [], {}),
    "bicyclegan_batchnorm": ("bicyclegan", ["--norm", "batch", "--batch-size", "4"], {}),
    "cyclegan": ("cyclegan", [], {}),
    "cyclegan_no_pool": ("cyclegan", ["--pool-size", "0"], {}),
    "munit": ("munit", [], {"methods": ("encode", "decode")}),
    "divco": ("divco", [], {}),
    "divco_unpaired": ("divco", ["--setting", "unpaired"], {"find_unused": [1]}),
}


def setup(script, flags, seed=0, dtype=torch.float32):
    """A script's args, networks, optimizers and the extra state its train_step takes (as main)."""
    module = importlib.import_module(script)
    args = module.parse_args(["--quick", "--device", "cpu", *flags])
    common.seed_everything(seed)
    nets = [net.to(dtype) for net in module.build_networks(args, torch.device("cpu"))]
    betas = (args.beta1, 0.999)
    if script == "cyclegan":
        optims = [common.adam(nets[:2], args.lr, betas), common.adam(nets[2:], args.lr, betas)]
        extra = [[common.ImagePool(args.pool_size), common.ImagePool(args.pool_size)]]
    elif script == "munit":
        optims = [common.adam(nets[:2], args.lr, betas, args.weight_decay),
                  common.adam(nets[2:], args.lr, betas, args.weight_decay)]
        extra = []
    else:
        optims, extra = [common.adam(net, args.lr, betas) for net in nets], []
    step = module.train_step_unpaired if getattr(args, "setting", "paired") == "unpaired" else module.train_step
    return args, nets, optims, extra, step


def images(args, n, seed=1, dtype=torch.float32):
    """n fixed random image pairs in [-1, 1], the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    size = (n, 3, args.crop_size, args.crop_size)
    return [(torch.rand(size, generator=g) * 2 - 1).to(dtype) for _ in "AB"]


def flat(tensors):
    return torch.cat([t.detach().flatten() for t in tensors])


def grads(nets):
    return flat([p.grad if p.grad is not None else torch.zeros_like(p) for net in nets for p in net.parameters()])


def weights(nets):
    return flat([p for net in nets for p in net.parameters()])


def main(out):
    common.setup_distributed("cpu")
    rank, world = common.rank(), common.world_size()
    results = {}
    for name, (script, flags, kwargs) in CONFIGS.items():
        dtype = torch.float64 if name in COMPARED else torch.float32
        args, nets, optims, extra, train_step = setup(script, flags, dtype=dtype)
        kwargs = dict(kwargs, find_unused=[nets[i] for i in kwargs.get("find_unused", [])])
        train_nets = common.distribute(nets, torch.device("cpu"), **kwargs)
        real_A, real_B = images(args, args.batch_size * world, dtype=dtype)
        mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)  # this rank's share
        steps = []
        for _ in range(STEPS):
            losses = train_step(train_nets, optims, *extra, real_A[mine], real_B[mine], args)
            w = weights(nets)
            everyone = [torch.empty_like(w) for _ in range(world)]
            torch.distributed.all_gather(everyone, w)
            steps.append({"equal": all(torch.equal(everyone[0], x) for x in everyone),
                          "losses": common.mean_over_ranks(losses), "grads": grads(nets), "weights": w})
        results[name] = steps
        torch.distributed.barrier()
    if common.is_main():
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
