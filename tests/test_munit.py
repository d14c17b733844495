"""munit.py: run as a user would, shapes of the official nets, AdaIN, and the loss targets."""
import csv
import json

import pytest
import torch

import munit
from conftest import FACADES, needs_facades, run_script



def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_run_then_test_sync_and_style(tmp_path):
    run_script("munit.py", "--quick", "--out", "run", cwd=tmp_path)
    losses = rows(tmp_path / "run" / "losses.csv")
    assert [int(r["step"]) for r in losses] == [5, 10, 15, 20]
    assert {"gan_A", "gan_B", "x_A", "x_B", "c_A", "c_B", "s_A", "s_B", "D_A", "D_B"} <= set(losses[0])
    assert "cyc_A" not in losses[0]  # --lambda-cycle 0 by default

    run_script("munit.py", "--quick", "--test", "--out", "run", cwd=tmp_path)
    test = tmp_path / "run" / "test"
    inputs = sorted(p.name for p in test.iterdir() if p.is_dir())
    assert inputs == [f"{i:04d}" for i in range(4)]
    assert sorted(p.name for p in (test / "0000").iterdir()) == ["input.png", "sample_00.png", "sample_01.png",
                                                                 "sample_02.png"]
    metrics = json.loads((test / "metrics.json").read_text())
    assert metrics["samples_per_input"] == 3 and not metrics["sync"] and "toy" in metrics
    assert metrics["pixel_diversity_l1"] > 0  # three random styles give three different images

    run_script("munit.py", "--quick", "--test", "--sync", "--out", "run", cwd=tmp_path)
    assert json.loads((test / "metrics.json").read_text())["sync"]

    style = tmp_path / "datasets" / "toy_unpaired" / "testB" / "0001.png"
    run_script("munit.py", "--quick", "--test", "--style", style, "--checkpoint", "run/latest.pt", "--out", "styled",
               cwd=tmp_path)
    styled = tmp_path / "styled" / "test" / "0002"
    assert sorted(p.name for p in styled.iterdir()) == ["input.png", "sample_00.png", "style.png"]

    result = run_script("munit.py", "--quick", "--test", "--style", tmp_path / "missing.png", "--out", "run",
                        cwd=tmp_path, check=False)
    assert result.returncode == 1 and "--style image" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("fixture", ["toy_unpaired", "toy_paired"])
def test_folder_runs_unpaired_and_paired_used_unpaired(tmp_path, fixture, request):
    folder = request.getfixturevalue(fixture)
    run_script("munit.py", "--quick", "--dataset", folder, "--max-iters", 2, "--log-every", 1, "--out", "run",
               cwd=tmp_path)
    assert len(rows(tmp_path / "run" / "losses.csv")) == 2


@needs_facades
def test_short_run_on_facades(tmp_path):
    run_script("munit.py", "--quick", "--dataset", FACADES, "--load-size", 64, "--crop-size", 64,
               "--max-iters", 2, "--log-every", 1, "--out", "run", cwd=tmp_path)
    assert len(rows(tmp_path / "run" / "losses.csv")) == 2


