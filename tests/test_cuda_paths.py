"""Paths that only a CUDA run takes, checked on the CPU wherever the CPU can show them (issue 13):
RNG states read with another map_location, optimizer state moved between layouts and kernels,
which device the timing names, dtypes under --amp, pinned memory, and the one-call GPU check
(notebooks/benchmark.py gpu) run on the CPU at toy size."""
import argparse
import copy
import runpy
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import common
from conftest import ROOT, run_script

SCRIPTS = ["pix2pix_noise.py", "cvae_gan.py", "clr_gan.py", "bicyclegan.py", "divco.py", "cyclegan.py", "munit.py"]


def small_paired(folder, source, train=12, test=2):
    """A paired data set with the first few toy files (an epoch of a few batches)."""
    for split, n in (("train", train), ("test", test)):
        (folder / split).mkdir(parents=True)
        for path in common.list_images(source / split)[:n]:
            shutil.copy(path, folder / split / path.name)
    return folder


# --- 1. RNG states ------------------------------------------------------------------------------
def test_rng_states_are_given_to_torch_as_cpu_byte_tensors(monkeypatch):
    """A CUDA run reads its checkpoint with map_location='cuda', so the saved RNG states arrive
    as GPU tensors, which torch.set_rng_state and torch.cuda.set_rng_state_all refuse. The CPU
    cannot make a GPU tensor; a state that arrives as another kind of tensor (int64 here) goes
    through the same conversion, and fakes of the CUDA calls check what they are given."""
    given = {}

    def strict(name):
        def take(state):
            for s in state if isinstance(state, list) else [state]:
                assert s.device.type == "cpu" and s.dtype == torch.uint8, (name, s.device, s.dtype)
            given[name] = state
        return take

    saved = common.rng_state()
    saved["cuda"] = [saved["torch"].clone(), saved["torch"].clone()]  # as if two GPUs had been seen
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", strict("cuda"))
    elsewhere = {"python": saved["python"], "torch": saved["torch"].long(), "cuda": [s.long() for s in saved["cuda"]]}
    expected = torch.rand(3)  # drawn after the state was taken
    common.set_rng_state(elsewhere)
    assert torch.equal(torch.rand(3), expected)  # the CPU generator is back where it was
    assert len(given["cuda"]) == 2 and torch.equal(given["cuda"][1], saved["torch"])


# --- 4. Optimizer state on resume -----------------------------------------------------------------
def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))


def train(net, opt, steps=2):
    for i in range(steps):
        opt.zero_grad()
        x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(i))
        net(x).square().mean().backward()
        opt.step()


def test_resume_gives_each_moment_its_parameters_layout_and_keeps_fused(tmp_path):
    """A checkpoint of an NCHW run, a plain (non-fused) Adam, resumed with channels-last weights and
    fused Adam (what a CUDA run with --channels-last has). Fused Adam reads the moments as raw
    memory: with the checkpoint's layout it silently applies them to the wrong weights (on the CPU
    a wrong update, on CUDA an error). After resume each moment has its weight's layout, fused
    stays on, and the step equals the plain per-tensor Adam's."""
    net = conv_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train(net, opt)
    path = tmp_path / "latest.pt"
    common.save_checkpoint(path, common.training_state({"net": net, "opt": opt}, epoch=0, batch=2, step=2, args={}))
    results = {}
    for fused in (False, True):
        resumed = conv_net().to(memory_format=torch.channels_last)
        resumed_opt = torch.optim.Adam(resumed.parameters(), lr=1e-2, fused=fused)
        common.resume(path, "cpu", argparse.Namespace(test=False), {"net": resumed, "opt": resumed_opt})
        assert resumed_opt.param_groups[0]["fused"] is fused  # the saved run's choice (False) does not win
        weight = resumed[0].weight
        assert weight.is_contiguous(memory_format=torch.channels_last)
        for key in ("exp_avg", "exp_avg_sq"):
            assert resumed_opt.state[weight][key].stride() == weight.stride(), key
        train(resumed, resumed_opt, steps=1)
        results[fused] = [p.detach().clone() for p in resumed.parameters()]
    for fused_p, plain_p in zip(results[True], results[False]):
        torch.testing.assert_close(fused_p, plain_p)


