"""Shared parts of the seven scripts: data, network blocks, the GAN loss and utilities.

What is here is used by two or more scripts. What makes a method a method -- its loss terms,
the order of its updates, where it calls detach() -- stays in the method's own script.

Sections: errors and devices | datasets (download, toy data, aligned and unaligned loaders) |
network blocks | GAN loss, init, schedule | speed | multi-GPU | checkpoints, logging, sample
grids | toy metrics.
"""
import atexit
import contextlib
import csv
import functools
import gzip
import json
import math
import os
import random
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ---------------------------------------------------------------------------------------------
# Errors a user can cause, and the device
# ---------------------------------------------------------------------------------------------
def fail(message):
    """Stop with one sentence and exit status 1 (no traceback): for errors a user can fix."""
    raise SystemExit(f"error: {message}")


# Options checked where they are parsed (each only where a script has it; None = "use the default").
COUNT_OPTIONS = ("batch_size", "n_samples", "max_iters", "num_test", "log_every", "nz", "ngf", "nef", "ndf",
                 "load_size", "crop_size", "style_dim", "mlp_dim", "num_scales", "step_size", "num_negatives")
MAY_BE_ZERO_OPTIONS = ("epochs", "epochs_decay", "num_workers", "pool_size", "n_blocks", "n_res")
POSITIVE_OPTIONS = ("lr", "radius", "tau")
NON_NEGATIVE_OPTIONS = ("weight_decay", "beta1")  # and every --lambda-*


def check_options(args, script):
    """Stop with one sentence naming the option for a value no run can use: counts below 1 (or
    below 0 where 0 means "none"), rates that are not positive, no epoch at all, channels other than
    1 or 3, a crop larger than the load size, an unknown --device, an --out that cannot be created.
    Also records the script (args.script), which every checkpoint then carries."""
    def flag(key):
        return "--" + key.replace("_", "-")

    for keys, least, what in ((COUNT_OPTIONS, 1, "at least 1"), (MAY_BE_ZERO_OPTIONS, 0, "at least 0")):
        for key in keys:
            value = getattr(args, key, None)
            if value is not None and value < least:
                fail(f"{flag(key)} {value} must be {what}"
                     + (" (leave it out to train the whole schedule)" if key == "max_iters" else ""))
    for key in POSITIVE_OPTIONS:
        value = getattr(args, key, None)
        if value is not None and not value > 0:
            fail(f"{flag(key)} {value} must be a positive number")
    lambdas = [key for key in vars(args) if key.startswith("lambda_")]
    for key in NON_NEGATIVE_OPTIONS + tuple(lambdas):
        value = getattr(args, key, None)
        if value is not None and not value >= 0:
            fail(f"{flag(key)} {value} must be zero or positive")
    if getattr(args, "beta1", None) is not None and args.beta1 >= 1:
        fail(f"--beta1 {args.beta1} must be below 1")
    if getattr(args, "epochs", None) is not None and args.epochs + (args.epochs_decay or 0) < 1:
        fail(f"--epochs {args.epochs} --epochs-decay {args.epochs_decay} leave no epoch to train; "
             "give at least one")
    for key in ("input_nc", "output_nc"):
        if getattr(args, key, None) not in (None, 1, 3):
            fail(f"{flag(key)} {getattr(args, key)} is not a channel count images have: use 1 (grayscale) or 3 (RGB)")
    if not args.test and args.crop_size > args.load_size:  # a test resizes to the test size only
        fail(f"--crop-size {args.crop_size} is larger than --load-size {args.load_size}; "
             "make the load size at least the crop size")
    check_device_name(args.device)
    check_out(args.out)
    args.script = Path(script).stem
    return args


def check_device_name(name):
    if name == "auto":
        return
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):  # not a device string at all, e.g. "tpu9"
        kind = None
    if kind not in ("cpu", "cuda"):
        fail(f"--device {name} is not a device this code runs on: use auto, cpu, cuda or cuda:N")


def check_out(out):
    """--out (None: the default under runs/) must be a folder or a path one can be created at."""
    path = Path(out if out is not None else "runs")
    if path.exists() and not path.is_dir():
        fail(f"--out {path} is a file, not a folder; choose another --out")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--out {path} cannot be created: {parent} is not a folder this user can write to; "
             "choose another --out")


def cannot_write(path, error):
    """A write that failed (full disk, no permission): one sentence that says what to do."""
    reason = getattr(error, "strerror", None) or "the write failed; is the disk full?"
    fail(f"could not write {path} ({reason}); free some disk space or choose a writable --out, then run "
         "again (--resume continues from the last complete checkpoint)")


