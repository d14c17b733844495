"""The study's summary (notebooks/study.py): what the README's table over seeds is built from."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))
import study  # noqa: E402


def metrics(coverage, valid, encoded=None):
    toy = {"mode_coverage": coverage, "valid_share": valid, "faithfulness_iou": 0.9, "mode_entropy_vs_uniform": 0.5}
    if encoded is not None:
        toy["encoded_colour_right"] = encoded
    return {"pixel_diversity_l1": 0.1, "toy": toy}


def test_summary_gives_mean_sd_and_the_worst_seed_and_encoded_only_where_there_is_an_encoder():
    results = {"with E": [metrics(0.9, 0.95, 1.0), metrics(0.7, 0.85, 0.8), metrics(0.8, 0.9, 0.9)],
               "no E": [metrics(0.25, 0.99), metrics(0.5, 0.97)]}
    summary = study.summarise(results)
    mean, sd, worst = summary["with E"]["coverage"]
    assert abs(mean - 0.8) < 1e-9 and abs(sd - 0.1) < 1e-9 and worst == 0.7
    assert summary["with E"]["encoded"][2] == 0.8 and summary["with E"]["valid"][2] == 0.85
    assert "encoded" not in summary["no E"]
    table = study.markdown_table(summary)
    assert "0.800 ± 0.100 (worst 0.700)" in table
    assert table.splitlines()[-1].endswith("| – |")  # no E: no encoded column value


def test_rescore_scores_saved_samples_again_with_the_shape_test(tmp_path):
    # A stored --test folder scored with the colour test alone: one input, its truth, its encoded
    # output, and two samples, one of them a clean colour in another input's place.
    import json
    import common
    import rescore_toy
    shape, elsewhere = ("square", [10, 10, 40, 40]), ("square", [34, 34, 60, 60])
    folder = tmp_path / "run" / "test" / "0000"
    folder.mkdir(parents=True)
    for name, img in (("input", common.draw_toy(shape)), ("ground_truth", common.draw_toy(shape, 2)),
                      ("encoded", common.draw_toy(elsewhere, 2)), ("sample_00", common.draw_toy(shape, 0)),
                      ("sample_01", common.draw_toy(elsewhere, 1))):
        img.save(folder / f"{name}.png")
    old = {"mode_coverage": 0.5, "valid_share": 1.0, "encoded_colour_right": 1.0}
    (folder.parent / "metrics.json").write_text(json.dumps({"inputs": 1, "sync": False, "lpips": "kept", "toy": old}))
    rescore_toy.main([str(tmp_path / "run")])
    m = json.loads((folder.parent / "metrics.json").read_text())
    assert m["lpips"] == "kept" and m["toy_before_rescore"] == old
    assert m["toy"]["valid_share"] == 0.5 and m["toy"]["mode_coverage"] == 0.25 and m["toy"]["mode_counts"] == [1, 0, 0, 0]
    assert m["toy"]["off_shape_share"] == 0.5 and m["toy"]["encoded_colour_right"] == 0.0
