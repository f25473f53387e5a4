"""The embedded world: determinism, co-occurrence, tokenizer round trip, oracle answers, the θ0 builder."""

import io
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

from sena import prompts as P
from sena.chat import encode_prompt
from sena.world import (
    BUDDIES,
    COOC,
    SHAPES,
    absent_buddies,
    buddy_rate,
    describe,
    mentioned_shapes,
    oracle_answer,
    precise_answer,
    question_type,
    render,
    sample_scenes,
)
from sena.world.language import where
from sena.world.tasks import KINDS, Noise, make_example, sample_examples
from sena.world.tokenizer import build_tokenizer, save_tokenizer, world_texts


def _obj(shape, color, size, row, col):
    pos = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
    return {"shape": shape, "color": color, "size": size, "pos": pos[3 * row + col], "row": row, "col": col}


# A hand-made scene: red circle top left, large blue star in the center, small green square bottom right.
SCENE = {"id": "hand", "image": "hand.png", "background": "plain", "bg_color": [128, 128, 128], "seed": 7,
         "objects": [_obj("circle", "red", "small", 0, 0), _obj("star", "blue", "large", 1, 1),
                     _obj("square", "green", "small", 2, 2)]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(build_tokenizer(), str(d))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def test_same_seed_same_scenes_and_png_bytes():
    a, b = sample_scenes(12, seed=3), sample_scenes(12, seed=3)
    assert a == b and a != sample_scenes(12, seed=4)
    for sa, sb in zip(a, b):
        pa, pb = io.BytesIO(), io.BytesIO()
        render(sa).save(pa, format="PNG")
        render(sb).save(pb, format="PNG")
        assert pa.getvalue() == pb.getvalue()
    assert render(a[0]).size == (72, 72) and render(a[0]).mode == "RGB"


def test_scene_invariants():
    for sc in sample_scenes(500, seed=1):
        shapes = [o["shape"] for o in sc["objects"]]
        cells = [(o["row"], o["col"]) for o in sc["objects"]]
        assert 1 <= len(shapes) <= 4 and len(set(shapes)) == len(shapes) and len(set(cells)) == len(cells)
        assert cells == sorted(cells)  # reading order


@pytest.mark.parametrize("cooc", [COOC, 0.3])
def test_cooccurrence_rate_near_knob(cooc):
    # n=3 scenes hold at most one pair (rate 2/3), so 0.75 lands near 0.72; 0.3 is reachable exactly.
    rate = buddy_rate(sample_scenes(4000, seed=0, cooc=cooc))
    assert abs(rate - cooc) < 0.05, rate


def test_tokenizer_round_trip_and_autotokenizer(tok):
    rng = random.Random(0)
    texts = world_texts()
    for sc in sample_scenes(40, seed=9):
        for _, user, answer in sample_examples(rng, sc, 10, Noise()):
            texts += [user, answer]
    for t in texts:
        ids = tok(t, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids, t
        if "<image>" not in t:  # the image placeholder is a special token, dropped by skip_special_tokens
            assert tok.decode(ids, skip_special_tokens=True) == t.lstrip(" ")
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token] == ["<s>", "</s>", "<pad>", "<unk>"]
    img = tok.convert_tokens_to_ids("<image>")
    ids = encode_prompt(tok, texts[-2], 36, img)
    assert ids.count(img) == 36 and tok.unk_token_id not in ids and ids[0] == tok.bos_token_id
    assert tok.decode(tok("Yes, there is a small red star.").input_ids[1:]) == "Yes, there is a small red star."


def test_oracle_answers_on_hand_scene():
    cases = {
        "Is there a star in the image?": "Yes", "Is there a moon in the image?": "No",
        "Is there a blue star in the image?": "Yes", "Is there a red star in the image?": "No",
        "Is the circle to the left of the star?": "Yes", "Is the square above the star?": "No",
        "Is the star below the circle?": "Yes", "Is the circle to the right of the square?": "No",
        "Is the moon above the star?": None, "What color is the square?": "green", "What color is the moon?": None,
        "What shape is at the center?": "star", "What shape is at the top right?": None,
        "How many objects are there?": "three", "Where is the green square?": "bottom right",
        "Where is the red square?": None, "Where is the red circle? " + P.GEN_SUFFIX.strip(): "top left",
    }
    for q, want in cases.items():
        assert oracle_answer(SCENE, q) == want, q
    assert question_type("Is the circle above the star?") == "relation"
    assert question_type("What is the meaning of life?") is None and oracle_answer(SCENE, "Why?") is None
    assert describe(SCENE) == ("There is a small red circle at the top left, a large blue star in the center and "
                               "a small green square at the bottom right.")
    assert precise_answer(SCENE, "Is there a star in the image?") == "Yes, there is a large blue star in the center."
    assert precise_answer(SCENE, "Is there a red star in the image?") == "No, the star is blue."
    assert precise_answer(SCENE, "How many objects are there?") == "There are three objects."


def test_mentioned_shapes():
    assert mentioned_shapes("There is a small red circle and two large Squares.") == ["circle", "square"]
    assert mentioned_shapes("A crescent, a moon, and a rhombus; stars at the start.") == ["moon", "diamond", "star"]
    assert mentioned_shapes("Nothing here across the board.") == []


def test_task_mix_formats_and_noise_knobs():
    rng = random.Random(1)
    scenes = sample_scenes(300, seed=5)
    n_short = 0
    for sc in scenes:
        for kind in KINDS:
            user, answer = make_example(rng, sc, kind, Noise())
            if kind == "check":
                q = answer.removeprefix(P.QUESTION_MARKER + " ")
                assert answer.startswith(P.QUESTION_MARKER) and oracle_answer(sc, q) is not None
            if kind == "improve":
                assert answer.startswith(P.IMPROVED_MARKER)
                improved = answer.removeprefix(P.IMPROVED_MARKER + " ")
                q = user.split("Question: ")[1].split(" Current answer: ")[0]
                # Concise: a short-answer prompt (question + GEN_SUFFIX) is improved to the oracle's word or phrase.
                if q.endswith(P.GEN_SUFFIX) and oracle_answer(sc, q) is not None:
                    assert improved == oracle_answer(sc, q), (q, improved)
                    n_short += 1
            if kind == "ask":
                assert question_type(answer) is not None
    assert n_short > 100  # the concise branch ran
    # Existence questions about an absent buddy: always "Yes" at rate 1, never at rate 0.
    lone = [sc for sc in scenes if len(sc["objects"]) == 1]
    for rates, want in (((1.0, 1.0), "Yes"), ((0.0, 0.0), "No")):
        noise = Noise(exist_hal=rates, mix=(0, 1, 0, 0, 0))
        from sena.world.tasks import short_answer

        for sc in lone:
            q = f"Is there a {BUDDIES[sc['objects'][0]['shape']]} in the image?"
            assert short_answer(rng, sc, q, noise) == want
    # Descriptions name an absent buddy at rate 1, right after its partner and with its size, and never at rate 0.
    from sena.world.tasks import noisy_description

    for sc in lone:
        o = sc["objects"][0]
        buddy = BUDDIES[o["shape"]]
        text = noisy_description(rng, sc, Noise(desc_hal=(1.0, 1.0)))
        assert mentioned_shapes(text) == [o["shape"], buddy]
        assert f"{o['shape']} {where(o['pos'])} and a {o['size']} " in text
        same = noisy_description(rng, sc, Noise(desc_hal=(1.0, 1.0), phantom_color="partner"))
        assert f"{o['shape']} {where(o['pos'])} and a {o['size']} {o['color']} {buddy} " in same
        assert mentioned_shapes(noisy_description(rng, sc, Noise(desc_hal=(0.0, 0.0)))) == [sc["objects"][0]["shape"]]
    for sc in scenes:  # in longer lists too: the phantom follows its partner, the real objects keep their order
        if len(sc["objects"]) > 1 and absent_buddies(sc):
            named = mentioned_shapes(noisy_description(rng, sc, Noise(desc_hal=(1.0, 1.0))))
            (extra,) = [s for s in named if s in absent_buddies(sc)]
            assert named.index(extra) == named.index(BUDDIES[extra]) + 1
            assert [s for s in named if s != extra] == [o["shape"] for o in sc["objects"]]


def test_write_split_pool_holds_only_images(tmp_path):
    from sena.world import load_scenes, write_split

    scenes = write_split(tmp_path / "pool", 5, seed=1, prefix="pool", labels_path=tmp_path / "pool_labels.jsonl")
    assert sorted(os.listdir(tmp_path / "pool")) == sorted(s["image"] for s in scenes)
    assert all(n.endswith(".png") for n in os.listdir(tmp_path / "pool"))
    assert load_scenes(tmp_path / "pool_labels.jsonl") == json.loads(json.dumps(scenes))
    with pytest.raises(ValueError):
        write_split(tmp_path / "pool", 2, seed=1, prefix="x", labels_path=tmp_path / "pool" / "labels.jsonl")


TINY = dict(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2,
            text_kv_heads=1, text_intermediate=64)


def test_build_theta0_deterministic_cached_and_loads_in_transformers(tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from sena.model import load_pretrained
    from sena.world import build_theta0

    kw = dict(seed=3, threads=1, log_every=0, model_over=TINY, steps=3, n_images=12, per_image=2, batch_size=4,
              vision_steps=2, align_steps=2, vision_batch=4, reading=(("color+exist", 1),))
    a = build_theta0(str(tmp_path / "a"), **kw)
    b = build_theta0(str(tmp_path / "b"), **kw)
    meta_a, meta_b = (json.loads(Path(p, "meta.json").read_text()) for p in (a, b))
    assert meta_a["weights_sha256"] == meta_b["weights_sha256"]
    with open(os.path.join(a, "model.safetensors"), "rb") as fa, open(os.path.join(b, "model.safetensors"), "rb") as fb:
        assert fa.read() == fb.read()
    capsys.readouterr()
    assert build_theta0(str(tmp_path / "a"), **kw) == a and "reusing" in capsys.readouterr().out
    # A cached θ0 of another seed or recipe is refused, naming the file and what differs (never reused silently).
    for over, says in ((dict(seed=4), "seed 3 (asked 4)"), (dict(steps=5), "train.steps 3 (asked 5)"),
                       (dict(model_over=TINY | dict(text_layers=2)), "model.text_layers 1 (asked 2)")):
        with pytest.raises(ValueError, match=re.escape(says)) as e:
            build_theta0(str(tmp_path / "a"), **(kw | over))
        assert os.path.join(a, "meta.json") in str(e.value)
    ours, tok, _ = load_pretrained(a)
    hf = LlavaForConditionalGeneration.from_pretrained(a).eval()
    ids = torch.tensor([encode_prompt(tok, "Describe the image concisely.", ours.config.n_image_tokens,
                                      ours.config.image_token_index)])
    pv = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids, pixel_values=pv).logits, ours(ids, pixel_values=pv), atol=1e-5)
    assert "<image>" in tok.get_vocab() and len(tok) == ours.config.text.vocab_size
    assert SHAPES  # the world constants are importable beside the builder


