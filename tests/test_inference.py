"""Translating one's own images (--input) with each script: native size, --style, --interpolate,
bad inputs; and the test size of --test (maps at 512 px).

One checkpoint per script (--quick, 2 iterations) is trained once for the module. The many
inference runs call main() in this process (each is a fraction of a second then, where a fresh
interpreter costs seconds on two shared cores); one error case and the maps command run as a
user would, in a subprocess."""
import importlib
import os
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import common
from conftest import run_script

SCRIPTS = ["pix2pix_noise", "cvae_gan", "clr_gan", "bicyclegan", "cyclegan", "munit", "divco"]
UNPAIRED = {"cyclegan", "munit"}
LATENT = [s for s in SCRIPTS if s != "cyclegan"]
GUIDED = ["cvae_gan", "bicyclegan", "divco", "munit"]
SIZES = {"square": (64, 64), "wide": (100, 70), "tall": (48, 130), "big": (150, 90)}  # (width, height)


def call(script, *argv):
    """python <script>.py argv, in this process (CPU, no progress bars, no LPIPS)."""
    module = importlib.import_module(script)
    with mock.patch.dict(os.environ, {"NO_PROGRESS": "1", "LPIPS": "off"}):
        module.main(module.parse_args([str(a) for a in argv] + ["--device", "cpu"]))


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def outline(size, box):
    """A white outline on black, as the toy inputs, at any size."""
    img = Image.new("RGB", size)
    ImageDraw.Draw(img).ellipse(box, outline=(255, 255, 255), width=2)
    return img


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A folder of own images: four sizes and aspect ratios, a 16-bit TIFF, a note that is no image."""
    folder = tmp_path_factory.mktemp("pictures")
    for name, (w, h) in SIZES.items():
        outline((w, h), (6, 6, w - 7, h - 7)).save(folder / f"{name}.png")
    ramp = (np.arange(80)[None, :].repeat(60, 0) * 800).astype(np.uint16)  # 0 .. 63200 of 65535
    Image.fromarray(ramp).save(folder / "deep.tif")
    (folder / "notes.txt").write_text("not an image")
    for name, colour in (("red", common.TOY_PALETTE[0]), ("blue", common.TOY_PALETTE[2])):  # guides: filled shapes
        img = Image.new("RGB", (64, 64), common.TOY_BACKGROUND)
        ImageDraw.Draw(img).rectangle((12, 12, 52, 52), fill=colour, outline=common.TOY_OUTLINE, width=2)
        img.save(folder.parent / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_paired, toy_unpaired):
    """trained(script) -> its run folder with latest.pt (trained on first use)."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def get(script):
        if script not in done:
            data = toy_unpaired if script in UNPAIRED else toy_paired
            call(script, "--quick", "--max-iters", 8, "--dataset", data, "--out", root / script)
            done[script] = root / script
        return done[script]
    return get


