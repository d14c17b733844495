"""The speed means (common.py, 'Speed on a CUDA GPU') compute the same thing as the plain path.

On the CPU these check equality, not speed: the data kept in memory gives the very same tensors,
channels-last and torch.compile the same losses up to float rounding (and compile's own dropout
masks), bf16 autocast the same losses within its precision. Speed itself is measured on a GPU
(README, 'Speed')."""
import sys

import pytest
import torch

import common
from conftest import ROOT, run_script


def batches(dataset, epoch):
    return list(common.epoch_loader(dataset, 4, epoch, seed=7, num_workers=0))


@pytest.mark.parametrize("input_nc", [1, 3])
def test_kept_in_memory_gives_the_same_batches(toy_paired, input_nc):
    def make():
        return common.AlignedDataset(toy_paired / "train", "BtoA", 72, 64, input_nc=input_nc, seed=7)

    from_disk, in_memory = make(), make()
    assert in_memory.keep_in_memory(torch.device("cpu"))
    for epoch in (0, 3):
        for a, b in zip(batches(from_disk, epoch), batches(in_memory, epoch)):
            assert torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"]) and a["path"] == b["path"]
    assert a["A"].shape == (4, input_nc, 64, 64)


def test_kept_in_memory_unaligned(toy_unpaired):
    def make():
        files = [[(p, None) for p in common.list_images(toy_unpaired / f"train{side}")] for side in "AB"]
        return common.UnalignedDataset(files[0], files[1], 72, 64, seed=3)

    from_disk, in_memory = make(), make()
    in_memory.keep_in_memory(torch.device("cpu"))
    for a, b in zip(batches(from_disk, 1), batches(in_memory, 1)):
        assert torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"]) and a["path_B"] == b["path_B"]


def test_too_large_a_set_stays_on_disk(toy_paired, capsys):
    dataset = common.AlignedDataset(toy_paired / "train", load_size=72, crop_size=64)
    assert not dataset.keep_in_memory(torch.device("cpu"), max_gib=0.001)  # 400 x 6 x 72 x 72 bytes = 0.012 GiB
    assert dataset.cache is None and "read from disk" in capsys.readouterr().out


def test_adam_over_several_networks():
    a, b = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)
    opt = common.adam([a, b], 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    assert not opt.defaults["fused"]  # fused only for CUDA parameters


def close(run, reference, rel, keys):
    for row, ref in zip(run, reference, strict=True):
        for k in keys:
            assert abs(row[k] - ref[k]) <= rel * abs(ref[k]) + 1e-6, (k, row[k], ref[k])


FLAGS = ["--quick", "--max-iters", "3", "--log-every", "1", "--epochs", "1"]


def test_speed_flags_give_the_same_losses(tmp_path):
    for name, extra in [("plain", []), ("no_cache", ["--no-cache"]), ("nhwc", ["--channels-last"]),
                        ("amp", ["--amp", "--channels-last"])]:
        run_script("bicyclegan.py", *FLAGS, "--out", name, *extra, cwd=tmp_path)
    plain = common.read_losses(tmp_path / "plain" / "losses.csv")
    assert common.read_losses(tmp_path / "no_cache" / "losses.csv") == plain  # the same tensors, bit for bit
    keys = ["G_GAN", "G_GAN2", "G_L1", "z_L1", "D", "D2"]
    close(common.read_losses(tmp_path / "nhwc" / "losses.csv"), plain, 1e-3, keys)  # other kernels, float32
    close(common.read_losses(tmp_path / "amp" / "losses.csv")[:2], plain[:2], 1e-2, keys)  # bf16: about 3 digits


def test_compile_gives_the_same_losses(tmp_path):
    """torch.compile (CPU here: needs a C compiler, takes about a minute) trains and saves plain
    checkpoints. Without dropout (whose masks compiled code draws differently) the losses agree to
    within 0.1 %."""
    run_script("pix2pix_noise.py", *FLAGS, "--no-dropout", "--out", "plain", cwd=tmp_path)
    run_script("pix2pix_noise.py", *FLAGS, "--no-dropout", "--out", "compiled", "--compile", cwd=tmp_path)
    compiled, plain = (common.read_losses(tmp_path / name / "losses.csv") for name in ("compiled", "plain"))
    close(compiled, plain, 1e-3, ["G_GAN", "G_L1", "D"])
    state = torch.load(tmp_path / "compiled" / "latest.pt", weights_only=False)
    assert not any("_orig_mod" in k for k in state["netG"])  # loadable without compiling
    run_script("pix2pix_noise.py", "--quick", "--test", "--out", "compiled", cwd=tmp_path)


def test_benchmark_reads_what_the_scripts_print(tmp_path):
    sys.path.insert(0, str(ROOT / "notebooks"))
    import benchmark
    stdout = run_script("pix2pix_noise.py", "--quick", "--max-iters", "8", cwd=tmp_path).stdout
    (rate, memory), = benchmark.THROUGHPUT.findall(stdout)
    assert float(rate) > 0 and memory == ""  # no GPU memory on the CPU
    # on CUDA, common.Throughput.report adds the peak memory to the same line
    cuda_line = "throughput: 61.20 images/s over 290 images after 5 warm-up iterations, peak GPU memory 1.25 GiB"
    assert benchmark.THROUGHPUT.findall(cuda_line) == [("61.20", "1.25")]


def test_no_host_sync_in_an_iteration_that_does_not_log(tmp_path, toy_paired, monkeypatch):
    """benchmark.py count: an iteration of every script but DivCo reads no tensor value from
    Python (a host sync, which would make the CPU wait for the GPU), and does the work it should."""
    sys.path.insert(0, str(ROOT / "notebooks"))
    import argparse
    import benchmark
    monkeypatch.setenv("NO_PROGRESS", "1")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    args = argparse.Namespace(data=str(toy_paired), size=64, scripts=None)
    rows, _ = benchmark.count(args, tmp_path, tmp_path / "count.log")
    assert len(rows) == 7
    for row in rows:
        # DivCo keeps the official rejection loop for its negatives, which reads close.any()
        assert row["syncs"] == 0 or (row["script"] == "divco.py" and row["syncs"] >= 1), row
        assert row["ops"] > 300 and row["gflop"] > 0.1, row  # it did train (toy widths: 16 channels)