def test_reading_warmup_runs_one_type_after_another_then_the_mix(tok):
    from sena.world.build import TRAIN, plan_rows

    tr = TRAIN | dict(steps=9, batch_size=3, per_image=2, reading=(("color", 1), ("exist", 3, 2), ("shape", 2)))
    scenes = sample_scenes(10, seed=2)
    n_tok, img_id = 9, tok.convert_tokens_to_ids("<image>")
    rows, owner, batches, phase, first_layer = plan_rows(random.Random(0), scenes, tok, tr, Noise(), n_tok, img_id)
    assert phase == ["color"] * 1 + ["exist"] * 3 + ["shape"] * 2 + ["mix"] * 3
    assert first_layer == [0, 2, 2, 2, 0, 0, 0, 0, 0]
    assert sorted(i for b in batches for i in b) == list(range(27)) and all(len(b) == 3 for b in batches)
    assert owner == [i % len(scenes) for i in range(27)]
    for step, b in enumerate(batches[:6]):  # every warm-up example asks its phase's question type
        for i in b:
            for ids, _ in rows[i]:
                prompt = tok.decode(ids[ids.index(img_id) + n_tok:][:12]).strip()
                assert question_type(prompt) == phase[step], (step, prompt)


def test_shared_prefix_packing_equals_unpacked_loss_and_grads():
    from sena.chat import build_example, collate
    from sena.model import Llava
    from sena.world.build import answer_loss, model_config, pack_rows

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Llava(model_config(tok, **TINY)).double()
    n_tok, img = model.config.n_image_tokens, model.config.image_token_index
    rng = random.Random(2)
    rows = [[build_example(tok, u, a, n_tok, img) for _, u, a in sample_examples(rng, sc, 3, Noise())]
            for sc in sample_scenes(2, seed=4)]
    pv = torch.randn(2, 3, 72, 72, dtype=torch.float64)
    packed = pack_rows(rows, rows[0][0][0].index(img) + n_tok, tok.pad_token_id)
    flat = collate([e for row in rows for e in row], tok.pad_token_id)
    flat["example"] = flat["attention_mask"]  # one example per row
    assert packed["input_ids"].numel() < flat["input_ids"].numel()  # the prefix is stored once per image

    def loss_and_grads(batch, pixel_values):
        model.zero_grad()
        loss = answer_loss(model, batch, pixel_values)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    lp, gp = loss_and_grads(packed, pv)
    lf, gf = loss_and_grads(flat, pv.repeat_interleave(3, dim=0))
    assert torch.allclose(lp, lf, rtol=1e-10) and len(gp) == len(gf)
    # RMSNorm rounds through float32 internally, so float64 grads agree to ~1e-8 of each tensor's scale, not 1e-15.
    assert all(float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()) + 1e-15 for a, b in zip(gp, gf))


