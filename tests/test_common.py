"""common.py: toy data and its metrics, loaders, blocks, losses, schedule, checkpoints, downloads."""
import argparse
import http.server
import io
import math
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import common


# --- toy data ---------------------------------------------------------------------------------
def test_toy_data_is_deterministic_and_balanced(tmp_path, toy_paired):
    again = common.make_toy_dataset(tmp_path / "again", seed=0)
    other = common.make_toy_dataset(tmp_path / "other", seed=1)
    first = sorted((toy_paired / "train").iterdir())[:5]
    for p in first:
        assert p.read_bytes() == (again / "train" / p.name).read_bytes()
    assert any(p.read_bytes() != (other / "train" / p.name).read_bytes() for p in first)
    dataset = common.AlignedDataset(toy_paired / "train", load_size=64, crop_size=64, train=False)
    modes = [common.toy_mode(dataset[i]["B"]) for i in range(len(dataset))]
    counts = [modes.count(m) for m in range(4)]
    assert -1 not in modes and all(60 < c < 140 for c in counts), counts  # 400 images, 4 equal modes


def test_toy_shapes_fill_a_quarter_to_a_third_of_the_image(toy_paired):
    # Toy data v4 (notebooks/when_g_ignores_z.md, The shapes' area): E averages over the image, so
    # shapes of very different sizes gave codes that moved with the area as much as with the colour.
    dataset = common.AlignedDataset(toy_paired / "train", load_size=64, crop_size=64, train=False)
    areas = [float(common.toy_foreground(dataset[i]["B"]).float().mean()) for i in range(0, len(dataset), 4)]
    assert 0.24 < min(areas) and max(areas) < 0.38 and max(areas) / min(areas) < 1.5, (min(areas), max(areas))


def test_toy_fills_vary_in_shade_within_each_colour(toy_paired):
    # Toy data v5 (notebooks/when_g_ignores_z.md, A shade within each colour): with flat fills G's
    # output is constant over a colour's region of z, and the image L1 cannot part two colours whose
    # codes E has put together. Each colour's targets must span a range of shades, all read as it.
    dataset = common.AlignedDataset(toy_paired / "train", load_size=64, crop_size=64, train=False)
    fills = {m: [] for m in range(len(common.TOY_PALETTE))}
    for i in range(0, len(dataset), 2):
        B = dataset[i]["B"]
        inside = common.toy_shape_mask(dataset[i]["A"]) & common.toy_foreground(B)
        px = common._as_rgb255(B)[:, inside].t()
        fills[common.toy_mode(B)].append(px[(px - torch.tensor(common.TOY_OUTLINE)).norm(dim=1) > 60].median(0).values)
    for mode, values in fills.items():
        lightness = torch.stack(values).mean(1)  # the mean over R, G, B moves with the shade
        assert lightness.max() - lightness.min() > 30, (mode, lightness.min(), lightness.max())
    assert common.TOY_SHADE > 0


def test_restored_checkpoints_from_before_norm_g_and_norm_d_build_G_and_D_with_norm():
    args = type("Args", (), {"norm": "batch", "norm_g": "layer", "norm_d": "layer", "crop_size": 64,
                             "test_size": None})()
    common.restore_arch_options(args, {"norm": "batch", "crop_size": 64})
    assert args.norm_g is None and args.norm_d is None and args.test_size == 64
    common.restore_arch_options(args, {"norm": "batch", "norm_g": "layer", "norm_d": "layer"})
    assert args.norm_g == "layer" and args.norm_d == "layer"


