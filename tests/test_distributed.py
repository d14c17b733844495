"""Multi-GPU on the CPU: torchrun with two gloo processes against one process."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT, run_script

import ddp_check

SCRIPTS = ["pix2pix_noise.py", "cvae_gan.py", "clr_gan.py", "bicyclegan.py", "cyclegan.py", "munit.py", "divco.py"]
UNPAIRED = {"cyclegan.py", "munit.py"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd, nproc=2, timeout=600):
    """python -m torch.distributed.run --nproc-per-node 2 <args> on a free port, CPU only."""
    env = dict(os.environ, NO_PROGRESS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               LPIPS="off")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *map(str, args)]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# --- the shard --------------------------------------------------------------------------------
@pytest.mark.parametrize("n, batch_size, world", [(23, 3, 2), (40, 2, 4), (9, 1, 3)])
def test_ranks_share_the_single_process_order(n, batch_size, world):
    single = common.epoch_order(n, batch_size * world, epoch=5, seed=3)
    shards = [common.epoch_order(n, batch_size, epoch=5, seed=3, rank=r, world=world) for r in range(world)]
    steps = n // (batch_size * world)
    assert all(len(s) == steps * batch_size for s in shards)  # as many steps on every rank
    assert len(set().union(*shards)) == steps * batch_size * world  # disjoint
    for k in range(steps):  # global batch k = the ranks' batch k side by side, in the single order
        together = [i for s in shards for i in s[k * batch_size:(k + 1) * batch_size]]
        assert together == single[k * batch_size * world:(k + 1) * batch_size * world]
    for r, s in enumerate(shards):  # a resume skips the same global batches on every rank
        rest = common.epoch_order(n, batch_size, epoch=5, seed=3, skip_batches=2, rank=r, world=world)
        assert rest == s[2 * batch_size:]


def test_world_size_one_keeps_the_plain_shuffle():
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100003 + 5)).tolist()
    assert common.epoch_order(10, 4, epoch=5, seed=3, skip_batches=1) == order[4:]


# --- two ranks against one process ------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """ddp_check.py under torchrun: every configuration, ddp_check.STEPS steps on 2 ranks."""
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    torchrun(ROOT / "tests" / "ddp_check.py", out, cwd=out.parent)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("name", list(ddp_check.CONFIGS))
def test_weights_stay_equal_on_every_rank(two_ranks, name):
    """Each step's update is the same everywhere: DDP averaged every gradient (MUNIT's encode and
    decode included), and nothing waited for the gradient of an unused logvar head."""
    assert [s["equal"] for s in two_ranks[name]] == [True] * ddp_check.STEPS


@pytest.mark.parametrize("name", sorted(ddp_check.COMPARED))
def test_two_ranks_match_one_process_with_the_global_batch(two_ranks, name):
    """Without random draws, 2 ranks x --batch-size b are one process with 2b. From the same
    weights the first step's losses and gradients agree up to the order of float64 sums; after it,
    Adam's first steps (lr x sign of each gradient) turn the sign of near-zero gradients into
    lr-sized weight differences, so later steps are compared loosely."""
    script, flags, _ = ddp_check.CONFIGS[name]
    args, nets, optims, extra, train_step = ddp_check.setup(script, flags, dtype=torch.float64)
    real_A, real_B = ddp_check.images(args, 2 * args.batch_size, dtype=torch.float64)
    for step, ranks in enumerate(two_ranks[name]):
        losses = common.mean_over_ranks(train_step(nets, optims, *extra, real_A, real_B, args))
        assert losses == pytest.approx(ranks["losses"], rel=1e-6 if step == 0 else 1e-3, abs=1e-7), f"step {step + 1}"
        if step == 0:
            grads = ddp_check.grads(nets)
            assert (grads - ranks["grads"]).norm() <= 1e-9 * grads.norm()  # measured: < 2e-15
            assert (grads - ranks["grads"]).abs().max() <= 1e-9 * grads.abs().max()


# --- every script under torchrun --------------------------------------------------------------
def data_flags(script, toy_paired, toy_unpaired):
    return ["--dataset", toy_unpaired if script in UNPAIRED else toy_paired]


@pytest.mark.parametrize("script", SCRIPTS)
def test_torchrun_trains_and_resumes(tmp_path, toy_paired, toy_unpaired, script):
    """2 + resume + 2 = 4 iterations on 2 processes; one set of output files, written by rank 0."""
    flags = ["--quick", "--device", "cpu", "--log-every", "1", *data_flags(script, toy_paired, toy_unpaired)]
    if script == "cyclegan.py":  # a pool that is full from the second image on: its content and draws matter
        flags += ["--pool-size", "1"]
    first = torchrun(ROOT / script, *flags, "--max-iters", "2", "--out", "run", cwd=tmp_path)
    second = torchrun(ROOT / script, *flags, "--max-iters", "4", "--out", "run", "--resume", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latest.pt", "losses.csv", "options.json"]
    split = common.read_losses(tmp_path / "run" / "losses.csv")
    assert [row["step"] for row in split] == [1, 2, 3, 4]
    ckpt = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    for result in (first, second):  # only rank 0 prints
        assert result.stdout.count("throughput:") == 1 and "2 processes together" in result.stdout
    assert second.stdout.count("resumed from step 2") == 1
    if script == "cyclegan.py":  # image pools and RNGs per rank: the resumed run continued exactly
        torchrun(ROOT / script, *flags, "--max-iters", "4", "--out", "straight", cwd=tmp_path)
        assert split == common.read_losses(tmp_path / "straight" / "losses.csv")
        # another world size: one process resumes the weights and says that the data order changes
        plain = run_script(script, *flags, "--max-iters", "6", "--out", "run", "--resume", cwd=tmp_path)
        assert "written by 2 process(es), this run has 1" in plain.stdout
        assert [row["step"] for row in common.read_losses(tmp_path / "run" / "losses.csv")] == [1, 2, 3, 4, 5, 6]
