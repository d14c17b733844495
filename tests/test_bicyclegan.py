"""bicyclegan.py: loss terms by hand, gradient routing, runs as a user would, exact resume, errors."""
import csv
import json
import math
import shutil

import pytest
import torch

import bicyclegan
import common
from conftest import FACADES, needs_facades, run_script


# --- loss terms against hand-computed values --------------------------------------------------
def test_kl_by_hand():
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # -1/2 [(1 + 0 - 1 - 1) + (1 + ln 2 - 0 - 2)] = 1 - ln(2) / 2
    assert bicyclegan.kl_loss(mu, logvar).item() == pytest.approx(1 - math.log(2) / 2)
    # summed over the batch it is given (the encoded half), not averaged: official code
    assert bicyclegan.kl_loss(mu.repeat(3, 1), logvar.repeat(3, 1)).item() == pytest.approx(3 * (1 - math.log(2) / 2))
    assert bicyclegan.kl_loss(torch.zeros(4, 8), torch.zeros(4, 8)).item() == 0.0  # E(B) = N(0, I)


def test_kl_warmup_ramps_lambda_kl_then_holds_it(monkeypatch):
    constant = bicyclegan.parse_args(["--quick", "--lambda-kl", "0.2"])
    assert [bicyclegan.kl_weight(constant, e) for e in (0, 5, 50)] == [0.2, 0.2, 0.2]  # the paper: constant
    ramp = bicyclegan.parse_args(["--quick", "--lambda-kl", "0.2", "--kl-warmup", "4"])
    assert [bicyclegan.kl_weight(ramp, e) for e in range(6)] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    # the weight given to train_step is the one its KL term uses (a KL of 1 to read it off)
    monkeypatch.setattr(bicyclegan, "kl_loss", lambda mu, logvar: 1.0 + 0.0 * mu.sum())
    torch.manual_seed(0)
    nets = bicyclegan.build_networks(ramp, torch.device("cpu"))
    optims = [common.adam(net, 0.0) for net in nets]
    real = torch.rand(2, 3, 64, 64) * 2 - 1
    kl = [bicyclegan.train_step(nets, optims, real, real, ramp, w)["kl"].item() for w in (0.0, 0.2)]
    assert kl == pytest.approx([0.0, 0.2])


def test_encoder_widths_match_the_official():
    """Official networks.py: E_NLayers (conv_256) nf_mult = min(2^n, 4); E_ResNet (resnet_256)
    ndf * min(4, n + 1) out of each of its four blocks."""
    cnn, resnet = common.ConvEncoder(nef=64), common.ResNetEncoder(nef=64)
    assert [m.out_channels for m in cnn.features if isinstance(m, torch.nn.Conv2d)] == [64, 128, 256, 256, 256]
    assert [resnet.features[0].out_channels] + [b.shortcut[1].out_channels for b in resnet.features[1:5]] == \
        [64, 128, 192, 256, 256]
    assert cnn.fc_mu.in_features == resnet.fc_mu.in_features == 256


def test_l1_terms_by_hand():
    fake, real = torch.tensor([0.5, -1.0, 0.0, 1.0]), torch.tensor([1.0, -1.0, 1.0, 0.0])
    assert bicyclegan.image_l1(fake, real).item() == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    mu, z = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.3, 0.2]])
    assert bicyclegan.latent_l1(mu, z).item() == pytest.approx((0.2 + 0.4) / 2)


def test_reparameterize_uses_sigma():
    torch.manual_seed(0)
    z = bicyclegan.reparameterize(torch.full((20000, 1), 2.0), torch.full((20000, 1), math.log(9.0)))
    assert z.mean().item() == pytest.approx(2.0, abs=0.1) and z.std().item() == pytest.approx(3.0, abs=0.1)