def pick_device(name="auto"):
    """'auto' takes CUDA when present and falls back to the CPU with a one-line notice."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        else:
            print("note: no CUDA GPU found, training on the CPU (slow beyond the toy data)")
            name = "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda":
        # Speed: let cuDNN pick the fastest convolution algorithms for our fixed input sizes.
        torch.backends.cudnn.benchmark = True
    return device


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---------------------------------------------------------------------------------------------
# Datasets: known names, download, built-in toy data
# ---------------------------------------------------------------------------------------------
PIX2PIX_URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/{}.tar.gz"
CYCLEGAN_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets/{}.zip"

# Per-dataset defaults from the official training scripts (reference §1 and §7): translation
# direction, constant-LR epochs + linear-decay epochs, load size, crop size, input channels.
PAIRED_DATASETS = {
    "facades": dict(direction="BtoA", epochs=200, epochs_decay=200, load_size=286, crop_size=256, input_nc=3),
    # maps: trained on random 256 crops of the 600-px images, tested on the whole image at 512 px
    # (official scripts/test_maps.sh: load and fine size 512).
    "maps": dict(direction="BtoA", epochs=200, epochs_decay=200, load_size=600, crop_size=256, input_nc=3,
                 test_size=512),
    "edges2shoes": dict(direction="AtoB", epochs=30, epochs_decay=30, load_size=256, crop_size=256, input_nc=1),
    "edges2handbags": dict(direction="AtoB", epochs=15, epochs_decay=15, load_size=256, crop_size=256, input_nc=1),
    "night2day": dict(direction="AtoB", epochs=50, epochs_decay=50, load_size=286, crop_size=256, input_nc=3),
    # Built-in, generated by code (see make_toy_dataset); small so a laptop CPU trains it in minutes.
    "toy": dict(direction="AtoB", epochs=15, epochs_decay=15, load_size=64, crop_size=64, input_nc=3,
                ngf=16, nef=16, ndf=16),
}
# The toy demo's training choices for the five paired scripts, whose G is the U-Net (README, "When G
# ignores z"): 16 pairs a step (8 per half-batch) and batch norm in E and the Ds. On the toy's flat,
# piecewise-constant images, instance norm removes the per-image offset that a spatially constant z
# adds at each normalised level, and G settles on two colours; batch norm over several images keeps
# it. G itself uses the per-image layer norm: batch norm's running averages, which mix G's passes on
# E's codes with those on prior codes, misread E's codes at test time. 90 + 90 epochs: after 60 + 60
# (and 70 + 70) E can still leave two colours with one code. Real data sets keep the official batch
# size and instance norm; flags still win.
TOY_PAIRED_TRAINING = dict(batch_size=16, norm="batch", norm_g="layer", epochs=90, epochs_decay=90)  # 4500 steps
# bicyclegan.py and divco.py sum the KL over the encoded half-batch, as the official code (one image
# at its batch 2); at 16 pairs a step that would weigh the KL 8x more per image against the image
# L1, which is a mean. 0.01 / 8 keeps the official per-image balance (divco.py's toy default);
# bicyclegan.py's toy default is four times it (its parse_args).
TOY_SUMMED_KL = 0.01 * 2 / 16
# Unpaired names (trainA/ trainB/ testA/ testB/), official CycleGAN zips and training options
# (100 + 100 epochs, load 286, crop 256). maps and facades also exist paired: their unpaired
# copies get their own folders.
UNPAIRED_DATASETS = {
    name: dict(direction="AtoB", epochs=100, epochs_decay=100, load_size=286, crop_size=256, input_nc=3)
    for name in ("horse2zebra", "apple2orange", "summer2winter_yosemite", "monet2photo", "cezanne2photo",
                 "ukiyoe2photo", "vangogh2photo", "maps", "facades", "iphone2dslr_flower")
}
UNPAIRED_DATASETS["maps"]["folder"] = "maps_unpaired"
UNPAIRED_DATASETS["facades"]["folder"] = "facades_unpaired"
UNPAIRED_DATASETS["toy"] = dict(PAIRED_DATASETS["toy"])

DEFAULT_OPTIONS = dict(direction="AtoB", epochs=100, epochs_decay=100, load_size=286, crop_size=256, input_nc=3,
                       ngf=64, nef=64, ndf=64)


def dataset_url(name, layout="paired"):
    return (PIX2PIX_URL if layout == "paired" else CYCLEGAN_URL).format(name)


def dataset_defaults(name, layout="paired"):
    """The official per-dataset options for a known name, or for a folder named like one
    (.../facades gets the facades options); general defaults for any other folder."""
    if name not in PAIRED_DATASETS and name not in UNPAIRED_DATASETS:
        name = Path(name).name
    table = UNPAIRED_DATASETS if layout == "unpaired" and name in UNPAIRED_DATASETS else PAIRED_DATASETS
    options = dict(DEFAULT_OPTIONS, **table.get(name, {}))
    options.pop("folder", None)
    return options


def resolve_options(args, layout="paired"):
    """Fill every option the user left at None from the dataset's defaults (flags win).
    A test takes its image size from --crop-size when given (test_size), else from the data set
    (maps: 512), else from the checkpoint; the networks keep their training crop size."""
    args.input = getattr(args, "input", None)
    args.test = getattr(args, "test", False) or args.input is not None  # --input is a kind of test
    args.test_size = args.crop_size if args.test else None
    for key, value in dataset_defaults(args.dataset, layout).items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    check_inference_flags(args)
    return args


def prepare_dataset(name_or_path, layout="paired", root="datasets", seed=0):
    """Return the folder of a data set: a path as given, toy data made on first use, or a known
    name downloaded from its official URL into ./datasets/<name> on first use."""
    path = Path(name_or_path)
    if name_or_path == "toy":
        return make_toy_dataset(Path(root) / ("toy" if layout == "paired" else "toy_unpaired"),
                                layout=layout, seed=seed)
    # An unpaired script may also take a paired name: the halves of its files become two domains.
    if layout == "unpaired" and name_or_path in UNPAIRED_DATASETS:
        known, kind = UNPAIRED_DATASETS, "unpaired"
    else:
        known, kind = PAIRED_DATASETS, "paired"
    if name_or_path in known:
        folder = Path(root) / known[name_or_path].get("folder", name_or_path)
        if not (folder / ".complete").exists():
            download_and_extract(dataset_url(name_or_path, kind), folder)
        return folder
    if path.is_dir():
        return path
    if os.sep in name_or_path or "/" in name_or_path or path.suffix:
        fail(f"dataset folder '{name_or_path}' does not exist; check the path")
    names = ", ".join(sorted(set(PAIRED_DATASETS) | (set(UNPAIRED_DATASETS) if layout == "unpaired" else set())))
    fail(f"unknown dataset '{name_or_path}': give a folder path or one of {names}")


def download_and_extract(url, folder, chunk=1 << 20):
    """Download url into folder/../<archive>.part (resuming a partial file), check the archive,
    then extract it and rename the result into place, so that an interruption at any point
    leaves either nothing or a .part file that the next run resumes."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    archive = folder.parent / url.rsplit("/", 1)[-1]
    part = archive.with_name(archive.name + ".part")
    if not archive.exists():
        where = f"so that {folder}/train (or {folder}/trainA) exists"
        try:
            _download(url, part, chunk)
        except (urllib.error.URLError, OSError) as e:  # no network, refused, truncated, HTTP error
            reason = getattr(e, "reason", e)
            fail(f"could not download {url} ({reason}); run again to resume, or download it by "
                 f"hand and extract it {where}")
        part.rename(archive)
    try:  # check the whole archive before anything is extracted
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                if z.testzip() is not None:
                    raise zipfile.BadZipFile("CRC mismatch")
        else:
            if archive.name.endswith("gz"):  # read the whole stream: gzip checks its CRC at the end
                with gzip.open(archive) as g:
                    while g.read(1 << 24):
                        pass
            with tarfile.open(archive) as t:
                t.getmembers()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        archive.unlink()
        fail(f"the downloaded archive {archive} is broken ({e}); it was deleted, run again to "
             "download it anew")
    tmp = folder.with_name(folder.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    else:
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")
    # The archives hold one top folder (facades/...); move its content up if so.
    inner = [p for p in tmp.iterdir()]
    content = inner[0] if len(inner) == 1 and inner[0].is_dir() else tmp
    shutil.rmtree(folder, ignore_errors=True)
    content.rename(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    (folder / ".complete").write_text(url + "\n")
    archive.unlink()
    return folder


def _download(url, part, chunk):
    """Stream url into part, asking the server for the missing tail if part already exists."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=f"download {url.rsplit('/', 1)[-1]}"
        ) as bar:
            while True:
                data = response.read(chunk)  # raises IncompleteRead if the connection drops
                if not data:
                    break
                f.write(data)
                bar.update(len(data))
    if total is not None and part.stat().st_size != total:
        raise OSError(f"got {part.stat().st_size} of {total} bytes")


# --- Built-in toy data ------------------------------------------------------------------------
# The task: the input is the outline of one shape (circle, square or triangle); the output is the
# same shape filled with one of four colours, each equally likely. The input fixes the structure,
# the colour is free: every input has exactly four right answers, known in advance.
TOY_SIZE = 64
TOY_BACKGROUND = (235, 235, 235)
TOY_OUTLINE = (20, 20, 20)
# The four colours are equally far apart (200 in RGB: a regular tetrahedron around mid-grey, 150
# from the background and the outline), so that no pair is easier for E to merge than another
# (notebooks/when_g_ignores_z.md, The cause; the earlier palette had pairs 151 and 290 apart).
TOY_PALETTE = ((158, 16, 87), (16, 158, 87), (128, 128, 250), (210, 210, 87))  # red green blue yellow
# 100 test pairs, as the paper's --num-test 100: the per-run coverage, valid share and encoded share are
# means over the test inputs, and with 20 inputs one input moved them by 5 points
# (notebooks/when_g_ignores_z.md, On 100 test inputs).
TOY_SPLITS = {"train": 400, "test": 100}  # the test pairs are drawn after the training pairs


# Every shape's coloured share of the image (toy data v4). E averages over the image, so with shapes of
# 2 to 56 % its code moved with the area as much as with the colour
# (notebooks/when_g_ignores_z.md, "The shapes' area").
TOY_AREA = (0.25, 0.35)
# Every target's fill is its palette colour made lighter or darker by up to this much in each RGB
# channel (toy data v5). With flat fills, G's output is constant over each colour's region of z, so
# where E gives two colours nearby codes the image L1 has no gradient left to move them apart; a
# shade gives z a continuous job within each colour, as a real photo's style is continuous
# (notebooks/when_g_ignores_z.md, "A shade within each colour"). toy_mode still reads every shade.
TOY_SHADE = 24


def _toy_shape(rng):
    kind = rng.choice(("circle", "square", "triangle"))
    area = rng.uniform(*TOY_AREA) * TOY_SIZE ** 2
    r = round(math.sqrt(area / {"circle": math.pi, "square": 4.0, "triangle": 2.0}[kind]))
    cx, cy = rng.randint(r + 3, TOY_SIZE - r - 4), rng.randint(r + 3, TOY_SIZE - r - 4)
    if kind == "circle":
        return kind, [cx - r, cy - r, cx + r, cy + r]
    if kind == "square":
        return kind, [cx - r, cy - r, cx + r, cy + r]
    return kind, [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]


def draw_toy(shape, colour=None, shade=0.0):
    """The outline (colour None: the input) or the filled shape in a palette colour, lighter by
    `shade` in each channel (darker if negative): an output."""
    kind, xy = shape
    if colour is None:
        img = Image.new("RGB", (TOY_SIZE, TOY_SIZE), (0, 0, 0))
        style = dict(fill=None, outline=(255, 255, 255), width=2)
    else:
        img = Image.new("RGB", (TOY_SIZE, TOY_SIZE), TOY_BACKGROUND)
        fill = tuple(min(255, max(0, round(v + shade))) for v in TOY_PALETTE[colour])
        style = dict(fill=fill, outline=TOY_OUTLINE, width=2)
    draw = ImageDraw.Draw(img)
    {"circle": draw.ellipse, "square": draw.rectangle, "triangle": draw.polygon}[kind](xy, **style)
    return img


def make_toy_dataset(folder, layout="paired", seed=0):
    """Write the toy data once (deterministic for a seed): paired A|B files in train/ and test/,
    or unpaired outlines and filled shapes in trainA/ trainB/ testA/ testB/."""
    folder = Path(folder)
    stamp = f"toy v5 {layout} seed {seed}\n"  # v2: the equidistant palette; v3: 100 test pairs; v4: equal areas; v5: shades
    if (folder / ".complete").exists() and (folder / ".complete").read_text() == stamp:
        return folder
    rng = random.Random(seed)
    tmp = folder.with_name(f"{folder.name}.writing-{os.getpid()}")  # one per process: no races
    shutil.rmtree(tmp, ignore_errors=True)
    for split, count in TOY_SPLITS.items():
        for i in range(count):
            shape, colour = _toy_shape(rng), rng.randrange(len(TOY_PALETTE))
            shade = rng.uniform(-TOY_SHADE, TOY_SHADE)
            if layout == "paired":
                pair = Image.new("RGB", (2 * TOY_SIZE, TOY_SIZE))
                pair.paste(draw_toy(shape), (0, 0))
                pair.paste(draw_toy(shape, colour, shade), (TOY_SIZE, 0))
                (tmp / split).mkdir(parents=True, exist_ok=True)
                pair.save(tmp / split / f"{i:04d}.png")
            else:  # the two domains get independent shapes: there are no pairs to learn from
                other = _toy_shape(rng)
                for side, img in (("A", draw_toy(shape)), ("B", draw_toy(other, colour, shade))):
                    (tmp / (split + side)).mkdir(parents=True, exist_ok=True)
                    img.save(tmp / (split + side) / f"{i:04d}.png")
    (tmp / ".complete").write_text(stamp)
    if (folder / ".complete").exists() and (folder / ".complete").read_text() == stamp:
        shutil.rmtree(tmp)  # another process finished the same data first
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process renamed its copy into place in the meantime
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --- Loaders ----------------------------------------------------------------------------------
def list_images(folder):
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS) if folder.is_dir() else []


def find_split(root, split, suffix=""):
    """train/ for training; for testing test/ when present, else val/."""
    root = Path(root)
    names = ["train"] if split == "train" else ["test", "val"]
    for name in names:
        if list_images(root / (name + suffix)):
            return root / (name + suffix)
    wanted = " or ".join(f"{root / (n + suffix)}/" for n in names)
    fail(f"no images found in {wanted}; a data set folder needs its images there")


def to_uint8(img, channels):
    """PIL image -> uint8 tensor (C, H, W) with 1 (grayscale) or 3 channels."""
    img = img.convert("L" if channels == 1 else "RGB")
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return x.view(img.height, img.width, channels).permute(2, 0, 1)


def to_tensor(img, channels):
    """PIL image -> float tensor in [-1, 1] with 1 (grayscale) or 3 channels."""
    return to_uint8(img, channels).float() / 127.5 - 1.0


def crop_flip(x, crop_size, params):
    """uint8 image (C, S, S) -> float crop in [-1, 1]; params (x, y, flip), or None for the whole
    image. Plain tensor ops, so they run where the image is (on the GPU for a data set kept there)."""
    if params is not None:
        left, top, flip = params
        x = x[:, top:top + crop_size, left:left + crop_size]
        x = x.flip(-1) if flip else x
    return x.float() / 127.5 - 1.0


class ImageFolderBase(torch.utils.data.Dataset):
    """Shared by the aligned and unaligned sets: image reading that skips broken files with a
    warning, and crops/flips drawn from (seed, epoch, index) so that they do not depend on worker
    processes and a resumed run sees the very same augmentation.

    An image is first decoded and resized (bicubic, square) to the load size when training, the
    crop size when testing; the random crop and flip follow on the tensor. keep_in_memory() does
    the first part once for every image, which gives the very same tensors."""

    def __init__(self, load_size, crop_size, train, seed):
        self.load_size, self.crop_size, self.train, self.seed, self.epoch = load_size, crop_size, train, seed, 0
        self.cache = None  # when kept in memory: side -> [(decoded uint8 image(s), path)] by index
        self.device = torch.device("cpu")  # where the batches go: set by common.keep_in_memory

    def set_epoch(self, epoch):
        self.epoch = epoch

    def rng(self, index, salt=0):
        return random.Random(f"{self.seed}/{self.epoch}/{index}/{salt}")

    def crop_params(self, rng):
        if not self.train:  # test: the whole image resized to the crop size, no flip
            return None
        room = self.load_size - self.crop_size
        return rng.randint(0, room), rng.randint(0, room), rng.random() < 0.5

    def resize(self, img, channels):
        """PIL image -> uint8 tensor at the load size (training) or crop size (test)."""
        size = self.load_size if self.train else self.crop_size
        return to_uint8(img.resize((size, size), Image.BICUBIC), channels)

    def transform(self, img, params, channels):
        """PIL image -> network input in [-1, 1] (params: a crop and flip, or None)."""
        return crop_flip(self.resize(img, channels), self.crop_size, params)

    def open(self, paths, index):
        """Open paths[index] -> (image, index read); a broken file is skipped, with a warning,
        for the next one."""
        for attempt in range(len(paths)):
            i = (index + attempt) % len(paths)
            path = paths[i]
            try:
                with Image.open(path) as img:
                    img.load()
                    return img.convert("RGB"), i
            except (OSError, SyntaxError, ValueError) as e:
                print(f"warning: skipping unreadable image {path} ({e})", file=sys.stderr)
        fail(f"none of the {len(paths)} images in {Path(paths[0]).parent} could be read; replace the broken files")

    def check_images(self, paths, paired):
        """Stop with one sentence if no file of paths can be read; warn when the first readable one
        is probably not what the user meant: a paired (A|B) file not about twice as wide as tall,
        or images (halves) much smaller than the size they are resized to."""
        if not paths:
            return
        img, i = self.open(paths, 0)
        w, h = img.size
        folder, size = Path(paths[i]).parent, self.load_size if self.train else self.crop_size
        if paired and not 1.5 <= w / h <= 2.5:
            print(f"warning: {paths[i]} is {w}x{h} pixels, not about twice as wide as tall, but a paired "
                  f"folder holds input|target side by side in each file; put each pair side by side, or "
                  "use an unpaired script with trainA/ and trainB/", file=sys.stderr)
        width = w // 2 if paired else w
        if min(width, h) < size / 2:
            print(f"warning: the images in {folder} are {width}x{h} pixels{' per half' if paired else ''}, "
                  f"much smaller than the {size} px they are resized to, so they come out blurred; lower "
                  "--load-size and --crop-size, or use larger images", file=sys.stderr)

    def decoded(self, side, index):
        """(uint8 image, path) of side 'A' or 'B' at index: from memory, else from its file."""
        if self.cache is not None:
            return self.cache[side][index]
        return self.decode(side, index)

    def keep_in_memory(self, device, max_gib=4.0):
        """Speed: decode and resize every image once and keep them, as uint8, on the device
        (the GPU for a CUDA run), so that an epoch reads no file and crops on the device. Skipped,
        with a note, for sets larger than max_gib; returns whether the set is kept."""
        size = self.load_size if self.train else self.crop_size
        gib = sum(n * channels for n, channels in self.sides().values()) * size * size / 2 ** 30
        if gib > max_gib:
            print(f"note: the data set needs {gib:.1f} GiB decoded, more than {max_gib} GiB: read from disk each epoch")
            return False
        print(f"data: decoding {len(self)} images once, kept as uint8 in {torch.device(device).type} memory "
              f"({gib:.2f} GiB)", flush=True)

        def to_device(x):  # an image, or the (A, B) pair of an aligned file
            return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)

        self.cache = {side: [(to_device(x), path) for x, path in (self.decode(side, i) for i in range(n))]
                      for side, (n, _) in self.sides().items()}
        return True


class AlignedDataset(ImageFolderBase):
    """Files holding A|B side by side (pix2pix layout). Returns {'A': input, 'B': target, 'path'}
    oriented by direction; one shared crop and flip for the pair."""

    def __init__(self, folder, direction="AtoB", load_size=286, crop_size=256, input_nc=3, output_nc=3,
                 train=True, seed=0):
        super().__init__(load_size, crop_size, train, seed)
        self.paths = list_images(folder)
        self.direction, self.input_nc, self.output_nc = direction, input_nc, output_nc
        self.check_images(self.paths, paired=True)

    def __len__(self):
        return len(self.paths)

    def sides(self):
        return {"AB": (len(self.paths), self.input_nc + self.output_nc)}

    def decode(self, side, index):
        """-> ((A, B) as uint8 tensors at the working size, path): both halves of one file."""
        img, i = self.open(self.paths, index)
        w, h = img.size
        left, right = img.crop((0, 0, w // 2, h)), img.crop((w // 2, 0, w, h))
        source, target = (left, right) if self.direction == "AtoB" else (right, left)
        return (self.resize(source, self.input_nc), self.resize(target, self.output_nc)), str(self.paths[i])

    def __getitem__(self, index):
        (A, B), path = self.decoded("AB", index)
        params = self.crop_params(self.rng(index))
        return {"A": crop_flip(A, self.crop_size, params), "B": crop_flip(B, self.crop_size, params), "path": path}


def image_size(args, train):
    """The side images are resized to: the crop size for training, the test size for a test."""
    return args.crop_size if train else (getattr(args, "test_size", None) or args.crop_size)


def paired_dataset(args, train=True):
    """The aligned data set for a script's options: train/ or, for --test, test/ (else val/)."""
    with local_main_first():  # Multi-GPU: one process downloads, the others wait
        root = prepare_dataset(args.dataset, "paired", seed=0)
    folder = find_split(root, "train" if train else "test")
    return AlignedDataset(folder, args.direction, args.load_size, image_size(args, train), args.input_nc,
                          args.output_nc, train=train, seed=args.seed)


class UnalignedDataset(ImageFolderBase):
    """Two unpaired domains. A by index, B at a random index; epoch length max(|A|, |B|);
    independent crops and flips. Each domain is a list of (path, half): half None for whole
    images, 0 or 1 for the left or right half of pix2pix A|B files (MUNIT's edges2shoes recipe).
    Returns {'A', 'B', 'path' (of A), 'path_B'}."""

    def __init__(self, files_A, files_B, load_size=286, crop_size=256, input_nc=3, output_nc=3, train=True, seed=0):
        super().__init__(load_size, crop_size, train, seed)
        self.paths_A, self.halves_A = [p for p, _ in files_A], [h for _, h in files_A]
        self.paths_B, self.halves_B = [p for p, _ in files_B], [h for _, h in files_B]
        self.input_nc, self.output_nc = input_nc, output_nc
        self.check_images(self.paths_A, paired=bool(files_A) and files_A[0][1] is not None)
        self.check_images(self.paths_B, paired=bool(files_B) and files_B[0][1] is not None)

    def __len__(self):
        return max(len(self.paths_A), len(self.paths_B))

    def sides(self):
        return {"A": (len(self.paths_A), self.input_nc), "B": (len(self.paths_B), self.output_nc)}

    def decode(self, side, index):
        """-> (uint8 tensor at the working size, path) of image index of domain side."""
        paths, halves, channels = ((self.paths_A, self.halves_A, self.input_nc) if side == "A"
                                   else (self.paths_B, self.halves_B, self.output_nc))
        img, i = self.open(paths, index)
        if halves[i] is not None:
            w, h = img.size
            img = img.crop((halves[i] * w // 2, 0, (halves[i] + 1) * w // 2, h))
        return self.resize(img, channels), str(paths[i])

    def __getitem__(self, index):
        rng = self.rng(index)
        A, path_A = self.decoded("A", index % len(self.paths_A))
        b = rng.randrange(len(self.paths_B)) if self.train else index % len(self.paths_B)
        B, path_B = self.decoded("B", b)
        return {"A": crop_flip(A, self.crop_size, self.crop_params(rng)),
                "B": crop_flip(B, self.crop_size, self.crop_params(rng)), "path": path_A, "path_B": path_B}


def unpaired_dataset(args, train=True):
    """Domains from trainA/ trainB/ (test: testA/ testB/, else valA/ valB/), or from the halves of
    a paired folder (train/; test: test/ or val/). --direction BtoA swaps the two domains."""
    with local_main_first():  # Multi-GPU: one process downloads, the others wait
        root = prepare_dataset(args.dataset, "unpaired", seed=0)
    if list_images(root / "trainA") or list_images(root / "testA"):
        files = [[(p, None) for p in list_images(find_split(root, "train" if train else "test", side))]
                 for side in ("A", "B")]
    else:  # a paired data set used unpaired: left halves are A, right halves are B
        paths = list_images(find_split(root, "train" if train else "test"))
        files = [[(p, 0) for p in paths], [(p, 1) for p in paths]]
        if train:  # the two domains must not come in pairs: shift B's order by a fixed permutation
            order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(1)).tolist()
            files[1] = [files[1][i] for i in order]
    if args.direction == "BtoA":
        files.reverse()
    return UnalignedDataset(files[0], files[1], args.load_size, image_size(args, train), args.input_nc,
                            args.output_nc, train=train, seed=args.seed)


def epoch_loader(dataset, batch_size, epoch, seed, skip_batches=0, num_workers=0, drop_last=True):
    """One epoch's DataLoader: a shuffle fixed by (seed, epoch) so a resumed run can skip the
    batches it has already trained on and continue with exactly the same data."""
    dataset.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    # Multi-GPU: this rank's share of each global batch (world size 1: the whole shuffle)
    order = epoch_order(len(dataset), batch_size, epoch, seed, skip_batches, rank(), world_size())
    # Its own generator also keeps the loader from drawing on the global RNG that z and dropout use.
    # A set kept in memory is cropped in this process (on its device); one read from disk is
    # decoded by num_workers processes into pinned memory, for fast copies to the GPU.
    in_memory = getattr(dataset, "cache", None) is not None
    pinned = getattr(dataset, "device", torch.device("cpu")).type == "cuda"  # pinned only helps copies to a GPU
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=drop_last,
                                       num_workers=0 if in_memory else num_workers,
                                       pin_memory=pinned and not in_memory, generator=generator)


def check_trainable(dataset, batch_size):
    if len(dataset) < batch_size * world_size():
        per_step = f" x {world_size()} processes" if world_size() > 1 else ""
        fail(f"the training set has {len(dataset)} images, fewer than --batch-size {batch_size}{per_step}; "
             "add images or lower the batch size")


# ---------------------------------------------------------------------------------------------
# Network blocks
# ---------------------------------------------------------------------------------------------
def norm_layer(kind):
    """'instance' (no affine, as the official BicycleGAN/CycleGAN), 'batch', 'layer' (one group
    norm over each image's channels and pixels, with affine: per image like instance norm, yet it
    keeps a code's per-channel offsets; README, When G ignores z), or 'none'."""
    if kind == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if kind == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True)
    if kind == "layer":
        return functools.partial(nn.GroupNorm, 1)
    return lambda channels: nn.Identity()


def unet_depth(size, max_depth=8):
    """Number of stride-2 levels for a U-Net on size x size images: log2(size), at most 8
    (the official 256 px net); the size must be divisible by 2**depth."""
    depth = min(max_depth, int(math.log2(size))) if size >= 2 else 0
    if size < 64 or size % 2 ** depth:  # 64 px is also the least the two-scale D can take
        fail(f"image size {size} does not fit the networks: use a multiple of {2 ** max(depth, 6)} "
             "of at least 64 (e.g. --crop-size 256)")
    return depth


def tile_z(x, z):
    """Concatenate z, replicated over the image plane, to the channels of x (Fig. 2 of the paper)."""
    return torch.cat([x, z[:, :, None, None].expand(-1, -1, x.size(2), x.size(3))], 1)


class UNetGenerator(nn.Module):
    """U-Net G(A, z). z is tiled and concatenated to the input of every down level
    (where_add='all', the paper's final model) or to the image input only ('input').
    Down level d: [LeakyReLU 0.2] conv4 s2 [norm]; up level d: ReLU convT4 s2 norm [dropout];
    no norm on the outermost and innermost down levels; Tanh at the end; skips concatenate."""

    def __init__(self, input_nc=3, output_nc=3, nz=8, size=256, ngf=64, norm="instance",
                 use_dropout=True, where_add="all"):
        super().__init__()
        self.nz, self.where_add = nz, where_add
        depth = unet_depth(size)
        Norm = norm_layer(norm)
        ch = [min(ngf * 2 ** d, ngf * 8) for d in range(depth)]  # 64 128 256 512 512 512 512 512
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for d in range(depth):
            c_in = (input_nc if d == 0 else ch[d - 1]) + (nz if (where_add == "all" or d == 0) else 0)
            layers = [] if d == 0 else [nn.LeakyReLU(0.2, True)]
            layers.append(nn.Conv2d(c_in, ch[d], 4, 2, 1))
            if 0 < d < depth - 1:
                layers.append(Norm(ch[d]))
            self.downs.append(nn.Sequential(*layers))
        for d in reversed(range(depth)):
            c_in = ch[d] if d == depth - 1 else 2 * ch[d]
            c_out = output_nc if d == 0 else ch[d - 1]
            layers = [nn.ReLU(True), nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)]
            if d == 0:
                layers.append(nn.Tanh())
            else:
                layers.append(Norm(c_out))
                if use_dropout and 4 <= d < depth - 1:  # the inner 8*ngf levels (three at 256 px)
                    layers.append(nn.Dropout(0.5))
            self.ups.append(nn.Sequential(*layers))

    def forward(self, x, z=None):
        skips = []
        for d, down in enumerate(self.downs):
            if self.nz and (self.where_add == "all" or d == 0):
                x = tile_z(x, z)
            x = down(x)
            skips.append(x)
        skips.pop()  # the innermost output goes straight up
        for up in self.ups:
            x = up(x)
            if skips:
                x = torch.cat([x, skips.pop()], 1)
        return x


