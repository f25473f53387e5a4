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
    COOC,
    SHAPES,
    buddy_rate,
    describe,
    mentioned_shapes,
    oracle_answer,
    precise_answer,
    question_type,
    render,
    sample_scenes,
)
from sena.world.tasks import KINDS, Mix, make_example, sample_examples
from sena.world.tokenizer import build_tokenizer, save_tokenizer, world_texts


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


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
        for _, user, answer in sample_examples(rng, sc, 10, Mix()):
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


def test_next_to_and_the_questions_a_scene_invites():
    """"What is next to the X?" names the one object in a cell sharing a side with X's (None without exactly one);
    θ0's ask data follows the scene: its mode is the scene's own type about its salient object."""
    from sena.world.tasks import ask_question

    scene = SCENE | {"objects": [_obj("circle", "red", "small", 0, 0), _obj("square", "blue", "large", 0, 1),
                                 _obj("star", "green", "small", 1, 2)]}
    for sc in (SCENE, scene):
        for o in sc["objects"]:
            o["faint"] = False
    assert oracle_answer(scene, "What is next to the circle?") == "square"
    assert oracle_answer(scene, "What is next to the square?") == "circle"
    assert oracle_answer(scene, "What is next to the star?") is None  # no neighbour
    assert oracle_answer(scene, "What is next to the moon?") is None  # absent
    assert oracle_answer(SCENE, "What is next to the star?") is None
    assert precise_answer(scene, "What is next to the circle?") == "Next to the circle there is a large blue square at the top."
    assert question_type("What is next to the heart?") == "next_to"
    rng = random.Random(0)
    asked = [ask_question(rng, scene, Mix()) for _ in range(2000)]
    # Three objects: "what is next to" the salient (large, clear) square, else where it is; any type sometimes.
    top = max(set(asked), key=asked.count)
    assert top == "What is next to the square?" and 0.45 < asked.count(top) / len(asked) < 0.75, asked.count(top)
    assert len({question_type(q) for q in asked}) >= 5
    lone = SCENE | {"objects": [_obj("moon", "red", "small", 2, 0) | {"faint": True}]}
    asked = [ask_question(rng, lone, Mix()) for _ in range(500)]
    assert max(set(asked), key=asked.count) == "What shape is at the bottom left?"


def test_mentioned_shapes():
    assert mentioned_shapes("There is a small red circle and two large Squares.") == ["circle", "square"]
    assert mentioned_shapes("A crescent, a moon, and a rhombus; stars at the start.") == ["moon", "diamond", "star"]
    assert mentioned_shapes("Nothing here across the board.") == []


def test_task_mix_labels_are_true():
    """Every label of θ0's mix is true: descriptions are the gold ones, short answers the oracle's, the self-check keeps
    an answerable question and replaces a false-premise one with an answerable one, and no example answers a question
    the image does not answer. Improve targets are gold; their current answers carry only generic errors."""
    rng = random.Random(1)
    counts = dict.fromkeys(("short_improve", "corrupted", "false_premise"), 0)
    for sc in sample_scenes(300, seed=5):
        for kind in KINDS:
            user, answer = make_example(rng, sc, kind, Mix())
            if kind == "des":
                assert answer == describe(sc)
            if kind == "gen":
                q = user.removesuffix(P.GEN_SUFFIX)
                assert oracle_answer(sc, q) is not None and answer == oracle_answer(sc, q), (q, answer)
            if kind == "ask":
                assert oracle_answer(sc, answer) is not None, answer
            if kind == "check":
                asked = user.split("Here is a question: ")[1].split(" If this question")[0]
                new = answer.removeprefix(P.QUESTION_MARKER + " ")
                assert answer.startswith(P.QUESTION_MARKER) and oracle_answer(sc, new) is not None
                if oracle_answer(sc, asked) is None:
                    counts["false_premise"] += 1
                else:
                    assert new == asked
            if kind == "improve":
                improved = answer.removeprefix(P.IMPROVED_MARKER + " ")
                q = user.split("Question: ")[1].split(" Current answer: ")[0]
                cur = user.split("Current answer: ")[1].split(" Using the image")[0]
                if q.endswith(P.GEN_SUFFIX):  # concise: the oracle's word or phrase
                    assert improved == oracle_answer(sc, q) is not None, (q, improved)
                    counts["short_improve"] += 1
                elif q.removesuffix(P.DES_SUFFIX) in P.DESCRIBE_PROMPTS:
                    assert improved == describe(sc)
                else:
                    assert improved == precise_answer(sc, q)
                counts["corrupted"] += cur != improved
    assert counts["short_improve"] > 30 and counts["corrupted"] > 30 and counts["false_premise"] > 30, counts