def translate(trained, script, *flags, out=None):
    """Run --input with flags; -> {input stem: {file name: pixels}} of <out>/translated/."""
    out = out or trained(script)
    call(script, "--out", out, *flags)
    folder = out / "translated"
    return {d.name: {f.name: (pixels(f) if f.suffix == ".png" else f) for f in d.iterdir()}
            for d in folder.iterdir() if d.is_dir()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_own_images_keep_their_size_and_walks_end_at_the_samples(script, trained, pictures):
    samples = [] if script == "cyclegan" else ["--n-samples", 2]
    result = translate(trained, script, "--input", pictures, *samples)
    assert set(result) == set(SIZES) | {"deep"}  # notes.txt skipped
    assert (trained(script) / "translated" / "grid.png").exists()
    for name, (w, h) in SIZES.items():
        files = result[name]
        assert "ground_truth.png" not in files and "encoded.png" not in files
        expected = {"input.png", "sample_00.png"} | ({"sample_01.png"} if samples else set())
        assert set(files) == expected
        assert all(files[f].shape[:2] == (h, w) for f in expected)  # the input's own size
    ramp = result["deep"]["input.png"][..., 0]  # 16-bit pixels scaled to 8 bits, not clipped to white
    assert ramp.shape == (60, 80) and ramp[0, 0] == 0 and abs(int(ramp[0, -1]) - round(63200 / 65535 * 255)) <= 1
    if script == "cyclegan":
        return
    walk = translate(trained, script, "--input", pictures, "--interpolate", 3)
    for name in SIZES:
        frames = walk[name]
        assert {"sample_00.png", "sample_01.png", "sample_02.png", "interpolation.png", "interpolation.gif"} <= set(frames)
        # same seed: the walk goes from the first to the second of the samples --n-samples 2 gives
        assert np.abs(frames["sample_00.png"] - result[name]["sample_00.png"]).max() <= 1
        assert np.abs(frames["sample_02.png"] - result[name]["sample_01.png"]).max() <= 1
        assert 1 <= Image.open(frames["interpolation.gif"]).n_frames <= 3  # GIF merges repeated frames


def with_loud_codes(run, folder):
    """A copy of a run whose E gives codes a thousand times larger. After a few iterations from the
    official init, E's codes, and with them a guide's effect on G's output, are too small to survive
    8-bit rounding, so two guides could give the same pixels whether or not --style reads them."""
    shutil.copytree(run, folder)
    state = torch.load(folder / "latest.pt", map_location="cpu", weights_only=False)
    if "fc_mu.weight" in state.get("netE", {}):  # the paired scripts' E; MUNIT's style codes are large already
        state["netE"]["fc_mu.weight"] *= 1000
        torch.save(state, folder / "latest.pt")
    return folder


@pytest.mark.parametrize("script", GUIDED)
def test_style_guides_the_output(script, trained, pictures, tmp_path):
    red, blue, wide = pictures.parent / "red.png", pictures.parent / "blue.png", pictures / "wide.png"
    run = with_loud_codes(trained(script), tmp_path / script)
    first = translate(trained, script, "--input", wide, "--style", red, out=run)["wide"]
    again = translate(trained, script, "--input", wide, "--style", red, out=run)["wide"]
    other = translate(trained, script, "--input", wide, "--style", blue, out=run)["wide"]
    walk = translate(trained, script, "--input", wide, "--style", red, blue, "--interpolate", 3, out=run)["wide"]
    assert set(first) == {"input.png", "sample_00.png", "style.png"}
    assert np.array_equal(first["sample_00.png"], again["sample_00.png"])  # same guide, same output
    assert not np.array_equal(first["sample_00.png"], other["sample_00.png"])  # another guide changes it
    assert np.abs(walk["sample_00.png"] - first["sample_00.png"]).max() <= 1  # the walk's ends: the guides
    assert np.abs(walk["sample_02.png"] - other["sample_00.png"]).max() <= 1
    assert {"style_start.png", "style_end.png"} <= set(walk)


def test_half_of_an_ab_file(trained, toy_paired):
    pair = sorted((toy_paired / "test").iterdir())[0]  # 128 x 64: outline | filled shape
    left = translate(trained, "bicyclegan", "--input", pair, "--half", "left", "--n-samples", 1)[pair.stem]
    assert left["input.png"].shape[:2] == (64, 64)
    assert np.array_equal(left["input.png"], pixels(pair)[:, :64])
    resized = translate(trained, "bicyclegan", "--input", pair, "--resize", 64, "--n-samples", 1)[pair.stem]
    assert resized["sample_00.png"].shape[:2] == (64, 64)  # the whole file squeezed to 64 x 64


def error(script, trained, *flags):
    """The one sentence a bad own-image run stops with (SystemExit: exit status 1)."""
    with pytest.raises(SystemExit) as stop:
        call(script, "--out", trained(script), *flags)
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_inputs_stop_with_one_sentence(trained, pictures, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_text("not a png")
    assert "does not exist" in error("bicyclegan", trained, "--input", tmp_path / "missing")
    assert "no readable image" in error("bicyclegan", trained, "--input", tmp_path / "empty")
    assert "no readable image" in error("bicyclegan", trained, "--input", tmp_path / "broken")
    assert "not an image file" in error("bicyclegan", trained, "--input", tmp_path / "broken" / "a.png")
    assert "--style image" in error("bicyclegan", trained, "--input", pictures,
                                    "--style", tmp_path / "broken" / "a.png")
    assert "two --style images" in error("divco", trained, "--input", pictures, "--style",
                                         pictures / "wide.png", "--interpolate", 3)
    assert "works with --input" in error("cvae_gan", trained, "--interpolate", 3)
    # as a user sees it: exit status 1 and one line, no traceback
    run = run_script("bicyclegan.py", "--out", trained("bicyclegan"), "--input", tmp_path / "missing",
                     cwd=tmp_path, check=False)
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_too_small_for_the_network(script, trained, tmp_path):
    outline((20, 40), (2, 2, 17, 37)).save(tmp_path / "tiny.png")
    assert "too small for this network" in error(script, trained, "--input", tmp_path / "tiny.png")


def test_one_channel_outputs_are_one_channel_pngs(tmp_path):
    common.save_image(torch.linspace(-1, 1, 64).view(1, 8, 8), tmp_path / "edges.png")
    common.save_image(torch.zeros(3, 8, 8), tmp_path / "photo.png")
    assert Image.open(tmp_path / "edges.png").mode == "L" and Image.open(tmp_path / "photo.png").mode == "RGB"


def test_pad_and_crop_back_restore_the_image():
    x = torch.randn(1, 3, 70, 100)
    padded, crop = common.pad_to_multiple(x, 64)
    assert padded.shape[-2:] == (128, 128) and torch.equal(padded[..., crop[0], crop[1]], x)


# --- issue 14: the test size is not the training crop size --------------------------------------
def test_maps_are_tested_at_512_px(tmp_path):
    """A folder named maps gets the official test size (512, scripts/test_maps.sh), and an explicit
    --crop-size wins; the networks keep the depth of their 64-px training crops."""
    maps = tmp_path / "maps"
    for split in ("train", "test"):
        (maps / split).mkdir(parents=True)
        for i in range(2):
            pair = Image.new("RGB", (160, 80), (90, 120, 90))
            pair.paste(outline((80, 80), (10, 10, 70, 70)), (0, 0))
            pair.save(maps / split / f"{i}.png")
    out = tmp_path / "run"
    call("bicyclegan", "--quick", "--dataset", maps, "--max-iters", 1, "--out", out)
    run_script("bicyclegan.py", "--dataset", maps, "--test", "--crop-size", 512, "--load-size", 512, "--out", out,
               "--n-samples", 1, "--num-test", 1, cwd=tmp_path)
    assert pixels(out / "test" / "0" / "sample_00.png").shape[:2] == (512, 512)
    call("bicyclegan", "--dataset", maps, "--test", "--crop-size", 128, "--out", out, "--n-samples", 1,
         "--num-test", 1)
    assert pixels(out / "test" / "0" / "sample_00.png").shape[:2] == (128, 128)
    call("bicyclegan", "--dataset", maps, "--test", "--out", out, "--n-samples", 1, "--num-test", 1)
    assert pixels(out / "test" / "0" / "sample_00.png").shape[:2] == (512, 512)  # the maps default
    assert "does not fit this network" in error_test(maps, out)


def error_test(maps, out):
    with pytest.raises(SystemExit) as stop:
        call("bicyclegan", "--dataset", maps, "--test", "--crop-size", 100, "--out", out, "--num-test", 1)
    return str(stop.value)
