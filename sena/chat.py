"""The LLaVA "v1" chat template and label masking.

A training sequence is   <s> SYSTEM USER: <image>\n{prompt} ASSISTANT: {answer}</s>
where "<image>" stands for n_image_tokens copies of the image token (transformers' LLaVA wants them expanded in
input_ids). Only the answer tokens and the closing </s> carry loss: every prompt position gets label -100.

The prompt and the answer are tokenized separately, as LLaVA's own `tokenizer_image_token` splits around the image,
so the prompt ids are a true prefix of every answer's sequence. That is what lets chosen and rejected share one
prompt forward (the image and prompt are ~90% of a SENA sequence).
"""

import torch

from sena.losses import IGNORE_INDEX

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def prompt_text(user, with_image=True):
    image = "<image>\n" if with_image else ""
    return f"{SYSTEM} USER: {image}{user} ASSISTANT:"


def encode_prompt(tokenizer, user, n_image_tokens, image_token_id, with_image=True):
    """Token ids of BOS + the v1 prompt, with the image placeholder expanded to n_image_tokens copies."""
    before, _, after = prompt_text(user, with_image).partition("<image>")
    ids = [tokenizer.bos_token_id] + tokenizer(before, add_special_tokens=False).input_ids
    if with_image:
        ids += [image_token_id] * n_image_tokens
    return ids + tokenizer(after, add_special_tokens=False).input_ids


def encode_answer(tokenizer, answer):
    """Answer ids followed by EOS; the leading space matches how the answer follows 'ASSISTANT:'."""
    return tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def build_example(tokenizer, user, answer, n_image_tokens, image_token_id, with_image=True):
    """(input_ids, labels) for one supervised example; labels are -100 on the prompt."""
    prompt = encode_prompt(tokenizer, user, n_image_tokens, image_token_id, with_image)
    ans = encode_answer(tokenizer, answer)
    return prompt + ans, [IGNORE_INDEX] * len(prompt) + ans


def collate(examples, pad_token_id):
    """Right-pad a list of (input_ids, labels) into tensors: input_ids, attention_mask, labels, all (B, T).

    Library API for plain supervised batches; the scripts do not call it (the θ0 build packs several examples behind
    one shared prefix instead, sena.world.data, and tests check the packing against this layout)."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
