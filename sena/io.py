"""Small file helpers: atomic writes, hashing, image listing, JSONL reading with bad lines counted."""

import hashlib
import json
import os
import sys
import tempfile

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def atomic_write_bytes(path, data):
    """Write to a temp file beside `path`, then rename: a kill at any moment leaves the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_weights(model_dir):
    """One hash over a model directory's safetensors files (sorted by name): the reference's identity."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode())
        h.update(sha256_file(os.path.join(model_dir, f)).encode())
    return h.hexdigest()


def read_jsonl(path, required=()):
    """Records of a JSONL file; a malformed line or one missing a required field is reported, skipped and counted."""
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                missing = [k for k in required if k not in rec]
                if missing:
                    raise ValueError(f"missing field(s) {missing}")
            except (json.JSONDecodeError, ValueError) as e:
                print(f"{path}:{n}: skipping malformed line ({e})", file=sys.stderr)
                bad += 1
                continue
            records.append(rec)
    return records, bad


def safe_join(root, rel):
    """root/rel, refusing paths that escape root (a data file must not point the loader at /etc/passwd)."""
    full = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([full, os.path.realpath(root)]) != os.path.realpath(root):
        raise ValueError(f"image path {rel!r} escapes the image root {root}")
    return full


def list_images(images_dir=None, image_list=None, image_root=None, offset=0, num=None):
    """(sorted image paths, root) from a folder or a LLaVA-style JSON list ([{"image": "coco/x.jpg", ...}, ...])."""
    if images_dir:
        if not os.path.isdir(images_dir):
            raise SystemExit(f"image folder not found: {images_dir}")
        root = images_dir
        paths = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS))
    elif image_list:
        if not os.path.isfile(image_list):
            raise SystemExit(f"image list not found: {image_list}")
        root = image_root or os.path.dirname(os.path.abspath(image_list))
        with open(image_list, encoding="utf-8") as f:
            try:
                entries = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{image_list}: not valid JSON ({e})") from e
        rels = sorted({e["image"] for e in entries if isinstance(e, dict) and isinstance(e.get("image"), str)})
        paths = [safe_join(root, r) for r in rels]
    else:
        raise SystemExit("give --images DIR or --image-list JSON")
    paths = paths[offset:]
    if num is not None:
        paths = paths[:num]
    return paths, root
