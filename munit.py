r"""MUNIT -- "Multimodal Unsupervised Image-to-Image Translation", Huang, Liu, Belongie, Kautz
(ECCV 2018), arXiv:1804.04732v2.

What it adds: CycleGAN's unpaired setting, made multimodal. Each image is split into a content
code (spatial, shared by both domains) and a style code (8 numbers, one prior N(0, I) per domain).
Translating a -> b keeps a's content and draws b's style from the prior, so one input gives many
outputs. Instead of a pixel cycle, the codes are asked to survive the translation: the content of
a comes back from the output, and so does the style it was made with (bidirectional reconstruction).

Full objective (MUNIT §3.2; the paper's equation numbers are not verified here, so sections are cited):
    \min_{E_1,E_2,G_1,G_2} \max_{D_1,D_2} \mathcal{L}^{x_1}_{GAN} + \mathcal{L}^{x_2}_{GAN}
        + \lambda_x (\mathcal{L}^{x_1}_{recon} + \mathcal{L}^{x_2}_{recon})
        + \lambda_c (\mathcal{L}^{c_1}_{recon} + \mathcal{L}^{c_2}_{recon})
        + \lambda_s (\mathcal{L}^{s_1}_{recon} + \mathcal{L}^{s_2}_{recon})
optionally + \lambda_{cyc} (||G_1(E^c_2(G_2(c_1, s_2)), s_1) - x_1||_1 + the same for x_2), the
explicit style-augmented cycle loss (official recon_x_cyc_w; off by default).

Symbols (paper -> code):
    x_1, x_2                    real_A, real_B (--direction BtoA swaps them)
    E^c_1, E^s_1, G_1           gen_a.content_encoder, gen_a.style_encoder, gen_a.decoder (same for b)
    c_1 = E^c_1(x_1)            content_a;  its code read back from the translation: content_a_recon
    s_1 = E^s_1(x_1)            style_a (encoded);  s_1 ~ N(0, I): style_a_random;  read back: style_a_recon
    G_1(c_1, s_1)               rec_A (within-domain reconstruction)
    G_2(c_1, s_2)               fake_B (a -> b with a prior style);  G_1(c_2, s_1): fake_A
    D_1, D_2                    dis_a, dis_b (three scales each)
    lambda_x, lambda_c, lambda_s   --lambda-x 10, --lambda-c 1, --lambda-s 1 (official configs)

Update order, per batch of 1 (official code): D step first (fresh prior styles, fakes without a
graph), then the G step on the same batch with new prior styles. The style reconstruction target
is the sampled prior code; the content target c_1 is not detached, so E^c_1 also learns from it.

Deviations:
- From the paper: none intended. The GAN terms use the least-squares form, as the official code.
- From the official code: layer norm is nn.GroupNorm(1, C) (it divides by sqrt(var + eps) instead
  of std + eps and starts its scale at 1 instead of uniform); D is frozen during the G step (the
  official code lets G's loss fill D's gradients and clears them before the next D step: same result).
- Length of training: MUNIT counts iterations (official: 1M, lr x 1/2 every 100k). Here an
  epoch is one pass over max(|A|, |B|) images, the run lasts --epochs + --epochs-decay epochs (both
  plain: there is no linear decay) or --max-iters iterations, whichever ends first, and the lr is
  halved every --step-size iterations. For the paper's schedule: --max-iters 1000000 and enough epochs.
- Data as the official configs: edges2shoes / edges2handbags edges are read as 3 channels at
  256 px with no larger load (the paired scripts read them as 1 channel; --input-nc 1 for that).
- Test: A -> B only, --n-samples prior styles per input (10, as the paper), --sync to share them
  across inputs, or --style IMAGE for example-guided outputs (the style of a real B image).

Usage:
    python munit.py                                      # built-in toy data (outlines -> filled shapes)
    python munit.py --dataset edges2shoes --max-iters 1000000   # paired files used unpaired, 1M iterations
    python munit.py --dataset edges2shoes --test [--sync | --style shoe.jpg]
"""
import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------------
# 2. Options (defaults: the official configs; per-dataset ones in common)
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MUNIT (arXiv:1804.04732): multimodal unpaired translation")
    p.add_argument("--dataset", default="toy", help="toy (built-in), a known name, a folder with trainA/ trainB/ "
                   "testA/ testB/, or a paired folder or name (left halves A, right halves B)")
    p.add_argument("--direction", choices=["AtoB", "BtoA"], help="BtoA swaps the two domains (default AtoB)")
    p.add_argument("--load-size", type=int, help="resize to this square size, then crop (default: per dataset)")
    p.add_argument("--crop-size", type=int, help="training crop size = network input size (default: per dataset)")
    p.add_argument("--input-nc", type=int, help="channels of domain A (default: per dataset)")
    p.add_argument("--output-nc", type=int, default=3, help="channels of domain B")
    p.add_argument("--batch-size", type=int, default=1, help="official: 1"
                   "; per process under torchrun (README, Multi-GPU)")
    p.add_argument("--epochs", type=int, help="epochs to run (default: per dataset; see the docstring)")
    p.add_argument("--epochs-decay", type=int, help="more epochs to run (no linear decay in MUNIT)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (official)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (official)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="Adam weight decay (official)")
    p.add_argument("--step-size", type=int, default=100_000, help="halve the lr every this many iterations (official)")
    p.add_argument("--ngf", type=int, help="encoder/decoder base width (default 64; 16 on the toy data)")
    p.add_argument("--ndf", type=int, help="D width at every scale (default 64; 16 on the toy data)")
    p.add_argument("--style-dim", type=int, default=8, help="|s| (official configs)")
    p.add_argument("--mlp-dim", type=int, default=256, help="hidden width of the style MLP (official)")
    p.add_argument("--n-res", type=int, default=4, help="residual blocks in the content encoder and decoder")
    p.add_argument("--num-scales", type=int, default=3, help="scales of each D (official)")
    p.add_argument("--lambda-x", type=float, default=10.0, help="lambda_x, image reconstruction weight (official: 10)")
    p.add_argument("--lambda-c", type=float, default=1.0, help="lambda_c, content reconstruction weight (official: 1)")
    p.add_argument("--lambda-s", type=float, default=1.0, help="lambda_s, style reconstruction weight (official: 1)")
    p.add_argument("--lambda-cycle", type=float, default=0.0, help="explicit style-augmented cycle loss (official: "
                   "0 or 10, for outputs that should stay pixel-aligned)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    common.add_speed_flags(p)  # --amp --channels-last --compile --no-cache
    p.add_argument("--out", help="run folder (default runs/munit_<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/latest.pt (or --checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint file for --resume and --test (default <out>/latest.pt)")
    p.add_argument("--max-iters", type=int, help="stop after this many iterations and print images/s")
    p.add_argument("--log-every", type=int, default=50, help="iterations between loss logs")
    p.add_argument("--quick", action="store_true", help="smoke run: toy data, narrow nets, 20 iterations")
    p.add_argument("--test", action="store_true", help="write samples for the test split (A -> B) instead of training")
    p.add_argument("--n-samples", type=int, default=10, help="random styles per test input (paper: 10)")
    p.add_argument("--num-test", type=int, default=100, help="test inputs to use (paper: 100)")
    p.add_argument("--sync", action="store_true", help="use the same styles for every test input")
    common.add_inference_flags(p)  # --input --half --resize --style (also for --test) --interpolate
    args = common.parse_with_quick(p, argv, ngf=16, ndf=16, mlp_dim=32, num_workers=0)
    # Official configs (edges2shoes/edges2handbags_folder.yaml): edges as 3 channels, new_size 256 and
    # a 256 crop, no larger load. Only the channels differ from the paired defaults (1 channel).
    if Path(args.dataset).name in ("edges2shoes", "edges2handbags") and args.input_nc is None:
        args.input_nc = 3
    common.resolve_options(args, layout="unpaired")
    common.check_options(args, __file__)  # counts, rates, --device, --out: one sentence for a bad value
    if args.crop_size % 4 or args.crop_size < 64:
        common.fail(f"--crop-size {args.crop_size} does not fit MUNIT's nets: use a multiple of 4 of at least 64 "
                    "(the third D scale and the style encoder halve it several times)")
    return args


# ---------------------------------------------------------------------------------------------
# 3. Networks (official architecture): per domain a content encoder, a style encoder and a
#    decoder whose AdaIN parameters an MLP computes from the style; a 3-scale D per domain
# ---------------------------------------------------------------------------------------------
class AdaptiveInstanceNorm(nn.Module):
    """AdaIN(x) = gamma(s) * (x - mean(x)) / std(x) + beta(s), per sample and channel; gamma and
    beta are written into .gamma and .beta by the decoder (from its MLP) before each forward."""

    def __init__(self, channels):
        super().__init__()
        self.channels, self.gamma, self.beta = channels, None, None

    def forward(self, x):
        return F.instance_norm(x, eps=1e-5) * self.gamma[:, :, None, None] + self.beta[:, :, None, None]


def content_encoder(input_nc, ngf, n_res):
    """conv7 (ngf) -> two stride-2 conv4 (to 4 ngf) -> n_res residual blocks; instance norm, ReLU."""
    IN = common.norm_layer("instance")
    layers, c = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7), IN(ngf), nn.ReLU(True)], ngf
    for _ in range(2):
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(c, 2 * c, 4, 2), IN(2 * c), nn.ReLU(True)]
        c *= 2
    layers += [common.ResnetBlock(c, IN) for _ in range(n_res)]
    return nn.Sequential(*layers)


