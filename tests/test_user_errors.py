"""Errors a user can cause, on all seven scripts: one sentence naming the cause, a non-zero exit,
no traceback, nothing written; checkpoints that are refused; faults (killed runs, a full disk)."""
import errno
import importlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import common
from conftest import ROOT, run_script

SCRIPTS = ["pix2pix_noise.py", "cvae_gan.py", "clr_gan.py", "bicyclegan.py", "cyclegan.py", "munit.py", "divco.py"]

# Options every script has, each with a value no run can use, and the option the sentence must name.
BAD_OPTIONS = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-2"], "--batch-size"),
    (["--batch-size", "two"], "--batch-size"),  # argparse's own check: its usage line, then the sentence
    (["--n-samples", "0"], "--n-samples"),
    (["--n-samples", "-1"], "--n-samples"),
    (["--max-iters", "0"], "--max-iters"),
    (["--max-iters", "-3"], "--max-iters"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--epochs", "0", "--epochs-decay", "0"], "--epochs"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs-decay", "-1"], "--epochs-decay"),
    (["--ngf", "0"], "--ngf"),
    (["--ndf", "-4"], "--ndf"),
    (["--num-test", "0"], "--num-test"),
    (["--log-every", "0"], "--log-every"),
    (["--load-size", "0"], "--load-size"),
    (["--crop-size", "-64"], "--crop-size"),
    (["--input-nc", "2"], "--input-nc"),
    (["--output-nc", "0"], "--output-nc"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--device", "tpu9"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--out", "a_file/run"], "--out"),
    (["--out", "a_file"], "--out"),
]

# Each method's own options, where it has them.
METHOD_OPTIONS = {
    "pix2pix_noise.py": [(["--nz", "0"], "--nz"), (["--lambda-l1", "-1"], "--lambda-l1")],
    "cvae_gan.py": [(["--nz", "-8"], "--nz"), (["--nef", "0"], "--nef"), (["--lambda-kl", "-0.01"], "--lambda-kl")],
    "clr_gan.py": [(["--nz", "0"], "--nz"), (["--lambda-latent", "-1"], "--lambda-latent")],
    "bicyclegan.py": [(["--nz", "0"], "--nz"), (["--beta1", "1.5"], "--beta1"), (["--batch-size", "3"], "--batch-size")],
    "cyclegan.py": [(["--n-blocks", "-1"], "--n-blocks"), (["--pool-size", "-1"], "--pool-size")],
    "munit.py": [(["--style-dim", "0"], "--style-dim"), (["--num-scales", "0"], "--num-scales"),
                 (["--step-size", "0"], "--step-size"), (["--weight-decay", "-1"], "--weight-decay")],
    "divco.py": [(["--nz", "0"], "--nz"), (["--num-negatives", "0"], "--num-negatives"), (["--tau", "0"], "--tau"),
                 (["--radius", "-1"], "--radius")],
}


def module(script):
    return importlib.import_module(Path(script).stem)


def parse_error(script, flags, capsys):
    """Parse flags as the script does; it must stop: returns (exit status, the last line it printed)."""
    with pytest.raises(SystemExit) as stop:
        module(script).parse_args(flags)
    code, err = stop.value.code, capsys.readouterr().err
    if isinstance(code, str):  # common.fail: Python prints the sentence and exits with status 1
        return 1, code
    return code, err.strip().splitlines()[-1]  # argparse printed usage, then its sentence