class PatchDiscriminator(nn.Module):
    """PatchGAN D at one or more scales; returns a list with one patch map per scale.
    Per scale: conv4 s2 (no norm) then n_layers-1 conv4 s2 with norm, one conv4 s1 with norm and
    a conv4 s1 to one channel (70x70 patches for n_layers=3). Scale i uses ndf / 2**i channels and
    sees the input average-pooled i times (3x3, stride 2), as in the official BicycleGAN D."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3, norm="instance", num_scales=2):
        super().__init__()
        self.scales = nn.ModuleList(self._single(input_nc, round(ndf / 2 ** i), n_layers, norm_layer(norm))
                                    for i in range(num_scales))
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    @staticmethod
    def _single(input_nc, ndf, n_layers, Norm):
        layers = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for n in range(1, n_layers + 1):
            c_next = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(c, c_next, 4, stride, 1), Norm(c_next), nn.LeakyReLU(0.2, True)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        return nn.Sequential(*layers)

    def forward(self, x):
        outputs = []
        for i, net in enumerate(self.scales):
            if i > 0:
                x = self.pool(x)
            outputs.append(net(x))
        return outputs


class ResidualPoolBlock(nn.Module):
    """Encoder block: norm-act-conv3-norm-act-conv3-avgpool2, plus avgpool2-conv1 shortcut."""

    def __init__(self, c_in, c_out, Norm):
        super().__init__()
        self.body = nn.Sequential(Norm(c_in), nn.LeakyReLU(0.2, True), nn.Conv2d(c_in, c_in, 3, 1, 1),
                                  Norm(c_in), nn.LeakyReLU(0.2, True), nn.Conv2d(c_in, c_out, 3, 1, 1),
                                  nn.AvgPool2d(2, 2))
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1))

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class ResNetEncoder(nn.Module):
    """E_ResNet: conv4 s2, four residual blocks with average-pool downsampling
    (64 -> 128 -> 192 -> 256 -> 256 channels), LeakyReLU, global average pool, and two linear
    heads giving mu and logvar. The official net pools 8x8 and so needs 256 px; the adaptive
    pool here lets it take any size from 32 px up."""

    def __init__(self, input_nc=3, nz=8, nef=64, n_blocks=4, norm="instance"):
        super().__init__()
        Norm = norm_layer(norm)
        ch = [nef * min(n + 1, 4) for n in range(n_blocks + 1)]  # 64 128 192 256 256
        layers = [nn.Conv2d(input_nc, ch[0], 4, 2, 1)]
        layers += [ResidualPoolBlock(ch[n], ch[n + 1], Norm) for n in range(n_blocks)]
        layers += [nn.LeakyReLU(0.2, True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc_mu, self.fc_logvar = nn.Linear(ch[-1], nz), nn.Linear(ch[-1], nz)

    def forward(self, x):
        h = self.features(x)
        return self.fc_mu(h).float(), self.fc_logvar(h).float()  # float32 also under --amp (z, KL)


class ConvEncoder(nn.Module):
    """E_CNN: n_layers conv4 s2 (official nf_mult = min(2^n, 4): 64 -> 128 -> 256 -> 256 -> 256),
    LeakyReLU, global average pool (official: 8x8 at 256 px), linear heads for mu and logvar."""

    def __init__(self, input_nc=3, nz=8, nef=64, n_layers=5, norm="instance"):
        super().__init__()
        Norm = norm_layer(norm)
        layers, c = [nn.Conv2d(input_nc, nef, 4, 2, 1), nn.LeakyReLU(0.2, True)], nef
        for n in range(1, n_layers):
            c_next = nef * min(2 ** n, 4)
            layers += [nn.Conv2d(c, c_next, 4, 2, 1), Norm(c_next), nn.LeakyReLU(0.2, True)]
            c = c_next
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc_mu, self.fc_logvar = nn.Linear(c, nz), nn.Linear(c, nz)

    def forward(self, x):
        h = self.features(x)
        return self.fc_mu(h).float(), self.fc_logvar(h).float()  # float32 also under --amp (z, KL)


def make_encoder(kind, input_nc, nz, nef, norm="instance"):
    return (ResNetEncoder if kind == "resnet" else ConvEncoder)(input_nc, nz, nef, norm=norm)


class ResnetBlock(nn.Module):
    """x + [reflect-pad conv3 norm ReLU (dropout) reflect-pad conv3 norm](x)."""

    def __init__(self, dim, Norm, use_dropout=False):
        super().__init__()
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), Norm(dim), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), Norm(dim)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """The CycleGAN generator: reflect-pad conv7 (ngf), two stride-2 convs (to 4 ngf), n_blocks
    residual blocks (9 at 256 px, 6 at 128 px), two stride-2 transposed convs, conv7, Tanh.
    Sizes must be multiples of 4."""

    def __init__(self, input_nc=3, output_nc=3, ngf=64, n_blocks=9, norm="instance", use_dropout=False):
        super().__init__()
        Norm = norm_layer(norm)
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7), Norm(ngf), nn.ReLU(True)]
        for i in range(2):
            c = ngf * 2 ** i
            layers += [nn.Conv2d(c, 2 * c, 3, 2, 1), Norm(2 * c), nn.ReLU(True)]
        layers += [ResnetBlock(4 * ngf, Norm, use_dropout) for _ in range(n_blocks)]
        for i in range(2):
            c = ngf * 4 // 2 ** i
            layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1), Norm(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class ImagePool:
    """A buffer of up to `size` past fakes for the D update (Shrivastava et al., used by CycleGAN):
    until full, store each new image and return it; then return, with probability 1/2, a stored
    image (putting the new one in its place), else the new image. Stored in float32 and returned
    in the dtype of the incoming fakes, so a pool filled under --amp (bf16) serves a run without."""

    def __init__(self, size=50):
        self.size, self.images = size, []

    def query(self, images):
        if self.size == 0:
            return images
        chosen = []
        self.images = [x.to(images.device) for x in self.images]  # no-op unless just loaded
        for image in images.detach():
            image = image[None]
            if len(self.images) < self.size:
                self.images.append(image.float())
                chosen.append(image)
            elif random.random() > 0.5:
                i = random.randrange(self.size)
                chosen.append(self.images[i].to(images.dtype, copy=True))
                self.images[i] = image.float()
            else:
                chosen.append(image)
        return torch.cat(chosen, 0)

    def state_dict(self):
        return {"size": self.size, "images": [x.cpu() for x in self.images]}

    def load_state_dict(self, state):  # kept on the CPU until query() moves them to the images' device
        self.size, self.images = state["size"], [x.float() for x in state["images"]]


def set_requires_grad(nets, flag):
    for net in nets if isinstance(nets, (list, tuple)) else [nets]:
        for p in net.parameters():
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# GAN loss, init, learning-rate schedule
# ---------------------------------------------------------------------------------------------
def gan_loss(outputs, target_is_real, mode="lsgan"):
    """GAN loss of D's output(s) against the real (1) or fake (0) label, summed over scales.
    lsgan: mean (D(x) - label)^2 (the paper's §4 choice); vanilla: binary cross-entropy on logits."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    total = 0.0
    for out in outputs:
        label = torch.full_like(out, 1.0 if target_is_real else 0.0)
        if mode == "lsgan":
            total = total + F.mse_loss(out, label)
        else:
            total = total + F.binary_cross_entropy_with_logits(out, label)
    return total


def init_weights(net, kind="normal", gain=0.02):
    """Conv/linear weights: 'xavier' -> xavier_normal(gain) (BicycleGAN), 'normal' -> N(0, gain)
    (pix2pix, CycleGAN), 'kaiming' (MUNIT's G); biases 0; norm scales N(1, gain)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if kind == "xavier":
                nn.init.xavier_normal_(m.weight, gain=gain)
            elif kind == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            else:
                nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


def linear_decay(optimizer, epochs, epochs_decay):
    """LR constant for `epochs` epochs, then linearly to zero over `epochs_decay` more (the
    official schedule; stepped once per epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1))


