"""The world's word-level tokenizer (Hugging Face `tokenizers`, loadable with transformers.AutoTokenizer).

One token per word or punctuation mark. Whitespace is kept inside the tokens the SentencePiece way: a word that
follows a space carries a leading "▁" ("▁red"), so decoding is plain concatenation with "▁" -> " " and
decode(encode(t)) == t exactly for every world text (punctuation re-attaches because it never carried a space).
Pre-tokenizer: split off "\n" -> Metaspace (" " -> "▁", "▁" prepended to the text's first word only) -> isolate
".", ",", "?", ":", "!", "'" and "...". Special tokens: <s> </s> <pad> <unk> <image>.
The vocabulary is every piece of every text the world, the SENA prompts and the chat template can produce, each
word both with and without its "▁" so that any position in a prompt is covered.
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>", "<image>"]
SPACE = "▁"


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=True),
        pre_tokenizers.Split(Regex(r"\.\.\.|[.,?:!']"), "isolated"),
    ])


def world_texts() -> list[str]:
    """Every kind of text the tokenizer must cover: chat frame, SENA prompts, templates, answers, descriptions."""
    import random

    from sena import prompts
    from sena.chat import SYSTEM, prompt_text
    from sena.world import language as L
    from sena.world import scenes as S

    texts = [SYSTEM, prompt_text("x"), prompt_text("x", with_image=False), prompts.ASK_QUESTION,
             prompts.SELF_CHECK, prompts.DES_SUFFIX, prompts.GEN_SUFFIX, prompts.IMPROVE,
             prompts.IMPROVE_NO_DESCRIPTION,
             prompts.IMPROVED_MARKER, prompts.QUESTION_MARKER, *prompts.DESCRIBE_PROMPTS, " ".join(L.NUMBERS),
             " ".join(S.SHAPES + S.COLORS + S.SIZES + S.POSITIONS + S.BACKGROUNDS), "Yes No yes no",
             "Nothing is next to the circle. Several objects are next to the circle."]
    texts += [w for ws in L.SYNONYMS.values() for w in ws]
    for sh in S.SHAPES:
        for c in S.COLORS:
            texts += [L.question("attribute", shape=sh, color=c), L.question("position", shape=sh, color=c)]
        for rel in L.RELATIONS:
            texts.append(L.question("relation", shape=sh, rel=rel, shape2="circle"))
        texts += [L.question("exist", shape=sh), L.question("color", shape=sh), L.question("next_to", shape=sh)]
    texts += [L.question("shape", pos=p) for p in S.POSITIONS] + [L.question("count")]
    rng = random.Random(0)
    for sc in S.sample_scenes(300, seed=1):
        texts.append(L.describe(sc))
        qs = [L.question("exist", shape=rng.choice(S.SHAPES)), L.question("count"),
              L.question("shape", pos=rng.choice(S.POSITIONS)), L.question("color", shape=rng.choice(S.SHAPES)),
              L.question("position", shape=rng.choice(S.SHAPES), color=rng.choice(S.COLORS)),
              L.question("attribute", shape=rng.choice(S.SHAPES), color=rng.choice(S.COLORS)),
              L.question("relation", shape="circle", rel=rng.choice(L.RELATIONS), shape2=rng.choice(S.SHAPES[1:])),
              L.question("next_to", shape=rng.choice(S.SHAPES))]
        texts += [L.precise_answer(sc, q) for q in qs]
    return texts


def build_tokenizer(texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose vocabulary covers `texts` (default: world_texts()); ids are deterministic."""
    pre = _pre_tokenizer()
    pieces = set()
    for t in world_texts() if texts is None else texts:
        for part in t.split("<image>"):
            for p in (part, " " + part, part.lstrip()):  # a text may start a prompt segment, or follow a space
                pieces.update(w for w, _ in pre.pre_tokenize_str(p))
    words = {w.lstrip(SPACE) for w in pieces} - {""}
    vocab_words = sorted(pieces | words | {SPACE + w for w in words} | {SPACE, "\n", SPACE + "\n"})
    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in vocab_words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="first", split=True)
    tok.add_special_tokens(SPECIALS)
    # Like Llama's tokenizer: add_special_tokens=True prepends <s>.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[
        ("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, clean_up_tokenization_spaces=False,
        padding_side="left", model_max_length=2048)


def save_tokenizer(tok, out_dir):
    """tok.save_pretrained plus the files older loaders look for (class name, special_tokens_map.json)."""
    import json
    import os

    tok.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
               "additional_special_tokens": ["<image>"]}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
