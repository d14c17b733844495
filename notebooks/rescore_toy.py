"""Score a toy run's saved --test outputs again with today's common.toy_scores, without the model.

The toy checks have changed once since runs were stored: since 2026-12-08 a sample counts as a
right answer only if it also follows the input's outline (common.TOY_MIN_IOU; README, "What the
toy's checks count"). This reads <run>/test/<input>/{input,ground_truth,encoded,sample_NN}.png,
which every --test writes (cyclegan.py: under test/AtoB/), and replaces the "toy" block of <run>/test/metrics.json (the other
entries, LPIPS included, are kept; the earlier block is kept as "toy_before_rescore").

    python notebooks/rescore_toy.py runs/study_v5/paired/*_seed? runs/study_v5u/unpaired/*_seed?
"""
import argparse
import json
import sys
from datetime import date
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def load(path):
    return common.to_tensor(Image.open(path), 3)


def rescore(run):
    test = Path(run) / "test"
    if not (test / "metrics.json").exists() and (test / "AtoB" / "metrics.json").exists():
        test = test / "AtoB"  # cyclegan.py tests both directions; the toy's outputs are A -> B
    metrics = json.loads((test / "metrics.json").read_text())
    folders = sorted(p for p in test.iterdir() if (p / "sample_00.png").exists())
    if not folders:
        raise SystemExit(f"error: {test} holds no saved samples (<input>/sample_00.png) to score")
    scores, encoded_right = [], []
    for folder in folders:
        A = load(folder / "input.png")
        scores.append(common.toy_scores(A, [load(p) for p in sorted(folder.glob("sample_*.png"))]))
        if (folder / "encoded.png").exists() and (folder / "ground_truth.png").exists():
            encoded = common.toy_scores(A, [load(folder / "encoded.png")])["modes"][0]
            encoded_right.append(encoded == common.toy_mode(load(folder / "ground_truth.png")))
    metrics.setdefault("toy_before_rescore", metrics.get("toy"))
    metrics["toy"] = common.toy_metrics(scores, encoded_right, metrics.get("sync", False))
    metrics["toy"]["rescored"] = f"{date.today()}: from the saved PNGs by notebooks/rescore_toy.py"
    (test / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders, each with test/metrics.json and the saved samples")
    for run in p.parse_args(argv).runs:
        m = rescore(run)
        old, new = m["toy_before_rescore"] or {}, m["toy"]
        print(f"{run}: " + ", ".join(
            f"{k} {old.get(k, float('nan')):.4f} -> {new[k]:.4f}"
            for k in ("mode_coverage", "valid_share", "encoded_colour_right") if k in new))


if __name__ == "__main__":
    main()
