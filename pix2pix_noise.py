r"""pix2pix+noise -- the first baseline of "Toward Multimodal Image-to-Image Translation", Zhu, Zhang,
Pathak, Darrell, Efros, Wang, Shechtman (NeurIPS 2017), arXiv:1711.11586v4, §3.1 and Fig. 2(b).

What it adds: this is where the family starts. pix2pix (Isola et al., arXiv:1611.07004) learns
G(A) with a GAN loss and an image L1 loss; here G also takes a random code z ~ N(0, I), tiled and
concatenated as in Fig. 2(b). Nothing in the objective makes G use z: the L1 loss pulls every
output towards the one ground truth, so G learns to ignore z and its samples hardly differ (the
paper's Fig. 6: LPIPS diversity 0.013 on maps, against 0.110 for BicycleGAN). cvae_gan.py adds
an encoder that makes z carry information about B.

Full objective, Eq. (3):
    G^* = \arg\min_{G} \max_{D} \mathcal{L}_{GAN}(G, D) + \lambda \mathcal{L}^{image}_{1}(G)
with Eq. (1)
    \mathcal{L}_{GAN}(G, D) = \mathbb{E}_{A,B}[\log D(A, B)] + \mathbb{E}_{A,z}[\log(1 - D(A, G(A, z)))]
and Eq. (2)
    \mathcal{L}^{image}_{1}(G) = \mathbb{E}_{A,B,z} \| B - G(A, z) \|_1

Symbols (paper -> code):
    A, B                 real_A, real_B (input, target; BtoA swaps the halves of the files)
    z ~ N(0, I)          z_random
    G(A, z)              fake_B_random
    D                    netD (two scales; sees B only, or A||B with --pix2pix-original)
    lambda               --lambda-l1 10 (paper §4; 100 with --pix2pix-original, pix2pix paper)

Update order, per batch, as in both official pix2pix codes (pytorch-CycleGAN-and-pix2pix and the
pix2pix model of the BicycleGAN repository): the whole batch goes through G with one z per image;
first D on the detached fake, then one backward of GAN + L1 through G against the updated D and
one step of G. This is the one update order that differs from the other three paired scripts,
which follow the BicycleGAN model (G and E first, then D).

Deviations:
- From the paper: LSGAN and a D that does not see A, as the paper's §4 does for all its methods
  (Eq. (1) is written with D(A, B)); batch 2 (the paper uses batch 1), so that each step sees
  as many images as a step of bicyclegan.py; here both images go through the one branch.
- From the official pix2pix code, which has no z at all: z is injected as in bicyclegan.py
  (same U-Net, same two-scale D, same init) so that the scripts differ only in their objective.
  --pix2pix-original restores four of the original choices: D conditioned on A||B, vanilla GAN
  loss, lambda = 100 and D's loss halved. It keeps the rest (two-scale D, instance norm, xavier
  init, z input, no dropout at test time); --norm batch --batch-size 1 come closer still.

Usage:
    python pix2pix_noise.py                               # built-in toy data, CPU in minutes
    python pix2pix_noise.py --dataset maps                # downloads maps, 200 + 200 epochs
    python pix2pix_noise.py --dataset maps --test --n-samples 10 [--sync]
"""
import argparse
from pathlib import Path

import torch

import common

