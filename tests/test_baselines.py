"""The paper's baselines (pix2pix_noise.py, cvae_gan.py, clr_gan.py) and cVAE-GAN++ (bicyclegan.py
--lambda-latent 0): each loss term by hand, where the gradients go, and runs as a user would."""
import csv
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bicyclegan
import clr_gan
import common
import cvae_gan
import pix2pix_noise
from conftest import FACADES, needs_facades, run_script

TINY = ["--crop-size", "64", "--load-size", "64", "--ngf", "4", "--nef", "4", "--ndf", "4"]
NARROW = ["--ngf", "8", "--nef", "8", "--ndf", "8"]  # with --quick: 64 px, toy data, CPU seconds



# --- stubs whose outputs are known, so each reported loss can be computed by hand --------------
class ConstD(nn.Module):
    """Two 'scales' whose every patch is c; remembers how many channels it was shown."""

    def __init__(self, c):
        super().__init__()
        self.c, self.channels = nn.Parameter(torch.tensor(c)), []

    def forward(self, x):
        self.channels.append(x.size(1))
        return [self.c.expand(x.size(0), 1, 3, 3), self.c.expand(x.size(0), 1, 2, 2)]


class ConstG(nn.Module):
    """G(A, z) = g everywhere; remembers the z it was given and the image it returned."""

    def __init__(self, g):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(g))

    def forward(self, real_A, z):
        self.z = z.detach().clone()
        self.out = self.g.expand(real_A.size(0), 3, real_A.size(2), real_A.size(3))
        return self.out


class ConstE(nn.Module):
    """E(B) = (mu, logvar), the same for every image; remembers what it was shown."""

    def __init__(self, mu, logvar):
        super().__init__()
        self.mu, self.logvar = nn.Parameter(torch.tensor(mu)), nn.Parameter(torch.tensor(logvar))

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.mu.expand(x.size(0), -1), self.logvar.expand(x.size(0), -1)


# The unit tests check the official configuration (batch 2, instance norm, lambda_KL 0.01): a real
# data set's name gives it; the toy data's own defaults (common.TOY_PAIRED_TRAINING) differ.
OFFICIAL = ["--dataset", "facades"]


