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
    elsewhere = [[outline, toy_image(0)] + [common.to_tensor(common.draw_toy(("square", [34, 34, 60, 60]), c), 3)
                                            for c in range(4)]]  # the right colours, not in the input's shape
    assert common.save_preview(elsewhere, tmp_path / "c.png", first_sample=2, toy=True)["preview_colours"] == 0
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


def two_level_map(channels=8, size=64):
    """A flat feature map as the toy's images give it: one value inside a square, another outside."""
    h = torch.full((1, channels, size, size), -0.5)
    h[:, :, 16:48, 16:48] = 0.8
    return h


def test_instance_norm_removes_a_constant_code_batch_norm_keeps_it():
    # The cause found for the toy demo's collapse (README, When G ignores z): a normalised U-Net
    # level adds z as a spatially constant map and normalises right after its conv. Instance norm
    # subtracts each image's own mean, so z's offset cancels except for the zero-padded border ring
    # (which the flat map's small spread then magnifies: about a tenth of the effect is left);
    # batch norm subtracts the batch's mean, so images with different codes keep different offsets.
    torch.manual_seed(0)
    h, z = two_level_map(), torch.randn(2, 8)
    x = common.tile_z(h.expand(2, -1, -1, -1), z)  # the same image, two codes
    conv = torch.nn.Conv2d(16, 16, 4, 2, 1)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    moved = {}
    for kind in ("instance", "batch"):
        norm = common.norm_layer(kind)(16).train()
        with torch.no_grad():
            y = norm(conv(x))[interior]
        moved[kind] = float((y[0] - y[1]).abs().mean() / y.abs().mean())
    assert moved["batch"] > 0.3, moved
    assert moved["instance"] < 0.2 * moved["batch"], moved


def test_toy_G_normalises_each_image_alone_so_training_and_test_agree():
    # The cause found on equal-area toy data (notebooks/when_g_ignores_z.md, The shapes' area): with
    # batch norm in G, its running averages (which mix G's passes on E's codes with those on prior
    # codes) misread E's codes at test time. The toy default's per-image norm gives G the same output
    # in training and in eval mode (dropout aside), and one pair's output does not depend on its batch mates.
    import bicyclegan
    torch.manual_seed(0)
    a, z = torch.randn(4, 3, 64, 64), torch.randn(4, 8)
    outputs = {}
    for flags in ([], ["--norm-g", "batch"]):
        netG = bicyclegan.build_networks(bicyclegan.parse_args(flags), torch.device("cpu"))[0]
        netG.train()
        for m in netG.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        with torch.no_grad():
            netG(a, z)  # one training pass: batch norm's running averages move
            trained, alone = netG(a, z), netG(a[:1], z[:1])
            netG.eval()
            outputs[tuple(flags)] = (trained, alone, netG(a, z))
    trained, alone, tested = outputs[()]
    assert torch.allclose(trained, tested, atol=1e-5) and torch.allclose(alone, trained[:1], atol=1e-5)
    trained, _, tested = outputs[("--norm-g", "batch")]
    assert (trained - tested).abs().mean() > 1e-3  # the check can fail: batch norm's outputs differ


def test_toy_defaults_are_batch_norm_at_16_for_the_paired_scripts():
    import bicyclegan, clr_gan, cvae_gan, divco, pix2pix_noise
    for script in (bicyclegan, clr_gan, cvae_gan, divco, pix2pix_noise):
        toy = script.parse_args([])
        assert (toy.batch_size, toy.norm, toy.norm_g, toy.epochs, toy.epochs_decay) == (16, "batch", "layer", 90, 90)
        real = script.parse_args(["--dataset", "facades"])  # real data: the official choices
        assert (real.batch_size, real.norm, real.norm_g, real.epochs) == (2, "instance", None, 200), script.__name__
        assert script.parse_args(["--norm", "instance", "--batch-size", "4"]).norm == "instance"  # flags win
        quick = script.parse_args(["--quick"])  # the smoke run stays small
        assert (quick.batch_size, quick.norm) == (2, "instance"), script.__name__
    for script, per_image in ((bicyclegan, 4), (divco, 1)):  # they sum the KL over the half-batch of 8:
        # 0.01 / 8 keeps the official weight per image; BicycleGAN's toy demo uses four times it
        assert script.parse_args([]).lambda_kl == per_image * 0.01 / 8
        assert script.parse_args(["--dataset", "maps"]).lambda_kl == 0.01
    for script in (bicyclegan, cvae_gan, divco):  # D's term of the encoded output trains G only on the toy
        assert script.parse_args([]).gan_trains_e is False and script.parse_args(["--dataset", "facades"]).gan_trains_e
        assert script.parse_args(["--gan-trains-e"]).gan_trains_e is True  # flags win
        assert script.parse_args(["--quick"]).gan_trains_e is True  # the smoke run keeps Eq. (9)'s update
    unpaired = divco.parse_args(["--setting", "unpaired"])
    assert (unpaired.batch_size, unpaired.norm) == (2, "instance")