# --- gradient routing -------------------------------------------------------------------------
def nets_after_one_step(flags, batch=2):
    """The four networks after one train_step at learning rate 0 (gradients kept), --quick plus flags."""
    args = bicyclegan.parse_args(["--quick", *flags])
    torch.manual_seed(0)
    nets = bicyclegan.build_networks(args, torch.device("cpu"))
    optims = [common.adam(net, 0.0) for net in nets]
    torch.manual_seed(1)
    real_A, real_B = torch.rand(batch, 3, 64, 64) * 2 - 1, torch.rand(batch, 3, 64, 64) * 2 - 1
    bicyclegan.train_step(nets, optims, real_A, real_B, args)
    return nets


def grads_after_one_step(lambda_latent):
    nets = nets_after_one_step(["--lambda-latent", str(lambda_latent)])
    netG, netE = nets[0], nets[1]
    return ([p.grad.clone() for p in netG.parameters()], [p.grad.clone() for p in netE.parameters()],
            all(p.requires_grad for net in nets for p in net.parameters()))


def test_encoded_gan_weight_reaches_E_the_random_one_does_not():
    # --lambda-gan weighs D(G(A, E(B))), whose gradient reaches E through z_encoded; --lambda-gan2
    # weighs D2(G(A, z)) with z from the prior, which never passes through E.
    def e_grads(flags):
        return [p.grad.clone() for p in nets_after_one_step(flags)[1].parameters()]

    base = e_grads([])
    assert all(torch.equal(a, b) for a, b in zip(base, e_grads(["--lambda-gan2", "0"])))
    assert any(not torch.allclose(a, b) for a, b in zip(base, e_grads(["--lambda-gan", "0"])))


def test_no_gan_trains_e_keeps_D_term_out_of_E_but_in_G():
    # The toy demo's cure (README, When G ignores z): D's pull on E's code merged the toy's colours.
    # With --no-gan-trains-e and only D's term of the encoded half on, E gets no gradient at all,
    # while G still does; with the official setting E gets one.
    def grads(flags):
        only_d = ["--lambda-gan2", "0", "--lambda-l1", "0", "--lambda-kl", "0", "--lambda-latent", "0"]
        nets = nets_after_one_step(only_d + flags, batch=4)
        size = lambda net: sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None)
        return size(nets[0]), size(nets[1])

    g_official, e_official = grads([])
    g_spared, e_spared = grads(["--no-gan-trains-e"])
    assert e_official > 0 and e_spared == 0
    assert g_spared > 0 and g_official > 0
    assert bicyclegan.parse_args([]).gan_trains_e is False  # the toy default
    assert bicyclegan.parse_args(["--dataset", "maps"]).gan_trains_e is True  # real data: Eq. (9) as written


def test_latent_term_reaches_G_but_not_E():
    g0, e0, _ = grads_after_one_step(0.0)
    g1, e1, trainable = grads_after_one_step(5.0)
    assert all(torch.equal(a, b) for a, b in zip(e0, e1))  # E's gradient is blind to the latent term
    assert any(not torch.allclose(a, b) for a, b in zip(g0, g1))  # G's is not
    assert trainable  # every net is unfrozen again after the step


# --- the script as a user runs it -------------------------------------------------------------
def test_quick_train_then_test_layout(tmp_path):
    result = run_script("bicyclegan.py", "--quick", cwd=tmp_path)
    out = tmp_path / "runs" / "bicyclegan_quick"
    assert "images/s" in result.stdout
    assert {"latest.pt", "losses.csv", "options.json"} <= {p.name for p in out.iterdir()}
    result = run_script("bicyclegan.py", "--quick", "--test", cwd=tmp_path, lpips=True)
    lpips_line = [line for line in result.stdout.splitlines() if "LPIPS" in line or "lpips" in line]
    assert lpips_line  # either a number in the metrics or one line saying why there is none
    test = out / "test"
    folders = sorted(p for p in test.iterdir() if p.is_dir())
    assert len(folders) == 4  # --quick tests 4 inputs
    names = {p.name for p in folders[0].iterdir()}
    assert names == {"input.png", "ground_truth.png", "encoded.png", "sample_00.png", "sample_01.png", "sample_02.png"}
    assert (test / "grid.png").exists()
    metrics = json.loads((test / "metrics.json").read_text())
    assert metrics["inputs"] == 4 and metrics["samples_per_input"] == 3 and "toy" in metrics


