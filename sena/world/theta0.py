"""The world's θ0 in a run directory: a checked copy of the shipped one, or a fresh build.

The repository ships θ0 (sena/world/theta0/, built by `python -m sena.world.build`; its meta.json records the
recipe, the device it was built on and the sha256 of every file), as real users download LLaVA-1.5 rather than
train it. A run starts from a copy, so nothing a run writes (metrics.json, eval answers) touches the shipped files.
"""

import hashlib
import json
import os
import shutil

from sena.cli import UserError
from sena.io import read_json, sha256_file

THETA0_FILES = ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "meta.json"]
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "theta0")
WEIGHTS = "model.safetensors"


class Theta0Error(UserError):
    """A θ0 directory that is missing, corrupt, or another θ0 than the one asked for (the CLIs print one line)."""


def read_meta(src) -> dict:
    path = os.path.join(src, "meta.json")
    if not os.path.isfile(path):
        raise Theta0Error(f"{path} is missing: {src} is not a θ0 directory made by sena.world.build")
    meta = read_json(path)  # a damaged one: a UserError naming it
    if "files_sha256" not in meta:
        raise Theta0Error(f"{path} records no files_sha256: {src} is not a θ0 directory made by sena.world.build")
    return meta


def verify(src) -> dict:
    """Check every file src/meta.json lists against its sha256 (a Git LFS pointer or a truncated download fails
    here, with the file's name, instead of deep inside the loader). Returns the meta."""
    meta = read_meta(src)
    for name, want in meta["files_sha256"].items():
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            raise Theta0Error(f"{path} is missing (listed in {os.path.join(src, 'meta.json')})")
        got = sha256_file(path)
        if got != want:
            raise Theta0Error(f"{path}: sha256 {got[:12]}… differs from {want[:12]}… in meta.json (a corrupt copy, "
                              f"or a Git LFS pointer instead of the file)")
    return meta


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def is_complete(path) -> bool:
    if not all(os.path.isfile(os.path.join(path, f)) for f in THETA0_FILES):
        return False
    return bool(read_json(os.path.join(path, "meta.json")).get("complete"))


class RecipeError(UserError):
    """A cached θ0 built with another recipe than the one asked for (the CLIs print it as one line)."""


# Recipe keys added after a θ0 was built, with the value its meta.json stands for (it was built that way).
PREDATES = {"mix": {"des_order": "reading"}}


def recipe_part(meta: dict, part: str) -> dict:
    """meta.json's recipe part ("train", "model", "mix", "questions"), a key it predates read as PREDATES says."""
    return PREDATES.get(part, {}) | meta.get(part, {})


def check_recipe(out, recipe):
    """Refuse a cached θ0 built with another recipe (seed, train, model, mix, question weights) than the one asked for: it would be
    reused silently and every number after it would belong to another θ0."""
    path = os.path.join(out, "meta.json")
    meta = read_json(path)
    asked = json.loads(json.dumps(recipe))  # as meta.json holds it: tuples -> lists
    diffs = [f"seed {meta['seed']} (asked {asked['seed']})"] if meta.get("seed") != asked["seed"] else []
    for part in ("train", "model", "mix", "questions"):
        have = recipe_part(meta, part)
        diffs += [f"{part}.{k} {have.get(k)} (asked {v})" for k, v in asked[part].items() if have.get(k) != v]
    if diffs:
        raise RecipeError(f"{path}: the cached θ0 was built with {'; '.join(diffs)}. Use another directory, or "
                          f"delete {out} to rebuild it")


def install(run_dir, src=SHIPPED) -> str:
    """run_dir/theta0 as a verified copy of src; an existing copy is reused if it holds the same weights.
    Returns the path."""
    dest = os.path.join(run_dir, "theta0")
    want = verify(src)["files_sha256"][WEIGHTS]
    if os.path.isdir(dest):
        have = read_meta(dest)["files_sha256"].get(WEIGHTS)
        if have != want:
            raise Theta0Error(f"{dest} holds another θ0 (weights {str(have)[:12]}…) than {src} ({want[:12]}…). "
                              f"Use another --run-dir, or delete {dest}")
        verify(dest)
        return dest
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in read_meta(src)["files_sha256"]:
        shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    shutil.copy2(os.path.join(src, "meta.json"), os.path.join(tmp, "meta.json"))
    os.replace(tmp, dest)  # appears whole or not at all
    verify(dest)
    return dest