def style_encoder(input_nc, ngf, style_dim):
    """No normalisation (it would erase the style): conv7 -> four stride-2 conv4 (ngf -> 2 -> 4 ->
    4 -> 4 ngf) -> global average pool -> 1x1 conv to style_dim. Output (N, style_dim, 1, 1)."""
    layers, c = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7), nn.ReLU(True)], ngf
    for i in range(4):
        c_next = 2 * c if i < 2 else c
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(c, c_next, 4, 2), nn.ReLU(True)]
        c = c_next
    layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, style_dim, 1)]
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """n_res residual blocks with AdaIN -> 2 x (nearest upsample x2 -> conv5 -> layer norm -> ReLU)
    -> conv7 -> Tanh. The MLP (style_dim -> mlp_dim -> mlp_dim -> every AdaIN's gamma and beta)
    sits in the official generator next to the decoder; it is kept here, where it is used."""

    def __init__(self, output_nc, c, n_res, style_dim, mlp_dim):
        super().__init__()
        self.res = nn.Sequential(*[common.ResnetBlock(c, AdaptiveInstanceNorm) for _ in range(n_res)])
        layers = []
        for _ in range(2):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(2), nn.Conv2d(c, c // 2, 5),
                       nn.GroupNorm(1, c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, output_nc, 7), nn.Tanh()]
        self.up = nn.Sequential(*layers)
        self.adain = [m for m in self.res.modules() if isinstance(m, AdaptiveInstanceNorm)]
        n_params = sum(2 * m.channels for m in self.adain)
        self.mlp = nn.Sequential(nn.Linear(style_dim, mlp_dim), nn.ReLU(True), nn.Linear(mlp_dim, mlp_dim),
                                 nn.ReLU(True), nn.Linear(mlp_dim, n_params))

    def forward(self, content, style):
        params = self.mlp(style.flatten(1))
        for m in self.adain:  # official order per layer: the biases (beta), then the scales (gamma)
            c = m.channels
            m.beta, m.gamma, params = params[:, :c], params[:, c:2 * c], params[:, 2 * c:]
        return self.up(self.res(content))