def test_too_small_crop_is_one_sentence(tmp_path):
    result = run_script("munit.py", "--quick", "--crop-size", 32, "--load-size", 32, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "crop-size 32" in result.stderr and "Traceback" not in result.stderr


def test_edges_data_take_the_official_munit_options():
    """configs/edges2*_folder.yaml: 3-channel edges, new_size 256 and a 256 crop (no larger load),
    where the paired scripts read the edges as 1 channel. An explicit flag still wins."""
    for name in ("edges2shoes", "edges2handbags", "some/folder/edges2shoes"):
        args = munit.parse_args(["--dataset", name])
        assert (args.input_nc, args.output_nc, args.load_size, args.crop_size) == (3, 3, 256, 256), name
    assert munit.parse_args(["--dataset", "edges2shoes", "--input-nc", "1"]).input_nc == 1
    assert munit.parse_args(["--dataset", "horse2zebra"]).input_nc == 3


# --- Networks --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nets():
    args = munit.parse_args(["--quick", "--ngf", "8", "--ndf", "8"])
    torch.manual_seed(0)
    return args, munit.build_networks(args, torch.device("cpu"))


def test_official_shapes(nets):
    args, (gen_a, _, dis_a, _) = nets
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    content, style = gen_a.encode(x)
    assert content.shape == (2, 4 * 8, 16, 16)  # two stride-2 convs, 4 ngf channels
    assert style.shape == (2, args.style_dim, 1, 1)
    assert gen_a.decode(content, style).shape == x.shape
    assert [tuple(o.shape) for o in dis_a(x)] == [(2, 1, 4, 4), (2, 1, 2, 2), (2, 1, 1, 1)]  # three scales
    # the MLP gives a scale and a bias per channel of every AdaIN layer (2 per residual block)
    assert gen_a.decoder.mlp[-1].out_features == 2 * 2 * args.n_res * 4 * 8


def test_adain_makes_the_output_depend_on_the_style(nets):
    _, (gen_a, *_rest) = nets
    with torch.no_grad():
        content, _ = gen_a.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
        s1, s2 = torch.randn(2, 1, 8, 1, 1)
        out1, out1_again, out2 = gen_a.decode(content, s1), gen_a.decode(content, s1), gen_a.decode(content, s2)
    assert torch.equal(out1, out1_again)
    assert (out1 - out2).abs().mean() > 1e-3
    adain = gen_a.decoder.adain[0]
    assert adain.gamma.shape == adain.beta.shape == (1, adain.channels)


# --- Loss terms ------------------------------------------------------------------------------
def test_recon_and_discriminator_losses_by_hand():
    assert munit.recon_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.5])).item() == pytest.approx(1.25)

    def two_scale_D(x):  # D(x) = [x, 2x]: two scales, summed by the LSGAN loss
        return [x, 2 * x]
    real, fake = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    # (1 - 1)^2 + (2 - 1)^2 for the real, 0.5^2 + 1^2 for the fake; no 1/2
    assert munit.discriminator_loss(two_scale_D, real, fake).item() == pytest.approx(1.0 + 1.25)


def test_reconstruction_targets(nets):
    """Style target = the sampled prior code; content target = the input's content; image = input."""
    args, (gen_a, gen_b, dis_a, dis_b) = nets
    torch.manual_seed(1)
    real_A, real_B = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    style_a_random, style_b_random = torch.randn(1, 8, 1, 1), torch.randn(1, 8, 1, 1)
    losses = munit.generator_losses(gen_a, gen_b, dis_a, dis_b, real_A, real_B, style_a_random, style_b_random, args)
    with torch.no_grad():
        content_a, style_a = gen_a.encode(real_A)
        content_b, _ = gen_b.encode(real_B)
        content_b_recon, style_a_recon = gen_a.encode(gen_a.decode(content_b, style_a_random))
        content_a_recon, _ = gen_b.encode(gen_b.decode(content_a, style_b_random))
        rec_A = gen_a.decode(content_a, style_a)
    l1 = lambda x, y: (x - y).abs().mean().item()  # noqa: E731
    assert losses["s_A"].item() == pytest.approx(args.lambda_s * l1(style_a_recon, style_a_random), rel=1e-5)
    assert losses["s_A"].item() != pytest.approx(args.lambda_s * l1(style_a_recon, style_a), rel=1e-3)
    assert losses["c_A"].item() == pytest.approx(args.lambda_c * l1(content_a_recon, content_a), rel=1e-5)
    assert losses["c_B"].item() == pytest.approx(args.lambda_c * l1(content_b_recon, content_b), rel=1e-5)
    assert losses["x_A"].item() == pytest.approx(10 * l1(rec_A, real_A), rel=1e-5)
    assert losses["c_A"].requires_grad and "cyc_A" not in losses


def test_content_target_is_not_detached(nets):
    """Official MUNIT: || E2c(G2(c1, s2)) - c1 ||_1 with c1 not detached, so the term also pulls
    E1c's output towards the reconstruction. Its gradient on E1c must equal the one computed
    here without detach, and differ from the one with the target detached."""
    args, (gen_a, gen_b, dis_a, dis_b) = nets
    torch.manual_seed(2)
    real_A, real_B = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    style_a_random, style_b_random = torch.randn(1, 8, 1, 1), torch.randn(1, 8, 1, 1)
    params = list(gen_a.content_encoder.parameters())

    def grads(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    losses = munit.generator_losses(gen_a, gen_b, dis_a, dis_b, real_A, real_B, style_a_random, style_b_random, args)
    from_script = grads(losses["c_A"])

    def by_hand(detach_target):
        content_a, _ = gen_a.encode(real_A)
        content_a_recon, _ = gen_b.encode(gen_b.decode(content_a, style_b_random))
        target = content_a.detach() if detach_target else content_a
        return grads(args.lambda_c * (content_a_recon - target).abs().mean())

    assert torch.allclose(from_script, by_hand(False), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(from_script, by_hand(True), rtol=1e-2, atol=1e-6)
