r"""DivCo -- "DivCo: Diverse Conditional Image Synthesis via Contrastive Generative Adversarial
Network", Liu, Tang, Yang, Ma, Lu, Wang, Fu (CVPR 2021), arXiv:2103.07893v1, on the BicycleGAN base
(arXiv:1711.11586v4).

What it adds: a latent-augmented contrastive loss. For a query code z, a positive z+ close to z and
N negatives z-_j far from it are fed to G with the same input; E reads the three kinds of output,
and the loss pulls f = E(G(A, z)) towards f+ and pushes it from every f-_j. Nearby codes must give
similar images, distant codes different ones, so G cannot ignore z. The base is the official paired
DivCo variant: BicycleGAN with the latent regression off (lambda_latent = 0), everything else equal.

Full objective, paired (DivCo §3, overall training objective, on BicycleGAN's Eq. (9)):
    G^*, E^* = \arg\min_{G,E} \max_{D} \mathcal{L}^{VAE}_{GAN} + \lambda \mathcal{L}^{VAE}_{1} + \mathcal{L}_{GAN}
               + \lambda_{latent} \mathcal{L}^{latent}_{1} + \lambda_{KL} \mathcal{L}_{KL}
               + \lambda_{contra} \mathcal{L}_{contra}(G)
    \mathcal{L}_{contra} = -\log \frac{\exp(f \cdot f^+ / \tau)}
                                      {\exp(f \cdot f^+ / \tau) + \sum_{j=1}^{N} \exp(f \cdot f^-_j / \tau)}
Unpaired (--setting unpaired; DivCo §3: L_opt becomes a cycle reconstruction through an auxiliary
inverse generator F: B -> A):
    G^*, F^* = \arg\min_{G,F} \max_{D} \mathcal{L}_{GAN}(G, D) + \lambda_{opt} \| F(G(A, z)) - A \|_1
               + \lambda_{contra} \mathcal{L}_{contra}(G)

Symbols (paper -> code):
    y (condition), x     real_A, real_B
    z, z+, z-_j          z_random, z_pos, z_neg (shape (n, N, nz))
    x^, x^+, x^-_j       fake_B_random, fake_B_pos, fake_B_neg
    f, f+, f-_j          mu of netE on those images, raw (official default; --featnorm: L2-normalised)
    N, R, tau            --num-negatives 10, --radius 0.01, --tau 1.0 (official code)
    lambda_contra        --lambda-contra 0.3 (official paired variant)
    lambda_opt           --lambda-l1 10 (BicycleGAN's lambda; paired: image L1, unpaired: cycle L1)
    F                    netF, CycleGAN's ResNet generator (unpaired only)

Latent augmentation (DivCo §3): the paper speaks of a hypersphere of radius R around z but states
the negative condition element-wise; this script, like the official code, uses a box throughout:
z+ = z + U(-R, R) per coordinate, and each z- is a fresh N(0, I) draw, drawn again while any of
its coordinates lies within R of the query's.

--diversity-loss picks the term on top of the same base: contrastive (DivCo), mode-seeking (MSGAN,
arXiv:1903.05628: minimise 1 / (mean|G(A,z1) - G(A,z2)| / mean|z1 - z2| + 1e-5), --lambda-ms 1;
both fakes face the random branch's D, as in its official code) or none (the plain base,
cVAE-GAN++), so the three can be compared with everything else equal.

Deviations:
- From the official code: the contrastive loss is backpropagated into G (the released paired code
  computes it and never calls backward on it); it is averaged over queries, not summed (the same
  at batch 2, one query).
- From the paper: raw features by default, as the official code (featnorm off); --featnorm
  L2-normalises them as the paper's text does. Then, with tau = 1, every logit lies in [-1, 1], so
  L_contra stays in [ln(1 + N e^-2), ln(1 + N e^2)] = [0.86, 4.3] and sits near ln(N + 1) = 2.40.
- From the paper: E is BicycleGAN's latent encoder (mean head), held fixed for this term, not
  G's own encoding layers (the official paired code does the same).
- Unpaired setting, designed here (the official unpaired variant is DRIT): no E(B) -> G -> B path,
  since there are no pairs; one D on B; F is trained only by the cycle term (no D on A, no B->A->B
  cycle); E is trained as a latent regressor, |E(G(A, z)) - z| on detached fakes, so that its
  features react to z, while the contrastive term stays G-only.
- On the toy data only (--no-gan-trains-e, its default): D's term of the encoded output trains G
  but not E, as the latent term does in the paper; D's pull on E's code merged the toy's colours
  (README, When G ignores z). Real data sets keep the objective as written (--gan-trains-e).
- As bicyclegan.py: batch 2 split in halves (paired), adaptive pool in E, test size and --input.

Usage:
    python divco.py                                       # built-in toy data, CPU in minutes
    python divco.py --dataset facades --diversity-loss mode-seeking
    python divco.py --setting unpaired --dataset horse2zebra && python divco.py --test --out runs/divco_horse2zebra
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------------
# 2. Options (defaults: paper §4 and the official training scripts; per-dataset ones in common)
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DivCo (arXiv:2103.07893): diverse translation by latent contrast")
    p.add_argument("--setting", default="paired", choices=["paired", "unpaired"],
                   help="paired: BicycleGAN base; unpaired: G + inverse F with a cycle term")
    p.add_argument("--dataset", default="toy", help="toy (built-in), a known name (facades, maps, "
                   "edges2shoes, edges2handbags, night2day) or a folder with train/ and test/ or val/")
    p.add_argument("--direction", choices=["AtoB", "BtoA"], help="default: the dataset's (BtoA for facades, maps)")
    p.add_argument("--load-size", type=int, help="resize to this square size, then crop (default: per dataset)")
    p.add_argument("--crop-size", type=int, help="training crop size = network input size (default: per dataset)")
    p.add_argument("--input-nc", type=int, help="input channels (1 for edges2*, default: per dataset)")
    p.add_argument("--output-nc", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2, help="paired: even, half encoded, half random (official: 2)"
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
                   help="D's term of the encoded output trains E as well as G (Eq. (9), official); "
                   "--no-gan-trains-e: G only (the toy default; README, When G ignores z)")
    p.add_argument("--lambda-l1", type=float, default=10.0, help="lambda_opt: image L1 (paired), cycle L1 (unpaired)")
    p.add_argument("--lambda-latent", type=float, default=0.0, help="lambda_latent of Eq. (9) (DivCo paired: 0)")
    p.add_argument("--lambda-kl", type=float, default=0.01, help="lambda_KL of Eq. (9); 0.01 / 8 on the toy data, "
                   "whose half-batch holds 8 images")
    p.add_argument("--diversity-loss", default="contrastive", choices=["contrastive", "mode-seeking", "none"])
    p.add_argument("--lambda-contra", type=float, default=0.3, help="lambda_contra (official paired: 0.3)")
    p.add_argument("--num-negatives", type=int, default=10, help="N negatives per query (official: 10)")
    p.add_argument("--radius", type=float, default=0.01, help="R of the latent augmentation (official: 0.01)")
    p.add_argument("--tau", type=float, default=1.0, help="temperature (official: 1.0)")
    p.add_argument("--featnorm", action="store_true", help="L2-normalised features (paper's text; official: off)")
    p.add_argument("--lambda-ms", type=float, default=1.0, help="weight of the mode-seeking term (MSGAN: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    common.add_speed_flags(p)  # --amp --channels-last --compile --no-cache
    p.add_argument("--out", help="run folder (default runs/divco_<dataset>)")
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
    toy = dict(common.TOY_PAIRED_TRAINING, lambda_kl=common.TOY_SUMMED_KL,  # the toy demo's choices (common.py)
               gan_trains_e=False)  # README, When G ignores z: D's pull on E merges the toy's colours
    args = common.parse_with_quick(p, argv, toy=toy, ngf=16, nef=16, ndf=16, num_workers=0)
    common.resolve_options(args, args.setting)
    common.check_options(args, __file__)  # counts, rates, --device, --out: one sentence for a bad value
    if args.setting == "paired" and (args.batch_size < 2 or args.batch_size % 2):
        common.fail(f"--batch-size {args.batch_size} is odd: BicycleGAN splits each batch into an encoded "
                    "and a random half, so use an even size such as 2")
    return args


# ---------------------------------------------------------------------------------------------
# 3. Networks: G, E and D are the shared blocks; paired: two Ds, one per cycle; unpaired: one D
#    and the auxiliary inverse generator F (B -> A)
# ---------------------------------------------------------------------------------------------
def network_names(args):
    return ["netG", "netE", "netD", "netD2" if args.setting == "paired" else "netF"]


def build_networks(args, device):
    netG = common.UNetGenerator(args.input_nc, args.output_nc, args.nz, args.crop_size, args.ngf,
                                args.norm_g or args.norm, use_dropout=not args.no_dropout, where_add=args.where_add)
    netE = common.make_encoder(args.encoder, args.output_nc, args.nz, args.nef, args.norm)
    netD = common.PatchDiscriminator(args.output_nc, args.ndf, norm=args.norm_d or args.norm, num_scales=2)
    if args.setting == "paired":
        last = common.PatchDiscriminator(args.output_nc, args.ndf, norm=args.norm_d or args.norm, num_scales=2)
    else:  # CycleGAN's choice: 9 residual blocks at 256 px, 6 below
        last = common.ResnetGenerator(args.output_nc, args.input_nc, args.ngf, 9 if args.crop_size >= 256 else 6,
                                      args.norm)
    # Official BicycleGAN init: xavier_normal with gain 0.02 for every network.
    return [common.init_weights(net, "xavier", 0.02).to(device) for net in (netG, netE, netD, last)]


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


def latent_augment(z, num_negatives, radius):
    """Positives and negatives for queries z (n, nz): z_pos (n, nz), z_neg (n, N, nz)."""
    # DivCo §3, latent augmentation (official: a box): z+ = z + eta, eta ~ U(-R, R) per coordinate
    z_pos = z + (2 * torch.rand_like(z) - 1) * radius
    # DivCo §3: |z- - z| > R element-wise; z- ~ N(0, I), drawn again while any coordinate is within R
    # (official code). close.any() reads a value from the GPU: the one host sync per iteration that
    # this script keeps (see README, "Speed").
    z_neg = torch.randn(z.size(0), num_negatives, z.size(1), device=z.device)
    close = ((z_neg - z[:, None]).abs() <= radius).any(-1)
    while close.any():
        z_neg[close] = torch.randn(int(close.sum()), z.size(1), device=z.device)
        close = ((z_neg - z[:, None]).abs() <= radius).any(-1)
    return z_pos, z_neg


def contrastive_loss(f, f_pos, f_neg, tau=1.0, normalize=False):
    """f, f_pos: (n, d); f_neg: (n, N, d). Mean over the n queries. Raw features by default
    (official code); normalize=True (--featnorm) for the paper's normalised ones."""
    if normalize:  # DivCo §3: <.,.> is the inner product of normalised features
        f, f_pos, f_neg = F.normalize(f, dim=-1), F.normalize(f_pos, dim=-1), F.normalize(f_neg, dim=-1)
    # DivCo §3, latent-augmented contrastive loss:
    # L_contra = -log( exp(f.f+ / tau) / (exp(f.f+ / tau) + sum_j exp(f.f-_j / tau)) )
    # (products and sums, not einsum, which --amp would run in bf16: all logits stay float32)
    logits = torch.cat([(f * f_pos).sum(-1, keepdim=True), (f[:, None] * f_neg).sum(-1)], 1) / tau
    return -torch.log_softmax(logits, 1)[:, 0].mean()


