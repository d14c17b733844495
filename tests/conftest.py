"""Shared test helpers: run a script as a user would, and tiny data sets made by the tests."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402


def run_script(script, *args, cwd, check=True, timeout=600, lpips=False):
    """python <script> <args> in a subprocess, CPU only, no progress bars; returns the result.
    LPIPS stays off unless asked for (it would try to fetch pretrained weights)."""
    # One thread: on two shared cores, torch's default of two threads per process can be many
    # times slower than one when other processes are busy.
    env = dict(os.environ, NO_PROGRESS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    if not lpips:
        env["LPIPS"] = "off"
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One thread for the in-process tests too (see run_script); results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_paired(tmp_path_factory):
    """The built-in paired toy data, written once for the session (a folder path)."""
    return common.make_toy_dataset(tmp_path_factory.mktemp("data") / "toy", layout="paired")


@pytest.fixture(scope="session")
def toy_unpaired(tmp_path_factory):
    """The built-in unpaired toy data (trainA/ trainB/ testA/ testB/)."""
    return common.make_toy_dataset(tmp_path_factory.mktemp("data") / "toy_unpaired", layout="unpaired")


FACADES = ROOT.parent / "shared" / "data" / "facades"
needs_facades = pytest.mark.skipif(not FACADES.is_dir(), reason="../shared/data/facades is not present")