def test_toy_metrics_on_constructed_samples(toy_paired):
    dataset = common.AlignedDataset(toy_paired / "test", load_size=64, crop_size=64, train=False)
    item = dataset[0]
    shape = common.toy_shape_mask(item["A"])
    assert common.toy_scores(item["A"], [item["B"]])["iou"] > 0.9  # the truth keeps the structure
    # the same shape in all four colours: full coverage, all valid, still faithful
    fg = common.toy_foreground(item["B"])
    recoloured = []
    for colour in common.TOY_PALETTE:
        x = item["B"].clone()
        x[:, fg & shape] = torch.tensor(colour, dtype=torch.float)[:, None] / 127.5 - 1
        recoloured.append(x)
    scores = common.toy_scores(item["A"], recoloured)
    assert scores["coverage"] == 1.0 and scores["valid"] == 1.0 and scores["iou"] > 0.8
    assert common.pixel_diversity([item["B"]] * 3) == 0.0
    assert common.pixel_diversity(recoloured) > 0.05
    # a blank image shows no mode; another input's output does not fit this input's outline
    assert common.toy_mode(torch.full_like(item["B"], 235 / 127.5 - 1)) == -1
    # noise around a palette colour is no clean toy image either
    noisy = item["B"] + 0.6 * torch.randn_like(item["B"])
    assert common.toy_mode(noisy) == -1 and common.toy_mode(item["B"] + 0.02 * torch.randn_like(item["B"])) >= 0
    wrong = min((dataset[i] for i in range(1, len(dataset))),
                key=lambda other: float((common.toy_foreground(other["B"]) & shape).sum()))
    assert common.toy_scores(item["A"], [wrong["B"]])["iou"] < 0.5
    # A clean colour is not enough: a sample must also follow the input's outline. Another input's
    # shape, or a pale wash with a blue band along one edge (what a run whose G ignores the outline
    # drew), shows a palette colour to toy_mode but is no right answer for this input.
    band = torch.full_like(item["B"], 235 / 127.5 - 1)
    band[:, :, :10] = torch.tensor(common.TOY_PALETTE[2], dtype=torch.float)[:, None, None] / 127.5 - 1
    for off in (wrong["B"], band):
        assert common.toy_mode(off) >= 0
        scores = common.toy_scores(item["A"], [off, item["B"]])
        assert scores["modes"][0] == -1 and scores["valid"] == 0.5 and scores["off_shape"] == 0.5
        assert scores["coverage"] == 0.25


# --- loaders ----------------------------------------------------------------------------------
def write_pair(path, left, right):
    img = Image.new("RGB", (2 * left.width, left.height))
    img.paste(left, (0, 0)), img.paste(right, (left.width, 0))
    img.save(path)


def test_aligned_dataset_direction_crop_and_channels(tmp_path):
    (tmp_path / "train").mkdir()
    gradient = Image.linear_gradient("L").resize((40, 40)).convert("RGB")
    write_pair(tmp_path / "train" / "0.png", gradient, Image.new("RGB", (40, 40), (255, 0, 0)))
    ds = common.AlignedDataset(tmp_path / "train", "AtoB", load_size=36, crop_size=32, train=True)
    x = ds[0]
    assert x["A"].shape == (3, 32, 32) and x["B"].shape == (3, 32, 32)
    assert -1 <= x["A"].min() and x["A"].max() <= 1
    assert torch.allclose(x["B"][0], torch.ones(32, 32), atol=0.02)  # B is the red half
    swapped = common.AlignedDataset(tmp_path / "train", "BtoA", 36, 32, input_nc=1, train=True)[0]
    assert swapped["A"].shape == (1, 32, 32) and torch.allclose(swapped["B"], x["A"])
    # one shared crop and flip: identical halves stay identical, whatever the random draw
    write_pair(tmp_path / "train" / "0.png", gradient, gradient)
    for epoch in range(4):
        ds.set_epoch(epoch)
        pair = ds[0]
        assert torch.equal(pair["A"], pair["B"])