def mode_seeking_loss(fake_1, fake_2, z_1, z_2, eps=1e-5):
    # MSGAN (official code): L_ms = 1 / (mean|G(A, z1) - G(A, z2)| / mean|z1 - z2| + eps)
    ratio = (fake_1 - fake_2).abs().mean() / (z_1 - z_2).abs().mean()
    return 1 / (ratio + eps)


def diversity_term(netG, netE, real_A, z_random, fake_B_random, args):
    """The weighted diversity loss of the random branch (it reaches G only), and the extra fakes
    that face the random branch's D: mode seeking's second fake, none for the others."""
    if args.diversity_loss == "contrastive":
        z_pos, z_neg = latent_augment(z_random, args.num_negatives, args.radius)
        n, N = z_neg.shape[:2]
        fake_B_pos = netG(real_A, z_pos)
        fake_B_neg = netG(real_A.repeat_interleave(N, 0), z_neg.flatten(0, 1))
        # DivCo §3: f = E(x^), E held fixed for this term (frozen: no gradient can reach it)
        common.set_requires_grad(netE, False)
        f, _ = netE(torch.cat([fake_B_random, fake_B_pos, fake_B_neg]))
        common.set_requires_grad(netE, True)
        loss = contrastive_loss(f[:n], f[n:2 * n], f[2 * n:].view(n, N, -1), args.tau, args.featnorm)
        return args.lambda_contra * loss, []
    if args.diversity_loss == "mode-seeking":
        z_random2 = torch.randn_like(z_random)
        fake_B_random2 = netG(real_A, z_random2)
        loss = mode_seeking_loss(fake_B_random, fake_B_random2, z_random, z_random2)
        return args.lambda_ms * loss, [fake_B_random2]
    return torch.zeros((), device=real_A.device), []


