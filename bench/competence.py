"""Is the toy model competent on prompts it never saw? Held-out (class, colour, background)
combinations, sampled and judged, at the seed used while the model was built and at seeds that were
never looked at during development (the number that counts: a model tuned while watching seed 0 can
look better at seed 0 than it is).

Usage: python bench/competence.py [--per-combo 4] [--fresh 20261205,20261206,20261207]
"""

from __future__ import annotations

import argparse
import os
import statistics

DEVELOPMENT_SEED = 0  # what `python -m dreambooth_kit.toy.pretrain` evaluates at (its --seed default)


def accuracy(seed: int, per_combo: int, combos) -> dict[str, float]:
    from dreambooth_kit.config import TOY_MODEL
    from dreambooth_kit.evaluation.metrics import attribute_accuracy
    from dreambooth_kit.toy import world
    from dreambooth_kit.toy.judge import Judge
    from dreambooth_kit.toy.model import sample

    prompts = [world.caption(world.Scene(c, k, b, 0.25, 0.5, 0.5)) for c, k, b in combos]
    images = sample(TOY_MODEL, prompts, per_combo=per_combo, seed=seed)
    expected = [{"class": c, "colour": k, "background": b} for c, k, b in combos for _ in range(per_combo)]
    return attribute_accuracy(Judge.load(), images, expected)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-combo", type=int, default=4)
    ap.add_argument("--fresh", default="20261205,20261206,20261207", help="seeds never used in development")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dreambooth_kit.toy import world

    combos = world.held_out_combos()
    rows = [("development seed", [accuracy(DEVELOPMENT_SEED, args.per_combo, combos)])]
    fresh = [accuracy(int(s), args.per_combo, combos) for s in args.fresh.split(",")]
    rows.append((f"fresh seeds ({args.fresh})", fresh))
    print(f"held-out combinations: {len(combos)} x {args.per_combo} samples per seed\n")
    print("| seeds | class | colour | background |\n| --- | --- | --- | --- |")
    for name, results in rows:
        cells = []
        for key in ("class", "colour", "background"):
            vals = [r[key] for r in results]
            spread = f" ± {statistics.pstdev(vals):.1%}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.1%}{spread}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