# --- 3. Throughput --------------------------------------------------------------------------------
def test_throughput_names_its_device_resets_the_peak_and_stops(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append(("peak", device)) or 2 ** 30)
    speed = common.Throughput(torch.device("cuda:1"), warmup=2)
    for _ in range(4):
        speed.step(2)
    assert ("reset", torch.device("cuda:1")) in calls  # the warm-up's peak (compilation, autotuning) is dropped
    speed.stop()
    rate = speed.rate()
    assert speed.rate() == rate  # fixed once stopped: what follows (checkpoint, preview) is not timed
    speed.report()
    assert "peak GPU memory 1.00 GiB" in capsys.readouterr().out
    assert calls and all(device == torch.device("cuda:1") for _, device in calls), calls  # never cuda:0 by default


def test_timed_window_ends_before_the_final_checkpoint_and_preview(tmp_path, toy_paired, monkeypatch):
    """Every script stops the timing after its last iteration, before the epoch-end preview and
    the checkpoint (one epoch of 12 images at batch 2 ends exactly at --max-iters 6)."""
    data = small_paired(tmp_path / "data", toy_paired)
    monkeypatch.setenv("NO_PROGRESS", "1")
    monkeypatch.setenv("LPIPS", "off")
    events = []
    stop, save, grid = common.Throughput.stop, common.save_checkpoint, common.save_grid
    monkeypatch.setattr(common.Throughput, "stop", lambda self: events.append("stop") or stop(self))
    monkeypatch.setattr(common, "save_checkpoint", lambda *a: events.append("save") or save(*a))
    monkeypatch.setattr(common, "save_grid", lambda *a: events.append("grid") or grid(*a))
    for script in SCRIPTS:
        events.clear()
        monkeypatch.setattr(sys, "argv", [script, "--quick", "--dataset", str(data), "--batch-size", "2",
                                          "--max-iters", "6", "--out", str(tmp_path / script)])
        runpy.run_path(str(ROOT / script), run_name="__main__")
        assert events == ["stop", "grid", "save"], (script, events)