# ---------------------------------------------------------------------------------------------
# 5. Training step: forward, G/E update with the diversity term, then the Ds
# ---------------------------------------------------------------------------------------------
def train_step(nets, optims, real_A, real_B, args):
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
    # that D's term trains G only (README, When G ignores z)
    judged_B_encoded = fake_B_encoded if args.gan_trains_e else netG(real_A_encoded, z_encoded.detach())
    # cLR-GAN cycle, z -> B -> z (official code: the random fake also uses the first half's A)
    z_random = torch.randn(half, args.nz, device=real_A.device)
    fake_B_random = netG(real_A_encoded, z_random)

    # G and E update. The Ds are frozen so that G's GAN terms do not fill their gradients.
    common.set_requires_grad([netD, netD2], False)
    opt_G.zero_grad(set_to_none=True)
    opt_E.zero_grad(set_to_none=True)
    # DivCo §3, overall objective: + lambda_contra L_contra, backpropagated into G with the rest
    # (mode seeking: with a second random fake, which faces D2 too, as in the official MSGAN)
    loss_div, extra_fakes = diversity_term(netG, netE, real_A_encoded, z_random, fake_B_random, args)
    fakes_random = [fake_B_random] + extra_fakes
    # The paper writes Eqs. (4) and (1) with D(A, B); §4 and the official code use an unconditional D
    # Eq. (4): L_GAN^VAE = E[log D(B)] + E[log(1 - D(G(A, E(B))))]   (LSGAN form, G's side)
    loss_G_GAN = common.gan_loss(netD(judged_B_encoded), True, args.gan_mode)
    # Eq. (1): L_GAN = E[log D(B)] + E[log(1 - D(G(A, z)))], z ~ N(0, I)   (second D, G's side)
    loss_G_GAN2 = sum(common.gan_loss(netD2(fake), True, args.gan_mode) for fake in fakes_random)
    loss_G_L1 = args.lambda_l1 * image_l1(fake_B_encoded, real_B_encoded)
    loss_kl = args.lambda_kl * kl_loss(mu, logvar)
    # Eq. (7), G only (DivCo paired default: lambda_latent = 0, the term vanishes)
    common.set_requires_grad(netE, False)
    mu_random, _ = netE(fake_B_random)
    common.set_requires_grad(netE, True)
    loss_z_L1 = args.lambda_latent * latent_l1(mu_random, z_random)
    (loss_G_GAN + loss_G_GAN2 + loss_G_L1 + loss_kl + loss_z_L1 + loss_div).backward()
    opt_E.step()
    opt_G.step()

    # D update (Eq. (4)); D2 update (Eq. (1)): real + fake, on detached fakes, no 1/2 (official);
    # D2 once per random fake (mode seeking: the real half counts twice, as in the official MSGAN)
    common.set_requires_grad([netD, netD2], True)
    opt_D.zero_grad(set_to_none=True)
    loss_D = (common.gan_loss(netD(real_B_encoded), True, args.gan_mode)
              + common.gan_loss(netD(judged_B_encoded.detach()), False, args.gan_mode))
    loss_D.backward()
    opt_D.step()
    opt_D2.zero_grad(set_to_none=True)
    loss_D2 = sum(common.gan_loss(netD2(real_B_random), True, args.gan_mode)
                  + common.gan_loss(netD2(fake.detach()), False, args.gan_mode) for fake in fakes_random)
    loss_D2.backward()
    opt_D2.step()
    return {"G_GAN": loss_G_GAN, "G_GAN2": loss_G_GAN2, "G_L1": loss_G_L1, "kl": loss_kl,
            "z_L1": loss_z_L1, "div": loss_div, "D": loss_D, "D2": loss_D2}