class AdaINGenerator(nn.Module):
    """One domain's auto-encoder: encode(x) -> (content, style); decode(content, style) -> image."""

    def __init__(self, nc, ngf, n_res, style_dim, mlp_dim):
        super().__init__()
        self.content_encoder = content_encoder(nc, ngf, n_res)
        self.style_encoder = style_encoder(nc, ngf, style_dim)
        self.decoder = Decoder(nc, 4 * ngf, n_res, style_dim, mlp_dim)

    def encode(self, x):
        return self.content_encoder(x), self.style_encoder(x)

    def decode(self, content, style):
        return self.decoder(content, style)


class MultiScaleDiscriminator(nn.Module):
    """num_scales copies of [conv4 s2 (ndf) -> 3 more conv4 s2 doubling to 8 ndf -> 1x1 conv to 1],
    LeakyReLU 0.2, no norm, reflect padding; the input is average-pooled between scales. Returns a
    list with one map per scale, which common.gan_loss sums."""

    def __init__(self, input_nc, ndf, num_scales=3, n_layers=4):
        super().__init__()
        self.scales = nn.ModuleList()
        for _ in range(num_scales):
            layers, c_in, c = [], input_nc, ndf
            for _ in range(n_layers):
                layers += [nn.ReflectionPad2d(1), nn.Conv2d(c_in, c, 4, 2), nn.LeakyReLU(0.2, True)]
                c_in, c = c, 2 * c
            self.scales.append(nn.Sequential(*layers, nn.Conv2d(c_in, 1, 1)))
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, x):
        outputs = []
        for net in self.scales:
            outputs.append(net(x))
            x = self.pool(x)
        return outputs