def test_existence_phase_and_the_stage2_schedule(tok):
    """Stage 2's phases: the mix under warmup + cosine, then existence questions only (answered truly, half of them
    about absent shapes) at a constant rate, then the mix again at its own constant rate; no window spans two
    phases, and the windows cover every step once."""
    from sena.world.build import TRAIN
    from sena.world.data import WINDOW, MixWindows, total_steps, windows
    from sena.world.stage2 import stage2_lr

    rng = random.Random(3)
    scenes = sample_scenes(200, seed=5)
    exs = [e for sc in scenes for e in sample_examples(rng, sc, 4, Mix(), focus=1.0)]
    assert exs and all(k == "gen" and question_type(u) == "exist" for k, u, _ in exs)
    assert 0.4 < sum(a == "No" for *_, a in exs) / len(exs) < 0.6

    tr = TRAIN | dict(steps=2 * WINDOW + 3, exist_steps=WINDOW + 5, settle_steps=7, warmup=4, batch_size=8)
    n = tr["steps"] + tr["exist_steps"] + tr["settle_steps"]
    assert total_steps(tr) == n and sum(k for _, k in windows(tr)) == n
    assert [p for p, _ in windows(tr)] == ["mix"] * 3 + ["exist"] * 2 + ["settle"]
    assert [k for _, k in windows(tr)] == [WINDOW, WINDOW, 3, WINDOW, 5, 7]
    lr = [stage2_lr(s, tr) for s in range(n)]
    mix = lr[: tr["steps"]]
    assert mix[0] == tr["lr"] / 4 and mix[3] == tr["lr"] and all(a > b for a, b in zip(mix[4:], mix[5:]))
    assert tr["lr"] * tr["lr_floor"] < mix[-1] < 1.05 * tr["lr"] * tr["lr_floor"]  # cosine to the floor
    assert set(lr[tr["steps"]: tr["steps"] + tr["exist_steps"]]) == {tr["exist_lr"]}
    assert set(lr[tr["steps"] + tr["exist_steps"]:]) == {tr["settle_lr"]}
    with pytest.raises(ValueError):
        stage2_lr(n, tr)

    def exist_share(w):
        batches = data[w]
        assert len(batches) == windows(tr)[w][1]
        ids = [x for b in batches for row in b["input_ids"].tolist() for x in row]
        return tok.decode(ids).count("Is there a") / sum(int(b["example"].max(1).values.sum()) for b in batches)

    data = MixWindows(scenes, tok, tr, Mix(), 10, tok.convert_tokens_to_ids("<image>"), 0)
    assert len(data) == 6
    assert exist_share(3) == exist_share(4) == 1.0 and exist_share(0) < 0.3 and exist_share(5) < 0.3


def test_descriptions_by_kind_name_every_object_once_with_buddies_side_by_side(tmp_path):
    """describe(order="kind") names the same object phrases as reading order, sorted by shape in SHAPES' order (so a
    buddy follows its partner); θ0's mix, self-enhancement targets and corruptions follow Mix.des_order; an unknown
    order is refused; a meta.json written before des_order existed stands for reading order and no other."""
    from sena.world.tasks import corrupt_description
    from sena.world.theta0 import RecipeError, check_recipe

    assert describe(SCENE, "kind") == ("There is a small red circle at the top left, a small green square at the "
                                       "bottom right and a large blue star in the center.")
    with pytest.raises(ValueError, match="order 'shuffled'"):
        describe(SCENE, "shuffled")
    phrases = lambda text: sorted(re.split(r", | and ", text.removeprefix("There is ").removesuffix(".")))  # noqa
    rng, mix = random.Random(4), Mix(des_order="kind")
    for sc in sample_scenes(200, seed=8):
        text = describe(sc, "kind")
        assert phrases(text) == phrases(describe(sc))
        named = mentioned_shapes(text)
        assert named == sorted(named, key=SHAPES.index) and len(named) == len(sc["objects"])
        assert make_example(rng, sc, "des", mix)[1] == text
        wrong = corrupt_description(rng, sc, "kind")
        assert wrong != text and mentioned_shapes(wrong) == sorted(mentioned_shapes(wrong), key=SHAPES.index)
        user, answer = make_example(rng, sc, "improve", mix)
        if user.split("Question: ")[1].split(" Current answer: ")[0].removesuffix(P.DES_SUFFIX) in P.DESCRIBE_PROMPTS:
            assert answer == f"{P.IMPROVED_MARKER} {text}"
    recipe = {"seed": 0, "train": {}, "model": {}, "mix": {"des_order": "reading"}, "questions": {}}
    (tmp_path / "meta.json").write_text(json.dumps({"seed": 0, "mix": {}, "files_sha256": {}}))
    check_recipe(str(tmp_path), recipe)
    with pytest.raises(RecipeError, match="mix.des_order reading \\(asked kind\\)"):
        check_recipe(str(tmp_path), recipe | {"mix": {"des_order": "kind"}})


