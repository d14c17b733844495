"""Mode collapse is visible: previews measure how much an input's samples differ, the toy demo
ends with its test metrics, and the toy configuration keeps G sensitive to z."""
import json
import shutil

import torch

import common
from conftest import run_script


def toy_image(colour, shift=0):
    return common.to_tensor(common.draw_toy(("square", [10 + shift, 10, 40 + shift, 40]), colour), 3)


class FakeBar:
    def __init__(self):
        self.lines, self.description = [], None

    def write(self, line):
        self.lines.append(line)

    def set_description(self, text):
        self.description = text


def test_preview_counts_colours_and_warns_on_collapse(tmp_path):
    outline = common.to_tensor(common.draw_toy(("square", [10, 10, 40, 40])), 3)
    diverse = [[outline, toy_image(0), toy_image(0), toy_image(1), toy_image(2), toy_image(3)]]
    collapsed = [[outline, toy_image(0), toy_image(0), toy_image(0), toy_image(0), toy_image(0)]]
    stats = common.save_preview(diverse, tmp_path / "a.png", first_sample=2, toy=True)
    assert stats["preview_colours"] == 4 and stats["preview_diversity"] > 0.05
    same = common.save_preview(collapsed, tmp_path / "b.png", first_sample=2, toy=True)
    assert same["preview_colours"] == 1 and same["preview_diversity"] == 0
    assert (tmp_path / "a.png").exists()

    log = common.LossLog(tmp_path / "losses.csv")
    log.write({"step": 1, "epoch": 0, "loss": 0.5})
    bar = FakeBar()
    common.log_preview(stats, log, bar, step=2, epoch=1)
    assert bar.lines == [] and "4.0 colours" in bar.description
    common.log_preview(same, log, bar, step=4, epoch=2)
    assert len(bar.lines) == 1 and "epoch 2" in bar.lines[0] and "ignoring" in bar.lines[0]
    log.write({"step": 5, "epoch": 2, "loss": 0.25})
    rows = common.read_losses(tmp_path / "losses.csv")  # one header, every row kept
    assert [r["step"] for r in rows] == [1, 2, 4, 5]
    assert rows[0] == {"step": 1, "epoch": 0, "loss": 0.5}
    assert rows[2]["preview_colours"] == 1 and "loss" not in rows[2]


def test_toy_demo_ends_with_its_test_metrics(tmp_path, toy_paired):
    # A toy-stamped folder of 8 pairs: 2 epochs of 4 iterations, so the schedule really finishes.
    data = tmp_path / "toy8"
    for split, n in (("train", 8), ("test", 3)):
        (data / split).mkdir(parents=True)
        for path in sorted((toy_paired / split).iterdir())[:n]:
            shutil.copy(path, data / split / path.name)
    shutil.copy(toy_paired / ".complete", data / ".complete")
    out = tmp_path / "run"
    result = run_script("bicyclegan.py", "--quick", "--dataset", data, "--max-iters", 100, "--epochs", 1,
                        "--epochs-decay", 1, "--out", out, cwd=tmp_path)
    assert "mode_coverage=" in result.stdout and str(out / "test" / "grid.png") in result.stdout
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    assert metrics["inputs"] == 3 and "toy" in metrics
    previews = [r for r in common.read_losses(out / "losses.csv") if "preview_diversity" in r]
    assert [r["epoch"] for r in previews] == [1, 2] and all("preview_colours" in r for r in previews)
    # A run stopped by --max-iters before its schedule ends does not test.
    short = run_script("bicyclegan.py", "--quick", "--dataset", data, "--max-iters", 2, "--out", tmp_path / "short",
                       cwd=tmp_path)
    assert "mode_coverage" not in short.stdout and not (tmp_path / "short" / "test").exists()