def build_networks(args, device):
    gen_a = AdaINGenerator(args.input_nc, args.ngf, args.n_res, args.style_dim, args.mlp_dim)
    gen_b = AdaINGenerator(args.output_nc, args.ngf, args.n_res, args.style_dim, args.mlp_dim)
    dis_a = MultiScaleDiscriminator(args.input_nc, args.ndf, args.num_scales)
    dis_b = MultiScaleDiscriminator(args.output_nc, args.ndf, args.num_scales)
    # Official MUNIT init: kaiming (fan in) for the generators, N(0, 0.02) for the discriminators.
    gens = [common.init_weights(g, "kaiming").to(device) for g in (gen_a, gen_b)]
    return gens + [common.init_weights(d, "normal", 0.02).to(device) for d in (dis_a, dis_b)]


# ---------------------------------------------------------------------------------------------
# 4. Loss terms (every reconstruction is a mean absolute error, as the official recon_criterion)
# ---------------------------------------------------------------------------------------------
def recon_loss(output, target):
    return (output.float() - target.float()).abs().mean()  # float32 also for --amp's bf16 content codes


def generator_losses(gen_a, gen_b, dis_a, dis_b, real_A, real_B, style_a_random, style_b_random, args):
    """Every term of the G objective for one batch and the given prior styles (a dict, weighted)."""
    content_a, style_a = gen_a.encode(real_A)
    content_b, style_b = gen_b.encode(real_B)
    rec_A, rec_B = gen_a.decode(content_a, style_a), gen_b.decode(content_b, style_b)
    fake_A = gen_a.decode(content_b, style_a_random)
    fake_B = gen_b.decode(content_a, style_b_random)
    content_b_recon, style_a_recon = gen_a.encode(fake_A)
    content_a_recon, style_b_recon = gen_b.encode(fake_B)
    losses = {
        # MUNIT §3.2, adversarial loss: L_GAN^{x2} = E[log(1 - D2(G2(c1, s2)))] + E[log D2(x2)];
        # official code: least squares, G's side E[(D2(G2(c1, s2)) - 1)^2], summed over D's scales
        "gan_A": common.gan_loss(dis_a(fake_A), True),
        "gan_B": common.gan_loss(dis_b(fake_B), True),
        # MUNIT §3.2, image reconstruction: L_recon^{x1} = E|| G1(E1c(x1), E1s(x1)) - x1 ||_1
        "x_A": args.lambda_x * recon_loss(rec_A, real_A),
        "x_B": args.lambda_x * recon_loss(rec_B, real_B),
        # MUNIT §3.2, content reconstruction: L_recon^{c1} = E|| E2c(G2(c1, s2)) - c1 ||_1
        # (the target c1 is not detached: the official code lets the gradient reach E1c both ways)
        "c_A": args.lambda_c * recon_loss(content_a_recon, content_a),
        "c_B": args.lambda_c * recon_loss(content_b_recon, content_b),
        # MUNIT §3.2, style reconstruction: L_recon^{s2} = E|| E2s(G2(c1, s2)) - s2 ||_1, s2 ~ N(0, I):
        # the target is the sampled prior code, not a code encoded from a real image
        "s_A": args.lambda_s * recon_loss(style_a_recon, style_a_random),
        "s_B": args.lambda_s * recon_loss(style_b_recon, style_b_random),
    }
    if args.lambda_cycle > 0:
        # MUNIT, explicit style-augmented cycle loss (section not verified; official recon_x_cyc_w):
        # E|| G1(E2c(G2(c1, s2)), E1s(x1)) - x1 ||_1
        losses["cyc_A"] = args.lambda_cycle * recon_loss(gen_a.decode(content_a_recon, style_a), real_A)
        losses["cyc_B"] = args.lambda_cycle * recon_loss(gen_b.decode(content_b_recon, style_b), real_B)
    return losses