def train_step_unpaired(nets, optims, real_A, real_B, args):
    """Unaligned A and B: the whole batch is the random branch, G(A, z) -> B, F(G(A, z)) -> A."""
    netG, netE, netD, netF = nets
    opt_G, opt_E, opt_D, opt_F = optims
    z_random = torch.randn(real_A.size(0), args.nz, device=real_A.device)
    fake_B_random = netG(real_A, z_random)

    common.set_requires_grad(netD, False)
    for opt in (opt_G, opt_E, opt_F):
        opt.zero_grad(set_to_none=True)
    loss_div, extra_fakes = diversity_term(netG, netE, real_A, z_random, fake_B_random, args)
    fakes_random = [fake_B_random] + extra_fakes  # mode seeking: both fakes face D (official MSGAN)
    # Eq. (1), written with D(A, B); unconditional here: L_GAN = E[log D(B)] + E[log(1 - D(G(A, z)))]
    loss_G_GAN = sum(common.gan_loss(netD(fake), True, args.gan_mode) for fake in fakes_random)
    # DivCo §3, L_opt for unpaired translation: cycle reconstruction || F(G(A, z)) - A ||_1
    loss_cycle = args.lambda_l1 * (netF(fake_B_random) - real_A).abs().mean()
    # Eq. (7), G only (E frozen), off by default as in the paired variant
    common.set_requires_grad(netE, False)
    mu_random, _ = netE(fake_B_random)
    common.set_requires_grad(netE, True)
    loss_z_L1 = args.lambda_latent * latent_l1(mu_random, z_random)
    (loss_G_GAN + loss_cycle + loss_z_L1 + loss_div).backward()
    # Not in the paper: E learns as a latent regressor, Eq. (7) for E only (detached fake), so that
    # the contrastive features follow z.
    loss_E = latent_l1(netE(fake_B_random.detach())[0], z_random)
    loss_E.backward()
    for opt in (opt_E, opt_G, opt_F):
        opt.step()

    # D update (Eq. (1)): real + fake, on the detached fake(s)
    common.set_requires_grad(netD, True)
    opt_D.zero_grad(set_to_none=True)
    loss_D = sum(common.gan_loss(netD(real_B), True, args.gan_mode)
                 + common.gan_loss(netD(fake.detach()), False, args.gan_mode) for fake in fakes_random)
    loss_D.backward()
    opt_D.step()
    return {"G_GAN": loss_G_GAN, "cycle": loss_cycle, "z_L1": loss_z_L1, "E_latent": loss_E,
            "div": loss_div, "D": loss_D}