def test_broken_image_is_skipped_with_a_warning(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    write_pair(tmp_path / "train" / "a.png", Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)))
    good = (tmp_path / "train" / "a.png").read_bytes()
    (tmp_path / "train" / "0_truncated.png").write_bytes(good[: len(good) // 2])
    ds = common.AlignedDataset(tmp_path / "train", load_size=8, crop_size=8)
    assert ds[0]["path"].endswith("a.png")
    assert "skipping unreadable image" in capsys.readouterr().err


def test_unaligned_dataset_lengths_and_halves(toy_paired, toy_unpaired):
    args = argparse.Namespace(dataset=str(toy_unpaired), direction="AtoB", load_size=64, crop_size=64,
                              input_nc=3, output_nc=3, seed=0)
    ds = common.unpaired_dataset(args)
    x = ds[5]
    assert len(ds) == 400 and "trainA" in x["path"] and "trainB" in x["path_B"]
    assert common.toy_mode(x["A"]) == -1 and common.toy_mode(x["B"]) >= 0  # outline vs filled
    args.dataset = str(toy_paired)  # a paired folder used unpaired: left halves A, right halves B
    x = common.unpaired_dataset(args, train=True)[5]
    assert common.toy_mode(x["A"]) == -1 and common.toy_mode(x["B"]) >= 0


def test_epoch_loader_skips_exactly(toy_paired):
    ds = common.AlignedDataset(toy_paired / "test", load_size=64, crop_size=64)
    full = [b["path"] for b in common.epoch_loader(ds, 2, epoch=3, seed=7)]
    rest = [b["path"] for b in common.epoch_loader(ds, 2, epoch=3, seed=7, skip_batches=4)]
    assert rest == full[4:] and len(full) == len(ds) // 2
    assert full != [b["path"] for b in common.epoch_loader(ds, 2, epoch=4, seed=7)]


# --- blocks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 128, 256, 512])
def test_block_shapes(size):
    x, z = torch.randn(2, 3, size, size), torch.randn(2, 8)
    for where in ("all", "input"):
        G = common.UNetGenerator(3, 3, nz=8, size=size, ngf=8, where_add=where)
        assert G(x, z).shape == (2, 3, size, size)
    D = common.PatchDiscriminator(3, ndf=8, num_scales=2)
    outs = D(x)
    assert len(outs) == 2 and outs[0].shape[-1] == size // 8 - 2 and outs[1].shape[-1] == size // 16 - 2
    for kind in ("resnet", "cnn"):
        mu, logvar = common.make_encoder(kind, 3, 8, 8)(x)
        assert mu.shape == (2, 8) and logvar.shape == (2, 8)


def test_unet_matches_the_official_layout():
    G = common.UNetGenerator(3, 3, nz=8, size=256, ngf=64)
    assert len(G.downs) == 8
    assert sum(isinstance(m, torch.nn.Dropout) for m in G.modules()) == 3  # three inner 512 levels
    assert G.downs[0][0].in_channels == 3 + 8 and G.downs[7][1].in_channels == 512 + 8
    G_input = common.UNetGenerator(3, 3, nz=8, size=256, ngf=64, where_add="input")
    assert G_input.downs[1][1].in_channels == 64
    # z matters: a different z gives a different output
    G.eval()
    x = torch.randn(1, 3, 256, 256)
    assert not torch.allclose(G(x, torch.zeros(1, 8)), G(x, torch.ones(1, 8)))


def test_unfit_size_stops_with_one_sentence():
    with pytest.raises(SystemExit, match="does not fit"):
        common.UNetGenerator(size=100)
    with pytest.raises(SystemExit, match="does not fit"):
        common.UNetGenerator(size=32)


# --- losses, init, schedule -------------------------------------------------------------------
def test_gan_loss_by_hand():
    outs = [torch.tensor([[0.5, 1.5]]), torch.tensor([[2.0]])]
    # LSGAN, real: mean((0.5-1)^2, (1.5-1)^2) + (2-1)^2 = 0.25 + 1
    assert common.gan_loss(outs, True).item() == pytest.approx(1.25)
    # LSGAN, fake: mean(0.25, 2.25) + 4
    assert common.gan_loss(outs, False).item() == pytest.approx(5.25)
    # vanilla, real, one logit 0: -log(sigmoid(0)) = log 2
    assert common.gan_loss(torch.zeros(1, 1), True, "vanilla").item() == pytest.approx(math.log(2))


def test_init_and_linear_decay():
    net = common.init_weights(torch.nn.Conv2d(64, 64, 3), "normal", 0.02)
    assert abs(net.weight.std().item() - 0.02) < 0.002 and net.bias.abs().sum() == 0
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = common.linear_decay(opt, epochs=2, epochs_decay=3)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs == pytest.approx([1, 1, 0.75, 0.5, 0.25])


# --- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    common.save_checkpoint(path, {"step": 1})

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"step": 2})
    assert common.load_checkpoint(path)["step"] == 1


# --- datasets by name and downloads -----------------------------------------------------------
def test_unknown_name_and_missing_folder():
    with pytest.raises(SystemExit, match="unknown dataset 'nosuchset'"):
        common.prepare_dataset("nosuchset")
    with pytest.raises(SystemExit, match="does not exist"):
        common.prepare_dataset("some/missing/folder")


def make_archive():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for split in ("train", "val"):
            for i in range(3):
                img = io.BytesIO()
                Image.new("RGB", (16, 8), (i * 40, 0, 0)).save(img, "PNG")
                info = tarfile.TarInfo(f"tiny/{split}/{i}.png")
                info.size = len(img.getvalue())
                tar.addfile(info, io.BytesIO(img.getvalue()))
        # bulk so that a partial download is a real partial archive
        noise = torch.randint(0, 256, (200_000,), dtype=torch.uint8).numpy().tobytes()
        info = tarfile.TarInfo("tiny/noise.bin")
        info.size = len(noise)
        tar.addfile(info, io.BytesIO(noise))
    return buffer.getvalue()