def bad_run(script, *args, cwd):
    result = run_script(script, *args, cwd=cwd, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def four_pairs(tmp_path_factory, toy_paired):
    """4 toy pairs: 2 iterations an epoch at batch 2, so a 3-epoch run saves three checkpoints."""
    folder = tmp_path_factory.mktemp("four")
    (folder / "train").mkdir()
    for p in common.list_images(toy_paired / "train")[:4]:
        (folder / "train" / p.name).write_bytes(p.read_bytes())
    return folder


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_options_stop_every_script_with_one_sentence(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder\n")
    for flags, option in BAD_OPTIONS + METHOD_OPTIONS[script]:
        for quick in ([], ["--quick"]):
            code, sentence = parse_error(script, quick + flags, capsys)
            assert code != 0 and option in sentence and "Traceback" not in sentence, (flags, sentence)
            assert "odd" not in sentence or flags == ["--batch-size", "3"], sentence
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_option_as_a_user_runs_it(script, tmp_path):
    """The same as a user sees it: exit status 1, one line, no traceback, --out not created."""
    result = run_script(script, "--quick", "--n-samples", "-1", "--out", "run", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == "error: --n-samples -1 must be at least 1"
    assert not (tmp_path / "run").exists() and not (tmp_path / "datasets").exists()


# --- the rows of issue 17's table, one test each ------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--device", "tpu9"], "--device tpu9 is not a device"),
    (["--n-samples", "-1"], "--n-samples -1 must be at least 1"),
    (["--n-samples", "0"], "--n-samples 0 must be at least 1"),
    (["--max-iters", "0"], "--max-iters 0 must be at least 1"),
    (["--lr", "-1"], "--lr -1.0 must be a positive number"),
    (["--nz", "0"], "--nz 0 must be at least 1"),
])
def test_table_rows_of_bad_options(flags, expected, capsys):
    code, sentence = parse_error("bicyclegan.py", flags, capsys)
    assert code == 1 and expected in sentence


@pytest.mark.parametrize("size", ["0", "-2"])
def test_batch_size_below_one_is_not_called_odd(size, capsys):
    code, sentence = parse_error("bicyclegan.py", ["--batch-size", size], capsys)
    assert f"--batch-size {size} must be at least 1" in sentence and "odd" not in sentence


def test_out_that_cannot_be_created(tmp_path):
    (tmp_path / "a_file").write_text("not a folder\n")
    sentence = bad_run("bicyclegan.py", "--quick", "--max-iters", "1", "--out", "a_file/run", cwd=tmp_path)
    assert sentence.startswith("error: --out a_file/run cannot be created")


class RunsACommand:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("script, mode", [("bicyclegan.py", "--test"), ("cvae_gan.py", "--resume")])
def test_checkpoint_that_would_run_code_is_refused(script, mode, tmp_path, four_pairs):
    marker = tmp_path / "the_command_ran"
    torch.save({"args": {}, "netG": RunsACommand(f"touch {shlex.quote(str(marker))}")}, tmp_path / "evil.pt")
    sentence = bad_run(script, "--quick", mode, "--checkpoint", "evil.pt", "--dataset", four_pairs,
                       "--out", "run", cwd=tmp_path)
    assert not marker.exists()
    assert sentence.startswith("error: refused to load evil.pt") and "could run code" in sentence


@pytest.fixture(scope="module")
def bicyclegan_checkpoint(tmp_path_factory, four_pairs):
    folder = tmp_path_factory.mktemp("bicyclegan")
    run_script("bicyclegan.py", "--quick", "--dataset", four_pairs, "--max-iters", "1", "--out", "run", cwd=folder)
    return folder / "run" / "latest.pt"


def test_test_with_another_scripts_checkpoint(bicyclegan_checkpoint, tmp_path):
    sentence = bad_run("cyclegan.py", "--quick", "--test", "--checkpoint", bicyclegan_checkpoint,
                       "--out", "run", cwd=tmp_path)
    assert "written by bicyclegan.py, not cyclegan.py" in sentence
    assert not (tmp_path / "run").exists()


def test_resume_with_another_scripts_checkpoint(bicyclegan_checkpoint, four_pairs, tmp_path):
    sentence = bad_run("cvae_gan.py", "--quick", "--resume", "--checkpoint", bicyclegan_checkpoint,
                       "--dataset", four_pairs, "--out", "run", cwd=tmp_path)
    assert "written by bicyclegan.py, not cvae_gan.py" in sentence
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_checkpoint_of_another_format_is_refused(tmp_path):
    args = module("bicyclegan.py").parse_args(["--quick", "--test"])
    common.save_checkpoint(tmp_path / "old.pt", {"args": {}, "netG": {}})  # as written before formats
    with pytest.raises(SystemExit, match="format None, this one reads format 1"):
        common.load_checkpoint(tmp_path / "old.pt", "cpu", args)
    state = common.training_state({}, epoch=0, batch=0, step=0, args=vars(args))
    assert state["format"] == common.CHECKPOINT_FORMAT and state["script"] == "bicyclegan"


def test_every_image_unreadable(tmp_path):
    (tmp_path / "broken" / "train").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "c.png"):
        (tmp_path / "broken" / "train" / name).write_bytes(b"not an image")
    sentence = bad_run("bicyclegan.py", "--quick", "--dataset", "broken", "--out", "run", cwd=tmp_path)
    assert sentence.startswith("error: none of the 3 images in broken/train could be read")


