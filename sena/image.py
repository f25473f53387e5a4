"""LLaVA-1.5 image preprocessing: PIL image -> normalized (3, S, S) tensor.

    x = (resize_bicubic(pad_to_square(img, mean colour)) / 255 - mean) / std

Equal (bit for bit on the tests' images) to transformers' LlavaImageProcessor with do_pad=True on its PIL backend,
which transformers uses when torchvision is absent (our setup). LLaVA-1.5 was trained on padded images
(`image_aspect_ratio="pad"` in the original code), so padding is the default here even when a preprocessor_config
(like llava-hf's CLIPImageProcessor one) does not say do_pad; do_pad=false gives CLIP's resize + center crop.
"""

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def default_image_cfg(image_size: int) -> dict:
    """A preprocessor_config.json dict that transformers' LlavaImageProcessor reads the same way preprocess does."""
    return {"image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor",
            "do_pad": True, "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white, as transformers' convert_to_rgb does.

    16/32-bit grey images are scaled to 8 bits by their range first: PIL's own convert clips them to 255 (white).
    """
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        span = max(a.max() - a.min(), 1e-12)
        img = Image.fromarray(((a - a.min()) / span * 255).round().astype(np.uint8), mode="L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def load_image(path) -> Image.Image:
    """Open an image file as an RGB PIL image; a clear error naming the file if it is missing or unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        # DecompressionBombError: PIL refuses images over ~179M pixels, a guard against crafted files.
        raise ValueError(f"cannot read image {path}: {e}") from e


def _size(cfg: dict) -> tuple[dict, int, int]:
    """(size dict: shortest_edge or height/width, crop height, crop width) from a preprocessor_config."""
    size, crop = cfg.get("size", {}), cfg.get("crop_size")
    size = {"shortest_edge": size} if isinstance(size, int) else size
    if crop is None:
        crop = {"height": size.get("height", size.get("shortest_edge")),
                "width": size.get("width", size.get("shortest_edge"))}
    elif isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    return size, crop["height"], crop["width"]


def preprocess(img: Image.Image, image_cfg: dict) -> torch.Tensor:
    """PIL image -> (3, S, S) float32: pad to square with the mean colour, bicubic resize, crop, rescale, normalize."""
    img = to_rgb(img)
    mean, std = image_cfg.get("image_mean", CLIP_MEAN), image_cfg.get("image_std", CLIP_STD)
    size, crop_h, crop_w = _size(image_cfg)
    if image_cfg.get("do_pad", True) and img.width != img.height:
        # The mean colour as uint8 (int() truncates, as LLaVA and transformers do), the image centred.
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    if image_cfg.get("do_resize", True):
        w, h = img.size
        short = size.get("shortest_edge")
        if short is not None:  # shortest edge -> short, the long edge scaled and truncated like transformers
            new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        else:
            new = (size["width"], size["height"])
        img = img.resize(new, resample=Image.Resampling(image_cfg.get("resample", 3)))
    x = np.array(img)  # (H, W, 3) uint8, a writable copy
    if image_cfg.get("do_center_crop", True):
        top, left = (x.shape[0] - crop_h) // 2, (x.shape[1] - crop_w) // 2
        if top < 0 or left < 0:
            raise ValueError(f"image {x.shape[1]}x{x.shape[0]} is smaller than crop_size {crop_w}x{crop_h}")
        x = x[top:top + crop_h, left:left + crop_w]
    # float64 multiply then float32, then normalize in float32: transformers' exact arithmetic.
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).double()  # (3, S, S)
    if image_cfg.get("do_rescale", True):
        x = x * image_cfg.get("rescale_factor", 1 / 255)
    x = x.float()
    if image_cfg.get("do_normalize", True):
        m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        s = torch.tensor(std, dtype=torch.float32)[:, None, None]
        x = (x - m) / s
    return x
