"""cyclegan.py: run as a user would, the loss terms by hand, the image pool, the frozen Ds."""
import csv
import json
import random

import pytest
import torch

import common
import cyclegan
from conftest import FACADES, needs_facades, run_script



def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_run_then_test_writes_both_directions(tmp_path):
    run_script("cyclegan.py", "--quick", "--out", "run", cwd=tmp_path)
    assert (tmp_path / "run" / "latest.pt").exists() and (tmp_path / "run" / "options.json").exists()
    losses = rows(tmp_path / "run" / "losses.csv")
    assert [int(r["step"]) for r in losses] == [5, 10, 15, 20]
    assert {"G", "F", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B"} <= set(losses[0])
    run_script("cyclegan.py", "--quick", "--test", "--out", "run", cwd=tmp_path)
    for side, folder in (("A", "AtoB"), ("B", "BtoA")):
        test = tmp_path / "run" / "test" / folder
        inputs = sorted(p.name for p in test.iterdir() if p.is_dir())
        assert inputs == [f"{side}_{i:04d}" for i in range(4)]  # --quick: 4 test inputs per domain
        for name in inputs:  # one output per input: CycleGAN is deterministic
            assert sorted(p.name for p in (test / name).iterdir()) == ["input.png", "reconstruction.png",
                                                                       "sample_00.png"]
        assert (test / "grid.png").exists()
        metrics = json.loads((test / "metrics.json").read_text())
        assert metrics["inputs"] == 4 and metrics["samples_per_input"] == 1
        assert ("toy" in metrics) == (side == "A")  # toy metrics read outlines as inputs: A -> B only


def test_folder_run_resume_continues_exactly(tmp_path, toy_unpaired):
    """6 steps in one go = 3 steps + resume + 3 steps, loss for loss (image pools and RNG included)."""
    flags = ["--dataset", toy_unpaired, "--load-size", 64, "--crop-size", 64, "--ngf", 8, "--ndf", 8,
             "--num-workers", 0, "--log-every", 1, "--pool-size", 2]
    run_script("cyclegan.py", *flags, "--max-iters", 6, "--out", "full", cwd=tmp_path)
    run_script("cyclegan.py", *flags, "--max-iters", 3, "--out", "split", cwd=tmp_path)
    run_script("cyclegan.py", *flags, "--max-iters", 6, "--out", "split", "--resume", cwd=tmp_path)
    full, split = rows(tmp_path / "full" / "losses.csv"), rows(tmp_path / "split" / "losses.csv")
    assert [int(r["step"]) for r in split] == list(range(1, 7))
    assert full == split


def test_paired_folder_used_unpaired(tmp_path, toy_paired):
    run_script("cyclegan.py", "--quick", "--dataset", toy_paired, "--max-iters", 2, "--out", "run", cwd=tmp_path)
    run_script("cyclegan.py", "--quick", "--dataset", toy_paired, "--test", "--out", "run", cwd=tmp_path)
    assert (tmp_path / "run" / "test" / "AtoB" / "A_0000" / "sample_00.png").exists()
    assert (tmp_path / "run" / "test" / "BtoA" / "B_0000" / "reconstruction.png").exists()


@needs_facades
def test_short_run_on_facades(tmp_path):
    run_script("cyclegan.py", "--dataset", FACADES, "--load-size", 64, "--crop-size", 64, "--ngf", 8, "--ndf", 8,
               "--max-iters", 2, "--log-every", 1, "--num-workers", 0, "--out", "run", cwd=tmp_path)
    assert len(rows(tmp_path / "run" / "losses.csv")) == 2


def test_unknown_dataset_is_one_sentence(tmp_path):
    result = run_script("cyclegan.py", "--dataset", "no_such_set", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "unknown dataset" in result.stderr and "Traceback" not in result.stderr


# --- Loss terms against values computed by hand ----------------------------------------------
def identity_D(x):  # a "discriminator" that returns its input: D(x) = x
    return x


def test_cycle_and_identity_losses_are_mean_l1():
    rec, real = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 0.5]])
    assert cyclegan.cycle_loss(rec, real).item() == pytest.approx((1.0 + 1.5) / 2)
    assert cyclegan.identity_loss(rec, real).item() == pytest.approx(1.25)


def test_least_squares_gan_terms():
    fake = torch.full((1, 1, 2, 2), 0.25)
    # G's side: (D(G(x)) - 1)^2
    assert cyclegan.generator_gan_loss(identity_D, fake).item() == pytest.approx(0.75 ** 2)
    # D's side, halved: 1/2 [(D(y) - 1)^2 + D(G(x))^2] with D(y) = 0.5, D(G(x)) = 2
    real, fake = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 2.0)
    assert cyclegan.discriminator_loss(identity_D, real, fake).item() == pytest.approx(0.5 * (0.25 + 4.0))


def test_image_pool_fills_to_50_then_swaps_half_the_time():
    random.seed(0)
    pool = common.ImagePool(50)
    for i in range(50):  # filling: every fake goes in and comes straight back
        image = torch.full((1, 1, 1, 1), float(i))
        assert torch.equal(pool.query(image), image)
    assert sorted(int(x) for x in pool.images) == list(range(50))
    old = 0
    for i in range(50, 450):
        returned = pool.query(torch.full((1, 1, 1, 1), float(i)))
        stored = {int(x) for x in pool.images}
        assert len(pool.images) == 50
        if int(returned) != i:  # an old fake came back: it left the pool and the new one took its place
            old += 1
            assert int(returned) < i and int(returned) not in stored and i in stored
        else:
            assert i not in stored
    assert 160 <= old <= 240  # p = 1/2 over 400 queries


def test_generator_step_sees_frozen_discriminators():
    """When G and F step, D_A and D_B hold no gradient, although G's GAN terms flowed through them."""
    args = cyclegan.parse_args(["--quick", "--ngf", "8", "--ndf", "8"])
    torch.manual_seed(0)
    nets = cyclegan.build_networks(args, torch.device("cpu"))
    G, F, D_A, D_B = nets
    optims = [torch.optim.Adam(list(G.parameters()) + list(F.parameters())),
              torch.optim.Adam(list(D_A.parameters()) + list(D_B.parameters()))]
    seen = {}
    step = optims[0].step

    def spy():
        seen["D"] = [p.grad for net in (D_A, D_B) for p in net.parameters()]
        seen["G"] = [p.grad for net in (G, F) for p in net.parameters()]
        return step()

    optims[0].step = spy
    real_A, real_B = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    pools = [common.ImagePool(50), common.ImagePool(50)]
    cyclegan.train_step(nets, optims, pools, real_A, real_B, args)
    assert all(g is None for g in seen["D"])
    assert all(g is not None for g in seen["G"])
    assert all(p.grad is not None and p.requires_grad for p in D_A.parameters())  # then the D step ran
    assert len(pools[0].images) == len(pools[1].images) == 1