def stub_step(module, nets, argv):
    args = module.parse_args(OFFICIAL + argv)
    optims = [torch.optim.SGD(net.parameters(), lr=0.0) for net in nets]
    real_A, real_B = torch.rand(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    torch.manual_seed(0)
    losses = module.train_step(nets, optims, real_A, real_B, args)
    return {k: v.item() for k, v in losses.items()}, real_A


def softplus(x):
    return math.log1p(math.exp(x))


# --- loss terms against hand-computed values --------------------------------------------------
def test_pix2pix_noise_losses_by_hand():
    netG, netD = ConstG(0.25), ConstD(0.3)
    losses, _ = stub_step(pix2pix_noise, [netG, netD], [])
    # LSGAN summed over D's two scales: G wants 1; D wants 1 on real, 0 on fake; lambda = 10
    assert losses["G_GAN"] == pytest.approx(2 * (0.3 - 1) ** 2)
    assert losses["G_L1"] == pytest.approx(10 * 0.25)
    assert losses["D"] == pytest.approx(2 * (0.3 - 1) ** 2 + 2 * 0.3 ** 2)
    assert set(netD.channels) == {3}  # D sees B only (paper §4)
    assert netG.z.shape == (2, 8) and not torch.equal(netG.z[0], netG.z[1])  # one z per image


def test_pix2pix_original_losses_by_hand():
    netG, netD = ConstG(0.25), ConstD(0.3)
    losses, _ = stub_step(pix2pix_noise, [netG, netD], ["--pix2pix-original"])
    # vanilla GAN: -log sigmoid(c) = softplus(-c); lambda = 100; D's loss halved; D sees A||B
    assert losses["G_GAN"] == pytest.approx(2 * softplus(-0.3))
    assert losses["G_L1"] == pytest.approx(100 * 0.25)
    assert losses["D"] == pytest.approx(0.5 * (2 * softplus(-0.3) + 2 * softplus(0.3)))
    assert set(netD.channels) == {6}
    args = pix2pix_noise.parse_args(["--pix2pix-original", "--lambda-l1", "7", "--gan-mode", "lsgan"])
    assert (args.lambda_l1, args.gan_mode) == (7.0, "lsgan")  # explicit flags still win


@pytest.mark.parametrize("deterministic", [False, True])
def test_cvae_gan_losses_by_hand(deterministic):
    mu, logvar = [0.5, -1.0], [0.0, math.log(2.0)]
    netG, netE, netD = ConstG(-0.5), ConstE(mu, logvar), ConstD(0.3)
    losses, _ = stub_step(cvae_gan, [netG, netE, netD], ["--nz", "2"] + ["--deterministic"] * deterministic)
    # KL(N(m, s^2) || N(0, 1)) = (s^2 + m^2 - 1 - ln s^2) / 2 per dimension, summed over the
    # dimensions and averaged over the 2 images (both images here are the same, so: one image's KL)
    kl = sum((math.exp(lv) + m * m - 1 - lv) / 2 for m, lv in zip(mu, logvar))
    assert losses["kl"] == pytest.approx(0.0 if deterministic else 0.01 * kl)
    assert losses["G_L1"] == pytest.approx(10 * 0.5)
    assert losses["G_GAN"] == pytest.approx(2 * (0.3 - 1) ** 2)
    assert losses["D"] == pytest.approx(2 * (0.3 - 1) ** 2 + 2 * 0.3 ** 2)
    assert torch.equal(netE.seen, torch.zeros(2, 3, 8, 8))  # E reads the real B
    z_is_mu = torch.equal(netG.z, torch.tensor([mu, mu]))
    assert z_is_mu == deterministic  # cAE-GAN: z = E(B); cVAE-GAN: a sample around it


def test_cvae_gan_kl_weight_matches_bicyclegan_at_batch_2():
    """Official code: the KL is summed over the encoded half-batch, one image at batch 2. cvae_gan.py
    encodes the whole batch, so it averages over images; bicyclegan.py sums over its half."""
    mu, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, math.log(2.0)]])
    one = cvae_gan.kl_loss(mu, logvar).item()
    assert cvae_gan.kl_loss(mu.repeat(3, 1), logvar.repeat(3, 1)).item() == pytest.approx(one)  # mean over images
    assert bicyclegan.kl_loss(mu.repeat(3, 1), logvar.repeat(3, 1)).item() == pytest.approx(3 * one)  # official sum
    E = ([0.5, -1.0], [0.0, math.log(2.0)])
    cvae, _ = stub_step(cvae_gan, [ConstG(-0.5), ConstE(*E), ConstD(0.3)], ["--nz", "2"])
    bicycle, _ = stub_step(bicyclegan, [ConstG(-0.5), ConstE(*E), ConstD(0.3), ConstD(0.3)], ["--nz", "2"])
    assert cvae["kl"] == pytest.approx(bicycle["kl"]) == pytest.approx(0.01 * one)  # same weight at batch 2


def test_cvae_gan_reparameterize_by_hand():
    mu, logvar = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, math.log(4.0)]])
    torch.manual_seed(3)
    z = cvae_gan.reparameterize(mu, logvar)
    torch.manual_seed(3)
    eps = torch.randn(1, 2)
    assert torch.allclose(z, mu + eps * torch.tensor([[1.0, 2.0]]))


def test_clr_gan_losses_by_hand():
    netG, netE, netD = ConstG(0.25), ConstE([0.5, -1.0], [0.0, 0.0]), ConstD(0.3)
    losses, _ = stub_step(clr_gan, [netG, netE, netD], ["--nz", "2"])
    z = netG.z  # z ~ N(0, I) drawn inside the step; E's mean is the point estimate
    assert losses["z_L1"] == pytest.approx(0.5 * (torch.tensor([[0.5, -1.0]]) - z).abs().mean().item())
    assert losses["G_GAN"] == pytest.approx(2 * (0.3 - 1) ** 2)
    assert losses["D"] == pytest.approx(2 * (0.3 - 1) ** 2 + 2 * 0.3 ** 2)
    assert "G_L1" not in losses and "kl" not in losses  # no image L1 on B, no KL
    assert torch.equal(netE.seen, netG.out.detach())  # E reads G(A, z), not the real B
    assert clr_gan.latent_l1(torch.tensor([[0.1, -0.2]]), torch.tensor([[0.3, 0.2]])).item() == pytest.approx(0.3)


