"""divco.py: runs as a user would, the contrastive and mode-seeking terms against hand-computed
values, the latent augmentation, and where the contrastive gradient goes."""
import copy
import csv
import json
import math

import pytest
import torch
import torch.nn as nn

import divco
from conftest import FACADES, needs_facades, run_script

SMALL = ["--ngf", "8", "--nef", "8", "--ndf", "8", "--num-negatives", "2", "--num-workers", "0"]


def read_losses(out):
    with open(out / "losses.csv") as f:
        return list(csv.DictReader(f))


def test_quick_run_and_test_layout(tmp_path):
    out = tmp_path / "run"
    run_script("divco.py", "--quick", "--max-iters", "4", *SMALL, "--out", out, cwd=tmp_path)
    rows = read_losses(out)
    assert rows[-1]["step"] == "4" and float(rows[-1]["div"]) > 0  # the contrastive term is on
    assert (out / "latest.pt").exists() and (out / "options.json").exists()
    result = run_script("divco.py", "--quick", "--test", "--out", out, cwd=tmp_path)
    assert "test metrics" in result.stdout
    folders = sorted(p for p in (out / "test").iterdir() if p.is_dir())
    assert len(folders) == 4  # --quick tests 4 inputs with 3 samples each
    names = {p.name for p in folders[0].iterdir()}
    assert {"input.png", "ground_truth.png", "encoded.png", "sample_00.png", "sample_02.png"} <= names
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    assert metrics["inputs"] == 4 and metrics["samples_per_input"] == 3
    assert len(metrics["toy"]["mode_coverage_per_input"]) == 4
    assert (out / "test" / "grid.png").exists()


def test_unpaired_folder_run_and_test(tmp_path, toy_unpaired):
    out = tmp_path / "unpaired"
    run_script("divco.py", "--setting", "unpaired", "--quick", "--dataset", toy_unpaired, "--max-iters", "3",
               *SMALL, "--out", out, cwd=tmp_path)
    rows = read_losses(out)
    assert {"G_GAN", "cycle", "E_latent", "div", "D"} <= set(rows[-1]) and "G_L1" not in rows[-1]
    assert "netF" in torch.load(out / "latest.pt", weights_only=False)
    run_script("divco.py", "--test", "--quick", "--dataset", toy_unpaired, "--out", out, cwd=tmp_path)
    names = {p.name for p in next(p for p in (out / "test").iterdir() if p.is_dir()).iterdir()}
    assert "example_B.png" in names and "ground_truth.png" not in names  # no pairs: no ground truth
    assert "toy" in json.loads((out / "test" / "metrics.json").read_text())


def test_paired_folder_mode_seeking(tmp_path, toy_paired):
    out = tmp_path / "ms"
    run_script("divco.py", "--quick", "--dataset", toy_paired, "--diversity-loss", "mode-seeking",
               "--max-iters", "3", *SMALL, "--out", out, cwd=tmp_path)
    assert float(read_losses(out)[-1]["div"]) > 0


@needs_facades
def test_facades_short_run(tmp_path):
    run_script("divco.py", "--dataset", FACADES, "--crop-size", "64", "--load-size", "64", "--max-iters", "2",
               *SMALL, "--out", tmp_path / "facades", cwd=tmp_path)
    assert (tmp_path / "facades" / "latest.pt").exists()


def test_contrastive_loss_by_hand():
    f = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # the first query is not unit length
    f_pos = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    f_neg = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[1.0, 0.0], [0.0, -3.0]]])
    tau = 0.5
    # raw features (the default, official code): query 1 logits 1.2/0.5, 0, -2/0.5; query 2 logits 2, 0, -6
    r1 = -math.log(math.exp(2.4) / (math.exp(2.4) + 1 + math.exp(-4.0)))
    r2 = -math.log(math.exp(2.0) / (math.exp(2.0) + 1 + math.exp(-6.0)))
    assert math.isclose(divco.contrastive_loss(f, f_pos, f_neg, tau).item(), (r1 + r2) / 2, rel_tol=1e-6)
    # normalised (--featnorm): query 1 logits 0.6/0.5, 0, -1/0.5; query 2 logits 1/0.5, 0, -1/0.5
    q1 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(0.0) + math.exp(-2.0)))
    q2 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-2.0)))
    normalised = divco.contrastive_loss(f, f_pos, f_neg, tau, normalize=True).item()
    assert math.isclose(normalised, (q1 + q2) / 2, rel_tol=1e-6)


# --- stubs whose outputs are known -------------------------------------------------------------
class CodeG(nn.Module):
    """G(A, z) = z's first coordinate everywhere; remembers every z it was given."""

    def __init__(self):
        super().__init__()
        self.w, self.calls = nn.Parameter(torch.tensor(1.0)), []

    def forward(self, real_A, z):
        self.calls.append(z.detach().clone())
        return (self.w * z[:, :1, None, None]).expand(-1, 3, real_A.size(2), real_A.size(3))