def discriminator_loss(dis, real, fake):
    # MUNIT §3.2, adversarial loss, D's side; official code: least squares, summed over scales,
    # E[(D(x) - 1)^2] + E[D(G(c, s))^2]   (no 1/2, unlike CycleGAN)
    return common.gan_loss(dis(real), True) + common.gan_loss(dis(fake), False)


# ---------------------------------------------------------------------------------------------
# 5. Training step: D step first, then the G step on the same batch with fresh prior styles
# ---------------------------------------------------------------------------------------------
def sample_styles(n, args, device):
    # MUNIT §3, the style prior: q(s) = N(0, I), one code per image, shaped (n, style_dim, 1, 1)
    return torch.randn(n, args.style_dim, 1, 1, device=device)


def train_step(nets, optims, real_A, real_B, args):
    gen_a, gen_b, dis_a, dis_b = nets
    opt_gen, opt_dis = optims
    n = real_A.size(0)

    # D step: fakes from prior styles, made without a graph through the generators (official: detach)
    with torch.no_grad():
        content_a, _ = gen_a.encode(real_A)
        content_b, _ = gen_b.encode(real_B)
        fake_A = gen_a.decode(content_b, sample_styles(n, args, real_A.device))
        fake_B = gen_b.decode(content_a, sample_styles(n, args, real_A.device))
    opt_dis.zero_grad(set_to_none=True)
    loss_D_A = discriminator_loss(dis_a, real_A, fake_A)
    loss_D_B = discriminator_loss(dis_b, real_B, fake_B)
    (loss_D_A + loss_D_B).backward()
    opt_dis.step()

    # G step (both encoders, decoders and MLPs) with new prior styles; the Ds are frozen
    common.set_requires_grad([dis_a, dis_b], False)
    opt_gen.zero_grad(set_to_none=True)
    style_a_random, style_b_random = sample_styles(n, args, real_A.device), sample_styles(n, args, real_A.device)
    losses = generator_losses(gen_a, gen_b, dis_a, dis_b, real_A, real_B, style_a_random, style_b_random, args)
    sum(losses.values()).backward()
    opt_gen.step()
    common.set_requires_grad([dis_a, dis_b], True)
    return losses | {"D_A": loss_D_A, "D_B": loss_D_B}


# ---------------------------------------------------------------------------------------------
# 6. Sampling and test
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def translate(gen_a, gen_b, real_A, styles):
    """One input (1, C, H, W) -> one output of domain B per style code (keeps A's content)."""
    content_a, _ = gen_a.encode(real_A)
    return list(gen_b.decode(content_a.expand(len(styles), -1, -1, -1), styles))


def sample_grid(gen_a, gen_b, items, styles, path, device, toy=False):
    """Training preview: per input, real_A | its reconstruction | outputs for fixed prior styles."""
    gen_a.eval(), gen_b.eval()
    rows = []
    for item in items:
        real_A = item["A"][None].to(device)
        with torch.no_grad():
            rec_A = gen_a.decode(*gen_a.encode(real_A))[0]
        rows.append([item["A"], rec_A] + translate(gen_a, gen_b, real_A, styles))
    gen_a.train(), gen_b.train()
    return common.save_preview(rows, path, first_sample=2, toy=toy)  # diversity of the styles