class ArchiveServer:
    """A local HTTP server for one archive; it honours Range requests and, while `truncate` is
    set, announces the whole length but drops the connection half way."""

    def __init__(self, payload):
        self.payload, self.truncate, self.requests = payload, False, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.headers.get("Range"))
                start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if server.truncate else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tiny.tar.gz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_resumes_after_a_truncated_transfer(tmp_path):
    server = ArchiveServer(make_archive())
    try:
        server.truncate = True
        with pytest.raises(SystemExit, match="could not download .*run again to resume"):
            common.download_and_extract(server.url, tmp_path / "tiny")
        part = tmp_path / "tiny.tar.gz.part"
        assert part.exists() and 0 < part.stat().st_size < len(server.payload)
        assert not (tmp_path / "tiny").exists()
        server.truncate = False
        folder = common.download_and_extract(server.url, tmp_path / "tiny")
        half = (len(server.payload)) // 2
        assert server.requests == [None, f"bytes={half}-"]  # the second request resumed
        assert len(common.list_images(folder / "train")) == 3 and (folder / ".complete").exists()
        assert not part.exists() and not (tmp_path / "tiny.tar.gz").exists()
    finally:
        server.close()


def test_broken_archive_is_deleted_and_reported(tmp_path):
    payload = make_archive()
    server = ArchiveServer(payload[:1000] + payload[2000:])  # complete transfer, corrupt content
    try:
        with pytest.raises(SystemExit, match="broken"):
            common.download_and_extract(server.url, tmp_path / "tiny")
        assert not (tmp_path / "tiny.tar.gz").exists() and not (tmp_path / "tiny").exists()
    finally:
        server.close()


def test_no_network_names_the_url_and_the_folder(tmp_path):
    server = ArchiveServer(b"")
    url = server.url
    server.close()  # nothing listens there any more: connection refused
    with pytest.raises(SystemExit) as e:
        common.download_and_extract(url, tmp_path / "tiny")
    message = str(e.value)
    assert url in message and str(tmp_path / "tiny") in message and "\n" not in message


def test_known_names_use_the_official_urls():
    assert common.dataset_url("maps") == "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/maps.tar.gz"
    assert common.dataset_url("horse2zebra", "unpaired") == \
        "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets/horse2zebra.zip"
    assert common.dataset_defaults("facades")["direction"] == "BtoA"
    assert common.dataset_defaults("edges2shoes")["input_nc"] == 1
    assert common.dataset_defaults("maps")["epochs"] == 200


def test_lpips_diversity_code_path():
    pytest.importorskip("lpips")
    model, why_not = common.load_lpips("0.1", random_backbone=True)  # random backbone: tests only
    assert model is not None, why_not
    torch.manual_seed(0)
    x = torch.rand(3, 64, 64) * 2 - 1
    assert common.lpips_diversity(model, [x, x, x]) == pytest.approx(0.0, abs=1e-6)
    assert common.lpips_diversity(model, [x, -x, x]) > 0.0
    assert common.sample_pairs(20) == [(i, i + 1) for i in range(19)]  # the paper's 19 pairs per input


def test_lpips_without_weights_reports_no_number(monkeypatch):
    lpips = pytest.importorskip("lpips")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    model, why_not = common.load_lpips("0.1")
    assert model is None and "no LPIPS number" in why_not


def test_toy_colours_are_equally_far_apart():
    # notebooks/when_g_ignores_z.md, The cause: with unequal distances E learnt the main colour axis
    # first and merged the closest pairs; the toy's four colours are a regular tetrahedron in RGB, clear
    # of background and outline.
    palette = torch.tensor(common.TOY_PALETTE, dtype=torch.float)
    apart = torch.pdist(palette)
    assert apart.min() > 195 and apart.max() - apart.min() < 5, apart
    centred = palette - palette.mean(0)
    spread = torch.linalg.eigvalsh(centred.T @ centred / 4)
    assert spread.max() / spread.min() < 1.05, spread  # no colour axis stands out
    for other in (common.TOY_BACKGROUND, common.TOY_OUTLINE):
        assert (palette - torch.tensor(other, dtype=torch.float)).norm(dim=1).min() > 140