class MeanE(nn.Module):
    """E(x) = (mean(x), 1) as mu (and as logvar): features that normalising changes."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        mu = torch.stack([self.s * x.mean((1, 2, 3)), torch.ones(len(x))], 1)
        return mu, mu


def test_features_are_raw_by_default_and_normalised_with_featnorm():
    """The official code leaves featnorm off: f = E(G(A, z)) goes into the loss as it is."""
    for flags, normalize in (([], False), (["--featnorm"], True)):
        args = divco.parse_args(["--quick", "--num-negatives", "3", *flags])
        assert args.featnorm == normalize
        netG, z_random = CodeG(), torch.randn(2, args.nz)
        fake_B_random = netG(torch.zeros(2, 3, 4, 4), z_random)
        loss, extra = divco.diversity_term(netG, MeanE(), torch.zeros(2, 3, 4, 4), z_random, fake_B_random, args)
        z_pos, z_neg = netG.calls[1], netG.calls[2].view(2, 3, -1)
        f, f_pos, f_neg = (torch.stack([z[..., 0], torch.ones_like(z[..., 0])], -1) for z in (z_random, z_pos, z_neg))
        expected = args.lambda_contra * divco.contrastive_loss(f, f_pos, f_neg, args.tau, normalize)
        other = args.lambda_contra * divco.contrastive_loss(f, f_pos, f_neg, args.tau, not normalize)
        assert torch.isclose(loss, expected) and not torch.isclose(loss, other) and extra == []


class ConstD(nn.Module):
    """Two 'scales' whose every patch is c; counts its calls."""

    def __init__(self, c):
        super().__init__()
        self.c, self.calls = nn.Parameter(torch.tensor(c)), 0

    def forward(self, x):
        self.calls += 1
        return [self.c.expand(x.size(0), 1, 3, 3), self.c.expand(x.size(0), 1, 2, 2)]


@pytest.mark.parametrize("setting", ["paired", "unpaired"])
def test_mode_seeking_second_fake_faces_D(setting):
    """Official MSGAN: both fakes get the GAN loss on G's side, and D sees both (the real once per fake)."""
    one_G = 2 * (0.3 - 1) ** 2  # LSGAN on one fake, summed over D's two scales
    one_D = 2 * (0.3 - 1) ** 2 + 2 * 0.3 ** 2  # real + fake
    for loss, fakes in (("mode-seeking", 2), ("none", 1)):
        args = divco.parse_args(["--quick", "--nz", "2", "--setting", setting, "--diversity-loss", loss])
        netD_random = ConstD(0.3)
        if setting == "paired":
            nets, step, keys = [CodeG(), MeanE(), ConstD(0.3), netD_random], divco.train_step, ("G_GAN2", "D2")
        else:
            nets, step, keys = [CodeG(), MeanE(), netD_random, nn.Conv2d(3, 3, 1)], divco.train_step_unpaired, \
                ("G_GAN", "D")
        optims = [torch.optim.SGD(net.parameters(), lr=0.0) for net in nets]
        losses = step(nets, optims, torch.rand(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), args)
        assert losses[keys[0]].item() == pytest.approx(fakes * one_G)
        assert losses[keys[1]].item() == pytest.approx(fakes * one_D)
        assert netD_random.calls == 3 * fakes  # G's side once per fake; D's side real + fake per fake


def test_latent_augmentation_inside_and_outside_radius():
    torch.manual_seed(0)
    z, radius = torch.randn(64, 8), 0.1  # a large R: about half of naive draws would be too close
    z_pos, z_neg = divco.latent_augment(z, 10, radius)
    assert z_pos.shape == (64, 8) and z_neg.shape == (64, 10, 8)
    assert ((z_pos - z).abs() <= radius).all() and not torch.equal(z_pos, z)
    assert ((z_neg - z[:, None]).abs() > radius).all()  # every coordinate outside R (official rule)
    naive = torch.randn(64, 10, 8)
    assert ((naive - z[:, None]).abs() <= radius).any(-1).float().mean() > 0.3  # so rejection mattered


def test_mode_seeking_by_hand():
    fake_1, fake_2 = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    z_1, z_2 = torch.zeros(1, 4), torch.tensor([[2.0, 2.0, 0.0, 4.0]])  # mean |z1 - z2| = 2
    expected = 1 / (0.5 / 2 + 1e-5)
    assert math.isclose(divco.mode_seeking_loss(fake_1, fake_2, z_1, z_2).item(), expected, rel_tol=1e-6)


def small_setup(*extra):
    args = divco.parse_args(["--quick", *SMALL, *extra])
    torch.manual_seed(0)
    nets = divco.build_networks(args, torch.device("cpu"))
    return args, nets


def test_contrastive_term_reaches_g_and_not_e():
    args, (netG, netE, _, _) = small_setup()
    real_A, z_random = torch.randn(1, 3, 64, 64), torch.randn(1, args.nz)
    fake_B_random = netG(real_A, z_random)
    divco.diversity_term(netG, netE, real_A, z_random, fake_B_random, args)[0].backward()
    assert all(p.grad is None for p in netE.parameters())
    assert all(p.requires_grad for p in netE.parameters())  # E is unfrozen again afterwards
    assert sum(p.grad.abs().sum() for p in netG.parameters() if p.grad is not None) > 0


def test_training_step_gradients_with_and_without_contrast():
    """Same nets, same data, same seed: lambda_contra 0.3 changes G's gradient and not E's."""
    grads = {}
    real_A, real_B = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    for lam in (0.3, 0.0):
        args, nets = small_setup("--lambda-contra", str(lam))
        nets = [copy.deepcopy(n) for n in nets]
        optims = [torch.optim.SGD(n.parameters(), lr=0.0) for n in nets]  # keep the weights
        torch.manual_seed(1)
        divco.train_step(nets, optims, real_A, real_B, args)
        grads[lam] = [torch.cat([p.grad.flatten() for p in n.parameters()]) for n in nets[:2]]
    (g_on, e_on), (g_off, e_off) = grads[0.3], grads[0.0]
    assert (g_on - g_off).abs().max() > 0  # the contrastive loss is backpropagated into G
    assert torch.allclose(e_on, e_off, rtol=0, atol=1e-12)  # and nothing of it reaches E
