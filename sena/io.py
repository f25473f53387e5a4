"""Small file helpers: atomic writes, a run directory's lock, hashing, image listing, JSONL reading with bad lines
counted."""

import errno
import fcntl
import hashlib
import json
import os
import posixpath
import re
import socket
import sys
import tempfile
import time

from sena import seeds
from sena.cli import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def umask_mode():
    """The mode a plain open() gives a new file (0o666 less the umask): what a colleague sharing the run may read."""
    mask = os.umask(0)  # the umask can only be read by setting it; it is put back at once
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path, data):
    """Write to a temp file beside `path`, then rename: a kill at any moment leaves the old or the new file.

    The file gets the umask's mode, as open() would give it (mkstemp's temp files are private, 0600). A failed
    write (a full disk, say) removes the temp file and names `path` in the OSError it raises."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), umask_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a write error names no file; the user needs to know it
            raise OSError(e.errno, e.strerror, path) from e
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(tensors, path, metadata=None):
    """safetensors' save_file through a temp file beside `path`, then a rename, with the umask's mode (save_file's
    own files are 0600). A failed write raises OSError naming `path`: safetensors reports a full disk as a
    SafetensorError whose text carries the OS error number."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        code = re.search(r"os error (\d+)", str(e)) if isinstance(e, SafetensorError) else None
        if code:
            raise OSError(int(code[1]), os.strerror(int(code[1])), path) from None
        raise


_LOCKS = {}  # path -> open file descriptor; the lock lives as long as the descriptor, i.e. the process


def lock_dir(path, flag):
    """Hold an exclusive lock on path/.lock until this process ends (taking it again is a no-op), or refuse with a
    UserError naming the process that holds it. flock locks belong to the open file, so the system drops them when
    their process ends however it ends (SIGKILL too): a lock is never left stale. `flag` names the folder's flag in
    the refusal."""
    if os.path.abspath(path) in _LOCKS:
        return
    lock = os.path.join(path, ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"{path}: cannot write to {flag} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        holder = os.read(fd, 1000).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{flag} {path} is in use by {holder}; wait for it to end, or use another {flag}") from None
    os.ftruncate(fd, 0)
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command}), since {time.strftime('%H:%M:%S')}"
                 .encode())
    _LOCKS[os.path.abspath(path)] = fd


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


def read_lines(path):
    """A text file's lines (utf-8), without their line ends."""
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


JSON_TYPES = {dict: "object", list: "list"}