def test_toy_metrics_count_encoded_outputs_of_the_right_colour(tmp_path):
    outline = common.to_tensor(common.draw_toy(("square", [10, 10, 40, 40])), 3)
    results = [dict(A=outline, B=toy_image(1), encoded=toy_image(1), samples=[toy_image(0), toy_image(1)], name="a"),
               dict(A=outline, B=toy_image(2), encoded=toy_image(3), samples=[toy_image(2), toy_image(2)], name="b")]
    args = type("Args", (), {"dataset": "toy", "direction": "AtoB"})()
    metrics = common.write_test_results(tmp_path / "test", results, args)
    assert metrics["toy"]["encoded_colour_right"] == 0.5
    assert metrics["toy"]["mode_coverage"] == (2 / 4 + 1 / 4) / 2
    assert "code_agreement" not in metrics["toy"]  # codes drawn afresh per input: nothing to agree on


def test_sync_metrics_tell_whether_each_code_means_one_colour(tmp_path):
    outline = common.to_tensor(common.draw_toy(("square", [10, 10, 40, 40])), 3)
    args = type("Args", (), {"dataset": "toy", "direction": "AtoB", "sync": True})()
    def agreement(rows):  # rows[input] = the colours drawn for codes 0, 1, 2 (-1: a grey, unclean sample)
        results = [dict(A=outline, samples=[toy_image(c) if c >= 0 else torch.zeros(3, 64, 64) for c in row],
                        name=str(i)) for i, row in enumerate(rows)]
        return common.write_test_results(tmp_path / "test", results, args)["toy"]["code_agreement"]
    assert agreement([[0, 1, 2], [0, 1, 2]]) == 1.0  # each code one colour for both inputs
    assert agreement([[0, 1, 2], [1, 2, 0]]) == 0.5  # the colour of a code depends on the input
    assert agreement([[0, 1, -1], [0, 1, -1]]) == 2 / 3  # no clean sample at code 2


def test_batch_norm_reads_a_code_against_the_batch_layer_norm_per_image():
    # What a normalised level makes of one image's code when the rest of its batch changes. Batch
    # norm subtracts the batch's mean offset, so the same image with the same code comes out
    # differently next to other codes (G reads z relative to its half-batch, and in eval mode
    # against running averages); --norm layer normalises each image alone, over its channels and
    # pixels, so its output does not depend on the batch, and a different code still moves it.
    torch.manual_seed(0)
    h = two_level_map().expand(4, -1, -1, -1)
    z, others = torch.randn(4, 8), torch.randn(3, 8)
    conv = torch.nn.Conv2d(16, 16, 4, 2, 1)
    changed, moved = {}, {}
    for kind in ("batch", "layer"):
        norm = common.norm_layer(kind)(16).train()
        with torch.no_grad():
            y = norm(conv(common.tile_z(h, z)))
            y_other_batch = norm(conv(common.tile_z(h, torch.cat([z[:1], others]))))
        changed[kind] = float((y[0] - y_other_batch[0]).abs().mean() / y[0].abs().mean())
        moved[kind] = float((y[0] - y[1]).abs().mean() / y[0].abs().mean())
    assert changed["batch"] > 0.1, changed
    assert changed["layer"] < 1e-5, changed
    assert moved["layer"] > 0.1, moved


def test_norm_g_and_norm_d_set_G_and_the_Ds_apart_from_norm_in_every_paired_script():
    import bicyclegan, clr_gan, cvae_gan, divco, pix2pix_noise
    for script in (bicyclegan, clr_gan, cvae_gan, divco, pix2pix_noise):
        args = script.parse_args(["--out", "unused", "--norm", "batch", "--norm-g", "instance", "--norm-d", "layer"])
        netG, *rest = script.build_networks(args, torch.device("cpu"))
        kinds = lambda net: {type(m).__name__ for m in net.modules() if "Norm" in type(m).__name__}
        assert kinds(netG) == {"InstanceNorm2d"}, script.__name__
        d_kinds = [kinds(net) for net in rest if isinstance(net, common.PatchDiscriminator)]
        assert d_kinds and all(k == {"GroupNorm"} for k in d_kinds), (script.__name__, d_kinds)
        others = [kinds(net) for net in rest if not isinstance(net, common.PatchDiscriminator)]
        assert all(k <= {"BatchNorm2d"} for k in others), (script.__name__, others)  # E keeps --norm
