"""θ0 against LLaVA-1.5-7B's band on the validation split (docs/world.md, gate 2), and which θ0 the selection rule
picks, from the numbers each build wrote to its meta.json.

    python -m benchmarks.theta0_band runs/theta0-s0 runs/theta0-s1

Prints each criterion with its value per θ0 and whether it is met, the selection distance, and the θ0 the rule
picks: one inside the band on every criterion before one outside it, then the smaller distance. The distance is the
mean, over POPE F1 random / popular / adversarial and CHAIR_i, of |value − centre| / half-width (centres 87 and 14,
half-widths 3 and 6, in %).
"""

import argparse
import json
import os

SPLITS = ("random", "popular", "adversarial")


def criteria(m: dict) -> dict[str, bool]:
    """Gate 2's criteria on a metrics dict (fractions, as meta.json holds them): name -> met."""
    f1 = [m[f"pope_{s}_f1"] for s in SPLITS]
    return {
        "POPE F1 84-90 on every split": all(0.84 <= v <= 0.90 for v in f1),
        "POPE adversarial the lowest": f1[2] == min(f1),
        "CHAIR_i 8-20": 0.08 <= m["chair_i"] <= 0.20,
        "CHAIR recall >= 80": m["chair_recall"] >= 0.80,
        "VQA >= 62": m["vqa_overall"] >= 0.62,
        "formats >= 95": min(m["fmt_ask_question"], m["fmt_self_check"], m["fmt_improve"]) >= 0.95,
        "AMBER yes-ratios 20-80": all(0.2 <= m[f"amber_yes_{d}"] <= 0.8 for d in ("existence", "attribute", "relation")),
        "question types >= 4, none > 50": m["sq_types"] >= 4 and m["sq_top_type"] <= 0.5,
    }


def distance(m: dict) -> float:
    parts = [abs(100 * m[f"pope_{s}_f1"] - 87) / 3 for s in SPLITS] + [abs(100 * m["chair_i"] - 14) / 6]
    return sum(parts) / len(parts)


def pick(metrics: dict[str, dict]) -> str:
    """The θ0 (a key of metrics) the selection rule ships."""
    return min(metrics, key=lambda k: (not all(criteria(metrics[k]).values()), distance(metrics[k])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("theta0", nargs="+", help="θ0 directories (each with the meta.json its build wrote)")
    args = p.parse_args(argv)
    metrics = {}
    for d in args.theta0:
        with open(os.path.join(d, "meta.json")) as f:
            metrics[d] = json.load(f)["metrics"]
    names = list(criteria(next(iter(metrics.values()))))
    shown = {
        "POPE F1 84-90 on every split": lambda m: " / ".join(f"{100 * m[f'pope_{s}_f1']:.2f}" for s in SPLITS),
        "POPE adversarial the lowest": lambda m: f"{100 * m['pope_adversarial_f1']:.2f}",
        "CHAIR_i 8-20": lambda m: f"{100 * m['chair_i']:.2f}",
        "CHAIR recall >= 80": lambda m: f"{100 * m['chair_recall']:.2f}",
        "VQA >= 62": lambda m: f"{100 * m['vqa_overall']:.2f}",
        "formats >= 95": lambda m: f"{100 * min(m['fmt_ask_question'], m['fmt_self_check'], m['fmt_improve']):.0f}",
        "AMBER yes-ratios 20-80": lambda m: " / ".join(f"{100 * m[f'amber_yes_{d}']:.1f}"
                                                        for d in ("existence", "attribute", "relation")),
        "question types >= 4, none > 50": lambda m: f"{m['sq_types']} ({100 * m['sq_top_type']:.1f})",
    }
    print("| criterion | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 1) + "|")
    for name in names:
        cells = [f"{shown[name](m)} {'met' if criteria(m)[name] else 'MISSED'}" for m in metrics.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| selection distance | " + " | ".join(f"{distance(m):.2f}" for m in metrics.values()) + " |")
    print(f"the selection rule picks {pick(metrics)}")


if __name__ == "__main__":
    main()