def test(args, device):
    out = common.default_out(args, __file__)
    ckpt = common.load_checkpoint(args.checkpoint or out / "latest.pt", device, args)
    gen_a, gen_b, _, _ = build_networks(args, device)
    gen_a.load_state_dict(ckpt["gen_a"]), gen_b.load_state_dict(ckpt["gen_b"])
    gen_a.eval(), gen_b.eval()
    if args.input:  # own images at their own size (two stride-2 convs: multiples of 4); --style: B's style code
        return common.translate_own_images(args, device, lambda A, s: translate(gen_a, gen_b, A, s), multiple=4,
                                           code_shape=(args.style_dim, 1, 1), encode=lambda g: gen_b.encode(g)[1])
    common.check_test_size(args, 4)
    dataset = common.unpaired_dataset(args, train=False)
    generator = torch.Generator().manual_seed(args.seed)

    def draw():  # n_samples prior styles, reproducible for a seed
        return torch.randn(args.n_samples, args.style_dim, 1, 1, generator=generator).to(device)

    styles_sync, extra = draw(), []
    if args.style:  # example-guided translation: the style code of a real image of domain B
        style_image = common.read_guides(args, device)[0]
        with torch.no_grad():
            styles_sync = gen_b.encode(style_image)[1]
        extra = [("style", style_image[0])]
    results = []
    for i in range(min(len(dataset.paths_A), args.num_test)):
        item = dataset[i]
        styles = styles_sync if args.sync or args.style else draw()
        samples = translate(gen_a, gen_b, item["A"][None].to(device), styles)
        results.append({"A": item["A"], "samples": samples, "path": item["path"], "extra": extra})
    common.write_test_results(out / "test", results, args)


# ---------------------------------------------------------------------------------------------
# 7. Main: a plain loop over epochs and batches
# ---------------------------------------------------------------------------------------------
def main(args):
    device = common.setup_distributed(args.device)  # Multi-GPU: torchrun -> process group, GPU of this rank
    if args.test:
        return test(args, device) if common.is_main() else None  # Multi-GPU: rank 0 tests
    out = common.default_out(args, __file__)
    dataset = common.keep_in_memory(common.unpaired_dataset(args, train=True), device, args)  # decoded once
    common.check_trainable(dataset, args.batch_size)
    common.seed_everything(args.seed)
    nets = common.speed_up(build_networks(args, device), args)  # --channels-last, --compile
    # Multi-GPU: train_step gets the networks wrapped in DDP, which averages gradients over ranks
    # (world size 1: the same networks); checkpoints, previews and the test use the plain ones.
    # The generators are used through encode/decode, not forward: DDP is told to watch those.
    train_nets = common.distribute(nets, device, methods=("encode", "decode"))
    gen_a, gen_b, dis_a, dis_b = nets
    # One optimizer for both generators, one for both Ds; lr x 1/2 every --step-size iterations (official)
    betas = (args.beta1, 0.999)
    optims = [common.adam([gen_a, gen_b], args.lr, betas, args.weight_decay),
              common.adam([dis_a, dis_b], args.lr, betas, args.weight_decay)]
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, args.step_size, gamma=0.5) for opt in optims]
    names = ["gen_a", "gen_b", "dis_a", "dis_b", "opt_gen", "opt_dis", "sched_gen", "sched_dis"]
    parts = dict(zip(names, nets + optims + schedulers))  # everything the checkpoint holds, by name
    epoch, skip, step = 0, 0, 0
    if args.resume:
        epoch, skip, step = common.resume(args.checkpoint or out / "latest.pt", device, args, parts)
    common.save_options(args, out)
    log = common.LossLog(out / "losses.csv", resume=args.resume)
    preview = [dataset[i] for i in range(min(4, len(dataset)))]
    toy = common.toy_outputs(args)  # previews also count the colours their samples reach
    styles_preview = torch.randn(4, args.style_dim, 1, 1, generator=torch.Generator().manual_seed(args.seed)).to(device)

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
            for scheduler in schedulers:  # per iteration (official)
                scheduler.step()
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
        epoch += 1
        if common.is_main():  # Multi-GPU: rank 0 writes the preview and logs its diversity
            stats = sample_grid(gen_a, gen_b, preview, styles_preview, out / f"samples_epoch_{epoch:03d}.png", device, toy)
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