def adam(nets, lr, betas=(0.5, 0.999), weight_decay=0.0):
    """One Adam optimizer over the parameters of a network or a list of networks."""
    params = [p for net in (nets if isinstance(nets, (list, tuple)) else [nets]) for p in net.parameters()]
    # Speed: on the GPU, fused Adam updates all parameters in a few kernels instead of several per tensor.
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=params[0].is_cuda)


# ---------------------------------------------------------------------------------------------
# Speed on a CUDA GPU. Each means is here, in one place; the scripts call these functions. On by
# default (they give the same results): cuDNN autotuning (pick_device), fused Adam (adam), the
# training set decoded once and kept on the GPU (keep_in_memory), one host sync per logged
# iteration (the loop). Behind flags: bf16 autocast, channels-last, torch.compile.
# ---------------------------------------------------------------------------------------------
def add_speed_flags(parser):
    g = parser.add_argument_group("speed (see README, 'Speed')")
    g.add_argument("--amp", action="store_true", help="bf16 mixed precision for the training step")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory layout for the networks")
    # Not offered: torch.compile's reduce-overhead and max-autotune modes. Both replay CUDA graphs,
    # whose outputs live in memory that the next call of the same graph overwrites, and these
    # loops call a network again while earlier outputs are still in use (D on real then on fake,
    # MUNIT's encode then decode, the image pool's stored fakes).
    g.add_argument("--compile", nargs="?", const="default", choices=["default", "max-autotune-no-cudagraphs"],
                   help="torch.compile the networks (default mode; max-autotune-no-cudagraphs also tunes "
                        "kernels); the first iterations compile, which takes minutes. The CUDA-graph modes "
                        "(reduce-overhead, max-autotune) are not offered: a network is called again while "
                        "its earlier outputs are still in use, which CUDA graphs overwrite")
    g.add_argument("--no-cache", action="store_true", help="decode the training images from disk every epoch "
                   "instead of once into memory (on the GPU for a CUDA run)")


