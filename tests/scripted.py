"""A scripted stand-in for generate.py's decoding call, for tests that need a model that says something.

The tiny random model of sena/tiny.py asks no question, so its rounds end with no pairs, and a test that compares
two rounds' pairs.jsonl would compare two empty files. Here the one decoding call of a round's self-play
(`sena.selfplay.generate`, which is sena.generation.generate) is replaced by `scripted_generate`: it decodes each
prompt, picks a reply by the prompt's kind and a digest of that row's image features, and returns the reply's token ids,
cut at max_new_tokens as a decoder would. Everything else is the real generate.py on a real tiny LLaVA directory:
image loading, the diffusion noise, the vision tower's features, the stage files and their resume, sharding under
torchrun, the question and rewrite parsers, the pair filters. The clean and the noised copy of an image give
different features, hence (mostly) different answers, as a model's would; the replies include every case the
parsers and filters handle: no question, a 'name' question, a refused or rewritten self-check, a refused rewrite,
Yes/No answers, identical clean and noised answers.

    python -m tests.scripted <generate.py flags>     generate.py with the scripted decoding (torchrun -m too)
    SCRIPTED_KILL_AT=N                               the process SIGKILLs itself at its N-th decoding call

The tokenizer is byte-level, so every reply decodes to exactly its text ("QUESTION: ...", "Improved Answer: ...").
"""

import hashlib
import os
import signal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sena import cli, dist, prompts, tiny

SIZES = ("small", "large")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES = ("star", "circle", "square", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right", "center")
NUMBERS = ("one", "two", "three", "four")
QUESTIONS = ("What color is the star?", "How many circles are there?", "What shape is at the top left?",
             "Is there a green square?", "What color is the large circle?", "Where is the blue triangle?")


def tokenizer():
    """Byte-level BPE without merges: one token per byte, so decode(encode(text)) == text for any text."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


_TOK = tokenizer()


def model_dir(path, seed=0):
    """A tiny random LLaVA directory with the byte tokenizer: its vision tower gives the features the replies use."""
    return tiny.model_dir(path, seed=seed, tok=_TOK)


def pick(options, *parts):
    """A deterministic choice among options, keyed by parts (strings)."""
    h = hashlib.blake2b("|".join(parts).encode(), digest_size=8).digest()
    return options[int.from_bytes(h, "big") % len(options)]


def image_key(feats):
    """A digest of one image's features (N, D): each token's feature sum, rounded to 2 decimals, so that the same
    image gives the same key however the vision tower's batches were composed (rank shards, chunk sizes), while a
    noised copy gives another."""
    if feats is None:
        return "no-image"
    coarse = torch.round(feats.float().sum(-1) * 100).to(torch.int64)  # (N,)
    return hashlib.blake2b(coarse.numpy().tobytes(), digest_size=8).hexdigest()


def between(text, start, end):
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def reply(user, key):
    """The scripted answer to one user turn about the image whose key is `key`."""
    if "Current answer:" in user:  # self-enhancement (both IMPROVE prompts)
        answer = between(user, "Current answer:", " Using the image")
        if pick(range(4), "refuse", key, user) == 0:
            return "The current answer is fine."  # no 'Improved Answer:' -> the rewrite is refused
        if prompts.DES_SUFFIX.strip() in user:  # the question of a des pair is a description prompt
            return f"{prompts.IMPROVED_MARKER} The image shows {answer[:1].lower()}{answer[1:]}"
        return f"{prompts.IMPROVED_MARKER} the {answer.lower()}"
    if user == prompts.ASK_QUESTION:
        kind = pick(range(10), "ask", key)
        if kind == 0:
            return "There are some shapes."  # no '?': no question
        if kind == 1:
            return "What is the name of the red star?"  # dropped: it asks for a name
        return f"Let me ask. {pick(QUESTIONS, 'q', key)}"
    if user.startswith("Here is a question:"):  # the self-check turn
        question = between(user, "Here is a question:", " If this question")
        kind = pick(range(10), "check", key, question)
        if kind == 0:
            return "I cannot tell."  # no '?': the question is dropped
        if kind == 1:
            return f"QUESTION: {pick(QUESTIONS, 'rewrite', key, question)}"
        return f"QUESTION: {question}"
    if user.endswith(prompts.DES_SUFFIX):
        return (f"A {pick(SIZES, 'size', key)} {pick(COLORS, 'color', key)} {pick(SHAPES, 'shape', key)} "
                f"at the {pick(PLACES, 'place', key)}.")
    if user.endswith(prompts.GEN_SUFFIX):
        question = user[: -len(prompts.GEN_SUFFIX)]
        if question.startswith("How many"):
            return pick(NUMBERS, "n", key, question)
        if question.startswith("Is there"):
            return pick(("Yes", "No"), "yn", key, question)  # removed by the yes/no filter
        if question.startswith("Where"):
            return f"at the {pick(PLACES, 'where', key, question)}"
        return f"{pick(SIZES, 'gsize', key, question)} {pick(COLORS, 'gcolor', key, question)}"
    return "I do not know."


def user_turn(ids):
    """The user's text of a v1 prompt's token ids (the system text, image tokens and 'ASSISTANT:' removed)."""
    text = _TOK.decode(ids, skip_special_tokens=True)
    return text.split("USER:", 1)[1].rsplit("ASSISTANT:", 1)[0].strip()


@torch.no_grad()
def scripted_generate(model, input_ids, pixel_values=None, image_features=None, max_new_tokens=32, **unused):
    """sena.generation.generate's signature and output (new token ids per prompt, no EOS), scripted replies."""
    if pixel_values is not None:
        image_features = model.encode_images(pixel_values)
    out = []
    for b, ids in enumerate(input_ids):
        key = image_key(None if image_features is None else image_features[b])
        text = reply(user_turn(ids), key)
        out.append(_TOK(text, add_special_tokens=False).input_ids[:max_new_tokens])
    return out


def main():
    """generate.py with the scripted decoding; with SCRIPTED_KILL_AT=N it SIGKILLs itself at decoding call N."""
    import generate
    from sena import selfplay

    kill_at, calls = int(os.environ.get("SCRIPTED_KILL_AT", 0)), [0]

    def decode(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # as an OOM killer or a pre-emption would: no cleanup at all
        return scripted_generate(*args, **kwargs)

    selfplay.generate = decode
    cli.run(generate.main)
    dist.shutdown()


if __name__ == "__main__":
    main()
