"""θ0 against LLaVA-1.5-7B's band on the validation split (docs/world.md, gate 2), and which θ0 the selection rule
picks, from the numbers each build wrote to its meta.json.

    python -m benchmarks.theta0_band runs/theta0-s0 runs/theta0-s1

Prints each criterion with its value per θ0 and whether it is met, the selection distance, and the θ0 the rule
picks: one inside the band on every criterion before one outside it, then the smaller distance. The distance is the
mean, over POPE F1 random / popular / adversarial and CHAIR_i, of |value − centre| / half-width (centres 87 and 14,
half-widths 3 and 6, in %).
"""

import argparse
import os

from sena.io import read_json

SPLITS = ("random", "popular", "adversarial")
AMBER_TYPES = ("existence", "attribute", "relation")


def _pct(x, digits=2):
    return f"{100 * x:.{digits}f}"


def _formats(m):
    return min(m["fmt_ask_question"], m["fmt_self_check"], m["fmt_improve"])


# Gate 2, one row per criterion: (name, met on a metrics dict of fractions as meta.json holds them, value shown).
CRITERIA = [
    ("POPE F1 84-90 on every split", lambda m: all(0.84 <= m[f"pope_{s}_f1"] <= 0.90 for s in SPLITS),
     lambda m: " / ".join(_pct(m[f"pope_{s}_f1"]) for s in SPLITS)),
    ("POPE adversarial the lowest", lambda m: m["pope_adversarial_f1"] == min(m[f"pope_{s}_f1"] for s in SPLITS),
     lambda m: _pct(m["pope_adversarial_f1"])),
    ("CHAIR_i 8-20", lambda m: 0.08 <= m["chair_i"] <= 0.20, lambda m: _pct(m["chair_i"])),
    ("CHAIR recall >= 80", lambda m: m["chair_recall"] >= 0.80, lambda m: _pct(m["chair_recall"])),
    ("VQA >= 62", lambda m: m["vqa_overall"] >= 0.62, lambda m: _pct(m["vqa_overall"])),
    ("formats >= 95", lambda m: _formats(m) >= 0.95, lambda m: _pct(_formats(m), 0)),
    ("AMBER yes-ratios 20-80", lambda m: all(0.2 <= m[f"amber_yes_{d}"] <= 0.8 for d in AMBER_TYPES),
     lambda m: " / ".join(_pct(m[f"amber_yes_{d}"], 1) for d in AMBER_TYPES)),
    ("question types >= 4, none > 50", lambda m: m["sq_types"] >= 4 and m["sq_top_type"] <= 0.5,
     lambda m: f"{m['sq_types']} ({_pct(m['sq_top_type'], 1)})"),
]


def criteria(m: dict) -> dict[str, bool]:
    """Gate 2's criteria on a metrics dict: name -> met."""
    return {name: met(m) for name, met, _ in CRITERIA}


def distance(m: dict) -> float:
    """(1/4) [Σ_{s in SPLITS} |F1_s − 87| / 3 + |CHAIR_i − 14| / 6], in %: how far from the band's centre."""
    parts = [abs(100 * m[f"pope_{s}_f1"] - 87) / 3 for s in SPLITS] + [abs(100 * m["chair_i"] - 14) / 6]
    return sum(parts) / len(parts)


def pick(metrics: dict[str, dict]) -> str:
    """The θ0 (a key of metrics) the selection rule ships."""
    return min(metrics, key=lambda k: (not all(criteria(metrics[k]).values()), distance(metrics[k])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("theta0", nargs="+", help="θ0 directories (each with the meta.json its build wrote)")
    args = p.parse_args(argv)
    metrics = {d: read_json(os.path.join(d, "meta.json"), what="θ0 meta.json")["metrics"] for d in args.theta0}
    print("| criterion | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 1) + "|")
    for name, met, shown in CRITERIA:
        cells = [f"{shown(m)} {'met' if met(m) else 'MISSED'}" for m in metrics.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| selection distance | " + " | ".join(f"{distance(m):.2f}" for m in metrics.values()) + " |")
    print(f"the selection rule picks {pick(metrics)}")


if __name__ == "__main__":
    main()
