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