# ---------------------------------------------------------------------------------------------
# 6. Sampling and test
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def translate(netG, netE, real_A, real_B, z_random):
    """One input (1, C, H, W) -> its encoded output (z = mu of E(B)) and one output per row of z.
    Unpaired: B is an unrelated example, so the encoded output takes its look (E regresses z)."""
    mu, _ = netE(real_B)
    encoded = netG(real_A, mu)[0]
    samples = netG(real_A.expand(len(z_random), -1, -1, -1), z_random)
    return encoded, list(samples)


def sample_grid(netG, netE, items, z_random, path, device, toy=False):
    """Training preview: per input, input | ground truth (unpaired: example B) | encoded | samples."""
    netG.eval(), netE.eval()
    rows = []
    for item in items:
        real_A, real_B = item["A"][None].to(device), item["B"][None].to(device)
        encoded, samples = translate(netG, netE, real_A, real_B, z_random)
        rows.append([item["A"], item["B"], encoded] + samples)
    netG.train(), netE.train()
    return common.save_preview(rows, path, first_sample=3, toy=toy)  # diversity of the samples


def load_dataset(args, train):
    return (common.paired_dataset if args.setting == "paired" else common.unpaired_dataset)(args, train=train)


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
    dataset = load_dataset(args, train=False)
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
        if args.setting == "paired":
            results.append(dict(item, encoded=encoded, samples=samples))
        else:  # no ground truth: B is the example the encoded output was made from
            results.append(dict(item, B=None, encoded=encoded, samples=samples, extra=[("example_B", item["B"])]))
    common.write_test_results(out / "test", results, args)


# ---------------------------------------------------------------------------------------------
# 7. Main: a plain loop over epochs and batches
# ---------------------------------------------------------------------------------------------
def main(args):
    device = common.setup_distributed(args.device)  # Multi-GPU: torchrun -> process group, GPU of this rank
    if args.test:
        return test(args, device) if common.is_main() else None  # Multi-GPU: rank 0 tests
    out = common.default_out(args, __file__)
    dataset = common.keep_in_memory(load_dataset(args, train=True), device, args)  # decoded once
    common.check_trainable(dataset, args.batch_size)
    common.seed_everything(args.seed)
    nets = common.speed_up(build_networks(args, device), args)  # --channels-last, --compile
    # Multi-GPU: train_step gets the networks wrapped in DDP, which averages gradients over ranks
    # (world size 1: the same networks); checkpoints, previews and the test use the plain ones.
    # Unpaired: E's logvar head gets no gradient (no KL), DDP is told to look for such parameters.
    train_nets = common.distribute(nets, device, find_unused=[nets[1]] if args.setting == "unpaired" else [])
    optims = [common.adam(net, args.lr, (args.beta1, 0.999)) for net in nets]
    schedulers = [common.linear_decay(opt, args.epochs, args.epochs_decay) for opt in optims]
    names = network_names(args)
    step_fn = train_step if args.setting == "paired" else train_step_unpaired
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
                losses = step_fn(train_nets, optims, real_A, real_B, args)
            step += 1
            speed.step(args.batch_size * common.world_size())  # images of all ranks
            bar.update(1)
            if step % args.log_every == 0 or step == total:
                values = common.mean_over_ranks(losses)  # host sync, mean over ranks (contrastive: also the rejection loop)
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