# --- 5. Image pool under --amp ------------------------------------------------------------------
def test_image_pool_stores_float32_and_returns_the_incoming_dtype():
    pool = common.ImagePool(2)
    pool.query(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16))
    assert all(x.dtype == torch.float32 for x in pool.images)
    for _ in range(10):
        assert pool.query(torch.randn(1, 3, 4, 4)).dtype == torch.float32
        assert pool.query(torch.randn(1, 3, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_cyclegan_trained_with_amp_resumes_without_it(tmp_path):
    """A pool of 2 is full after two iterations, so the resumed run draws stored fakes."""
    run_script("cyclegan.py", "--quick", "--amp", "--pool-size", "2", "--max-iters", "3", "--out", "run", cwd=tmp_path)
    run_script("cyclegan.py", "--quick", "--pool-size", "2", "--max-iters", "8", "--resume", "--out", "run", cwd=tmp_path)
    assert common.read_losses(tmp_path / "run" / "losses.csv")[-1]["step"] == 8


# --- 9. Pinned memory, DivCo's and MUNIT's loss dtypes -----------------------------------------------
def test_pinned_memory_follows_the_chosen_device(toy_paired, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is present ...
    dataset = common.AlignedDataset(toy_paired / "train", load_size=72, crop_size=64)
    args = argparse.Namespace(no_cache=True)
    common.keep_in_memory(dataset, torch.device("cpu"), args)  # ... but the run asked for the CPU
    assert not common.epoch_loader(dataset, 2, 0, seed=0).pin_memory
    dataset.device = torch.device("cuda")  # what keep_in_memory(dataset, 'cuda', args) records
    assert common.epoch_loader(dataset, 2, 0, seed=0).pin_memory


def test_divco_contrastive_logits_stay_float32_under_amp():
    import divco
    torch.manual_seed(0)
    f, f_pos, f_neg = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 10, 8)
    plain = divco.contrastive_loss(f, f_pos, f_neg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = divco.contrastive_loss(f, f_pos, f_neg)
    assert amp.dtype == torch.float32 and abs(float(amp - plain)) < 1e-6  # bf16 negatives: about 1e-2 off


def test_munit_content_loss_is_float32_under_amp():
    import munit
    args = munit.parse_args(["--quick"])
    nets = munit.build_networks(args, "cpu")
    real = torch.randn(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = munit.generator_losses(*nets, real, real, torch.randn(1, 8, 1, 1), torch.randn(1, 8, 1, 1), args)
    assert {k: v.dtype for k, v in losses.items()} == {k: torch.float32 for k in losses}


# --- 2 and 7. --compile ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_compile_modes_are_refused(mode):
    import bicyclegan
    with pytest.raises(SystemExit) as e:
        bicyclegan.parse_args(["--quick", "--compile", mode])
    assert e.value.code == 2  # argparse: invalid choice
    assert bicyclegan.parse_args(["--quick", "--compile", "max-autotune-no-cudagraphs"]).compile


def test_compile_captures_all_of_munits_sequential_parts(monkeypatch):
    """Module.compile on an nn.Sequential of built-in layers (MUNIT's style and content encoders)
    traces every layer into one graph: counted with a backend that only counts."""
    import munit
    from torch._dynamo.testing import CompileCounter
    args = munit.parse_args(["--quick", "--compile"])
    gen_a = munit.build_networks(args, "cpu")[0]
    counters = []
    compile_ = nn.Module.compile

    def counted(self, mode=None):
        counters.append((self, CompileCounter()))
        compile_(self, backend=counters[-1][1])

    monkeypatch.setattr(nn.Module, "compile", counted)
    for key in ("automatic_dynamic_shapes", "cache_size_limit"):  # speed_up sets them: restored after the test
        monkeypatch.setattr(torch._dynamo.config, key, getattr(torch._dynamo.config, key))
    torch._dynamo.reset()
    common.speed_up([gen_a], args)
    content, style = gen_a.encode(torch.randn(1, 3, 64, 64))
    (content.sum() + style.sum()).backward()
    for part in (gen_a.content_encoder, gen_a.style_encoder):
        counter = next(c for m, c in counters if m is part)
        layers = sum(1 for m in part.modules() if not list(m.children()))
        assert counter.frame_count == 1 and counter.op_count >= layers, (counter.frame_count, counter.op_count, layers)
    torch._dynamo.reset()


# --- The GPU check, on the CPU ------------------------------------------------------------------------
def test_gpu_check_runs_on_the_cpu(tmp_path, toy_paired):
    """benchmark.py gpu at toy size, without --compile (which takes minutes on the CPU), for
    bicyclegan.py (the paired family) and cyclegan.py (unpaired, with image pools): train, resume
    with the fast flags, test, one table with a grid per script."""
    data = small_paired(tmp_path / "facades", toy_paired)
    env = dict(__import__("os").environ, NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "notebooks" / "benchmark.py"), "gpu", "--data", str(data),
                             "--iters", "3", "--size", "64", "--no-compile", "--scripts", "bicyclegan.py", "cyclegan.py",
                             "--out", str(tmp_path / "bench"), "--device", "cpu", "--quick", "--num-workers", "0"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (tmp_path / "bench" / "gpu.md").read_text()
    for script in ("bicyclegan", "cyclegan"):
        assert f"| {script}.py |" in table and f"![{script}.py](grid_{script}.png)" in table
        assert (tmp_path / "bench" / f"grid_{script}.png").exists()
    assert table.count("| ok | ok |") == 2, table