def read_json(path, expect=dict, what="JSON"):
    """The content of a JSON file (utf-8), whose top level must be an `expect` (dict, list; None: anything). A file
    that is missing, unreadable, empty, not valid JSON or of another top level is a UserError naming the file and
    what is wrong; `what` names the kind of file when it is missing ("image list file not found: ...")."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e})") from None
    if not text.strip():
        raise UserError(f"{path}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if expect is not None and not isinstance(data, expect):
        raise UserError(f"{path}: expected a JSON {JSON_TYPES[expect]}, found a {type(data).__name__}")
    return data


def read_jsonl(path, required=(), check=None, unique=None, tally=None, shown=10):
    """Records of a JSONL file. A line that is not a JSON object, lacks a required field, fails `check` (a function
    returning a problem string or None) or repeats an earlier line's `unique` field (the first one counts) is
    reported as "<file>:<line>: skipping malformed line (<problem>)", skipped and counted: returns (records, n_bad).
    The first `shown` reports are printed and then one line with the rest's count, so that a file of the wrong kind
    does not bury the terminal. tally: a dict that receives the counts {"malformed": n, "repeated": n}."""
    records, seen, counts = [], set(), {"malformed": 0, "repeated": 0}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                problem = None if isinstance(rec, dict) else "not a JSON object"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON: {e.msg}"
            if not problem:
                missing = [k for k in required if k not in rec]
                problem = f"missing field(s) {missing}" if missing else check(rec) if check else None
            repeated = not problem and unique is not None and rec[unique] in seen
            if repeated:
                problem = f"repeats {unique} {rec[unique]!r}"
            if problem:
                counts["repeated" if repeated else "malformed"] += 1
                if sum(counts.values()) <= shown:
                    print(f"{path}:{n}: skipping malformed line ({problem})", file=sys.stderr)
                continue
            if unique is not None:
                seen.add(rec[unique])
            records.append(rec)
    bad = sum(counts.values())
    if bad > shown:
        print(f"{path}: {bad - shown} more malformed lines skipped ({bad} in all)", file=sys.stderr)
    if tally is not None:
        tally.update(counts)
    return records, bad


def safe_join(root, rel):
    """root/rel, refusing paths that escape root (a data file must not point the loader at /etc/passwd)."""
    full = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([full, os.path.realpath(root)]) != os.path.realpath(root):
        raise ValueError(f"image path {rel!r} escapes the image root {root}")
    return full


def image_source(rel):
    """The source of an image-list path: its first folder ('coco/train2017/x.jpg' -> 'coco', 'gqa/images/y.jpg' ->
    'gqa'); a file directly under the root has the source '.'. LLaVA-665K's folders are its image sources (coco, gqa,
    ocr_vqa, textvqa, vg), which is how the official SENA/SeVa runs drew equal counts from each."""
    head, sep, _ = rel.partition("/")
    return head if sep else "."


def read_image_list(image_list, per_source=None, seed=0, offset=0):
    """(relative image paths, one-line summary) of a LLaVA-style JSON list ([{"image": "coco/x.jpg", ...}, ...]).

    Records without an 'image' string (LLaVA-665K's text-only conversations) are skipped and counted; a path that
    several records share is kept once. Without per_source: every path, sorted, from `offset` on. With per_source=N:
    each source's paths are sorted, shuffled with sena.seeds.rng(seed, "per-source", source) and the N after the first
    `offset` are taken, so rounds that step `offset` by N get disjoint images from every source; the result is
    sorted. A path that lexically leaves the root ('../x', '/etc/x') is refused (ValueError).
    """
    entries = read_json(image_list, list, "image list")
    rels, skipped = set(), 0
    for e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("image"), str) and e["image"].strip()):
            skipped += 1
            continue
        rel = posixpath.normpath(e["image"])
        if rel.startswith(("../", "/")) or rel == "..":
            raise ValueError(f"image path {e['image']!r} escapes the image root")
        rels.add(rel)
    by_source = {}
    for rel in sorted(rels):
        by_source.setdefault(image_source(rel), []).append(rel)
    if per_source is None:
        chosen = sorted(rels)[offset:]
        parts = [f"{s} {len(v)}" for s, v in by_source.items()]
    else:
        chosen = []
        for src, paths in by_source.items():
            seeds.rng(seed, "per-source", src).shuffle(paths)
            chosen += paths[offset : offset + per_source]
        parts = [f"{s} {len(v[offset : offset + per_source])}/{len(v)}" for s, v in by_source.items()]
        chosen.sort()
    summary = (f"image list {image_list}: {len(entries)} records, {skipped} without an image skipped, "
               f"{len(rels)} distinct images; {'images' if per_source is None else 'taken/listed'} per source: "
               + (", ".join(parts) or "none"))
    return chosen, summary


def list_images(images_dir=None, image_list=None, image_root=None, offset=0, num=None, per_source=None, seed=0):
    """(sorted image paths, root) from a folder or a LLaVA-style JSON list (read_image_list; per_source needs it)."""
    if images_dir:
        if per_source is not None:
            raise UserError("--per-source needs --image-list (the source is the first folder of each listed path)")
        if not os.path.isdir(images_dir):
            raise UserError(f"image folder not found: {images_dir}")
        root = images_dir
        paths = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths = paths[offset:]
    elif image_list:
        root = image_root or os.path.dirname(os.path.abspath(image_list))
        rels, summary = read_image_list(image_list, per_source, seed, offset)
        print(summary)
        paths = rels
    else:
        raise UserError("give --images DIR or --image-list JSON")
    if num is not None:
        paths = paths[:num]
    if image_list:  # symlinks are resolved only for the images actually used (a 665K list has 600K+ paths)
        paths = [safe_join(root, r) for r in paths]
    return paths, root
