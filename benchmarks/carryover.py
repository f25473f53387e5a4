"""Does a change in what θ0 writes in its descriptions carry over to its yes/no answers? The cheap check before SENA.

    python -m benchmarks.carryover --model sena/world/theta0            # ~3 minutes on 2 CPU cores

SENA's pairs are mostly descriptions (its filters drop every pair whose answer is exactly "Yes" or "No"), so the
paper's gains on POPE and AMBER's yes/no questions can only come through a belief that descriptions and yes/no
answers share: fewer absent objects named in descriptions, fewer "Yes" to them. This trains LoRA adapters (our own,
r 16, α 32, the language model's projections, as a SENA round does) for --steps steps of plain next-token loss on
*gold* descriptions of fresh world scenes, and measures on held-out scenes, before and after:

  yes_absent_buddy   the share of "Yes" to "Is there a <absent buddy of a present shape> in the image?"
  yes_absent_other   the same for the other absent shapes
  yes_present        the share of "Yes" to the present shapes (training must not just teach "No")
  chair_i, buddies   CHAIR_i of the descriptions and the absent buddies they name

If gold descriptions lower CHAIR_i but leave yes_absent_buddy where it was, the two live apart in the model and no
SENA variant can move existence answers through descriptions. --scenes buddy draws the training scenes among those
with an absent buddy (where a prior-driven model errs), --scenes all from every scene.

Gold descriptions of the world's own scenes carry the world's own co-occurrence (a faint buddy is named because it
is there), so training on them confirms the prior rather than questioning it. --cooc draws the training scenes at
another co-occurrence rate (0: a buddy pair never shares a scene; the probe scenes keep the world's): if "Yes" to
absent buddies then follows what the descriptions alone said about which shapes go together, the prior is one
belief that both read-outs share.

--train exist is the positive control: the same steps on true existence answers ("Is there a <shape> in the
image?", half present shapes, half absent ones drawn uniformly) instead of descriptions. It shows how far 200 LoRA
steps can move the yes/no answers at all, so that a description run that leaves them still is read against it.
"""

import argparse
import json
import os
import tempfile
import time

import torch

from sena import seeds
from sena.chat import build_example, collate
from sena.checkpoint import load_pretrained
from sena.image import load_image, preprocess
from sena.lora import LLAMA_TARGETS, apply_lora
from sena.metrics import chair, pope_parse
from sena.prompts import DES_SUFFIX, DESCRIBE_PROMPTS, GEN_SUFFIX
from sena.world.evaluation import answer_requests, shape_mentions
from sena.world.build import write_split
from sena.world.language import describe, oracle_answer, question
from sena.world.render import render
from sena.world.scenes import SHAPES, absent_buddies, sample_scenes
from sena.world.stage2 import answer_loss
from sena.world.tasks import answerable_question
from sena.world.theta0 import read_meta, recipe_part


def probe(model, tok, image_cfg, scenes, image_dir):
    """The yes-rates and CHAIR numbers of the module docstring, greedy, on `scenes` (rendered in image_dir)."""
    reqs = []
    for i, sc in enumerate(scenes):
        present = {o["shape"] for o in sc["objects"]}
        buddies = absent_buddies(sc)
        for s in SHAPES:
            kind = "present" if s in present else "absent_buddy" if s in buddies else "absent_other"
            reqs.append({"task": "pope", "kind": kind, "image": sc["image"],
                         "prompt": question("exist", shape=s) + GEN_SUFFIX})
        reqs.append({"task": "des", "image": sc["image"], "prompt": DESCRIBE_PROMPTS[i % 11] + DES_SUFFIX})
    model.eval()
    answer_requests(model, tok, image_cfg, reqs, image_dir, 64, {True: 8, False: 96})
    out = {}
    for kind in ("absent_buddy", "absent_other", "present"):
        answers = [pope_parse(r["answer"]) for r in reqs if r.get("kind") == kind]
        out[f"yes_{kind}"] = sum(a == "yes" for a in answers) / len(answers)
    by_image = {sc["image"]: sc for sc in scenes}
    des = [r for r in reqs if r["task"] == "des"]
    mentions = [shape_mentions(r["answer"]) for r in des]
    gt = [{o["shape"] for o in by_image[r["image"]]["objects"]} for r in des]
    c = chair(mentions, gt)
    out.update(chair_i=c["chair_i"], recall=c["recall"],
               buddies=sum(s in absent_buddies(by_image[r["image"]]) for r, m in zip(des, mentions) for s in m))
    return out