def write_images(folder, size, n=2):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"{i}.png")


def test_paired_folder_of_square_or_tiny_images_warns(tmp_path, toy_paired, capsys):
    write_images(tmp_path / "square", (64, 64))
    common.AlignedDataset(tmp_path / "square", load_size=64, crop_size=64)
    assert "not about twice as wide as tall" in capsys.readouterr().err
    write_images(tmp_path / "tiny", (2, 1))  # two 1-pixel halves
    common.AlignedDataset(tmp_path / "tiny", load_size=64, crop_size=64)
    err = capsys.readouterr().err
    assert "are 1x1 pixels per half, much smaller than the 64 px" in err and "--load-size" in err
    common.AlignedDataset(toy_paired / "train", load_size=64, crop_size=64)  # what it should be: no word
    common.UnalignedDataset([(p, None) for p in common.list_images(tmp_path / "square")],
                            [(p, None) for p in common.list_images(tmp_path / "square")], 64, 64)
    assert capsys.readouterr().err == ""


# --- faults: a full disk, a failed rename, a run killed at any moment ----------------------------
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "latest.pt"
    common.save_checkpoint(path, {"step": 1})
    (tmp_path / "latest.pt.tmp").symlink_to("/dev/full")  # every write to it: no space left on device
    with pytest.raises(SystemExit, match=r"could not write .*latest.pt .*free some disk space"):
        common.save_checkpoint(path, {"step": 2, "weights": torch.zeros(1000)})
    assert common.load_checkpoint(path)["step"] == 1
    assert not (tmp_path / "latest.pt.tmp").exists()


def test_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    common.save_checkpoint(path, {"step": 1})

    def no_rename(source, target):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(SystemExit, match="Permission denied"):
        common.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert common.load_checkpoint(path)["step"] == 1
    assert not (tmp_path / "latest.pt.tmp").exists()


def train(tmp_path, data, out, *extra):
    script = module("pix2pix_noise.py")
    script.main(script.parse_args(["--quick", "--dataset", str(data), "--epochs", "3", "--log-every", "1",
                                   "--device", "cpu", "--out", str(tmp_path / out), *extra]))
    return {row["step"]: row for row in common.read_losses(tmp_path / out / "losses.csv")}


def kill_on_second_call(monkeypatch, owner, name):
    """Make the second call of owner.name write half its file, then stop as a killed run does."""
    original, calls = getattr(owner, name), []

    def killed(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(owner, name, killed)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, four_pairs):
    return train(tmp_path_factory.mktemp("full"), four_pairs, "full")


@pytest.mark.parametrize("where", ["checkpoint write", "epoch preview"])
def test_killed_run_resumes_from_the_last_complete_checkpoint(where, tmp_path, four_pairs, full_run, monkeypatch,
                                                              capsys):
    if where == "checkpoint write":
        kill_on_second_call(monkeypatch, torch, "save")
    else:
        kill_on_second_call(monkeypatch, common, "save_grid")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, four_pairs, "killed")
    monkeypatch.undo()
    assert common.load_checkpoint(tmp_path / "killed" / "latest.pt")["step"] == 2  # the first epoch's
    capsys.readouterr()
    resumed = train(tmp_path, four_pairs, "killed", "--resume")  # rows of steps 3-4 logged twice: last wins
    assert "resumed from step 2 (epoch 1, batch 0)" in capsys.readouterr().out
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6] and resumed == full_run


def test_run_killed_by_a_signal_resumes(tmp_path, four_pairs):
    """A real kill -9 at some moment of a run that saves a checkpoint every 2 iterations."""
    env = dict(os.environ, NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", LPIPS="off")
    command = [sys.executable, str(ROOT / "pix2pix_noise.py"), "--quick", "--dataset", str(four_pairs),
               "--epochs", "1000", "--max-iters", "2000", "--out", "run"]
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "run" / "latest.pt"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    time.sleep(0.7)  # a few more checkpoints, previews and log rows: the kill lands anywhere among them
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert latest.exists()
    step = common.load_checkpoint(latest)["step"]
    result = run_script("pix2pix_noise.py", "--quick", "--dataset", four_pairs, "--epochs", "1000",
                        "--max-iters", str(step + 2), "--out", "run", "--resume", cwd=tmp_path)
    assert f"resumed from step {step} " in result.stdout
    assert common.load_checkpoint(latest)["step"] == step + 2
