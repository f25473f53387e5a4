"""A SENA run as one self-contained HTML page: sampled pairs, the data report, training curves, benchmarks.

    python evaluate.py report runs/world        # -> runs/world/report.html

Reads what a run directory holds and shows whatever exists (a round without metrics or a log, a run without
labels): runs/<name>/iter_<k>/{pairs.jsonl, report.json, log.jsonl, meta.json, model/metrics.json},
runs/<name>/theta0/metrics.json and, on the world, runs/<name>/labels/pool_iter_<k>.jsonl for right/wrong marks.
Images are inlined as base64 PNG data URIs and the CSS is inline, so the file can be mailed or archived alone.
Curves are PNG plots when matplotlib is installed (requirements-report.txt); a table of their values is always there.
"""

import base64
import html
import io
import os
import re
import time

from PIL import Image

from sena import seeds
from sena.cli import UserError
from sena.io import atomic_write_text, read_json, read_jsonl, safe_join
from sena.noise import REJECTED_STEP
from sena.pairs import STAGE_COUNTS
from sena.world.evaluation import LOWER_IS_BETTER, score_pairs, shown, summary

# Panels of the curve figure: title -> log.jsonl keys drawn in it (train.py writes the usual DPO keys).
CURVES = (("loss", ("loss", "dpo", "ica")), ("reward margin", ("rewards/margins",)),
          ("reward accuracy", ("rewards/accuracies",)), ("rewards", ("rewards/chosen", "rewards/rejected")),
          ("log-probs", ("logps/chosen", "logps/rejected")), ("grad norm", ("grad_norm",)))
CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;border-bottom:2px solid #ccc;margin-top:28px}h3{font-size:15px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}.up{color:#070}.down{color:#b00}.muted{color:#888}
.grid{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:10px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px}.imgs{display:flex;gap:6px}
.imgs figure{margin:0;font-size:11px;color:#666;text-align:center}
.imgs img{width:132px;height:132px;object-fit:contain;image-rendering:pixelated;border:1px solid #ddd}
.card td,.card th{text-align:left;overflow-wrap:break-word;vertical-align:top;font-size:13px}
.card table{width:100%}.card td:first-child{white-space:nowrap}
.ok{background:#d8f5d8;color:#060;padding:0 4px}.bad{background:#fadada;color:#a00;padding:0 4px}
.na{background:#eee;color:#666;padding:0 4px}.arrow{color:#888}img.curves{max-width:100%}"""


def load_json(path):
    """A JSON object file's content, or None when it is missing or damaged (the report shows what exists)."""
    try:
        return read_json(path)
    except UserError:
        return None


def rounds_of(run_dir):
    """Sorted round indices k of the run's iter_<k> folders."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"iter_(\d+)", n)))


def data_uri(img, max_side=256):
    """A PIL image as a PNG data URI, shrunk so its longer side is at most max_side pixels."""
    img = img.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def noised_rgb(path, name, settings, image_cfg):
    """The image the rejected answers saw, exactly as generate.py made it, back in RGB.

    x_t = sena.noise.noised_image(preprocess(image), t, seed, name, round)   (3, S, S)
    rgb = clamp(x_t · std + mean, 0, 1) · 255        the normalization undone with the model's image mean/std.
    """
    import torch

    from sena.image import load_image, preprocess
    from sena.noise import noised_image

    x = preprocess(load_image(path), image_cfg)
    t = settings.get("noise_step", REJECTED_STEP)
    x_t = noised_image(x, t, settings.get("seed", 0), name, settings.get("round", 1))
    mean = torch.tensor(image_cfg["image_mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_cfg["image_std"], dtype=torch.float32).view(3, 1, 1)
    rgb = (x_t.float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)  # (3, S, S)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def e(text):
    return html.escape("" if text is None else str(text))


def mark(ok, right="right", wrong="wrong", tip=""):
    """A right/wrong badge; None (nothing to score against) gives a grey one."""
    if ok is None:
        return f'<span class="na" title="{e(tip)}">? no oracle</span>'
    return f'<span class="ok">✓ {right}</span>' if ok else f'<span class="bad">✗ {wrong}</span>'


def load_round(run_dir, k):
    """Everything round k left on disk; missing pieces are None or empty."""
    d = os.path.join(run_dir, f"iter_{k}")

    def jsonl(path, req=()):
        return read_jsonl(path, required=req)[0] if os.path.exists(path) else []

    pairs = jsonl(os.path.join(d, "pairs.jsonl"), ("image", "chosen", "rejected", "type"))
    logs = jsonl(os.path.join(d, "log.jsonl"))
    labels = os.path.join(run_dir, "labels", f"pool_iter_{k}.jsonl")
    scenes = {sc["image"]: sc for sc in jsonl(labels, ("image", "objects"))} if os.path.exists(labels) else None
    metrics = load_json(os.path.join(d, "model", "metrics.json")) or load_json(os.path.join(d, "metrics.json"))
    return {"k": k, "pairs": pairs, "logs": logs, "scenes": scenes, "metrics": metrics,
            "report": load_json(os.path.join(d, "report.json")) or {}, "meta": load_json(os.path.join(d, "meta.json")),
            "telemetry": load_json(os.path.join(d, "telemetry.json")) or {}}


def image_cfg_for(run_dir, r):
    """The preprocessor config of the model that generated round k (θ(k-1)): recorded path first, then run dirs."""
    prev = os.path.join(run_dir, "theta0") if r["k"] == 1 else os.path.join(run_dir, f"iter_{r['k'] - 1}", "model")
    for m in (r["report"].get("settings", {}).get("model"), r["report"].get("model"), prev):
        cfg = load_json(os.path.join(m, "preprocessor_config.json")) if m else None
        if cfg and "image_mean" in cfg:
            return cfg
    return None


def gallery(run_dir, r, n_images):
    """Cards for n_images images sampled (seeded by round) from the round's pairs: both images, question, pairs."""
    by_image = {}
    for p in r["pairs"]:
        by_image.setdefault(p["image"], []).append(p)
    names = sorted(by_image)
    names = sorted(seeds.rng("report", r["k"]).sample(names, min(n_images, len(names))))
    settings = r["report"].get("settings", {}) | {"round": r["k"]}
    root = r["report"].get("image_root")
    root = root if root and os.path.isdir(root) else os.path.join(run_dir, "pool", f"iter_{r['k']}")
    cfg = image_cfg_for(run_dir, r)
    cards = []
    for name in names:
        ps = sorted(by_image[name], key=lambda p: p["type"])
        figs = ""
        try:
            path = safe_join(root, name)
            with Image.open(path) as im:
                figs += f'<figure><img src="{data_uri(im)}"><br>image</figure>'
            if cfg:
                noised = noised_rgb(path, name, settings, cfg)
                t = settings.get("noise_step", REJECTED_STEP)
                figs += f'<figure><img src="{data_uri(noised)}"><br>noised t={t}</figure>'
        except (OSError, ValueError) as err:
            figs += f'<span class="muted">image unavailable: {e(err)}</span>'
        scored = [score_pairs([p], r["scenes"]) if r["scenes"] else None for p in ps]
        q = ps[0]
        q_raw, q_chk = q.get("question_raw"), q.get("question")
        qm = ["", ""]
        if scored[0] and not scored[0]["n_missing_scene"]:
            qm = [mark(scored[0]["question_raw_answerable"] > 0, "answerable", "unanswerable"),
                  mark(scored[0]["question_answerable"] > 0, "answerable", "unanswerable")]
        same = ' <span class="muted">(kept as is)</span>' if q_raw == q_chk else ""
        rows = ""
        for p, s in zip(ps, scored):
            cm = rm = ""
            if s and not s["n_missing_scene"]:
                n = s["n_gen_scored"] if p["type"] == "gen" else s["n_des"]
                c, w = (s["gen_chosen_correct"], s["gen_rejected_wrong"]) if p["type"] == "gen" else \
                    (s["des_chosen_correct"], s["des_rejected_wrong"])
                cm = " " + mark(c > 0 if n else None, tip="the oracle does not answer this question")
                rm = " " + mark(w == 0 if n else None, tip="the oracle does not answer this question")
            raw = p.get("chosen_raw")
            if raw is not None and raw != p["chosen"]:
                chosen = f'{e(raw)} <span class="arrow">→</span> <b>{e(p["chosen"])}</b>'
            else:
                why = "" if p.get("se_accepted") else "no self-enhancement" if settings.get("no_enhance") else \
                    "rewrite refused: raw kept"
                chosen = f"<b>{e(p['chosen'])}</b>" + (f' <span class="muted">({why})</span>' if why else "")
            rows += (f'<tr><td><b>{e(p["type"])}</b></td><td class="muted">{e(p.get("prompt"))}</td>'
                     f"<td>{chosen}{cm}</td><td>{e(p['rejected'])}{rm}</td></tr>")
        cards.append(f'<div class="card"><div class="imgs">{figs}</div><div class="muted">{e(name)}</div>'
                     f'<div><b>question:</b> {e(q_raw)} {qm[0]} <span class="arrow">→ checked:</span> {e(q_chk)} '
                     f"{qm[1]}{same}</div><table><tr><th>type</th><th>prompt</th><th>chosen (raw → enhanced)</th>"
                     f"<th>rejected (noised)</th></tr>{rows}</table></div>")
    return f'<div class="grid">{"".join(cards)}</div>' if cards else '<p class="muted">no pairs</p>'


def table(header, rows):
    """HTML table; the first column is left-aligned labels."""
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">{c}</td>' for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def fmt(v, pct=False):
    if v is None:
        return '<span class="muted">—</span>'
    if isinstance(v, (bool, int)):
        return str(v)
    return f"{100 * v:.1f}%" if pct else f"{v:.4g}"


def data_report(rounds):
    """Counts per stage and filter, rates, timings and (world) data-side correctness, one column per round."""
    reps = [r["report"] for r in rounds]
    filters = sorted({f for rep in reps for f in rep.get("filtered", {})})

    def ratio(a, b):
        return a / b if a is not None and b else None

    rows = [[s.replace("_", " "), *[fmt(rep.get(s)) for rep in reps]] for s in STAGE_COUNTS]
    rows += [[f"filtered: {f}", *[fmt(rep.get("filtered", {}).get(f)) for rep in reps]] for f in filters]
    rows += [[k, *[fmt(rep.get(k)) for rep in reps]] for k in ("pairs", "pairs_des", "pairs_gen")]
    rows += [["self-check rewrite rate", *[fmt(ratio(rep.get("self_check_rewritten"), rep.get("questions_raw")), 1)
                                          for rep in reps]],
             ["question keep rate", *[fmt(ratio(rep.get("questions_kept"), rep.get("images")), 1) for rep in reps]],
             ["SE acceptance (des)", *[fmt(rep.get("se_accept_rate_des"), 1) for rep in reps]],
             ["SE acceptance (gen)", *[fmt(rep.get("se_accept_rate_gen"), 1) for rep in reps]],
             ["pair acceptance", *[fmt(ratio(rep.get("pairs"), rep.get("candidate_pairs")), 1) for rep in reps]],
             ["mean words chosen", *[fmt(rep.get("mean_words_chosen")) for rep in reps]],
             ["mean words rejected", *[fmt(rep.get("mean_words_rejected")) for rep in reps]],
             ["seconds (generation)", *[fmt(rep.get("seconds")) for rep in reps]]]
    for group in ("des", "gen"):  # sena/telemetry.py: label-free, from θ(k-1)
        pref = [r["telemetry"].get("reference_prefers_chosen", {}).get(group, {}) for r in rounds]
        rel = [r["telemetry"].get("image_reliance", {}).get(group, {}) for r in rounds]
        rows += [[f"reference prefers chosen ({group})", *[fmt(p.get("summed"), 1) for p in pref]],
                 [f"image reliance chosen / rejected ({group}, nats/token)",
                  *[f"{v['chosen']:+.3f} / {v['rejected']:+.3f}" if v else fmt(None) for v in rel]]]
    for part in ("reference", "train", "eval"):
        rows.append([f"seconds ({part})", *[fmt((r["meta"] or {}).get("seconds", {}).get(part)) for r in rounds]])
    if any(r["scenes"] for r in rounds):
        scored = [score_pairs(r["pairs"], r["scenes"]) if r["scenes"] else {} for r in rounds]
        for key in ("question_raw_answerable", "question_answerable", "chosen_correct", "rejected_wrong",
                    "gen_chosen_correct", "gen_rejected_wrong", "des_chosen_correct", "des_rejected_wrong"):
            rows.append([f"world: {key.replace('_', ' ')}", *[fmt(s.get(key), 1) for s in scored]])
        for side in ("chosen", "rejected"):  # the noised answers should name the absent buddies (the prior's guesses)
            rows.append([f"world: absent buddies / other absent shapes named ({side}, des)",
                         *[f"{s[f'des_{side}_buddies']} / {s[f'des_{side}_others']}" if s else fmt(None)
                           for s in scored]])
    return table(["stage / filter", *[f"iter {r['k']}" for r in rounds]], rows)


def curves_png(rounds):
    """One PNG of the training curves over the whole run (x = step, rounds end at the dashed lines); None without
    matplotlib or without logs."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    xs, ends, x = [], [], 0
    for r in rounds:
        xs.append(list(range(x, x + len(r["logs"]))))
        x += len(r["logs"])
        ends.append(x)
    if not x:
        return None
    fig = Figure(figsize=(12, 6), dpi=80)
    for ax, (title, keys) in zip(fig.subplots(2, 3).flat, CURVES):
        for key in keys:
            pts = [(i, rec[key]) for r, xr in zip(rounds, xs) for i, rec in zip(xr, r["logs"]) if key in rec]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, lw=1.2)
        for k_end in ends[:-1]:
            ax.axvline(k_end - 0.5, color="#999", ls="--", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step (all rounds)", fontsize=8)
        ax.tick_params(labelsize=8)
        if len(keys) > 1 and ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("rounds " + ", ".join(f"iter {r['k']}: {len(r['logs'])} steps" for r in rounds), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no matplotlib URL in the file
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def curves_table(rounds):
    """First → last value of every curve, one column per round (always shown, matplotlib or not)."""
    logged = [r for r in rounds if r["logs"]]
    if not logged:
        return '<p class="muted">no training logs</p>'
    rows = [["steps", *[str(len(r["logs"])) for r in logged]]]
    for key in [k for _, ks in CURVES for k in ks]:
        rows.append([key, *[f"{fmt(r['logs'][0].get(key))} → {fmt(r['logs'][-1].get(key))}" for r in logged]])
    return table(["curve (first → last step)", *[f"iter {r['k']}" for r in logged]], rows)


def flatten(m, prefix=""):
    """{dotted key: number} of a nested metrics dict, without its 'meta' block."""
    out = {}
    for k, v in m.items():
        if isinstance(v, dict) and k != "meta":
            out |= flatten(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "meta":
            out[prefix + k] = v
    return out


def benchmarks(run_dir, rounds):
    """θ0 → round k: each metric, each round's delta against θ0 (green better, red worse)."""
    ref = (rounds[0]["meta"] or {}).get("reference") if rounds else None
    theta0 = load_json(os.path.join(run_dir, "theta0", "metrics.json")) or (
        load_json(os.path.join(ref, "metrics.json")) if ref else None)
    cols = [("θ0", theta0)] + [(f"iter {r['k']}", r["metrics"]) for r in rounds]
    if not any(m for _, m in cols):
        return '<p class="muted">no metrics.json yet</p>'

    def view(m):
        if m is None:
            return None
        try:
            return {k: shown(k, v) for k, v in summary(m).items()}
        except (KeyError, TypeError):
            return flatten(m)

    views = [view(m) for _, m in cols]
    keys = list(dict.fromkeys(k for v in views if v for k in v))
    base = views[0] or {}
    rows = []
    for key in keys:
        cells = []
        for i, v in enumerate(views):
            val = (v or {}).get(key)
            cell = f"{val:.2f}" if val is not None else fmt(val)
            if i and val is not None and base.get(key) is not None:
                d = val - base[key]
                better = d < 0 if key in LOWER_IS_BETTER else d > 0
                # A yes-ratio is best near 50%, so its delta gets no colour.
                cls = "muted" if not d or key.endswith("_yes") else "up" if better else "down"
                cell += f' <span class="{cls}">({d:+.2f})</span>'
            cells.append(cell)
        rows.append([key + (" ↓" if key in LOWER_IS_BETTER else ""), *cells])
    return table(["metric (%)", *[n for n, _ in cols]], rows)


def build_report(run_dir, n_images=6):
    """The report page as a string."""
    rounds = [load_round(run_dir, k) for k in rounds_of(run_dir)]
    meta = next((r["meta"] for r in reversed(rounds) if r["meta"]), None) or {}
    args = meta.get("args", {})
    shown = ("ablation", "self_check", "noise_step", "beta", "ica_weight", "lr", "epochs", "batch_size", "seed")
    settings = ", ".join(f"{k}={args[k]}" for k in shown if k in args)
    parts = [f"<h1>SENA run: {e(os.path.basename(os.path.abspath(run_dir)))}</h1>",
             f'<p class="muted">{e(os.path.abspath(run_dir))} · {len(rounds)} round(s) · written '
             f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} · commit {e(meta.get("git_commit") or "?")}'
             f"<br>{e(settings)}</p>", "<h2>Sampled preference pairs</h2>",
             '<p class="muted">Marks (world runs, from the scene labels): a question is answerable when the world '
             "oracle answers it; a des answer is right when it names no absent shape.</p>"]
    for r in rounds:
        parts.append(f"<h3>iter {r['k']} · {len(r['pairs'])} pairs"
                     f"{'' if r['scenes'] else ' · no labels'}</h3>{gallery(run_dir, r, n_images)}")
    parts.append(f"<h2>Data report</h2>{data_report(rounds)}")
    png = curves_png(rounds)
    parts.append("<h2>Training curves</h2>" + (f'<img class="curves" src="{png}">' if png else
                 '<p class="muted">(install matplotlib for plots: requirements-report.txt)</p>'))
    parts.append(curves_table(rounds))
    parts.append(f"<h2>Benchmarks: θ0 → round k</h2>{benchmarks(run_dir, rounds)}")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>SENA report</title><style>{CSS}</style>'
            f"</head><body>{''.join(parts)}</body></html>")


def write_report(run_dir, out=None, n_images=6):
    """Write build_report(run_dir) to out (default <run_dir>/report.html) atomically; returns the path."""
    out = out or os.path.join(run_dir, "report.html")
    atomic_write_text(out, build_report(run_dir, n_images))
    print(f"report -> {out}")
    return out