def test_corrupted_descriptions_have_one_generic_error():
    """Self-enhancement learns to repair a wrong colour, shape or place, a dropped object or an inserted one; the
    inserted shape is drawn uniformly from the absent ones, so buddies are not favoured."""
    from sena.world.evaluation import description_errors
    from sena.world.tasks import corrupt_description

    rng = random.Random(3)
    inserted = {"buddy": 0, "other": 0}
    for sc in sample_scenes(400, seed=6):
        text = corrupt_description(rng, sc)
        errs = description_errors(text, sc)
        n = sum(len(v) for v in errs.values())
        assert text != describe(sc) and 1 <= n <= 2, (text, errs)  # a wrong shape is a phantom plus an omission
        for kind in inserted:
            inserted[kind] += len(errs[kind])
    assert inserted["buddy"] > 0 and inserted["other"] > 2 * inserted["buddy"], inserted


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
TINY_TRAIN = dict(steps=5, n_scenes=40, per_image=2, batch_size=4, vision_steps=3, vision_batch=4, warmup=2)


def test_build_theta0_deterministic_cached_and_loads_in_transformers(tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from sena.checkpoint import load_pretrained
    from sena.world import build_theta0
    from sena.world.theta0 import weights_hash

    kw = dict(seed=3, threads=1, log_every=0, model_over=TINY, evaluate=False, **TINY_TRAIN)
    a = build_theta0(str(tmp_path / "a"), **kw)
    b = build_theta0(str(tmp_path / "b"), **kw)
    meta_a, meta_b = (read_json(p, "meta.json") for p in (a, b))
    assert meta_a["weights_sha256"] == meta_b["weights_sha256"]
    with open(os.path.join(a, "model.safetensors"), "rb") as fa, open(os.path.join(b, "model.safetensors"), "rb") as fb:
        assert fa.read() == fb.read()
    c = build_theta0(str(tmp_path / "c"), **(kw | dict(seed=4)))
    assert read_json(c, "meta.json")["weights_sha256"] != meta_a["weights_sha256"]
    capsys.readouterr()
    assert build_theta0(str(tmp_path / "a"), **kw) == a and "reusing" in capsys.readouterr().out
    # A cached θ0 of another seed or recipe is refused, naming the file and what differs (never reused silently).
    for over, says in ((dict(seed=4), "seed 3 (asked 4)"), (dict(steps=6), "train.steps 5 (asked 6)"),
                       (dict(model_over=TINY | dict(text_layers=2)), "model.text_layers 1 (asked 2)")):
        with pytest.raises(ValueError, match=re.escape(says)) as e:
            build_theta0(str(tmp_path / "a"), **(kw | over))
        assert os.path.join(a, "meta.json") in str(e.value)
    ours, tok, _ = load_pretrained(a)
    assert weights_hash(ours) == meta_a["weights_sha256"]  # what meta.json says is what loads
    assert sorted(meta_a["files_sha256"]) == sorted(f for f in os.listdir(a) if f != "meta.json")
    hf = LlavaForConditionalGeneration.from_pretrained(a).eval()
    ids = torch.tensor([encode_prompt(tok, "Describe the image concisely.", ours.config.n_image_tokens,
                                      ours.config.image_token_index)])
    pv = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids, pixel_values=pv).logits, ours(ids, pixel_values=pv), atol=1e-5)
    assert "<image>" in tok.get_vocab() and len(tok) == ours.config.text.vocab_size