def gold_example(rng, scene, train, order):
    """(user prompt, answer): a gold description naming objects in `order`, or a true existence answer."""
    if train == "exist":
        q = answerable_question(rng, scene, "exist")
        return q + GEN_SUFFIX, oracle_answer(scene, q)
    return rng.choice(DESCRIBE_PROMPTS) + DES_SUFFIX, describe(scene, order)


def train_gold(model, tok, image_cfg, scenes, steps, batch, lr, seed, order="reading", train="des"):
    """LoRA on the language model, `steps` AdamW steps of answer NLL on gold descriptions of `scenes`, naming objects
    in `order` (the one θ0 was taught: its meta.json's mix); or, with train="exist", on true existence answers."""
    torch.manual_seed(seeds.derive(seed, "carryover-lora"))
    apply_lora(model, LLAMA_TARGETS, r=16, alpha=32.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rng = seeds.rng(seed, "carryover-order")
    cfg = model.config
    model.train()
    for step in range(steps):
        chosen = [rng.choice(scenes) for _ in range(batch)]
        examples = [build_example(tok, *gold_example(rng, sc, train, order), cfg.n_image_tokens,
                                  cfg.image_token_index) for sc in chosen]
        b = collate(examples, tok.pad_token_id)
        pixels = torch.stack([preprocess(render(sc), image_cfg) for sc in chosen])
        loss = answer_loss(model, b, pixel_values=pixels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:03d}/{steps} | loss {loss.item():.4f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sena/world/theta0", help="θ0 directory")
    p.add_argument("--steps", type=int, default=200, help="LoRA steps on gold examples")
    p.add_argument("--batch", type=int, default=16, help="examples per step")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (a SENA round's)")
    p.add_argument("--scenes", choices=["all", "buddy"], default="all", help="training scenes: any, or only those "
                   "with an absent buddy of a present shape")
    p.add_argument("--train", choices=["des", "exist"], default="des", help="train on gold descriptions, or on "
                   "true existence answers (the positive control)")
    p.add_argument("--cooc", type=float, default=None, help="co-occurrence rate of the training scenes (default: "
                   "the world's, sena.world.scenes.COOC)")
    p.add_argument("--n-probe", type=int, default=400, help="held-out scenes probed before and after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    t0 = time.time()
    model, tok, image_cfg = load_pretrained(args.model, need_tokenizer=True)
    pool = sample_scenes(20000, args.seed, "carryover", **({} if args.cooc is None else {"cooc": args.cooc}))
    train = [sc for sc in pool if args.scenes == "all" or absent_buddies(sc)]
    with tempfile.TemporaryDirectory() as tmp:
        probe_scenes = write_split(os.path.join(tmp, "probe"), args.n_probe, args.seed, "carryover-probe",
                                   os.path.join(tmp, "probe.jsonl"))
        before = probe(model, tok, image_cfg, probe_scenes, os.path.join(tmp, "probe"))
        order = recipe_part(read_meta(args.model), "mix")["des_order"]
        train_gold(model, tok, image_cfg, train, args.steps, args.batch, args.lr, args.seed, order, args.train)
        after = probe(model, tok, image_cfg, probe_scenes, os.path.join(tmp, "probe"))
    print(f"{'':20}{'before':>10}{'after':>10}")
    for k in before:
        print(f"{k:20}{before[k]:>10.4f}{after[k]:>10.4f}")
    print(f"{time.time() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "before": before, "after": after}, f, indent=2)


if __name__ == "__main__":
    main()