def test_image_l1_by_hand():
    fake, real = torch.tensor([0.5, -1.0, 0.0, 1.0]), torch.tensor([1.0, -1.0, 1.0, 0.0])
    for module in (pix2pix_noise, cvae_gan):
        assert module.image_l1(fake, real).item() == pytest.approx(2.5 / 4)


# --- gradient routing, with the real (tiny) networks ---------------------------------------------
def real_step(module, argv, seed=1):
    args = module.parse_args(OFFICIAL + TINY + argv)
    torch.manual_seed(0)
    nets = module.build_networks(args, torch.device("cpu"))
    before = [[p.detach().clone() for p in net.parameters()] for net in nets]
    optims = [common.adam(net, args.lr) for net in nets]
    real_A, real_B = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    torch.manual_seed(seed)
    losses = module.train_step(nets, optims, real_A, real_B, args)
    changed = [any(not torch.equal(a, b) for a, b in zip(old, net.parameters())) for old, net in zip(before, nets)]
    return nets, losses, changed, real_B


def test_clr_gan_latent_term_trains_E():
    (netG, netE, netD), losses, changed, _ = real_step(clr_gan, [])
    assert all(changed)  # G, E and D all take a step
    assert netE.fc_mu.weight.grad.abs().sum() > 0  # E's only loss is the latent term
    assert netE.fc_logvar.weight.grad is None  # no KL: the logvar head is never used
    assert all(p.requires_grad for p in netE.parameters())
    (_, netE0, _), _, _, _ = real_step(clr_gan, ["--lambda-latent", "0"])
    assert netE0.fc_mu.weight.grad.abs().sum() == 0  # without the latent term E learns nothing


def test_cae_gan_is_deterministic_without_kl():
    (netG, netE, netD), losses, changed, real_B = real_step(cvae_gan, ["--deterministic"])
    assert losses["kl"].item() == 0.0 and all(changed)
    assert netE.fc_logvar.weight.grad is None  # no KL, no sampling: logvar gets no gradient
    z1, mu, _ = cvae_gan.encode(netE, real_B, deterministic=True)
    z2, _, _ = cvae_gan.encode(netE, real_B, deterministic=True)
    assert torch.equal(z1, z2) and torch.equal(z1, mu)  # same B twice -> the same z
    z3, _, _ = cvae_gan.encode(netE, real_B, deterministic=False)
    z4, _, _ = cvae_gan.encode(netE, real_B, deterministic=False)
    assert not torch.equal(z3, z4)  # cVAE-GAN samples


def test_cvae_gan_kl_reaches_logvar():
    (_, netE, _), losses, _, _ = real_step(cvae_gan, [])
    assert netE.fc_logvar.weight.grad.abs().sum() > 0  # sampling and the KL use logvar


@pytest.mark.parametrize("flags", [[], ["--pix2pix-original"]])
def test_pix2pix_noise_steps_D_before_G(flags):
    """Both official pix2pix codes: D's step first (on the detached fake), then G's, whose GAN term
    reads the D just updated."""
    args = pix2pix_noise.parse_args(["--crop-size", "64", "--ngf", "4", "--ndf", "4"] + flags)
    torch.manual_seed(0)
    netG, netD = pix2pix_noise.build_networks(args, torch.device("cpu"))
    opt_G, opt_D = common.adam(netG, args.lr), common.adam(netD, args.lr)
    events = []
    opt_G.register_step_post_hook(lambda *_: events.append("step G"))
    opt_D.register_step_post_hook(lambda *_: events.append("step D"))
    netD.register_forward_hook(lambda net, *_: events.append("D for D" if next(net.parameters()).requires_grad
                                                             else "D for G"))
    real_A, real_B = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    pix2pix_noise.train_step([netG, netD], [opt_G, opt_D], real_A, real_B, args)
    assert events == ["D for D", "D for D", "step D", "D for G", "step G"]
    assert all(p.requires_grad for p in netD.parameters())  # D trainable again after the step


def test_pix2pix_noise_has_no_encoder():
    args = pix2pix_noise.parse_args(["--crop-size", "64", "--ngf", "4", "--ndf", "4"])
    nets = pix2pix_noise.build_networks(args, torch.device("cpu"))
    assert [type(n).__name__ for n in nets] == ["UNetGenerator", "PatchDiscriminator"]
    assert not hasattr(args, "nef") and not hasattr(args, "lambda_kl")