def speed_up(nets, args):
    """The flags that act on the networks, in place (so checkpoints, previews and tests are unchanged).
    --channels-last: weights in NHWC, the layout the GPU's tensor cores read; activations follow
    the weights' layout, so the inputs need no change. --compile: each network's forward is
    compiled (fused kernels, fewer launches); a network used through methods instead of forward
    (MUNIT's encode/decode) has its parts compiled."""
    for net in nets:
        if args.channels_last:
            net.to(memory_format=torch.channels_last)
        if args.compile:
            own_forward = type(net).forward is not nn.Module.forward
            for part in [net] if own_forward else net.children():
                part.compile(mode=None if args.compile == "default" else args.compile)
    if args.compile:
        # One static graph per input shape: training has one, the epoch previews a few more.
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = 32
    return nets


def mixed_precision(device, enabled):
    """--amp: run the training step's matrix products and convolutions in bfloat16 (the rest,
    e.g. losses and norms, stays in float32). bf16 keeps float32's exponent range, so unlike
    float16 it needs no loss scaling. Off: a context that does nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def keep_in_memory(dataset, device, args):
    """Unless --no-cache: decode the training set once and keep it on the device (see
    ImageFolderBase.keep_in_memory); crops and flips then run there, and no worker reads files.
    The set also learns the device (epoch_loader pins its batches only for a CUDA run)."""
    dataset.device = torch.device(device)
    if not args.no_cache:
        dataset.keep_in_memory(device)
    return dataset


# ---------------------------------------------------------------------------------------------
# Multi-GPU: `torchrun --nproc-per-node N script.py ...` starts N copies of a script; each joins
# one process group (NCCL on GPUs, gloo on the CPU), takes the GPU of its local rank, trains on
# its own share of every global batch, and DistributedDataParallel (DDP) averages the gradients
# in backward(), so that every optimizer step is the same on every rank. --batch-size is per
# process: one step takes N x --batch-size images. A plain `python script.py` has world size 1,
# no process group, and every function here does nothing.
# ---------------------------------------------------------------------------------------------
def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """Rank 0, the only process that writes options, logs, previews, checkpoints and test outputs."""
    return rank() == 0


def setup_distributed(name="auto"):
    """The device, and under torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE) the process group.
    Ranks other than 0 print nothing (their stdout goes to /dev/null; errors still reach stderr)."""
    if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
        return pick_device(name)
    local_rank = int(os.environ["LOCAL_RANK"])
    if int(os.environ["RANK"]) > 0:
        sys.stdout = open(os.devnull, "w")
    device = pick_device(name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            fail(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); start at most "
                 "as many processes per node as there are GPUs")
        device = torch.device("cuda", local_rank)  # under torchrun each process takes its local rank's GPU
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    atexit.register(dist.destroy_process_group)
    print(f"distributed: {world_size()} processes ({dist.get_backend()}), --batch-size per process, "
          f"{world_size()} x that per step")
    return device


@contextlib.contextmanager
def local_main_first():
    """The first process on each machine goes first (a download, the toy data), the others wait at
    a barrier and then find the data in place."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if world_size() > 1 and not first:
        dist.barrier()
    yield
    if world_size() > 1 and first:
        dist.barrier()


