"""sena.image against transformers' image processors (PIL backend: torchvision is not installed here)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from sena.image import CLIP_MEAN, default_image_cfg, load_image, preprocess


def noise_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    x = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(x[..., 0] if mode == "L" else x, mode)


def theirs(cfg, img, tmp_path):
    """What a transformers user gets from this preprocessor_config.json."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    proc = AutoImageProcessor.from_pretrained(tmp_path)
    return torch.as_tensor(np.asarray(proc(images=img, return_tensors="np")["pixel_values"][0]))


@pytest.mark.parametrize("w,h,mode", [(45, 29, "RGB"), (20, 51, "RGBA"), (33, 33, "L"), (64, 17, "RGB")])
def test_pad_resize_equals_llava_image_processor(w, h, mode, tmp_path):
    cfg = default_image_cfg(32)
    img = noise_image(w, h, mode)
    ours, ref = preprocess(img, cfg), theirs(cfg, img, tmp_path)
    assert ours.shape == ref.shape == (3, 32, 32) and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-6


def test_crop_path_equals_clip_image_processor(tmp_path):
    """A llava-hf style config with do_pad false: shortest-edge resize then center crop, as CLIPImageProcessor."""
    cfg = default_image_cfg(32) | {"image_processor_type": "CLIPImageProcessor", "do_pad": False}
    img = noise_image(57, 30, seed=1)
    ours, ref = preprocess(img, cfg), theirs(cfg, img, tmp_path)
    assert ours.shape == ref.shape == (3, 32, 32)
    assert (ours - ref).abs().max().item() <= 1e-6
    assert (ours - preprocess(img, default_image_cfg(32))).abs().max() > 0.1  # padding really changes the input


def test_height_width_size_config(tmp_path):
    """size given as height/width (a square resize, no shortest edge), then a smaller center crop."""
    cfg = default_image_cfg(32) | {"size": {"height": 40, "width": 40}, "crop_size": {"height": 32, "width": 32}}
    img = noise_image(50, 23, seed=2)
    ours, ref = preprocess(img, cfg), theirs(cfg, img, tmp_path)
    assert ours.shape == ref.shape == (3, 32, 32)
    assert (ours - ref).abs().max().item() <= 1e-6


def test_padding_is_the_mean_colour_and_normalizes_to_about_zero():
    """A wide black strip: the padded rows are int(mean*255) grey, which normalizes to (int(m*255)/255 - m) / s."""
    img = Image.new("RGB", (32, 8), (0, 0, 0))
    x = preprocess(img, default_image_cfg(32))  # no resize needed: padded 32x32
    m = torch.tensor(CLIP_MEAN)
    expect = ((m * 255).floor() / 255 - m) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(x[:, 0, 0], expect, atol=1e-6, rtol=0)  # top padding row
    assert torch.allclose(x[:, 16, 16], -m / torch.tensor([0.26862954, 0.26130258, 0.27577711]), atol=1e-6)
    assert torch.allclose(x[:, :12], expect[:, None, None].expand(3, 12, 32), atol=1e-6, rtol=0)


def test_load_image(tmp_path):
    noise_image(10, 7, "RGBA").save(tmp_path / "a.png")
    noise_image(10, 7, "L").save(tmp_path / "b.png")
    assert load_image(tmp_path / "a.png").mode == "RGB" and load_image(tmp_path / "b.png").size == (10, 7)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="missing.png"):
        load_image(tmp_path / "missing.png")