# ---------------------------------------------------------------------------------------------
# 2. Options (defaults: paper §4 and the official training scripts; per-dataset ones in common)
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="pix2pix+noise (arXiv:1711.11586 baseline): paired translation with z")
    p.add_argument("--dataset", default="toy", help="toy (built-in), a known name (facades, maps, "
                   "edges2shoes, edges2handbags, night2day) or a folder with train/ and test/ or val/")
    p.add_argument("--direction", choices=["AtoB", "BtoA"], help="default: the dataset's (BtoA for facades, maps)")
    p.add_argument("--load-size", type=int, help="resize to this square size, then crop (default: per dataset)")
    p.add_argument("--crop-size", type=int, help="training crop size = network input size (default: per dataset)")
    p.add_argument("--input-nc", type=int, help="input channels (1 for edges2*, default: per dataset)")
    p.add_argument("--output-nc", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2, help="all of it through G (2: as many images a step as bicyclegan.py)"
                   "; 16 on the toy data; per process under torchrun (README, Multi-GPU)")
    p.add_argument("--epochs", type=int, help="epochs at the initial learning rate (default: per dataset)")
    p.add_argument("--epochs-decay", type=int, help="epochs of linear decay to zero (default: per dataset)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (paper §4)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (official code)")
    p.add_argument("--nz", type=int, default=8, help="|z| (paper §4)")
    p.add_argument("--ngf", type=int, help="G width (default 64; 16 on the toy data)")
    p.add_argument("--ndf", type=int, help="D width (default 64; 16 on the toy data)")
    p.add_argument("--norm", default="instance", choices=["instance", "batch", "layer", "none"],
                   help="official: instance; batch on the toy data; layer: one group norm per image "
                   "(README, When G ignores z)")
    p.add_argument("--norm-g", choices=["instance", "batch", "layer", "none"],
                   help="G's norm if it differs from --norm (layer on the toy data; README, When G ignores z)")
    p.add_argument("--norm-d", choices=["instance", "batch", "layer", "none"],
                   help="the Ds' norm if it differs from --norm (README, When G ignores z)")
    p.add_argument("--where-add", default="all", choices=["all", "input"], help="inject z in every down level or the input only")
    p.add_argument("--no-dropout", action="store_true", help="drop the 0.5 dropout of the inner U-Net levels")
    p.add_argument("--gan-mode", choices=["lsgan", "vanilla"], help="paper §4: LSGAN (vanilla with --pix2pix-original)")
    p.add_argument("--lambda-l1", type=float, help="lambda of Eq. (3), image L1 (default 10; 100 with --pix2pix-original)")
    p.add_argument("--pix2pix-original", action="store_true", help="D on A||B, vanilla GAN, lambda 100, D loss x 1/2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    common.add_speed_flags(p)  # --amp --channels-last --compile --no-cache
    p.add_argument("--out", help="run folder (default runs/pix2pix_noise_<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/latest.pt (or --checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint file for --resume and --test (default <out>/latest.pt)")
    p.add_argument("--max-iters", type=int, help="stop after this many iterations and print images/s")
    p.add_argument("--log-every", type=int, default=50, help="iterations between loss logs")
    p.add_argument("--quick", action="store_true", help="smoke run: toy data, narrow nets, 20 iterations")
    p.add_argument("--test", action="store_true", help="write samples for the test split instead of training")
    p.add_argument("--n-samples", type=int, default=10, help="random samples per test input")
    p.add_argument("--num-test", type=int, default=100, help="test inputs to use (paper: 100)")
    p.add_argument("--sync", action="store_true", help="use the same z for every test input")
    common.add_inference_flags(p, style=False)  # --input --half --resize --interpolate
    args = common.parse_with_quick(p, argv, toy=common.TOY_PAIRED_TRAINING, ngf=16, ndf=16, num_workers=0)
    common.resolve_options(args)
    common.check_options(args, __file__)  # counts, rates, --device, --out: one sentence for a bad value
    # pix2pix paper §3 and official code: vanilla GAN, lambda = 100; BicycleGAN paper §4: LSGAN, 10
    if args.gan_mode is None:
        args.gan_mode = "vanilla" if args.pix2pix_original else "lsgan"
    if args.lambda_l1 is None:
        args.lambda_l1 = 100.0 if args.pix2pix_original else 10.0
    return args


# ---------------------------------------------------------------------------------------------
# 3. Networks: G and D are the shared blocks; no encoder, one D
# ---------------------------------------------------------------------------------------------
def build_networks(args, device):
    netG = common.UNetGenerator(args.input_nc, args.output_nc, args.nz, args.crop_size, args.ngf,
                                args.norm_g or args.norm, use_dropout=not args.no_dropout, where_add=args.where_add)
    d_input_nc = args.input_nc + args.output_nc if args.pix2pix_original else args.output_nc
    netD = common.PatchDiscriminator(d_input_nc, args.ndf, norm=args.norm_d or args.norm, num_scales=2)
    # Official BicycleGAN init: xavier_normal with gain 0.02 for every network.
    return [common.init_weights(net, "xavier", 0.02).to(device) for net in (netG, netD)]


def d_input(real_A, B, args):
    """What D sees: B alone (paper §4, all methods) or A||B (Eq. (1) as written; pix2pix)."""
    return torch.cat([real_A, B], 1) if args.pix2pix_original else B


# ---------------------------------------------------------------------------------------------
# 4. Loss terms
# ---------------------------------------------------------------------------------------------
def image_l1(fake_B, real_B):
    # Eq. (2): L1_image = E || B - G(A, z) ||_1   (mean over pixels)
    return (real_B - fake_B).abs().mean()


# ---------------------------------------------------------------------------------------------
# 5. Training step: forward, D update, then G (official pix2pix order)
# ---------------------------------------------------------------------------------------------
def train_step(nets, optims, real_A, real_B, args):
    netG, netD = nets
    opt_G, opt_D = optims

    # G(A, z) with z from the prior, one z per image of the batch
    z_random = torch.randn(real_A.size(0), args.nz, device=real_A.device)
    fake_B_random = netG(real_A, z_random)

    # D update first, as both official pix2pix codes: real + fake, on the detached fake, no 1/2
    # (official BicycleGAN; the original pix2pix halves it so that D learns at half G's rate).
    # The paper writes Eq. (1) with D(A, B); §4 and the official BicycleGAN code use an unconditional
    # D (d_input: B alone; A||B with --pix2pix-original, as pix2pix).
    # Eq. (1): L_GAN = E[log D(B)] + E[log(1 - D(G(A, z)))], z ~ N(0, I)   (LSGAN form by default)
    common.set_requires_grad(netD, True)
    opt_D.zero_grad(set_to_none=True)
    loss_D = (common.gan_loss(netD(d_input(real_A, real_B, args)), True, args.gan_mode)
              + common.gan_loss(netD(d_input(real_A, fake_B_random.detach(), args)), False, args.gan_mode))
    if args.pix2pix_original:
        loss_D = 0.5 * loss_D
    loss_D.backward()
    opt_D.step()

    # G update, against the D just updated. D is frozen so that G's GAN term does not fill its gradients.
    common.set_requires_grad(netD, False)
    opt_G.zero_grad(set_to_none=True)
    # Eq. (1), G's side: G wants D(G(A, z)) judged real
    loss_G_GAN = common.gan_loss(netD(d_input(real_A, fake_B_random, args)), True, args.gan_mode)
    loss_G_L1 = args.lambda_l1 * image_l1(fake_B_random, real_B)
    # Eq. (3): G* = arg min_G max_D L_GAN + lambda L1_image
    (loss_G_GAN + loss_G_L1).backward()
    opt_G.step()
    common.set_requires_grad(netD, True)  # leave D trainable after the step, as the other scripts do
    return {"G_GAN": loss_G_GAN, "G_L1": loss_G_L1, "D": loss_D}


# ---------------------------------------------------------------------------------------------
# 6. Sampling and test
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def translate(netG, real_A, z_random):
    """One input (1, C, H, W) -> one output per row of z (no encoder, so no encoded output)."""
    samples = netG(real_A.expand(len(z_random), -1, -1, -1), z_random)
    return list(samples)


def sample_grid(netG, items, z_random, path, device, toy=False):
    """Training preview: per input, input | ground truth | samples (fixed z)."""
    netG.eval()
    rows = []
    for item in items:
        real_A = item["A"][None].to(device)
        samples = translate(netG, real_A, z_random)
        rows.append([item["A"], item["B"]] + samples)
    netG.train()
    return common.save_preview(rows, path, first_sample=2, toy=toy)  # diversity of the samples


def test(args, device):
    out = common.default_out(args, __file__)
    ckpt = common.load_checkpoint(args.checkpoint or out / "latest.pt", device, args)
    netG, _ = build_networks(args, device)
    netG.load_state_dict(ckpt["netG"])
    netG.eval()
    multiple = 2 ** common.unet_depth(args.crop_size)  # G takes sides that are multiples of 2^depth
    if args.input:  # own images, each at its own size (common.translate_own_images)
        return common.translate_own_images(args, device, lambda A, z: netG(A.expand(len(z), -1, -1, -1), z),
                                           multiple, code_shape=(args.nz,))
    common.check_test_size(args, multiple)
    dataset = common.paired_dataset(args, train=False)
    generator = torch.Generator().manual_seed(args.seed)
    z_sync = torch.randn(args.n_samples, args.nz, generator=generator)
    results = []
    for i in range(min(len(dataset), args.num_test)):
        item = dataset[i]
        z_random = z_sync if args.sync else torch.randn(args.n_samples, args.nz, generator=generator)
        samples = translate(netG, item["A"][None].to(device), z_random.to(device))
        results.append(dict(item, samples=samples))
    common.write_test_results(out / "test", results, args)


# ---------------------------------------------------------------------------------------------
# 7. Main: a plain loop over epochs and batches
# ---------------------------------------------------------------------------------------------
def main(args):
    device = common.setup_distributed(args.device)  # Multi-GPU: torchrun -> process group, GPU of this rank
    if args.test:
        return test(args, device) if common.is_main() else None  # Multi-GPU: rank 0 tests
    out = common.default_out(args, __file__)
    dataset = common.keep_in_memory(common.paired_dataset(args, train=True), device, args)  # decoded once
    common.check_trainable(dataset, args.batch_size)
    common.seed_everything(args.seed)
    nets = common.speed_up(build_networks(args, device), args)  # --channels-last, --compile
    # Multi-GPU: train_step gets the networks wrapped in DDP, which averages gradients over ranks
    # (world size 1: the same networks); checkpoints, previews and the test use the plain ones.
    train_nets = common.distribute(nets, device)
    optims = [common.adam(net, args.lr, (args.beta1, 0.999)) for net in nets]
    schedulers = [common.linear_decay(opt, args.epochs, args.epochs_decay) for opt in optims]
    names = ["netG", "netD"]
    # Everything the checkpoint holds, by name: networks, their optimizers and LR schedulers.
    keys = names + [f"opt_{n}" for n in names] + [f"sched_{n}" for n in names]
    parts = dict(zip(keys, nets + optims + schedulers))
    epoch, skip, step = 0, 0, 0
    if args.resume:
        epoch, skip, step = common.resume(args.checkpoint or out / "latest.pt", device, args, parts)
    common.save_options(args, out)
    log = common.LossLog(out / "losses.csv", resume=args.resume)
    preview = [dataset[i] for i in range(min(4, len(dataset)))]
    toy = common.toy_outputs(args)  # previews also count the colours their samples reach
    z_preview = torch.randn(4, args.nz, generator=torch.Generator().manual_seed(args.seed)).to(device)

    def save(epoch, batch):
        state = common.training_state(parts, epoch=epoch, batch=batch, step=step, args=vars(args))
        common.save_checkpoint(out / "latest.pt", state)

    total_epochs = args.epochs + args.epochs_decay
    per_epoch = len(dataset) // (args.batch_size * common.world_size())  # Multi-GPU: --batch-size per rank
    total = min(args.max_iters or 10 ** 12, total_epochs * per_epoch)
    bar, speed = common.progress(total, step), common.Throughput(device)
    done = step >= total
    while not done and epoch < total_epochs:
        loader = common.epoch_loader(dataset, args.batch_size, epoch, args.seed, skip, args.num_workers)
        batch_index = skip - 1
        for batch_index, batch in enumerate(loader, start=skip):
            real_A = batch["A"].to(device, non_blocking=True)
            real_B = batch["B"].to(device, non_blocking=True)
            with common.mixed_precision(device, args.amp):  # --amp: bf16 autocast
                losses = train_step(train_nets, optims, real_A, real_B, args)
            step += 1
            speed.step(args.batch_size * common.world_size())  # images of all ranks
            bar.update(1)
            if step % args.log_every == 0 or step == total:
                values = common.mean_over_ranks(losses)  # the only host sync of the loop (mean over ranks)
                bar.set_postfix(values | {"img/s": round(speed.rate(), 1)})
                log.write({"step": step, "epoch": epoch, "lr": optims[0].param_groups[0]["lr"]} | values)
            if step >= total:
                speed.stop()  # the timed window ends before the last checkpoint and preview
                done = True
                break
        skip = 0
        if done and batch_index + 1 < per_epoch:  # stopped inside an epoch
            save(epoch, batch_index + 1)
            break
        for scheduler in schedulers:
            scheduler.step()
        epoch += 1
        if common.is_main():  # Multi-GPU: rank 0 writes the preview and logs its diversity
            stats = sample_grid(nets[0], preview, z_preview, out / f"samples_epoch_{epoch:03d}.png", device, toy)
            common.log_preview(stats, log, bar, step, epoch)  # diversity: collapse shows here
        save(epoch, 0)
    bar.close()
    speed.report()
    print(f"checkpoint: {out / 'latest.pt'}; test with: python {Path(__file__).name} --test --out {out}")
    if common.is_main() and common.is_toy(args.dataset) and epoch == total_epochs:  # the toy demo tests itself
        args.test = True
        test(args, device)


if __name__ == "__main__":
    main(parse_args())
