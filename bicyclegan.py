r"""BicycleGAN -- "Toward Multimodal Image-to-Image Translation", Zhu, Zhang, Pathak, Darrell,
Efros, Wang, Shechtman (NeurIPS 2017), arXiv:1711.11586v4.

What it adds: it joins the two cycles of the paper. The cVAE-GAN cycle (B -> z -> B) encodes the
target with E, asks G to rebuild it (image L1) and keeps E(B) close to the prior (KL). The cLR-GAN
cycle (z -> B -> z) draws z from the prior, asks a second D to find G(A, z) realistic and E to
recover z from it (latent L1). Together: z is used (cVAE) and every prior z gives a realistic,
distinct output (cLR). cVAE-GAN++ is this script with --lambda-latent 0 (Eq. (9) without the latent
term; the second D still sees prior samples).

Full objective, Eq. (9):
    G^*, E^* = \arg\min_{G,E} \max_{D} \mathcal{L}^{VAE}_{GAN}(G, D, E) + \lambda \mathcal{L}^{VAE}_{1}(G, E)
               + \mathcal{L}_{GAN}(G, D) + \lambda_{latent} \mathcal{L}^{latent}_{1}(G, E)
               + \lambda_{KL} \mathcal{L}_{KL}(E)

Symbols (paper -> code):
    A, B                 real_A, real_B (input, target; BtoA swaps the halves of the files)
    z ~ E(B)             z_encoded = mu + eps * exp(logvar / 2)   (reparameterisation)
    z ~ N(0, I)          z_random
    G(A, z)              fake_B_encoded (z from E), fake_B_random (z from the prior)
    E(G(A, z))           mu_random (E's mean: the paper uses a point estimate here)
    D, D (second)        netD (cVAE branch), netD2 (cLR branch); two scales each
    lambda, lambda_latent, lambda_KL   --lambda-l1 10, --lambda-latent 0.5, --lambda-kl 0.01 (paper §4)
    (weights of the two GAN terms)     --lambda-gan 1, --lambda-gan2 1 (Eq. (9) weighs them 1; official options)

Update order, per batch (official code): the batch is split in halves, the first for the
encoded branch and the second for the random branch; both fakes are generated from the first
half's A and D2 compares the random fake with the second half's real B. Then one backward of
GAN + GAN2 + L1 + KL + latent L1, where E is frozen while it reads the random fake so the latent
term reaches G only; one step each of E and G; then D and D2 on detached fakes.

Deviations:
- From the paper: batch 2 split in halves, as the official code does (the paper uses batch 1).
- From the official code: E has an adaptive average pool so that it takes any image size; the
  latent term's E(G(A, z)) is computed after E is frozen, so no gradient of it can reach E.
- As the official code: the KL is summed over the encoded half-batch (and z's dimensions) while
  the L1 and GAN terms are means, so its weight grows with --batch-size (one image at batch 2).
- On the toy data only (--no-gan-trains-e, its default): D's term of the encoded output trains G
  but not E, as the latent term does in the paper; D's pull on E's code merged the toy's colours
  (README, When G ignores z). Real data sets keep Eq. (9) as written (--gan-trains-e).
- On the toy data only: lambda_KL four times the official weight per image (0.01 / 2 summed over a
  half-batch of 8), which keeps the four colours' codes around the prior's centre (README, When G
  ignores z).
- --test resizes each image to the test size: --crop-size when given, else 512 px for maps (the
  official test script), else the training crop size, which alone fixes the U-Net's depth.
  --input translates own images at their own size (padded to a multiple of 2^depth, cropped back).

Usage:
    python bicyclegan.py                                  # built-in toy data, CPU in minutes
    python bicyclegan.py --dataset maps                   # downloads maps, 200 + 200 epochs
    python bicyclegan.py --dataset maps --test --n-samples 10 [--sync]
    python bicyclegan.py --out runs/bicyclegan_maps --input my_maps/ [--style photo.jpg | --interpolate 8]
"""
import argparse
from pathlib import Path

import torch

import common