def test_cvae_gan_pp_second_D_sees_prior_samples():
    """cVAE-GAN++ = bicyclegan.py --lambda-latent 0: no latent term, D2 still trained on G(A, z)."""
    (netG, netE, netD, netD2), losses, changed, _ = real_step(bicyclegan, ["--lambda-latent", "0"])
    assert losses["z_L1"].item() == 0.0
    assert losses["G_GAN2"].item() > 0 and losses["D2"].item() > 0 and changed[3]


def test_every_listed_equation_sits_above_its_code():
    for module in (pix2pix_noise, cvae_gan, clr_gan):
        source = Path(module.__file__).read_text()
        body = source.split('"""', 2)[2]
        listed = set(re.findall(r"Eq\. \((\d+)\)", module.__doc__))
        assert listed, module.__name__
        for n in listed:
            assert f"# Eq. ({n})" in body, f"{module.__name__}: Eq. ({n}) has no comment in the code"


# --- run as a user would ---------------------------------------------------------------------
def read_losses(out):
    with open(out / "losses.csv") as f:
        return list(csv.DictReader(f))


def check_test_layout(out, encoded):
    folders = sorted(p for p in (out / "test").iterdir() if p.is_dir())
    assert len(folders) == 4 and (out / "test" / "grid.png").exists() and (out / "test" / "metrics.json").exists()
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        expected = {"input.png", "ground_truth.png", "sample_00.png", "sample_01.png", "sample_02.png"}
        assert names == expected | ({"encoded.png"} if encoded else set()), folder


@pytest.mark.parametrize("script, columns, has_encoder", [
    ("cvae_gan.py", ["G_GAN", "G_L1", "kl", "D"], True),
    ("clr_gan.py", ["G_GAN", "z_L1", "D"], True),
])
def test_quick_train_then_test(tmp_path, script, columns, has_encoder):
    out = tmp_path / "run"
    run_script(script, "--quick", *NARROW, "--max-iters", "2", "--log-every", "1", "--out", out, cwd=tmp_path)
    rows = read_losses(out)
    assert len(rows) == 2 and list(rows[0])[3:] == columns
    assert all(math.isfinite(float(r[c])) for r in rows for c in columns)
    ckpt = torch.load(out / "latest.pt", weights_only=False)
    assert ("netE" in ckpt) == has_encoder and "netD2" not in ckpt
    run_script(script, "--quick", *NARROW, "--test", "--out", out, cwd=tmp_path)
    check_test_layout(out, encoded=has_encoder)


def test_pix2pix_noise_on_a_folder(tmp_path, toy_paired):
    out = tmp_path / "run"
    run_script("pix2pix_noise.py", "--quick", "--ngf", "8", "--ndf", "8", "--dataset", toy_paired, "--max-iters", "2",
               "--out", out, cwd=tmp_path)
    assert list(read_losses(out)[0])[3:] == ["G_GAN", "G_L1", "D"]
    ckpt = torch.load(out / "latest.pt", weights_only=False)
    assert {k for k in ckpt if k.startswith("net")} == {"netG", "netD"}  # no encoder
    run_script("pix2pix_noise.py", "--quick", "--ngf", "8", "--ndf", "8", "--dataset", toy_paired, "--test", "--out", out,
               cwd=tmp_path)
    check_test_layout(out, encoded=False)
    assert not (tmp_path / "datasets").exists()  # the folder was used as given


@needs_facades
def test_cae_gan_on_real_facades(tmp_path):
    out = tmp_path / "run"
    small = ["--dataset", FACADES, "--crop-size", "64", "--load-size", "64", "--ngf", "8", "--nef", "8",
             "--ndf", "8", "--num-workers", "0", "--out", out]
    run_script("cvae_gan.py", *small, "--deterministic", "--max-iters", "3", "--log-every", "1", cwd=tmp_path)
    rows = read_losses(out)
    assert len(rows) == 3 and all(float(r["kl"]) == 0.0 for r in rows)  # cAE-GAN: no KL
    run_script("cvae_gan.py", *small, "--test", "--num-test", "2", "--n-samples", "2", cwd=tmp_path)
    folders = [p for p in (out / "test").iterdir() if p.is_dir()]
    assert len(folders) == 2 and all((p / "encoded.png").exists() for p in folders)