class _Methods(nn.Module):
    """DDP averages the gradients of what runs through its forward() only. A network used through
    other methods (MUNIT's encode and decode) is wrapped in this, and wrapper.encode(x) becomes
    DDP(this)(x, method="encode"), so DDP sees those calls too."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *inputs, method="forward"):
        return getattr(self.net, method)(*inputs)


def distribute(nets, device, find_unused=(), methods=()):
    """World size 1: the networks as they are. Else each wrapped in DDP (which first copies rank
    0's weights to every rank), BatchNorm made SyncBatchNorm on GPUs (statistics over the global
    batch), and the RNGs of ranks > 0 reseeded so that ranks draw different z and dropout masks.
    find_unused: networks with parameters that get no gradient in a step (a logvar head whose
    output no loss reads); DDP then searches the graph for them after each forward (a little
    slower) instead of waiting for their gradients forever. methods: calls, besides forward, that
    train_step makes (MUNIT's encode, decode): they are routed through DDP's forward.
    The plain networks stay what the checkpoint, the previews and the test use."""
    if world_size() == 1:
        return nets
    if device.type == "cuda":
        nets = [nn.SyncBatchNorm.convert_sync_batchnorm(net) for net in nets]  # in place: same parameters
    elif any(isinstance(m, nn.BatchNorm2d) for net in nets for m in net.modules()):
        print("note: --norm batch on the CPU: each process normalises with its own batch's statistics "
              "(SyncBatchNorm needs GPUs)")
    wrapped = []
    for net in nets:
        unused = any(net is n for n in find_unused)
        ddp = nn.parallel.DistributedDataParallel(
            _Methods(net) if methods else net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused)
        for name in methods:
            if hasattr(net, name):
                setattr(ddp, name, functools.partial(ddp, method=name))
        wrapped.append(ddp)
    seed_everything(torch.initial_seed() + rank())  # rank 0 keeps the stream of a single process
    return wrapped


def epoch_order(n, batch_size, epoch, seed, skip_batches=0, rank=0, world=1):
    """The indices one rank reads in an epoch. One shuffle of the n examples, fixed by (seed,
    epoch), is cut into global batches of world x batch_size; rank r takes the r-th batch_size
    slice of each, so the ranks together read exactly the batches a single process with
    --batch-size world x batch_size would. The first skip_batches global batches (already trained
    on before a resume) are skipped; with world > 1 only whole global batches are kept, so that
    every rank takes as many steps."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=generator)[skip_batches * batch_size * world:].tolist()
    if world == 1:
        return order
    size = batch_size * world
    return [i for start in range(0, len(order) - size + 1, size)
            for i in order[start + rank * batch_size:start + (rank + 1) * batch_size]]


def mean_over_ranks(losses):
    """Loss tensors -> floats for the log, averaged over ranks: the losses of the global batch.
    One host sync (and under torchrun one all-reduce), so call it only on logged iterations."""
    if world_size() == 1:
        return {k: v.item() for k, v in losses.items()}
    values = torch.stack([v.detach().float() for v in losses.values()])
    dist.all_reduce(values)
    return dict(zip(losses, (values / world_size()).tolist()))


def rank_states(parts):
    """What each rank keeps for itself, gathered for the checkpoint: its RNG states and its image
    pools (its own past fakes). Every rank must call this (it is a collective)."""
    if world_size() == 1:
        return {}
    own = {"rng": rng_state()} | {n: p.state_dict() for n, p in parts.items() if isinstance(p, ImagePool)}
    states = [None] * world_size()
    dist.all_gather_object(states, own)
    return {"world_size": world_size(), "ranks": states}


def restore_rank_state(ckpt, parts):
    """After the shared state is loaded: give each rank its own RNG states and pools back, and
    return the global batch to continue from. A checkpoint of another world size continues the
    weights and optimizers; its batches are re-cut, so the data order and random draws change."""
    saved_world, saved = ckpt.get("world_size", 1), ckpt.get("ranks", [])
    if 0 < rank() < len(saved):
        set_rng_state(saved[rank()]["rng"])
        for name, part in parts.items():
            if isinstance(part, ImagePool) and name in saved[rank()]:
                part.load_state_dict(saved[rank()][name])
    elif rank() > 0:  # a rank the checkpoint did not have: fresh draws, not a copy of rank 0's
        seed_everything(ckpt.get("args", {}).get("seed", 0) + ckpt["step"] + rank())
    if saved_world == world_size():
        return ckpt["batch"]
    print(f"note: the checkpoint was written by {saved_world} process(es), this run has {world_size()}: "
          "the weights continue, but the data order and the random draws change")
    return ckpt["batch"] * saved_world // world_size()


# ---------------------------------------------------------------------------------------------
# Run folder: options, checkpoints, logs, sample grids
# ---------------------------------------------------------------------------------------------
def default_out(args, script):
    if args.out is None:
        name = "quick" if args.quick else Path(args.dataset).name
        args.out = str(Path("runs") / f"{Path(script).stem}_{name}")
    return Path(args.out)


def parse_with_quick(parser, argv=None, toy=None, **extra):
    """Parse the flags; with --quick, a smoke configuration (toy data, 64 px, a few iterations,
    plus the script's `extra`, e.g. narrow nets) replaces the defaults. Flags given explicitly
    still win, so `--quick --max-iters 4` runs 4 iterations. `toy`: the script's own defaults on
    the toy data (TOY_PAIRED_TRAINING for the paired scripts), not used by the --quick smoke run."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(dataset="toy", load_size=64, crop_size=64, max_iters=20, epochs=1, epochs_decay=0,
                            n_samples=3, num_test=4, log_every=5, **extra)
        args = parser.parse_args(argv)
    elif toy and is_toy(args.dataset) and getattr(args, "setting", "paired") == "paired":  # not divco's unpaired
        parser.set_defaults(**toy)
        args = parser.parse_args(argv)
    return args


def save_options(args, out):
    if not is_main():  # Multi-GPU: rank 0 writes the options
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "options.json").write_text(json.dumps(vars(args), indent=2, sort_keys=True) + "\n")
    except OSError as e:
        cannot_write(out / "options.json", e)


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore rng_state(). torch takes RNG states only as CPU byte tensors, and a checkpoint read
    with map_location='cuda' (as a CUDA run reads it) holds them on the GPU: bring them back."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in state["cuda"]])


# Written into every checkpoint (training_state) with the script that wrote it; raise it when the
# layout of the checkpoint dict changes, so that an older file is refused with one sentence.
CHECKPOINT_FORMAT = 1


def save_checkpoint(path, state):
    """Write to a temporary file, flush it to the disk and rename it over the old one: a run
    killed while saving leaves the previous checkpoint intact, never a broken one; so does a full
    disk or a failed rename, which stop with one sentence."""
    if not is_main():  # Multi-GPU: rank 0 writes the one checkpoint (rank_states holds the others')
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data on the disk before the rename, so that even a power cut leaves one whole file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        cannot_write(path, e)


def load_checkpoint(path, device="cpu", args=None):
    """Read a checkpoint without running code from it (tensors and plain values only). With args:
    it must come from the script that parsed args (args.script) in this checkpoint format; for
    --test, the options that shape the networks are taken from the checkpoint; for --resume, they
    must match it (else one sentence says which differ)."""
    path = Path(path)
    if not path.exists():
        fail(f"no checkpoint at {path}; train first, or point --checkpoint at a .pt file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a file that is not a checkpoint of ours
        if "Weights only load failed" in str(e):  # it holds objects whose unpickling could run code
            fail(f"refused to load {path}: it holds more than tensors and plain values, and loading it "
                 "could run code; use a checkpoint these scripts wrote")
        fail(f"could not read the checkpoint {path} ({e.__class__.__name__}); is it a file this script wrote?")
    if args is None:
        return ckpt
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found != CHECKPOINT_FORMAT:
        fail(f"{path} is not a checkpoint of this version of the scripts (format {found}, this one reads "
             f"format {CHECKPOINT_FORMAT}); train anew, or use the version that wrote it")
    script = getattr(args, "script", None)
    if script is not None and ckpt["script"] != script:
        fail(f"{path} was written by {ckpt['script']}.py, not {script}.py: --test and --resume need a "
             f"checkpoint of {script}.py (or run {ckpt['script']}.py with it)")
    if args.test:
        restore_arch_options(args, ckpt["args"])
    else:
        differ = [f"--{k.replace('_', '-')} {ckpt['args'][k]}" for k in ARCH_OPTIONS
                  if k in ckpt["args"] and hasattr(args, k) and getattr(args, k) != ckpt["args"][k]]
        if differ:
            fail(f"{path} was trained with {', '.join(differ)}; resume with the same options")
    return ckpt


def training_state(parts, **progress):
    """One checkpoint dict: the state of every part (networks, optimizers, schedulers, image
    pools: anything with state_dict()), the RNG states, and progress (epoch, batch, step, args),
    tagged with the checkpoint format and the script that wrote it (see load_checkpoint)."""
    state = {name: part.state_dict() for name, part in parts.items()} | {"rng": rng_state()} | progress
    state |= rank_states(parts)  # Multi-GPU: every rank's RNG states and pools
    return state | {"format": CHECKPOINT_FORMAT, "script": progress.get("args", {}).get("script")}


def load_optimizer_state(optimizer, state):
    """Load an optimizer's saved state for the parameters it has now. Each moment takes its
    parameter's device, dtype and memory layout (the checkpoint may come from a run on another
    device or with another --channels-last; fused Adam needs all of them to match), and the kernel
    choice (fused, foreach) stays the one made for these parameters, not the saved run's."""
    kernels = [{k: group[k] for k in ("fused", "foreach", "capturable") if k in group}
               for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, chosen in zip(optimizer.param_groups, kernels):
        group.update(chosen)
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    continue
                if key == "step":  # a float32 scalar: on the parameter's device for fused kernels
                    optimizer.state[p][key] = value.to(p.device if on_device else "cpu", torch.float32)
                elif value.shape == p.shape:  # exp_avg, exp_avg_sq: like p in every respect
                    optimizer.state[p][key] = torch.empty_like(p).copy_(value)


def resume(path, device, args, parts):
    """Load a training_state checkpoint into parts and the RNGs; returns (epoch, batch, step)."""
    ckpt = load_checkpoint(path, device, args)
    for name, part in parts.items():
        if isinstance(part, torch.optim.Optimizer):
            load_optimizer_state(part, ckpt[name])
        else:
            part.load_state_dict(ckpt[name])
    set_rng_state(ckpt["rng"])
    batch = restore_rank_state(ckpt, parts)  # Multi-GPU: each rank's own RNG and pools
    print(f"resumed from step {ckpt['step']} (epoch {ckpt['epoch']}, batch {ckpt['batch']})")
    return ckpt["epoch"], batch, ckpt["step"]


# Options that fix the shape of the networks: a resumed or tested run takes them from its checkpoint.
# crop_size is among them because the training crop decides the U-Net's depth (and CycleGAN's
# number of blocks); the size a test runs at is test_size, which is not.
ARCH_OPTIONS = ("nz", "ngf", "nef", "ndf", "input_nc", "output_nc", "crop_size", "where_add", "norm", "norm_g",
                "norm_d", "encoder", "direction", "setting", "n_blocks", "mlp_dim", "style_dim", "pix2pix_original")


def restore_arch_options(args, saved):
    """For a test: the network options of the checkpoint; the test size stays the one asked for
    (or the data set's), else it becomes the training crop size."""
    for key in ARCH_OPTIONS:
        if key in saved and getattr(args, key, None) != saved[key]:
            setattr(args, key, saved[key])
    for key in ("norm_g", "norm_d"):  # a checkpoint from before --norm-g / --norm-d: G / D have --norm's layers
        if "norm" in saved and key not in saved and hasattr(args, key):
            setattr(args, key, None)
    if getattr(args, "test_size", None) is None:
        args.test_size = args.crop_size
    return args


class LossLog:
    """Appends rows of losses to <out>/losses.csv. Columns come from the first row; a row with a
    new column (the epoch previews' diversity) rewrites the file once with the column added, so
    that every row keeps its values and other rows leave that cell empty."""

    def __init__(self, path, resume=False):
        self.path = Path(path)
        if not is_main():  # Multi-GPU: rank 0 alone keeps the log
            self.write = lambda row: None
            return
        if not resume and self.path.exists():
            self.path.unlink()
        self.fields = None
        if self.path.exists():
            with open(self.path) as f:
                self.fields = next(csv.reader(f), None)

    def write(self, row):
        if self.fields is not None and not set(row) <= set(self.fields):
            with open(self.path) as f:
                rows = list(csv.DictReader(f))
            self.fields += [k for k in row if k not in self.fields]
            self._write(rows, "w")
        self._write([row], "a")

    def _write(self, rows, mode):
        new = mode == "w" or not self.path.exists() or self.fields is None
        if self.fields is None:
            self.fields = list(rows[0])
        try:
            with open(self.path, mode, newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerows(rows)
        except OSError as e:
            cannot_write(self.path, e)


def read_losses(path):
    """A losses.csv written by LossLog -> one dict per logged row, values as floats (empty cells,
    e.g. the preview columns of a loss row, are left out)."""
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def progress(total, initial=0, desc="train"):
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True,
                disable=os.environ.get("NO_PROGRESS") == "1" or not is_main())


class Throughput:
    """Images per second over the iterations after the first `warmup` (compilation, autotuning)
    and until stop() (called by the loop after its last iteration, so that the final checkpoint
    and preview are not timed). On CUDA it synchronises the run's own device and reports that
    device's peak memory since the end of the warm-up."""

    def __init__(self, device, warmup=5):
        self.device, self.warmup, self.count, self.images = torch.device(device), warmup, 0, 0
        self.start = self.end = None

    def step(self, images):
        self.count += 1
        if self.count == self.warmup:
            self._sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.start = time.perf_counter()
        elif self.count > self.warmup:
            self.images += images

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stop(self):
        """End the timed window (after the last training iteration)."""
        if self.end is None:
            self._sync()
            self.end = time.perf_counter()

    def rate(self):
        if self.start is None or self.images == 0:
            return float("nan")
        if self.end is not None:
            return self.images / (self.end - self.start)
        self._sync()
        return self.images / (time.perf_counter() - self.start)

    def report(self):
        line = f"throughput: {self.rate():.2f} images/s over {self.images} images after {self.warmup} warm-up iterations"
        if world_size() > 1:  # the loop counts every rank's images: this is all ranks together
            line += f" ({world_size()} processes together)"
        if self.device.type == "cuda":
            peaks = [torch.cuda.max_memory_allocated(self.device) / 2 ** 30] * world_size()
            if world_size() > 1:  # Multi-GPU: every rank's own GPU
                dist.all_gather_object(peaks, peaks[0])
            line += f", peak GPU memory {', '.join(f'{p:.2f}' for p in peaks)} GiB" + (" per GPU" if len(peaks) > 1 else "")
        print(line)


def to_image(x):
    """[-1, 1] tensor (C,H,W) -> [0, 1], 1-channel images repeated to RGB."""
    x = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2
    return x.expand(3, -1, -1) if x.size(0) == 1 else x


def save_image(x, path):
    """[-1, 1] tensor (C,H,W) -> PNG; one-channel images (edges, grayscale) stay one-channel."""
    x = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2
    pixels = (x * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    Image.fromarray(pixels[:, :, 0].numpy() if x.size(0) == 1 else pixels.numpy()).save(path)


def fit_in_cell(x, height, width):
    """[0, 1] image (3,H,W) -> (3, height, width): shrunk to fit (aspect ratio kept), centred on white."""
    scale = min(1.0, height / x.size(1), width / x.size(2))
    if scale < 1.0:
        size = (max(1, round(x.size(1) * scale)), max(1, round(x.size(2) * scale)))
        x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    cell = torch.ones(3, height, width)
    top, left = (height - x.size(1)) // 2, (width - x.size(2)) // 2
    cell[:, top:top + x.size(1), left:left + x.size(2)] = x
    return cell


def save_grid(rows, path, max_cell=256):
    """rows: list of lists of images (C,H,W) in [-1, 1]; one row per input. Images of different
    sizes (own images) are fitted into cells of at most max_cell px, keeping their aspect ratio."""
    from torchvision.utils import save_image as _save
    ncol = max(len(r) for r in rows)
    images = [to_image(x) for r in rows for x in r]
    sizes = {tuple(x.shape[1:]) for x in images}
    if len(sizes) == 1:
        height, width = sizes.pop()
    else:
        height, width = min(max_cell, max(h for h, _ in sizes)), min(max_cell, max(w for _, w in sizes))
    cells = [fit_in_cell(to_image(x), height, width) for r in rows
             for x in r + [torch.ones(3, height, width)] * (ncol - len(r))]
    try:
        _save(torch.stack(cells), path, nrow=ncol, padding=2, pad_value=1.0)
    except OSError as e:
        cannot_write(path, e)


def save_preview(rows, path, first_sample, toy=False):
    """The epoch preview: save the grid (one row per input, the input in column 0; the columns from
    first_sample on are the samples for the preview's fixed codes) and measure how much each input's
    samples differ. A generator that ignores its code draws the same image in every sample column. Returns
    {'preview_diversity': mean pixel L1 between consecutive samples of one input} and, on the toy
    data, 'preview_colours': the number of palette colours an input's samples reach (mean)."""
    save_grid(rows, path)
    samples = [row[first_sample:] for row in rows]
    stats = {"preview_diversity": sum(pixel_diversity(s) for s in samples) / len(samples)}
    if toy:
        modes = [toy_scores(row[0], s)["modes"] for row, s in zip(rows, samples)]  # -1: not a right answer
        reached = [len({m for m in row_modes if m >= 0}) for row_modes in modes]
        stats["preview_colours"] = sum(reached) / len(reached)
    return stats


COLLAPSED_DIVERSITY = 0.01  # pixel L1 between samples; pix2pix+noise sits at ~0.002 on the toy data


def log_preview(stats, log, bar, step, epoch):
    """Write a preview's diversity to losses.csv and the progress bar, and warn in one line when
    the samples of an input no longer differ: the sign that G has learnt to ignore z."""
    log.write({"step": step, "epoch": epoch} | {k: round(v, 5) for k, v in stats.items()})
    colours = stats.get("preview_colours")
    bar.set_description("train (preview: diversity {:.3f}{})".format(
        stats["preview_diversity"], "" if colours is None else f", {colours:.1f} colours"))
    if stats["preview_diversity"] < COLLAPSED_DIVERSITY or (colours is not None and 0 < colours <= 1):
        what = f"{stats['preview_diversity']:.4f} mean pixel L1 between samples"
        what += "" if colours is None else f", {colours:.1f} colour(s) per input"
        bar.write(f"warning: epoch {epoch}: the preview's samples of one input hardly differ ({what}): "
                  "G is ignoring its code (mode collapse); see README, 'When G ignores z'")


def save_test_outputs(out_dir, stem, images):
    """The shared --test layout: <out>/test/<input stem>/<name>.png for each (name, image)."""
    folder = Path(out_dir) / stem
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images:
        save_image(img, folder / f"{name}.png")


# ---------------------------------------------------------------------------------------------
# Toy metrics: the modes of the toy task are known, so coverage can be counted exactly
# ---------------------------------------------------------------------------------------------
def _as_rgb255(img):
    return (to_image(img) * 255).round()


def toy_shape_mask(input_img):
    """The region an input outline encloses (outline included): every pixel that cannot be
    reached from the border without crossing the outline. Found by repeated 3x3 dilation."""
    outline = _as_rgb255(input_img).mean(0) > 127
    outside = torch.zeros_like(outline)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    outside &= ~outline
    while True:
        grown = F.max_pool2d(outside[None, None].float(), 3, 1, 1)[0, 0].bool() & ~outline
        if torch.equal(grown, outside):
            return ~outside
        outside = grown


def toy_mode(output_img, max_distance=60.0, purity=0.8):
    """Which palette colour (0..3) a toy output shows, or -1 when it is no clean toy image: the
    median colour of its non-background, non-outline pixels must be near a palette entry, and at
    least `purity` of all pixels must be near the background, the outline or that entry."""
    px = _as_rgb255(output_img).reshape(3, -1).t()
    to_background = (px - torch.tensor(TOY_BACKGROUND, dtype=px.dtype)).norm(dim=1)
    to_outline = (px - torch.tensor(TOY_OUTLINE, dtype=px.dtype)).norm(dim=1)
    fill = px[(to_background > 40) & (to_outline > 60)]
    if len(fill) < 20:
        return -1
    distances = (torch.tensor(TOY_PALETTE, dtype=px.dtype) - fill.median(dim=0).values).norm(dim=1)
    mode = int(distances.argmin())
    if distances[mode] > max_distance:
        return -1
    to_mode = (px - torch.tensor(TOY_PALETTE[mode], dtype=px.dtype)).norm(dim=1)
    explained = (to_background < max_distance) | (to_outline < max_distance) | (to_mode < max_distance)
    return mode if explained.float().mean() >= purity else -1


def toy_foreground(output_img):
    px = _as_rgb255(output_img)
    return (px - torch.tensor(TOY_BACKGROUND, dtype=px.dtype)[:, None, None]).norm(dim=0) > 40


# A sample counts as a right answer only if it also follows the input's outline: its foreground
# must overlap the region the outline encloses more than it misses it. The colour check alone
# counted washed-out or blotched samples, and triangles drawn for circles, as clean (cLR-GAN on
# toy data v5; README, "What the toy's checks count").
TOY_MIN_IOU = 0.5


def toy_scores(input_img, samples):
    """For one input and its samples: the modes hit (toy_mode, or -1 where the sample does not
    follow the input's outline), the share of valid samples (a clear palette colour in the input's
    shape), the share with a clear colour in another shape ('off_shape'), and faithfulness (mean
    IoU of each sample's foreground with the input's outline region)."""
    target = toy_shape_mask(input_img)
    modes, ious, off_shape = [], [], 0
    for s in samples:
        fg = toy_foreground(s)
        iou = float((fg & target).sum()) / max(1.0, float((fg | target).sum()))
        mode = toy_mode(s)
        off_shape += mode >= 0 and iou < TOY_MIN_IOU
        modes.append(mode if iou >= TOY_MIN_IOU else -1)
        ious.append(iou)
    return {"modes": modes, "coverage": len({m for m in modes if m >= 0}) / len(TOY_PALETTE),
            "valid": sum(m >= 0 for m in modes) / len(modes), "off_shape": off_shape / len(samples),
            "iou": sum(ious) / len(ious)}


def code_agreement(modes):
    """modes[input][k]: the colour of input i's sample from code k, the same codes for every input
    (--sync). Per code, the share of inputs whose sample shows that code's most common colour,
    averaged over the codes: 1.0 when each code means one colour whatever the input (z is read as
    a colour), lower as a code's colour depends more on the input. Unclean samples count against."""
    shares = []
    for k in range(len(modes[0])):
        clean = [row[k] for row in modes if row[k] >= 0]
        shares.append(max(clean.count(m) for m in set(clean)) / len(modes) if clean else 0.0)
    return sum(shares) / len(shares)


def toy_metrics(scores, encoded_right=(), sync=False):
    """The --test toy block from toy_scores of every input: mode coverage, valid share, samples
    in another shape, IoU, per-colour counts; the share of encoded outputs in the ground truth's
    colour (encoded_right: one bool per input); with --sync, code_agreement."""
    counts = [0] * len(TOY_PALETTE)
    for s in scores:
        for m in s["modes"]:
            if m >= 0:
                counts[m] += 1
    total = max(1, sum(counts))
    entropy = sum(c / total * math.log(total / c) for c in counts if c)
    toy = {
        "mode_coverage": sum(s["coverage"] for s in scores) / len(scores),
        "mode_coverage_per_input": [s["coverage"] for s in scores],
        "valid_share": sum(s["valid"] for s in scores) / len(scores),
        "off_shape_share": sum(s["off_shape"] for s in scores) / len(scores),
        "faithfulness_iou": sum(s["iou"] for s in scores) / len(scores),
        "mode_counts": counts,
        "mode_entropy_vs_uniform": entropy / math.log(len(TOY_PALETTE)),
    }
    if encoded_right:  # the encoded output (z = E's mean for the ground truth) has its colour
        toy["encoded_colour_right"] = sum(encoded_right) / len(encoded_right)
    if sync:  # the same codes for every input: does each code mean one colour?
        toy["code_agreement"] = code_agreement([s["modes"] for s in scores])
    return toy


def is_toy(dataset):
    """The built-in toy data, by name or by the stamp make_toy_dataset leaves in its folder."""
    stamp = Path(dataset) / ".complete"
    return dataset == "toy" or (stamp.exists() and stamp.read_text().startswith("toy"))


def toy_outputs(args):
    """Whether a script's outputs are toy images that toy_mode can score (toy data, AtoB)."""
    return is_toy(args.dataset) and getattr(args, "direction", "AtoB") == "AtoB"


def sample_pairs(n):
    """The pairs of samples compared for diversity: consecutive ones, (0, 1), (1, 2), ... -- with
    20 samples for each of 100 inputs this is the BicycleGAN paper's 1900 pairs (Fig. 6)."""
    return [(i, i + 1) for i in range(n - 1)]


def pixel_diversity(samples):
    """Mean L1 distance (images in [0, 1]) between pairs of samples of one input."""
    pairs = sample_pairs(len(samples))
    if not pairs:
        return 0.0
    x = torch.stack([to_image(s) for s in samples])
    return sum(float((x[i] - x[j]).abs().mean()) for i, j in pairs) / len(pairs)


def load_lpips(version="0.1", net="alex", random_backbone=False):
    """The LPIPS metric (optional package `lpips`) -> (model, None), or (None, why not).
    Its linear heads ship with the package; the pretrained backbone comes from torchvision's
    download cache or the internet. A random backbone is for tests only: its numbers mean nothing."""
    try:
        import lpips
    except ImportError:
        return None, "the optional package lpips is not installed (pip install lpips==0.1.4)"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lpips.LPIPS(net=net, version=version, pnet_rand=random_backbone, verbose=False).eval(), None
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        return None, (f"the pretrained {net} weights LPIPS needs could not be loaded "
                      f"({getattr(e, 'reason', e)}); no LPIPS number is reported")
    finally:
        socket.setdefaulttimeout(previous)


@torch.no_grad()
def lpips_diversity(model, samples):
    """Mean LPIPS distance between pairs of samples of one input (images in [-1, 1])."""
    pairs = sample_pairs(len(samples))
    if not pairs:
        return 0.0
    x = torch.stack([s.detach().float().cpu() for s in samples])
    x = x.expand(-1, 3, -1, -1) if x.size(1) == 1 else x
    first, second = zip(*pairs)
    return float(model(x[list(first)], x[list(second)]).mean())


MAX_GRID_ROWS = 16


def write_test_results(folder, results, args, toy=None):
    """The shared --test output: per input a folder <stem>/ with input.png, ground_truth.png (if
    the data has one), encoded.png (if the method has an encoder), sample_00.png ..., and any
    extra (name, image) pairs; grid.png (rows = the first 16 inputs); metrics.json (also printed).
    results: dicts with A, samples, path (or name), and optionally B, encoded, extra.
    toy: score samples as toy outputs (default: on the toy data translated AtoB)."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)  # no stale files from an earlier test run
    folder.mkdir(parents=True)
    if toy is None:
        toy = toy_outputs(args)
    rows, scores, diversity, encoded_right = [], [], [], []
    lpips_models = {}
    if os.environ.get("LPIPS") != "off":
        for version in ("0.1", "0.0"):  # the paper's Fig. 6 used v0.0; v0.1 gives ~2.4x larger values
            model, why_not = load_lpips(version)
            if model is None:
                print(f"note: {why_not}")
                break
            lpips_models[version] = model
    lpips_values = {version: [] for version in lpips_models}
    for r in results:
        named = [("input", r["A"])]
        if r.get("B") is not None:
            named.append(("ground_truth", r["B"]))
        if r.get("encoded") is not None:
            named.append(("encoded", r["encoded"]))
        named += [(f"sample_{k:02d}", s) for k, s in enumerate(r["samples"])]
        named += list(r.get("extra", []))
        save_test_outputs(folder, r.get("name") or Path(r["path"]).stem, named)
        rows.append([img for _, img in named])
        diversity.append(pixel_diversity(r["samples"]))
        for version, model in lpips_models.items():
            lpips_values[version].append(lpips_diversity(model, r["samples"]))
        if toy:
            scores.append(toy_scores(r["A"], r["samples"]))
            if r.get("encoded") is not None and r.get("B") is not None:  # does G follow E's code?
                encoded_right.append(toy_scores(r["A"], [r["encoded"]])["modes"][0] == toy_mode(r["B"]))
    save_grid(rows[:MAX_GRID_ROWS], folder / "grid.png")
    metrics = {"inputs": len(results), "samples_per_input": len(results[0]["samples"]) if results else 0,
               "sync": bool(getattr(args, "sync", False)),
               "pixel_diversity_l1": sum(diversity) / max(1, len(diversity))}
    for version, values in lpips_values.items():
        metrics[f"lpips_diversity_v{version}"] = sum(values) / max(1, len(values))
    if lpips_models:
        from importlib.metadata import version as package_version
        metrics["lpips"] = f"lpips {package_version('lpips')}, alex backbone, pairs of consecutive samples"
    if scores:
        metrics["toy"] = toy_metrics(scores, encoded_right, metrics["sync"])
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    summary = {k: v for k, v in metrics.items() if k != "toy"}
    if "toy" in metrics:
        summary.update({k: v for k, v in metrics["toy"].items() if k not in ("mode_coverage_per_input",)})
    print("test metrics: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in summary.items()))
    print(f"wrote {len(results)} test folders, {folder / 'grid.png'} and {folder / 'metrics.json'}")
    return metrics


# ---------------------------------------------------------------------------------------------
# Own images: translate any file or folder with a trained checkpoint, each image at its own size
# ---------------------------------------------------------------------------------------------
INPUT_EXTENSIONS = IMG_EXTENSIONS + (".tif", ".tiff")
MIN_SIDE = 32  # E_ResNet and MUNIT's style encoder halve an image five and four times


def add_inference_flags(parser, style=True, interpolate=True):
    """--input, --half, --resize; --style (encoder-based scripts) and --interpolate (latent ones)."""
    g = parser.add_argument_group("own images (needs a trained checkpoint; writes <out>/translated/)")
    g.add_argument("--input", metavar="PATH", help="translate this image, or every image in this folder (png, jpg, "
                   "bmp, webp, tif; no ground truth needed), each at its own size")
    g.add_argument("--half", choices=["left", "right"], help="use only this half of each --input image "
                   "(pix2pix A|B files: left is A)")
    g.add_argument("--resize", type=int, metavar="N", help="squeeze each --input image to N x N first, as --test "
                   "does (default: its own size, padded to a size the network takes and cropped back)")
    if style:
        g.add_argument("--style", nargs="+", metavar="IMAGE", help="an example of the output domain: every output "
                       "takes its code (its style code for MUNIT, else z = mu of E(IMAGE)); two with --interpolate")
    if interpolate:
        g.add_argument("--interpolate", type=int, metavar="K", help="--input: K outputs along the path between two "
                       "codes (two prior samples, or the codes of two --style images): frames, strip PNG and GIF")


def check_inference_flags(args):
    """One sentence for flags of own-image translation given where they cannot work."""
    given = [f"--{k}" for k in ("half", "resize", "interpolate") if getattr(args, k, None) is not None]
    if given and args.input is None:
        fail(f"{' and '.join(given)} {'work' if len(given) > 1 else 'works'} with --input PATH (the images to translate)")
    if getattr(args, "interpolate", None) is not None and args.interpolate < 2:
        fail(f"--interpolate {args.interpolate}: a path needs at least 2 frames (its two ends)")
    if getattr(args, "resize", None) is not None and args.resize < MIN_SIDE:
        fail(f"--resize {args.resize} is smaller than the {MIN_SIDE} px the networks can read")
    n_style = len(getattr(args, "style", None) or [])
    if getattr(args, "interpolate", None) and n_style not in (0, 2):
        fail("--interpolate walks between two codes: give two --style images, or none for two prior samples")
    if n_style > 1 and not getattr(args, "interpolate", None):
        fail("--style takes one image (two only with --interpolate, for the two ends of the path)")


def check_test_size(args, multiple):
    """--test: the test size must be one the network takes (the U-Net: multiples of 2^depth)."""
    if args.test_size % multiple or args.test_size < MIN_SIDE:
        fail(f"test size {args.test_size} does not fit this network (trained at {args.crop_size} px, it takes "
             f"multiples of {multiple}); pass --crop-size {max(multiple, args.crop_size)} or another multiple")


HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def read_image(path):
    """An image file -> 8-bit RGB or grayscale PIL image, as a camera or a drawing program meant
    it: EXIF rotation applied, transparency composited on white, 16-bit and float pixels
    (TIFF, PNG) scaled to 8 bits with a note. Raises OSError or ValueError for what PIL cannot read."""
    import numpy as np
    from PIL import ImageOps
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_DEPTH_MODES:
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" else max(1.0, float(values.max()))
        print(f"note: {Path(path).name} has {img.mode} pixels (more than 8 bits); scaled to 8 bits, "
              f"{top:g} -> 255")
        img = Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("L") if img.mode in ("1", "L") else img.convert("RGB")


def read_inputs(path, channels, half=None):
    """--input: one file or the images of one folder (not its subfolders) -> [(stem, image in
    [-1, 1], C x H x W)]. Unreadable files are skipped with a warning; none readable -> fail."""
    path = Path(path)
    if not path.exists():
        fail(f"--input {path} does not exist; give an image file or a folder of images")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in INPUT_EXTENSIONS) if path.is_dir() else [path]
    images, skipped = [], []
    for file in files:
        try:
            img = read_image(file)
        except (OSError, SyntaxError, ValueError) as e:
            skipped.append(f"warning: skipping {file}, which is not a readable image ({e.__class__.__name__})")
            continue
        if half is not None:
            w, h = img.size
            img = img.crop((0, 0, w // 2, h) if half == "left" else (w // 2, 0, w, h))
        images.append((file.stem, to_tensor(img, channels)))
    if not images and path.is_dir():
        fail(f"no readable image in {path} (looked for {', '.join(INPUT_EXTENSIONS)} files; "
             f"{len(skipped)} could not be read)")
    if not images:
        fail(f"--input {path} is not an image file that can be read")
    for line in skipped:
        print(line, file=sys.stderr)
    return images


def read_guides(args, device):
    """--style images -> [(1, output_nc, S, S) tensors] at the training crop size S, the size the
    encoder learned on."""
    guides = []
    for path in getattr(args, "style", None) or []:
        try:
            img = read_image(path)
        except (OSError, ValueError) as e:
            fail(f"cannot read the --style image {path} ({e.__class__.__name__}); give an image file")
        img = img.resize((args.crop_size, args.crop_size), Image.BICUBIC)
        guides.append(to_tensor(img, args.output_nc)[None].to(device))
    return guides


def check_fits(name, size, multiple, args):
    """Fail with one sentence for an image the network cannot take: each side at least half the
    multiple (else the padding would outweigh the image) and MIN_SIDE px."""
    least = max(MIN_SIDE, multiple // 2)
    if min(size) < least:
        fail(f"{name} is {size[1]}x{size[0]} px, too small for this network (it takes sides that are multiples "
             f"of {multiple}; each side needs at least {least} px): enlarge it or pass --resize {args.crop_size}")


def pad_to_multiple(x, multiple):
    """(N, C, H, W) -> (padded so that H and W are multiples of `multiple`, crop that undoes it).
    The image sits in the middle; the border is mirrored (replicated where it is thinner than the pad)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    top, left = pad_h // 2, pad_w // 2
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    padded = F.pad(x, (left, pad_w - left, top, pad_h - top), mode=mode)
    return padded, (slice(top, top + h), slice(left, left + w))


def slerp(z0, z1, steps):
    """`steps` codes on the great circle from z0 to z1 (norms interpolated linearly), ends exact;
    the BicycleGAN authors walk their latent space this way for their videos."""
    t = torch.linspace(0, 1, steps, device=z0.device).view(-1, *[1] * z0.dim())
    a, b = z0.flatten(), z1.flatten()
    omega = torch.acos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
    if omega < 1e-4:  # (nearly) the same direction: a straight line is the same path
        return (1 - t) * z0 + t * z1
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


def save_walk(folder, frames, duration_ms=200):
    """interpolation.png (the frames side by side) and interpolation.gif (looping) in folder."""
    save_grid([frames], folder / "interpolation.png")
    pictures = [Image.open(folder / f"sample_{k:02d}.png").convert("RGB") for k in range(len(frames))]
    pictures[0].save(folder / "interpolation.gif", save_all=True, append_images=pictures[1:], duration=duration_ms,
                     loop=0)


@torch.no_grad()
def translate_own_images(args, device, generate, multiple, code_shape=None, encode=None):
    """--input: translate each image at its own size and write <out>/translated/ in the --test
    layout (input.png, sample_00.png ..., style.png for a guide; grid.png; no ground truth).
    generate(real_A, codes) -> outputs (n, C, H, W), for one padded input (1, C, H, W) and n codes
    (codes None for a deterministic net); code_shape: one prior code's shape, N(0, I); encode(guide)
    -> (1, *code_shape), the code of a --style image. --n-samples, --sync and --seed as in --test;
    --interpolate K: the K frames of a walk are the samples, plus interpolation.png and .gif."""
    out = Path(args.out) / "translated"
    guides = read_guides(args, device)
    guide_codes = [encode(g) for g in guides]
    inputs = read_inputs(args.input, args.input_nc, args.half)
    generator = torch.Generator().manual_seed(args.seed)
    walk = getattr(args, "interpolate", None)  # K frames, or None
    n = 2 if walk else args.n_samples

    def draw():  # as in --test: first the shared codes, then per input; the walk's ends = samples 0, 1
        return torch.randn((n, *code_shape), generator=generator).to(device) if code_shape else None

    codes_sync, results = draw(), []
    for name, real_A in inputs:
        if args.resize:
            real_A = F.interpolate(real_A[None], size=(args.resize, args.resize), mode="bicubic",
                                   align_corners=False)[0].clamp(-1, 1)
        check_fits(name, real_A.shape[1:], multiple, args)
        padded, crop = pad_to_multiple(real_A[None].to(device), multiple)
        if code_shape is None:
            codes = None
        elif guide_codes and not walk:
            codes = guide_codes[0]
        else:
            ends = torch.cat(guide_codes) if guide_codes else (codes_sync if getattr(args, "sync", False) else draw())
            codes = slerp(ends[0], ends[1], walk) if walk else ends
        samples = [y[:, crop[0], crop[1]] for y in generate(padded, codes)]
        results.append({"A": real_A, "samples": samples, "name": name,
                        "extra": list(zip(["style"] if len(guides) == 1 else ["style_start", "style_end"],
                                          [g[0] for g in guides]))})
    write_test_results(out, results, args, toy=False)
    if walk:
        for r in results:
            save_walk(out / r["name"], r["samples"])
        print(f"wrote a walk of {walk} frames per input: <input>/interpolation.png and .gif")