def test_sync_shares_z_across_inputs(tmp_path, toy_paired):
    run_script("bicyclegan.py", "--quick", "--dataset", toy_paired, "--max-iters", "2", "--out", "r", cwd=tmp_path)
    run_script("bicyclegan.py", "--quick", "--dataset", toy_paired, "--test", "--sync", "--out", "r", cwd=tmp_path)
    assert json.loads((tmp_path / "r" / "test" / "metrics.json").read_text())["sync"] is True


def read_losses(path):
    with open(path) as f:
        return [row for row in csv.DictReader(f)]


def test_resume_continues_exactly(tmp_path, toy_paired):
    """4 iterations == 2 + resume + 2, across an epoch boundary (3 batches per epoch)."""
    data = tmp_path / "small"
    (data / "train").mkdir(parents=True)
    for p in sorted((toy_paired / "train").iterdir())[:6]:
        shutil.copy(p, data / "train")
    shutil.copytree(toy_paired / "test", data / "test")
    flags = ["--quick", "--dataset", data, "--epochs", "2", "--epochs-decay", "2", "--log-every", "1"]
    run_script("bicyclegan.py", *flags, "--max-iters", "4", "--out", "full", cwd=tmp_path)
    run_script("bicyclegan.py", *flags, "--max-iters", "2", "--out", "split", cwd=tmp_path)
    result = run_script("bicyclegan.py", *flags, "--max-iters", "4", "--out", "split", "--resume", cwd=tmp_path)
    assert "resumed from step 2" in result.stdout
    full, split = read_losses(tmp_path / "full" / "losses.csv"), read_losses(tmp_path / "split" / "losses.csv")
    losses = [row for row in full if row["G_GAN"]]  # the epoch preview adds a row of its own diversity
    assert len(losses) == 4 and len(full) == 5 and split == full


@needs_facades
def test_runs_on_real_facades(tmp_path):
    result = run_script("bicyclegan.py", "--dataset", FACADES, "--load-size", "72", "--crop-size", "64",
                        "--ngf", "8", "--nef", "8", "--ndf", "8", "--max-iters", "3", "--num-workers", "0",
                        "--out", "f", cwd=tmp_path)
    options = json.loads((tmp_path / "f" / "options.json").read_text())
    assert options["direction"] == "BtoA" and options["epochs"] == 200  # the facades defaults
    assert "images/s" in result.stdout


# --- errors a user can cause: one sentence, non-zero exit, no traceback ------------------------
def bad_run(tmp_path, *args):
    result = run_script("bicyclegan.py", *args, cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_user_errors(tmp_path, toy_paired):
    assert "does not exist" in bad_run(tmp_path, "--dataset", "no/such/folder")
    assert "unknown dataset 'nosuch'" in bad_run(tmp_path, "--dataset", "nosuch")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert "no images found" in bad_run(tmp_path, "--dataset", tmp_path / "empty")
    assert "odd" in bad_run(tmp_path, "--quick", "--batch-size", "3")
    assert "does not fit" in bad_run(tmp_path, "--quick", "--dataset", toy_paired, "--load-size", "100",
                                     "--crop-size", "100")
    assert "no checkpoint" in bad_run(tmp_path, "--quick", "--test", "--out", "never_trained")
    assert "larger than --load-size" in bad_run(tmp_path, "--quick", "--crop-size", "128")


def test_truncated_image_is_skipped(tmp_path, toy_paired):
    data = tmp_path / "broken"
    (data / "train").mkdir(parents=True)
    for p in sorted((toy_paired / "train").iterdir())[:4]:
        shutil.copy(p, data / "train")
    victim = sorted((data / "train").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    result = run_script("bicyclegan.py", "--quick", "--dataset", data, "--max-iters", "2",
                        "--batch-size", "4", "--out", "b", cwd=tmp_path)  # every batch holds the broken file
    assert "skipping unreadable image" in result.stderr and victim.name in result.stderr
