r"""cVAE-GAN (and cAE-GAN) -- baselines of "Toward Multimodal Image-to-Image Translation", Zhu, Zhang,
Pathak, Darrell, Efros, Wang, Shechtman (NeurIPS 2017), arXiv:1711.11586v4, §3.2 and Fig. 2(c).

What it adds to pix2pix+noise: an encoder E. Instead of a random z, G gets z ~ E(B), a noisy
"peek" at the target, so the image L1 can only be met if G reads z (B -> z -> B, a conditional
VAE with a GAN loss). A KL term keeps E(B) close to N(0, I) so that at test time z can be drawn
from the prior. --deterministic gives the paper's cAE-GAN: z = E(B) itself, no KL; nothing then
shapes the latent space, and prior samples land where G was never trained (the paper's Fig. 6:
diverse but unrealistic). clr_gan.py goes the other way round (z -> B -> z); bicyclegan.py
joins both cycles.

Full objective, Eq. (6):
    G^*, E^* = \arg\min_{G,E} \max_{D} \mathcal{L}^{VAE}_{GAN}(G, D, E) + \lambda \mathcal{L}^{VAE}_{1}(G, E)
               + \lambda_{KL} \mathcal{L}_{KL}(E)
with Eq. (4), the conditional GAN loss with z ~ E(B) in place of z ~ N(0, I):
    \mathcal{L}^{VAE}_{GAN} = \mathbb{E}_{A,B}[\log D(A, B)] + \mathbb{E}_{A,B,z \sim E(B)}[\log(1 - D(A, G(A, z)))]
the image L1 of Eq. (2) with z ~ E(B), and Eq. (5)
    \mathcal{L}_{KL}(E) = \mathbb{E}_{B}[\mathcal{D}_{KL}(E(B) \| \mathcal{N}(0, I))]

Symbols (paper -> code):
    A, B                 real_A, real_B (input, target; BtoA swaps the halves of the files)
    z ~ E(B)             z_encoded = mu + eps * exp(logvar / 2)   (reparameterisation; = mu for cAE-GAN)
    G(A, z)              fake_B_encoded
    D                    netD (two scales)
    lambda, lambda_KL    --lambda-l1 10, --lambda-kl 0.01 (paper §4)

Update order, per batch: the whole batch goes through the encoded branch; one backward of
GAN + L1 + KL through G and E; one step each of E and G; then D on the detached fake.

Deviations:
- From the paper: batch 2 (the paper uses batch 1), so that each step sees as many images as a
  step of bicyclegan.py; here both images go through the one branch (bicyclegan.py gives it half).
- From the official code: E has an adaptive average pool so that it takes any image size. With
  --deterministic E keeps its logvar head (unused) so that both variants share one layout.
- KL reduction: per image (summed over z's dimensions, averaged over the batch). The official
  code sums it over the encoded half-batch, one image at its batch 2; here the whole batch is
  encoded, so a sum would double lambda_KL against it (and against bicyclegan.py) at batch 2.
- On the toy data only (--no-gan-trains-e, its default): D's term of the encoded output trains G
  but not E, as the latent term does in the paper; D's pull on E's code merged the toy's colours
  (README, When G ignores z). Real data sets keep Eq. (6) as written (--gan-trains-e).
- Test samples draw z from the prior, as the paper does for every method (for cAE-GAN, too,
  though its E(B) need not look like N(0, I)); encoded.png uses z = mu of E(B).

Usage:
    python cvae_gan.py [--deterministic]                  # built-in toy data, CPU in minutes
    python cvae_gan.py --dataset maps                     # downloads maps, 200 + 200 epochs
    python cvae_gan.py --dataset maps --test --n-samples 10 [--sync]
"""
import argparse
from pathlib import Path

import torch

import common