# ---------------------------------------------------------------------------------------------
# 2. Options (defaults: paper §4 and the official training scripts; per-dataset ones in common)
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="BicycleGAN (arXiv:1711.11586): multimodal paired translation")
    p.add_argument("--dataset", default="toy", help="toy (built-in), a known name (facades, maps, "
                   "edges2shoes, edges2handbags, night2day) or a folder with train/ and test/ or val/")
    p.add_argument("--direction", choices=["AtoB", "BtoA"], help="default: the dataset's (BtoA for facades, maps)")
    p.add_argument("--load-size", type=int, help="resize to this square size, then crop (default: per dataset)")
    p.add_argument("--crop-size", type=int, help="training crop size = network input size (default: per dataset)")
    p.add_argument("--input-nc", type=int, help="input channels (1 for edges2*, default: per dataset)")
    p.add_argument("--output-nc", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2, help="even: half encoded, half random (official: 2)"
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
    p.add_argument("--lambda-gan", type=float, default=1.0, help="weight of L_GAN^VAE, D(G(A, E(B))) (official "
                   "--lambda_GAN; the paper: 1)")
    p.add_argument("--gan-trains-e", action=argparse.BooleanOptionalAction, default=True,
                   help="D's term of the encoded half trains E as well as G (Eq. (9), official); "
                   "--no-gan-trains-e: G only (the toy default; README, When G ignores z)")
    p.add_argument("--lambda-gan2", type=float, default=1.0, help="weight of L_GAN, D2(G(A, z)) (official --lambda_GAN2)")
    p.add_argument("--lambda-l1", type=float, default=10.0, help="lambda of Eq. (9), image L1")
    p.add_argument("--lambda-latent", type=float, default=0.5, help="lambda_latent of Eq. (9); 0 gives cVAE-GAN++")
    p.add_argument("--lambda-kl", type=float, default=0.01, help="lambda_KL of Eq. (9); 0.01 / 2 on the toy data "
                   "(its half-batch holds 8 images: four times the official weight per image)")
    p.add_argument("--kl-warmup", type=int, default=0, help="epochs over which lambda_KL rises linearly from 0 "
                   "to its value (0: constant, as the paper; notebooks/when_g_ignores_z.md, KL warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    common.add_speed_flags(p)  # --amp --channels-last --compile --no-cache
    p.add_argument("--out", help="run folder (default runs/bicyclegan_<dataset>)")
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
    # The toy demo's choices (common.py). lambda_KL: four times the official per-image weight, which
    # keeps E's four colour codes around the prior's centre, so that prior samples reach every colour;
    # gan_trains_e: D's pull on E merges the toy's colours (README, When G ignores z).
    toy = dict(common.TOY_PAIRED_TRAINING, lambda_kl=4 * common.TOY_SUMMED_KL, gan_trains_e=False)
    args = common.parse_with_quick(p, argv, toy=toy, ngf=16, nef=16, ndf=16, num_workers=0)
    common.resolve_options(args)
    common.check_options(args, __file__)  # counts, rates, --device, --out: one sentence for a bad value
    if args.batch_size < 2 or args.batch_size % 2:
        common.fail(f"--batch-size {args.batch_size} is odd: BicycleGAN splits each batch into an encoded "
                    "and a random half, so use an even size such as 2")
    return args


# ---------------------------------------------------------------------------------------------
# 3. Networks: G, E and D are the shared blocks; BicycleGAN uses two Ds, one per cycle
# ---------------------------------------------------------------------------------------------
def build_networks(args, device):
    netG = common.UNetGenerator(args.input_nc, args.output_nc, args.nz, args.crop_size, args.ngf,
                                args.norm_g or args.norm, use_dropout=not args.no_dropout, where_add=args.where_add)
    netE = common.make_encoder(args.encoder, args.output_nc, args.nz, args.nef, args.norm)
    netD = common.PatchDiscriminator(args.output_nc, args.ndf, norm=args.norm_d or args.norm, num_scales=2)
    netD2 = common.PatchDiscriminator(args.output_nc, args.ndf, norm=args.norm_d or args.norm, num_scales=2)
    # Official BicycleGAN init: xavier_normal with gain 0.02 for every network.
    return [common.init_weights(net, "xavier", 0.02).to(device) for net in (netG, netE, netD, netD2)]


# ---------------------------------------------------------------------------------------------
# 4. Loss terms
# ---------------------------------------------------------------------------------------------
def reparameterize(mu, logvar):
    # Eq. (4): z ~ E(B) through the reparameterisation trick, z = mu + eps * sigma
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def kl_loss(mu, logvar):
    # Eq. (5): L_KL = D_KL(E(B) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - exp(logvar)), summed over
    # the latent dimensions and the encoded half-batch (one image at batch 2), as the official code
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def image_l1(fake_B, real_B):
    # Eq. (2): L1_image = E || B - G(A, z) ||_1   (mean over pixels)
    return (real_B - fake_B).abs().mean()


def latent_l1(mu_random, z_random):
    # Eq. (7): L1_latent = E || z - E(G(A, z)) ||_1   (E's mean as a point estimate)
    return (mu_random - z_random).abs().mean()


# ---------------------------------------------------------------------------------------------
# 5. Training step: forward both cycles, G/E update, then D and D2
# ---------------------------------------------------------------------------------------------
def kl_weight(args, epoch):
    # lambda_KL of Eq. (9) in this epoch: constant (the paper), or with --kl-warmup N rising linearly
    # over the first N epochs, so that E's codes for different targets part before the KL pulls them in
    return args.lambda_kl * min(1.0, (epoch + 1) / args.kl_warmup) if args.kl_warmup else args.lambda_kl


def train_step(nets, optims, real_A, real_B, args, lambda_kl=None):
    netG, netE, netD, netD2 = nets
    opt_G, opt_E, opt_D, opt_D2 = optims
    half = real_A.size(0) // 2
    real_A_encoded, real_B_encoded = real_A[:half], real_B[:half]
    real_B_random = real_B[half:]

    # cVAE-GAN cycle, B -> z -> B
    mu, logvar = netE(real_B_encoded)
    z_encoded = reparameterize(mu, logvar)
    fake_B_encoded = netG(real_A_encoded, z_encoded)
    # --no-gan-trains-e (the toy default): D judges a second pass of G with E's code detached, so
    # that D's term trains G only, as the latent term below trains G only (README, When G ignores z)
    judged_B_encoded = fake_B_encoded if args.gan_trains_e else netG(real_A_encoded, z_encoded.detach())
    # cLR-GAN cycle, z -> B -> z (official code: the random fake also uses the first half's A)
    z_random = torch.randn(half, args.nz, device=real_A.device)
    fake_B_random = netG(real_A_encoded, z_random)

    # G and E update. The Ds are frozen so that G's GAN terms do not fill their gradients.
    common.set_requires_grad([netD, netD2], False)
    opt_G.zero_grad(set_to_none=True)
    opt_E.zero_grad(set_to_none=True)
    # The paper writes Eqs. (4) and (1) with D(A, B); §4 and the official code use an unconditional D
    # Eq. (4): L_GAN^VAE = E[log D(B)] + E[log(1 - D(G(A, E(B))))]   (LSGAN form, G's side)
    loss_G_GAN = args.lambda_gan * common.gan_loss(netD(judged_B_encoded), True, args.gan_mode)
    # Eq. (1): L_GAN = E[log D(B)] + E[log(1 - D(G(A, z)))], z ~ N(0, I)   (second D, G's side)
    loss_G_GAN2 = args.lambda_gan2 * common.gan_loss(netD2(fake_B_random), True, args.gan_mode)
    loss_G_L1 = args.lambda_l1 * image_l1(fake_B_encoded, real_B_encoded)
    loss_kl = (args.lambda_kl if lambda_kl is None else lambda_kl) * kl_loss(mu, logvar)
    # Eq. (7), G only: E is frozen while it reads the random fake, so this term reaches G through
    # fake_B_random and never E (paper §4: optimising both lets them hide z instead of using it).
    common.set_requires_grad(netE, False)
    mu_random, _ = netE(fake_B_random)
    common.set_requires_grad(netE, True)
    loss_z_L1 = args.lambda_latent * latent_l1(mu_random, z_random)
    (loss_G_GAN + loss_G_GAN2 + loss_G_L1 + loss_kl + loss_z_L1).backward()
    opt_E.step()
    opt_G.step()

    # D update (Eq. (4)); D2 update (Eq. (1)): real + fake, on detached fakes, no 1/2 (official)
    common.set_requires_grad([netD, netD2], True)
    opt_D.zero_grad(set_to_none=True)
    loss_D = (common.gan_loss(netD(real_B_encoded), True, args.gan_mode)
              + common.gan_loss(netD(judged_B_encoded.detach()), False, args.gan_mode))
    loss_D.backward()
    opt_D.step()
    opt_D2.zero_grad(set_to_none=True)
    loss_D2 = (common.gan_loss(netD2(real_B_random), True, args.gan_mode)
               + common.gan_loss(netD2(fake_B_random.detach()), False, args.gan_mode))
    loss_D2.backward()
    opt_D2.step()
    return {"G_GAN": loss_G_GAN, "G_GAN2": loss_G_GAN2, "G_L1": loss_G_L1, "kl": loss_kl,
            "z_L1": loss_z_L1, "D": loss_D, "D2": loss_D2}


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
    netG, netE, _, _ = build_networks(args, device)
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
    train_nets = common.distribute(nets, device)
    optims = [common.adam(net, args.lr, (args.beta1, 0.999)) for net in nets]
    schedulers = [common.linear_decay(opt, args.epochs, args.epochs_decay) for opt in optims]
    names = ["netG", "netE", "netD", "netD2"]
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
                losses = train_step(train_nets, optims, real_A, real_B, args, kl_weight(args, epoch))
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
