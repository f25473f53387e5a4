"""The v1 template: prompt ids are a prefix of the example, image placeholder expanded, only the answer has labels."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sena.chat import SYSTEM, build_example, collate, encode_answer, encode_prompt
from sena.losses import IGNORE_INDEX


def tiny_tokenizer():
    words = (SYSTEM + " USER: ASSISTANT: what color is the circle ? red .").replace(".", " . ").replace("?", " ? ")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    for w in words.replace(",", " , ").replace(":", " : ").split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_prompt_expands_image_and_masks_prompt():
    tok = tiny_tokenizer()
    prompt = encode_prompt(tok, "what color is the circle ?", n_image_tokens=5, image_token_id=4)
    assert prompt[0] == tok.bos_token_id
    assert prompt.count(4) == 5
    # The five image tokens are contiguous and come right after "USER:".
    first = prompt.index(4)
    assert prompt[first : first + 5] == [4] * 5
    assert tok.decode(prompt[first - 2 : first]) == "USER :"
    assert tok.decode(prompt[-2:]) == "ASSISTANT :"
    assert tok.convert_ids_to_tokens(prompt[first + 5]) == "what"

    ids, labels = build_example(tok, "what color is the circle ?", "red .", 5, 4)
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) :] == encode_answer(tok, "red .") == ids[len(prompt) :]
    assert ids[-1] == tok.eos_token_id


def test_prompt_without_image_has_no_image_tokens():
    tok = tiny_tokenizer()
    assert 4 not in encode_prompt(tok, "red", 5, 4, with_image=False)


def test_collate_right_pads():
    batch = collate([([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7])], pad_token_id=3)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