# ---------------------------------------------------------------------------------------------
# 2. Options (defaults: paper §4 and the official training scripts; per-dataset ones in common)
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="cVAE-GAN / cAE-GAN (arXiv:1711.11586 baselines): paired translation")
    p.add_argument("--dataset", default="toy", help="toy (built-in), a known name (facades, maps, "
                   "edges2shoes, edges2handbags, night2day) or a folder with train/ and test/ or val/")
    p.add_argument("--direction", choices=["AtoB", "BtoA"], help="default: the dataset's (BtoA for facades, maps)")
    p.add_argument("--load-size", type=int, help="resize to this square size, then crop (default: per dataset)")
    p.add_argument("--crop-size", type=int, help="training crop size = network input size (default: per dataset)")
    p.add_argument("--input-nc", type=int, help="input channels (1 for edges2*, default: per dataset)")
    p.add_argument("--output-nc", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2, help="all of it encoded (2: as many images a step as bicyclegan.py)"
                   "; 16 on the toy data; per process under torchrun (README, Multi-GPU)")
    p.add_argument("--epochs", type=int, help="epochs at the initial learning rate (default: per dataset)")
    p.add_argument("--epochs-decay", type=int, help="epochs of linear decay to zero (default: per dataset)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (paper §4)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (official code)")
    p.add_argument("--nz", type=int, default=8, help="|z| (paper §4)")
    p.add_argument("--ngf", type=int, help="G width (default 64; 16 on the toy data)")
    p.add_argument("--nef", type=int, help="E width (default 64; 16 on the toy data)")
    p.add_argument("--ndf", type=int, help="D width (default 64; 16 on the toy data)")
    p.add_argument("--norm", default="instance", choices=["instance", "batch", "layer", "none"],
                   help="official: instance; batch on the toy data; layer: one group norm per image "
                   "(README, When G ignores z)")
    p.add_argument("--norm-g", choices=["instance", "batch", "layer", "none"],
                   help="G's norm if it differs from --norm (layer on the toy data; README, When G ignores z)")
    p.add_argument("--norm-d", choices=["instance", "batch", "layer", "none"],
                   help="the Ds' norm if it differs from --norm (README, When G ignores z)")
    p.add_argument("--encoder", default="resnet", choices=["resnet", "cnn"], help="E_ResNet (paper) or E_CNN")
    p.add_argument("--where-add", default="all", choices=["all", "input"], help="inject z in every down level or the input only")
    p.add_argument("--no-dropout", action="store_true", help="drop the 0.5 dropout of the inner U-Net levels")
    p.add_argument("--gan-mode", default="lsgan", choices=["lsgan", "vanilla"], help="paper §4: LSGAN")
    p.add_argument("--gan-trains-e", action=argparse.BooleanOptionalAction, default=True,
                   help="D's term of the encoded output trains E as well as G (Eq. (6), official); "
                   "--no-gan-trains-e: G only (the toy default; README, When G ignores z)")
    p.add_argument("--lambda-l1", type=float, default=10.0, help="lambda of Eq. (6), image L1")
    p.add_argument("--lambda-kl", type=float, default=0.01, help="lambda_KL of Eq. (6) (unused with --deterministic)")
    p.add_argument("--deterministic", action="store_true", help="cAE-GAN: z = E(B), no sampling, no KL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    common.add_speed_flags(p)  # --amp --channels-last --compile --no-cache
    p.add_argument("--out", help="run folder (default runs/cvae_gan_<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/latest.pt (or --checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint file for --resume and --test (default <out>/latest.pt)")
    p.add_argument("--max-iters", type=int, help="stop after this many iterations and print images/s")
    p.add_argument("--log-every", type=int, default=50, help="iterations between loss logs")
    p.add_argument("--quick", action="store_true", help="smoke run: toy data, narrow nets, 20 iterations")
    p.add_argument("--test", action="store_true", help="write samples for the test split instead of training")
    p.add_argument("--n-samples", type=int, default=10, help="random samples per test input")
    p.add_argument("--num-test", type=int, default=100, help="test inputs to use (paper: 100)")
    p.add_argument("--sync", action="store_true", help="use the same z for every test input")
    common.add_inference_flags(p, style=True)  # --input --half --resize --style --interpolate
    toy = dict(common.TOY_PAIRED_TRAINING, gan_trains_e=False)  # the toy demo's choices (common.py; README,
    # When G ignores z: D's pull on E merges the toy's colours)
    args = common.parse_with_quick(p, argv, toy=toy, ngf=16, nef=16, ndf=16, num_workers=0)
    common.resolve_options(args)
    common.check_options(args, __file__)  # counts, rates, --device, --out: one sentence for a bad value
    return args


# ---------------------------------------------------------------------------------------------
# 3. Networks: G, E and D are the shared blocks; one D
# ---------------------------------------------------------------------------------------------
def build_networks(args, device):
    netG = common.UNetGenerator(args.input_nc, args.output_nc, args.nz, args.crop_size, args.ngf,
                                args.norm_g or args.norm, use_dropout=not args.no_dropout, where_add=args.where_add)
    netE = common.make_encoder(args.encoder, args.output_nc, args.nz, args.nef, args.norm)
    netD = common.PatchDiscriminator(args.output_nc, args.ndf, norm=args.norm_d or args.norm, num_scales=2)
    # Official BicycleGAN init: xavier_normal with gain 0.02 for every network.
    return [common.init_weights(net, "xavier", 0.02).to(device) for net in (netG, netE, netD)]


# ---------------------------------------------------------------------------------------------
# 4. Loss terms
# ---------------------------------------------------------------------------------------------
def reparameterize(mu, logvar):
    # Eq. (4): z ~ E(B) through the reparameterisation trick, z = mu + eps * sigma
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def encode(netE, real_B, deterministic):
    """z for G from the target: sampled from E(B) (cVAE-GAN) or E(B)'s mean itself (cAE-GAN, §3.2)."""
    mu, logvar = netE(real_B)
    z_encoded = mu if deterministic else reparameterize(mu, logvar)
    return z_encoded, mu, logvar


def kl_loss(mu, logvar):
    # Eq. (5): L_KL = E_B[D_KL(E(B) || N(0, I))], D_KL = -1/2 sum(1 + logvar - mu^2 - exp(logvar)):
    # summed over the latent dimensions, averaged over the batch. The official code sums over its
    # encoded half-batch, one image at batch 2: the same value as here at batch 2.
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1).mean()