def test_stage2_batches_are_a_function_of_seed_and_step_not_of_workers(tok):
    """MixWindows: the same (seed, window) gives the same batches in any process and with any number of DataLoader
    workers; every step gets batch_size rows of per_image examples; the noised share and its t range hold."""
    from sena.world.build import TRAIN
    from sena.world.data import WINDOW, MixWindows

    tr = TRAIN | dict(steps=2 * WINDOW + 3, exist_steps=0, settle_steps=0, batch_size=4, per_image=3,
                      stage2_noise=(0.3, 1, 1000))
    scenes = sample_scenes(50, seed=2)
    img_id = tok.convert_tokens_to_ids("<image>")
    data = MixWindows(scenes, tok, tr, Mix(), 10, img_id, seed=7)

    def flat(windows):
        return [b for w in windows for b in w]

    inline = flat(data[w] for w in range(len(data)))
    assert len(data) == 3 and len(inline) == tr["steps"]
    workers = flat(torch.utils.data.DataLoader(MixWindows(scenes, tok, tr, Mix(), 10, img_id, seed=7),
                                               batch_size=None, num_workers=2))
    assert len(workers) == len(inline)
    for a, b in zip(inline, workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = flat(MixWindows(scenes, tok, tr, Mix(), 10, img_id, seed=8)[w] for w in range(len(data)))
    assert not torch.equal(torch.cat([b["image"] for b in inline]), torch.cat([b["image"] for b in other]))
    t = torch.cat([b["t"] for b in inline])
    assert all(b["input_ids"].shape[0] == 4 and int(b["example"].max()) == 3 for b in inline)
    assert 0.1 < (t > 0).float().mean() < 0.5 and int(t.max()) < 1000 and int(t[t > 0].min()) >= 1
    for b in inline:  # every row holds one image's tokens once, and 3 examples behind it
        assert ((b["input_ids"] == img_id).sum(1) == 10).all()


def test_stage2_features_noise_only_the_rows_marked_noised():
    """stage2_features: a row with t = 0 sees the clean image, bit for bit; a row with t > 0 sees
    x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε (sena.noise.add_diffusion_noise) with ε drawn from the build's generator."""
    import numpy as np

    from sena.image import default_image_cfg
    from sena.model import Llava
    from sena.noise import add_diffusion_noise
    from sena.world.build import model_config
    from sena.world.encoder import pixels
    from sena.world.stage2 import stage2_features

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Llava(model_config(tok, **TINY)).eval()
    cfg = default_image_cfg(72)
    images = torch.from_numpy(np.stack([np.asarray(render(sc)) for sc in sample_scenes(4, seed=1)])).permute(0, 3, 1, 2)
    batch = {"image": torch.tensor([2, 0, 3]), "t": torch.tensor([0, 600, 0])}
    with torch.no_grad():
        got = stage2_features(model, images, batch, cfg, torch.Generator().manual_seed(9), "cpu")
        clean = model.encode_images(pixels(images[[2, 3]], cfg))
        gen = torch.Generator().manual_seed(9)
        x = add_diffusion_noise(pixels(images[[0]], cfg), torch.tensor([600]), generator=gen)
        noised = model.encode_images(x)
    assert torch.equal(got[[0, 2]], clean) and torch.allclose(got[1:2], noised, atol=1e-6)
    assert not torch.allclose(got[1:2], model.encode_images(pixels(images[[0]], cfg)), atol=1e-3)


def test_shared_prefix_packing_equals_unpacked_loss_and_grads():
    from sena.chat import build_example, collate
    from sena.model import Llava
    from sena.world.build import model_config
    from sena.world.data import pack_rows
    from sena.world.stage2 import answer_loss

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Llava(model_config(tok, **TINY)).double()
    n_tok, img = model.config.n_image_tokens, model.config.image_token_index
    rng = random.Random(2)
    rows = [[build_example(tok, u, a, n_tok, img) for _, u, a in sample_examples(rng, sc, 3, Mix())]
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


def test_input_alignment_is_the_cross_entropy_of_features_read_as_words():
    """input_alignment by hand: the projected features times the word embedding matrix are logits over the vocabulary;
    the loss is the mean over the two words (colour, shape) of the cross-entropy at the named tokens. Its gradient
    reaches both the projector's output and the word embeddings."""
    import torch.nn.functional as F

    from sena.model import Llava
    from sena.world.build import cell_words, model_config
    from sena.world.stage2 import input_alignment

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Llava(model_config(tok, **TINY)).double()
    n_tok = model.config.n_image_tokens
    scenes = sample_scenes(3, seed=4)
    words = cell_words(scenes, tok, 3, n_tok)  # (3, 10, 2): colour, shape
    assert words.shape == (3, n_tok, 2) and (words[:, 0] == -100).all()
    assert (words[..., 1] != -100).sum() == sum(len(sc["objects"]) for sc in scenes)
    o = scenes[0]["objects"][0]
    at = 1 + o["row"] * 3 + o["col"]  # CLS first, then the cells in reading order
    assert words[0, at].tolist() == [tok.convert_tokens_to_ids("▁" + o["color"]),
                                     tok.convert_tokens_to_ids("▁" + o["shape"])]
    feats = torch.randn(3, n_tok, model.config.text.hidden_size, dtype=torch.float64, requires_grad=True)
    E = model.model.language_model.embed_tokens.weight
    loss = input_alignment(model, feats, words)
    named = words[..., 0] != -100
    logp = torch.log_softmax(feats[named] @ E.T, dim=-1)  # (n_named, V)
    want = -(logp.gather(1, words[named][:, :1]).mean() + logp.gather(1, words[named][:, 1:]).mean()) / 2
    assert loss > 0 and torch.allclose(loss.double(), want, rtol=1e-5)
    assert torch.allclose(want, (F.cross_entropy(feats[named] @ E.T, words[named][:, 0])
                                 + F.cross_entropy(feats[named] @ E.T, words[named][:, 1])) / 2)
    loss.backward()
    assert feats.grad[~named].abs().sum() == 0 and feats.grad[named].abs().sum() > 0 and E.grad.abs().sum() > 0


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


def test_memo_tokenizer_gives_the_tokenizers_ids_and_fresh_lists(tok):
    from sena.chat import build_example
    from sena.world.data import MemoTokenizer

    memo = MemoTokenizer(tok)
    for user, answer in [("What color is the star?", "red"), ("Describe the image.", describe(SCENE))] * 2:
        assert build_example(memo, user, answer, 9, 5) == build_example(tok, user, answer, 9, 5)
    ids = memo("a red star").input_ids
    ids.append(-1)  # a caller extending its list must not change the cache
    assert memo("a red star").input_ids == tok("a red star", add_special_tokens=False).input_ids
    assert len(memo.cache) == 6  # system line, 2 prompt tails, 2 answers, "a red star": the repeats were hits


def test_stage1_noise_batch_by_hand():
    """Stage 1's noise: the noised share is x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε with ᾱ_600 = 0.539118 (sena/noise.py),
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


@pytest.fixture(scope="module")
def tiny_theta0(tmp_path_factory):
    """Two tiny θ0 builds (seeds 3 and 4): the sources the install tests copy from."""
    from sena.world import build_theta0

    d = tmp_path_factory.mktemp("theta0s")
    kw = dict(threads=1, log_every=0, model_over=TINY, evaluate=False, **TINY_TRAIN)
    return build_theta0(str(d / "s3"), seed=3, **kw), build_theta0(str(d / "s4"), seed=4, **kw)


def test_theta0_install_copies_verifies_and_refuses(tiny_theta0, tmp_path):
    """A run starts from a verified copy of θ0; a corrupt file, a Git LFS pointer or another θ0 already in the run
    directory stops it with one line that names the file (through train.py's command line too)."""
    import shutil

    import train
    from sena.world import Theta0Error, install_theta0

    src, other = tiny_theta0
    dest = install_theta0(str(tmp_path / "run"), src)
    names = sorted(read_json(src, "meta.json")["files_sha256"])
    assert len(names) >= 4 and sorted(n for n in os.listdir(dest) if n != "meta.json") == names
    for n in names + ["meta.json"]:
        assert Path(src, n).read_bytes() == Path(dest, n).read_bytes()
    (tmp_path / "run" / "theta0" / "metrics.json").write_text("{}")  # what a run adds beside θ0 is allowed
    assert install_theta0(str(tmp_path / "run"), src) == dest
    with pytest.raises(Theta0Error, match="holds another θ0"):
        install_theta0(str(tmp_path / "run"), other)
    for name, damage in (("flipped", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
                         ("lfs", lambda b: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")):
        bad = str(tmp_path / name)
        shutil.copytree(src, bad)
        w = os.path.join(bad, "model.safetensors")
        Path(w).write_bytes(damage(Path(w).read_bytes()))
        with pytest.raises(Theta0Error, match=re.escape(w)):
            install_theta0(str(tmp_path / f"run_{name}"), bad)
        assert not os.path.exists(tmp_path / f"run_{name}" / "theta0")  # nothing half-installed
    with pytest.raises(Theta0Error, match=r"model\.safetensors: sha256"):
        train.main(["--theta0", str(tmp_path / "lfs"), "--run-dir", str(tmp_path / "run_cli"), "--no-eval"])
    os.remove(os.path.join(str(tmp_path / "lfs"), "meta.json"))
    with pytest.raises(Theta0Error, match="meta.json is missing"):
        install_theta0(str(tmp_path / "run_cli"), str(tmp_path / "lfs"))


def test_shipped_theta0_matches_its_meta_and_the_recipe():
    """The θ0 the repository ships: every file has the sha256 its meta.json records, the weights that load hash to
    meta's weights_sha256, and meta's recipe and config.json are what `python -m sena.world.build` builds today (a
    recipe change without a rebuild fails here)."""
    from sena.checkpoint import load_pretrained
    from sena.world import SHIPPED_THETA0
    from sena.world.build import MODEL, TRAIN, model_config
    from sena.world.tasks import GEN_WEIGHTS
    from sena.world.theta0 import recipe_part, verify, weights_hash

    meta = verify(SHIPPED_THETA0)
    # The repository ships the seed of 0 and 1 nearer the band's centre on the validation split (docs/world.md).
    assert meta["complete"] and meta["seed"] in (0, 1) and len(meta["files_sha256"]) >= 4
    want = json.loads(json.dumps({"train": TRAIN, "model": MODEL, "mix": vars(Mix()), "questions": GEN_WEIGHTS}))
    assert {k: recipe_part(meta, k) for k in want} == want  # keys newer than the build read as it was built
    config = read_json(SHIPPED_THETA0, "config.json")
    assert config.pop("dtype") == "float32"  # save_pretrained records the weights' dtype beside the architecture
    assert config == json.loads(json.dumps(model_config(build_tokenizer()).to_hf_dict()))
    model, tok, _ = load_pretrained(SHIPPED_THETA0)
    assert weights_hash(model) == meta["weights_sha256"]
    assert sum(os.path.getsize(os.path.join(SHIPPED_THETA0, f)) for f in os.listdir(SHIPPED_THETA0)) < 40e6
    for key in ("pope_adversarial_f1", "chair_i", "chair_recall", "vqa_overall", "fmt_self_check"):
        assert 0 <= meta["metrics"][key] <= 1  # θ0's benchmark scores, as the build measured them


def _shipped_metrics():
    from sena.world import SHIPPED_THETA0
    from sena.world.theta0 import verify

    return verify(SHIPPED_THETA0)["metrics"]


def test_shipped_theta0_meets_these_band_criteria():
    """θ0 against LLaVA-1.5-7B's band on the validation split (docs/world.md, gate 2), the criteria it meets: POPE
    F1 ≥ 84 on every split with adversarial the hardest and "Yes" between 40% and 70%, VQA ≥ 62%, every self-play
    format ≥ 95% well-formed, AMBER's existence yes-ratio 20–80%, and greedy self-asked questions of at least 4
    types, none more than half of them."""
    from sena.metrics import POPE_SPLITS

    m = _shipped_metrics()
    f1 = {s: m[f"pope_{s}_f1"] for s in POPE_SPLITS}
    assert all(v >= 0.84 for v in f1.values()) and f1["adversarial"] == min(f1.values()), f1
    assert all(0.4 <= m[f"pope_{s}_yes"] <= 0.7 for s in POPE_SPLITS)
    assert m["vqa_overall"] >= 0.62
    assert min(m["fmt_ask_question"], m["fmt_self_check"], m["fmt_improve"]) >= 0.95
    assert 0.2 <= m["amber_yes_existence"] <= 0.8
    assert m["sq_types"] >= 4 and m["sq_top_type"] <= 0.5


@pytest.mark.xfail(strict=True, reason="the shipped θ0 misses these band criteria (docs/results.md): POPE F1 "
                   "90.5 / 90.7 on random / popular (band ≤ 90), CHAIR_i 3.6 (band 8–20), recall 77.2 (band ≥ 80), "
                   "AMBER yes-ratio 93.9 on attribute and 0.3 on relation (band 20–80)")
def test_shipped_theta0_misses_these_band_criteria():
    """The rest of gate 2, which the shipped θ0 does not meet; strict, so a θ0 that meets them fails here until
    this test joins the one above."""
    from sena.metrics import POPE_SPLITS

    m = _shipped_metrics()
    assert all(m[f"pope_{s}_f1"] <= 0.90 for s in POPE_SPLITS)
    assert 0.08 <= m["chair_i"] <= 0.20 and m["chair_recall"] >= 0.80
    assert all(0.2 <= m[f"amber_yes_{d}"] <= 0.8 for d in ("attribute", "relation")), m


def test_carryover_probe_runs_from_its_command_line_and_trains_on_true_examples(tiny_theta0, tmp_path):
    """benchmarks/carryover.py: its training examples are gold (descriptions in the order θ0 was taught, or true
    existence answers, half of them about absent shapes), and its command line writes before/after rates in [0, 1]."""
    from benchmarks.carryover import gold_example, main

    rng = random.Random(2)
    answers = []
    for sc in sample_scenes(200, seed=9, cooc=0.0):
        assert gold_example(rng, sc, "des", "kind")[1] == describe(sc, "kind")
        user, answer = gold_example(rng, sc, "exist", "reading")
        assert user.endswith(P.GEN_SUFFIX) and answer == oracle_answer(sc, user.removesuffix(P.GEN_SUFFIX))
        answers.append(answer)
    assert 70 < answers.count("No") < 130, answers.count("No")
    out = tmp_path / "co.json"
    main(["--model", tiny_theta0[0], "--steps", "2", "--batch", "2", "--n-probe", "3", "--train", "exist",
          "--cooc", "0", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["args"]["train"] == "exist" and res["args"]["cooc"] == 0.0
    for side in ("before", "after"):
        assert {"yes_absent_buddy", "yes_absent_other", "yes_present", "chair_i", "recall"} <= set(res[side])
        assert all(0 <= res[side][k] <= 1 for k in ("yes_absent_other", "yes_present", "chair_i", "recall"))


def test_theta0_selection_rule_by_hand(tmp_path, capsys):
    """benchmarks/theta0_band.py: the distance of docs/world.md by hand, and a θ0 inside the band ships before a
    nearer one outside it (through its command line, from meta.json)."""
    from benchmarks.theta0_band import criteria, distance, main, pick

    base = {"pope_random_f1": 0.90, "pope_popular_f1": 0.87, "pope_adversarial_f1": 0.84, "chair_i": 0.20,
            "chair_recall": 0.80, "vqa_overall": 0.62, "fmt_ask_question": 1, "fmt_self_check": 1, "fmt_improve": 1,
            "amber_yes_existence": 0.5, "amber_yes_attribute": 0.5, "amber_yes_relation": 0.5, "sq_types": 4,
            "sq_top_type": 0.5}
    assert distance(base) == pytest.approx((1 + 0 + 1 + 1) / 4) and all(criteria(base).values())
    near = base | {"pope_random_f1": 0.87, "pope_adversarial_f1": 0.86, "amber_yes_relation": 0.1}  # outside the band
    assert distance(near) < distance(base) and not criteria(near)["AMBER yes-ratios 20-80"]
    assert pick({"a": near, "b": base}) == "b" and pick({"a": near, "b": near | {"chair_i": 0.3}}) == "a"
    for name, m in (("in", base), ("out", near)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"metrics": m}))
    main([str(tmp_path / "out"), str(tmp_path / "in")])
    out = capsys.readouterr().out
    assert "| selection distance | 0.33 | 0.75 |" in out and f"picks {tmp_path / 'in'}" in out, out
    assert "MISSED" in out.split("AMBER")[1].split("\n")[0]