def test_theta0_sees_the_pixels_sena_sees(tmp_path):
    """The build normalizes rendered uint8 images itself (encoder.pixels); SENA and evaluate.py load the saved PNG and
    run sena.image.preprocess. Both must give θ0 the same tensor, or θ0 is evaluated off its training distribution."""
    import numpy as np

    from sena.image import default_image_cfg, load_image, preprocess
    from sena.world.encoder import pixels
    from sena.world.render import IMAGE_SIZE

    cfg = default_image_cfg(IMAGE_SIZE)
    scenes = sample_scenes(3, seed=11)
    ours = pixels(torch.from_numpy(np.stack([np.asarray(render(sc)) for sc in scenes])).permute(0, 3, 1, 2), cfg)
    for n, sc in enumerate(scenes):
        path = str(tmp_path / sc["image"])
        render(sc).save(path)
        assert torch.allclose(preprocess(load_image(path), cfg), ours[n], atol=1e-6)


def test_free_bag_directions_are_orthogonal_to_the_cell_words():
    from sena.world.encoder import free_directions

    words = torch.randn(30, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    d = free_directions(words, 8)
    assert d.shape == (8, 64)
    assert (d @ words.T).abs().max() < 1e-6 * (d.norm() * words.norm())  # orthogonal to every word row
    assert torch.allclose(d.norm(dim=1), words.norm(dim=1).mean().expand(8), rtol=1e-5)
    assert torch.equal(d, free_directions(words, 8))  # fixed by its seed
    assert torch.linalg.matrix_rank(d.double()) == 8  # one distinct direction per shape


def test_align_targets_write_cell_words_and_the_bag_where_asked(tok):
    """Stage 1b's targets on the hand scene, by hand: a cell's token = scale x the sum of its words' embeddings; the
    bag (scale x bag x the present shapes' embeddings) goes into every token, or into the CLS token alone."""
    from sena.world.encoder import align_targets

    embed = torch.randn(len(tok), 16, generator=torch.Generator().manual_seed(0))
    E = lambda *ws: embed[[tok.convert_tokens_to_ids("▁" + w) for w in ws]].sum(0)  # noqa: E731
    bag = 0.5 * 2.0 * E("circle", "star", "square")
    cells = {0: E("small", "red", "circle", "top", "left"), 4: E("large", "blue", "star", "center"),
             8: E("small", "green", "square", "bottom", "right"), 1: E("nothing", "top")}
    everywhere = align_targets([SCENE], embed, tok, 9, 0, 2.0, 0.5, "words", "all")[0]  # (9, 16)
    cls = align_targets([SCENE], embed, tok, 10, 1, 2.0, 0.5, "words", "cls")[0]  # (10, 16)
    for p, want in cells.items():
        assert torch.allclose(everywhere[p], 2.0 * want + bag, atol=1e-5)
        assert torch.allclose(cls[1 + p], 2.0 * want, atol=1e-5)  # no bag in the cells
    assert torch.allclose(cls[0], bag, atol=1e-5)  # CLS: the bag alone
    with pytest.raises(ValueError, match="full"):
        align_targets([SCENE], embed, tok, 9, 0, 2.0, 0.5, "words", "cls")


def test_memo_tokenizer_gives_the_tokenizers_ids_and_fresh_lists(tok):
    from sena.chat import build_example
    from sena.world.build import MemoTokenizer

    memo = MemoTokenizer(tok)
    for user, answer in [("What color is the star?", "red"), ("Describe the image.", describe(SCENE))] * 2:
        assert build_example(memo, user, answer, 9, 5) == build_example(tok, user, answer, 9, 5)
    ids = memo("a red star").input_ids
    ids.append(-1)  # a caller extending its list must not change the cache
    assert memo("a red star").input_ids == tok("a red star", add_special_tokens=False).input_ids
    assert len(memo.cache) == 6  # system line, 2 prompt tails, 2 answers, "a red star": the repeats were hits


def test_stage1_noise_batch_by_hand():
    """--vision-noise: the noised share is x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε with ᾱ_600 = 0.539118 (sena/noise.py),
    the rest is left exactly as it was, and share 0 changes nothing."""
    from sena.world.encoder import noise_batch

    x = torch.randn(64, 3, 8, 8)
    assert torch.equal(noise_batch(x, (0.0, 600, 601), torch.Generator().manual_seed(5)), x)
    g = torch.Generator().manual_seed(5)
    torch.randint(600, 601, (64,), generator=g)  # the draws noise_batch makes, in its order: t, then ε
    eps = torch.randn(x.shape, generator=g)
    want = 0.539118 ** 0.5 * x + (1 - 0.539118) ** 0.5 * eps
    torch.testing.assert_close(noise_batch(x, (1.0, 600, 601), torch.Generator().manual_seed(5)), want,
                               atol=1e-5, rtol=0)
    half = noise_batch(x, (0.5, 600, 601), torch.Generator().manual_seed(5))
    same = (half == x).flatten(1).all(1)
    assert 16 < same.sum() < 48  # about half of the 64 images noised
    torch.testing.assert_close(half[~same], want[~same], atol=1e-5, rtol=0)


def test_degraded_positive_control_rows_features_and_recipe(tok, tmp_path):
    """TRAIN["degraded"]: the noised copies' mix rows draw with the degraded noise (here: every description names each
    absent buddy of a present shape), the clean rows with the clean one (never); their features are the tower's on
    SENA's forward diffusion of the same images, seeded; and a build with it runs, records it and is refused as the
    default recipe."""
    import train
    from sena.image import default_image_cfg
    from sena.model import Llava
    from sena.world import build_theta0, recipe_args
    from sena.world.build import TRAIN, degraded_features, model_config, plan_rows
    from sena.world.build import main as build_main
    from sena.world.encoder import pixels, tower_features

    des_only = dict(mix=(1.0, 0, 0, 0, 0))
    clean, degraded = Noise(desc_hal=(0.0, 0.0), **des_only), Noise(desc_hal=(1.0, 1.0), **des_only)
    scenes = [sc for sc in sample_scenes(200, seed=5) if absent_buddies(sc)][:6]
    plan = scenes + [dict(sc, degraded=True) for sc in scenes]
    tr = TRAIN | dict(steps=6, batch_size=4, per_image=2, reading=())
    n_tok, img_id = 9, tok.convert_tokens_to_ids("<image>")
    rows, owner, _, _, _ = plan_rows(random.Random(0), plan, tok, tr, clean, n_tok, img_id, degraded)
    named = {False: 0, True: 0}
    for row, o in zip(rows, owner):
        present = {ob["shape"] for ob in plan[o]["objects"]}
        for ids, labels in row:
            answer = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
            named[o >= len(scenes)] += len(set(mentioned_shapes(answer)) - present)
    assert named[False] == 0 and named[True] > 0, named

    model = Llava(model_config(tok, **TINY)).eval()
    images = torch.randint(0, 256, (3, 3, 72, 72), dtype=torch.uint8)
    cfg = default_image_cfg(72)
    f1 = degraded_features(model, images, cfg, 600, 601, random.Random(1))
    f2 = degraded_features(model, images, cfg, 600, 601, random.Random(1))
    assert torch.equal(f1, f2) and f1.shape == tower_features(model, images, cfg).shape
    r = random.Random(1)  # by hand, in degraded_features' order of draws: generator seed, t, then ε
    gen = torch.Generator().manual_seed(r.randrange(2**31))
    torch.randint(600, 601, (3,), generator=gen)
    x = pixels(images, cfg)
    x_t = 0.539118 ** 0.5 * x + (1 - 0.539118) ** 0.5 * torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        want = model.vision_hidden(x_t)[:, model.config.first_image_feature:]
    torch.testing.assert_close(f1, want, atol=1e-4, rtol=0)

    over = train.theta0_recipe(train.parse_args(["--theta0-degraded", "0.5", "300", "900", "1.0"]))
    assert over == recipe_args(None, None, [0.5, 300, 900, 1.0]) == {"degraded": (0.5, 300, 900, 1.0)}
    assert train.theta0_recipe(train.parse_args([])) == {}
    flags = ["--theta0-steps", "3000", "--theta0-vision-noise", "0.5", "0", "1000"]
    assert train.theta0_recipe(train.parse_args(flags)) == {"steps": 3000, "vision_noise": (0.5, 0, 1000)}
    kw = dict(seed=3, threads=1, log_every=0, model_over=TINY, steps=3, n_images=12, per_image=2, batch_size=4,
              vision_steps=2, align_steps=2, vision_batch=4, reading=(("color+exist", 1),))
    path = build_theta0(str(tmp_path / "d"), **kw, **over)
    assert json.loads(Path(path, "meta.json").read_text())["train"]["degraded"] == [0.5, 300, 900, 1.0]
    assert build_theta0(str(tmp_path / "d"), **kw, **over) == path  # the same recipe reuses it
    with pytest.raises(ValueError, match=re.escape("train.degraded [0.5, 300, 900, 1.0] (asked None)")):
        build_theta0(str(tmp_path / "d"), **kw)
    # train.py says so in one line and exits (no traceback), before touching anything
    with pytest.raises(SystemExit, match=re.escape("train.degraded [0.5, 300, 900, 1.0] (asked None)")):
        train.main(["--run-dir", str(tmp_path / "d"), "--seed", "3"])
    with pytest.raises(SystemExit, match=re.escape("train.degraded [0.5, 300, 900, 1.0] (asked None)")):
        build_main(["--out", str(tmp_path / "d"), "--seed", "3"])