def image_l1(fake_B, real_B):
    # Eq. (2): L1_image = E || B - G(A, z) ||_1   (mean over pixels; L1^VAE: z ~ E(B))
    return (real_B - fake_B).abs().mean()


# ---------------------------------------------------------------------------------------------
# 5. Training step: forward the encoded cycle, G/E update, then D
# ---------------------------------------------------------------------------------------------
def train_step(nets, optims, real_A, real_B, args):
    netG, netE, netD = nets
    opt_G, opt_E, opt_D = optims

    # cVAE-GAN cycle, B -> z -> B (the whole batch)
    z_encoded, mu, logvar = encode(netE, real_B, args.deterministic)
    fake_B_encoded = netG(real_A, z_encoded)
    # --no-gan-trains-e (the toy default): D judges a second pass of G with E's code detached, so
    # that D's term trains G only (README, When G ignores z)
    judged_B_encoded = fake_B_encoded if args.gan_trains_e else netG(real_A, z_encoded.detach())

    # G and E update. D is frozen so that G's GAN term does not fill its gradients.
    common.set_requires_grad(netD, False)
    opt_G.zero_grad(set_to_none=True)
    opt_E.zero_grad(set_to_none=True)
    # The paper writes Eq. (4) with D(A, B); §4 and the official code use an unconditional D:
    # Eq. (4): L_GAN^VAE = E[log D(B)] + E[log(1 - D(G(A, E(B))))]   (LSGAN form, G's side)
    loss_G_GAN = common.gan_loss(netD(judged_B_encoded), True, args.gan_mode)
    loss_G_L1 = args.lambda_l1 * image_l1(fake_B_encoded, real_B)
    # cAE-GAN (--deterministic) drops the KL term (§3.2): nothing shapes the distribution of E(B)
    loss_kl = torch.zeros((), device=mu.device) if args.deterministic else args.lambda_kl * kl_loss(mu, logvar)
    # Eq. (6): G*, E* = arg min_{G,E} max_D L_GAN^VAE + lambda L1^VAE + lambda_KL L_KL
    (loss_G_GAN + loss_G_L1 + loss_kl).backward()
    opt_E.step()
    opt_G.step()

    # D update (Eq. (4)): real + fake, on the detached fake, no 1/2 (official)
    common.set_requires_grad(netD, True)
    opt_D.zero_grad(set_to_none=True)
    loss_D = (common.gan_loss(netD(real_B), True, args.gan_mode)
              + common.gan_loss(netD(judged_B_encoded.detach()), False, args.gan_mode))
    loss_D.backward()
    opt_D.step()
    return {"G_GAN": loss_G_GAN, "G_L1": loss_G_L1, "kl": loss_kl, "D": loss_D}


# ---------------------------------------------------------------------------------------------
# 6. Sampling and test
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def translate(netG, netE, real_A, real_B, z_random):
    """One input (1, C, H, W) -> its encoded output (z = mu of E(B)) and one output per row of z."""
    mu, _ = netE(real_B)
    encoded = netG(real_A, mu)[0]
    samples = netG(real_A.expand(len(z_random), -1, -1, -1), z_random)
    return encoded, list(samples)


def sample_grid(netG, netE, items, z_random, path, device, toy=False):
    """Training preview: per input, input | ground truth | encoded | samples (fixed z)."""
    netG.eval(), netE.eval()
    rows = []
    for item in items:
        real_A, real_B = item["A"][None].to(device), item["B"][None].to(device)
        encoded, samples = translate(netG, netE, real_A, real_B, z_random)
        rows.append([item["A"], item["B"], encoded] + samples)
    netG.train(), netE.train()
    return common.save_preview(rows, path, first_sample=3, toy=toy)  # diversity of the samples


def test(args, device):
    out = common.default_out(args, __file__)
    ckpt = common.load_checkpoint(args.checkpoint or out / "latest.pt", device, args)
    netG, netE, _ = build_networks(args, device)
    netG.load_state_dict(ckpt["netG"]), netE.load_state_dict(ckpt["netE"])
    netG.eval(), netE.eval()
    multiple = 2 ** common.unet_depth(args.crop_size)  # G takes sides that are multiples of 2^depth
    if args.input:  # own images at their own size; no B, so no encoded output; --style: z = mu of E(guide)
        return common.translate_own_images(args, device, lambda A, z: netG(A.expand(len(z), -1, -1, -1), z),
                                           multiple, code_shape=(args.nz,), encode=lambda guide: netE(guide)[0])
    common.check_test_size(args, multiple)
    dataset = common.paired_dataset(args, train=False)
    generator = torch.Generator().manual_seed(args.seed)
    z_sync = torch.randn(args.n_samples, args.nz, generator=generator)
    z_style = [netE(guide)[0].detach() for guide in common.read_guides(args, device)]  # --style: mu of E(guide)
    results = []
    for i in range(min(len(dataset), args.num_test)):
        item = dataset[i]
        z_random = z_sync if args.sync else torch.randn(args.n_samples, args.nz, generator=generator)
        z_random = z_style[0] if z_style else z_random  # one guided output instead of random ones
        encoded, samples = translate(netG, netE, item["A"][None].to(device), item["B"][None].to(device),
                                     z_random.to(device))
        results.append(dict(item, encoded=encoded, samples=samples))
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
    # --deterministic: E's logvar head gets no gradient, DDP is told to look for such parameters.
    train_nets = common.distribute(nets, device, find_unused=[nets[1]] if args.deterministic else [])
    optims = [common.adam(net, args.lr, (args.beta1, 0.999)) for net in nets]
    schedulers = [common.linear_decay(opt, args.epochs, args.epochs_decay) for opt in optims]
    names = ["netG", "netE", "netD"]
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
            stats = sample_grid(nets[0], nets[1], preview, z_preview, out / f"samples_epoch_{epoch:03d}.png", device, toy)
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
