"""Zero-shot classification by text prompts with ImageBind (images, audio) and Point-Bind (point clouds)."""

from __future__ import annotations

import csv
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from model.imagebind.encoder import ImageBind
from model.imagebind.point import farthest_points, seeded_starts
from model.imagebind.point_files import PointCloudError, normalize_cloud, read_points
from pipelines.errors import InputError, folder_expected

log = logging.getLogger(__name__)

KINDS = ("image", "audio", "point")
LAYOUT_NAMES = {"imagenet": "ImageNet", "esc50": "ESC-50", "modelnet40": "ModelNet40"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # compared lower-cased, so .JPEG (ImageNet's) counts
CLASSNAMES_FILE = "classnames.txt"
ESC50_CSV = os.path.join("meta", "esc50.csv")
ESC50_COLUMNS = ("filename", "fold", "target", "category")  # of filename,fold,target,category,esc10,src_file,take
ESC50_FOLDS = (1, 2, 3, 4, 5)
MODELNET_SHAPES = "modelnet40_shape_names.txt"
MAX_FAILURES = 20
MAX_REASONS = 10
_WNID = re.compile(r"^n\d{8}$")  # ImageNet's folder names are WordNet ids
_SHAPE_ID = re.compile(r"^(.+)_(\d+)$")  # airplane_0627 -> airplane

# Point-Bind's ModelNet40 evaluation (ZiyuGuo99/Point-Bind_Point-LLM zero_shot.py, scripts/pointbind_pointbert.sh and
# data/dataset_3d.py, ULIP's ModelNet reader, itself Point-BERT's datasets/ModelNetDataset.py): the test split's
# 10,000-point files read as x,y,z,nx,ny,nz, farthest-point sampled down to --npoints 8192 (uniform=True, the
# modelnet40_test_8192pts_fps.dat cache, first index np.random.randint), then pc_normalize on x,y,z (centre on the
# mean, divide by the largest norm), normals dropped (USE_NORMALS: FALSE in ULIP's and Point-BERT's
# ModelNet40.yaml), point order kept at test time. classify's point defaults reproduce this, the first FPS index
# drawn from `seed` (seeded_starts) instead of numpy's global generator; a cloud of fewer points is used whole.
POINT_EVAL_POINTS = 8192
POINT_EVAL_NORMALIZE = True

# Prompt templates per kind, "{}" = the readable class name.
# image: OpenCLIP's zero-shot ImageNet ensemble (OPENAI_IMAGENET_TEMPLATES in open_clip/zero_shot_metadata.py, the 80
#   prompts of OpenAI's CLIP notebook), with which OpenCLIP ViT-H/14 (ImageBind's frozen image and text towers)
#   reports its ImageNet zero-shot; ImageBind's 77.7 is that model's figure.
# audio: ImageBind publishes no audio prompt list. One template, "This is a sound of {}", as MTEB's ESC50_Zeroshot
#   task (mteb/tasks/audio/audio_zeroshot_classification/eng/esc50.py) asks it; with ImageBind huge on all 2,000
#   clips MTEB measured 66.4 against the paper's 66.9 (embeddings-benchmark/mteb pull request 5015). MTEB keeps the
#   category's underscores; we write them as spaces.
# point: Point-Bind's data/templates.json "modelnet40_64" (ULIP's 64 prompts), verbatim, including the one without a
#   final full stop; its labels are ModelNet40's shape names with "_" -> " " (ULIP's data/labels.json).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "image": (
        "a bad photo of a {}.",
        "a photo of many {}.",
        "a sculpture of a {}.",
        "a photo of the hard to see {}.",
        "a low resolution photo of the {}.",
        "a rendering of a {}.",
        "graffiti of a {}.",
        "a bad photo of the {}.",
        "a cropped photo of the {}.",
        "a tattoo of a {}.",
        "the embroidered {}.",
        "a photo of a hard to see {}.",
        "a bright photo of a {}.",
        "a photo of a clean {}.",
        "a photo of a dirty {}.",
        "a dark photo of the {}.",
        "a drawing of a {}.",
        "a photo of my {}.",
        "the plastic {}.",
        "a photo of the cool {}.",
        "a close-up photo of a {}.",
        "a black and white photo of the {}.",
        "a painting of the {}.",
        "a painting of a {}.",
        "a pixelated photo of the {}.",
        "a sculpture of the {}.",
        "a bright photo of the {}.",
        "a cropped photo of a {}.",
        "a plastic {}.",
        "a photo of the dirty {}.",
        "a jpeg corrupted photo of a {}.",
        "a blurry photo of the {}.",
        "a photo of the {}.",
        "a good photo of the {}.",
        "a rendering of the {}.",
        "a {} in a video game.",
        "a photo of one {}.",
        "a doodle of a {}.",
        "a close-up photo of the {}.",
        "a photo of a {}.",
        "the origami {}.",
        "the {} in a video game.",
        "a sketch of a {}.",
        "a doodle of the {}.",
        "a origami {}.",
        "a low resolution photo of a {}.",
        "the toy {}.",
        "a rendition of the {}.",
        "a photo of the clean {}.",
        "a photo of a large {}.",
        "a rendition of a {}.",
        "a photo of a nice {}.",
        "a photo of a weird {}.",
        "a blurry photo of a {}.",
        "a cartoon {}.",
        "art of a {}.",
        "a sketch of the {}.",
        "a embroidered {}.",
        "a pixelated photo of a {}.",
        "itap of the {}.",
        "a jpeg corrupted photo of the {}.",
        "a good photo of a {}.",
        "a plushie {}.",
        "a photo of the nice {}.",
        "a photo of the small {}.",
        "a photo of the weird {}.",
        "the cartoon {}.",
        "art of the {}.",
        "a drawing of the {}.",
        "a photo of the large {}.",
        "a black and white photo of a {}.",
        "the plushie {}.",
        "a dark photo of a {}.",
        "itap of a {}.",
        "graffiti of the {}.",
        "a toy {}.",
        "itap of my {}.",
        "a photo of a cool {}.",
        "a photo of a small {}.",
        "a tattoo of the {}.",
    ),
    "audio": ("This is a sound of {}",),
    "point": (
        "a point cloud model of {}.",
        "There is a {} in the scene.",
        "There is the {} in the scene.",
        "a photo of a {} in the scene.",
        "a photo of the {} in the scene.",
        "a photo of one {} in the scene.",
        "itap of a {}.",
        "itap of my {}.",
        "itap of the {}.",
        "a photo of a {}.",
        "a photo of my {}.",
        "a photo of the {}.",
        "a photo of one {}.",
        "a photo of many {}.",
        "a good photo of a {}.",
        "a good photo of the {}.",
        "a bad photo of a {}.",
        "a bad photo of the {}.",
        "a photo of a nice {}.",
        "a photo of the nice {}.",
        "a photo of a cool {}.",
        "a photo of the cool {}.",
        "a photo of a weird {}.",
        "a photo of the weird {}.",
        "a photo of a small {}.",
        "a photo of the small {}.",
        "a photo of a large {}.",
        "a photo of the large {}.",
        "a photo of a clean {}.",
        "a photo of the clean {}.",
        "a photo of a dirty {}.",
        "a photo of the dirty {}.",
        "a bright photo of a {}.",
        "a bright photo of the {}.",
        "a dark photo of a {}.",
        "a dark photo of the {}.",
        "a photo of a hard to see {}.",
        "a photo of the hard to see {}.",
        "a low resolution photo of a {}.",
        "a low resolution photo of the {}.",
        "a cropped photo of a {}.",
        "a cropped photo of the {}.",
        "a close-up photo of a {}.",
        "a close-up photo of the {}.",
        "a jpeg corrupted photo of a {}.",
        "a jpeg corrupted photo of the {}.",
        "a blurry photo of a {}.",
        "a blurry photo of the {}.",
        "a pixelated photo of a {}.",
        "a pixelated photo of the {}.",
        "a black and white photo of the {}.",
        "a black and white photo of a {}",
        "a plastic {}.",
        "the plastic {}.",
        "a toy {}.",
        "the toy {}.",
        "a plushie {}.",
        "the plushie {}.",
        "a cartoon {}.",
        "the cartoon {}.",
        "an embroidered {}.",
        "the embroidered {}.",
        "a painting of the {}.",
        "a painting of a {}.",
    ),
}


@dataclass(frozen=True)
class Sample:
    """One labelled file: its absolute path and its class index."""

    path: str
    label: int


@dataclass(frozen=True)
class LabelledSet:
    """A labelled dataset of one kind, read from a known layout."""

    kind: str  # one of KINDS
    root: str  # absolute
    classes: tuple[str, ...]  # readable class names used in prompts, by class index
    samples: tuple[Sample, ...]
    layout: str  # "imagenet", "esc50" or "modelnet40"


def _readable(name: str) -> str:
    return name.replace("_", " ").strip()


def _read_lines(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped (a byte-order mark dropped)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f.read().splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None


def read_imagenet(root: str) -> LabelledSet:
    """An ImageNet-style folder (any folder-per-class image set): `root/<class folder>/*.jpg|jpeg|png|webp|bmp`
    (any case, so ImageNet's .JPEG too); class index = the folder's place in sorted order.

    Readable names come from `root/classnames.txt` when it exists: one name per line, in sorted folder order (for
    ImageNet's WordNet-id folders, the standard class order, e.g. OpenCLIP's IMAGENET_CLASSNAMES); otherwise each
    folder's name with "_" -> " ". Raises InputError naming the path: root missing, no class folders, an empty class
    folder, or a classnames.txt whose line count is not the folder count.
    """
    if not os.path.isdir(root):
        raise InputError(folder_expected("image", root))
    root = os.path.abspath(root)
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise InputError(f"{root}: no class folders (expected root/<class>/<image files>)")
    samples = []
    for label, folder in enumerate(folders):
        path = os.path.join(root, folder)
        files = sorted(e.name for e in os.scandir(path) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise InputError(f"{path}: empty class folder (no {', '.join(IMAGE_SUFFIXES)} files)")
        samples += [Sample(os.path.join(path, name), label) for name in files]
    names_path = os.path.join(root, CLASSNAMES_FILE)
    if os.path.isfile(names_path):
        names = _read_lines(names_path)
        if len(names) != len(folders):
            raise InputError(
                f"{names_path}: {len(names)} names for {len(folders)} class folders; give one name per line, "
                "in sorted folder order"
            )
        classes = tuple(names)
    else:
        if all(_WNID.match(f) for f in folders):
            log.warning(
                "%s: class folders are WordNet ids and there is no %s: prompts will name the ids, so the "
                "accuracy says little; add one readable name per line",
                root,
                CLASSNAMES_FILE,
            )
        classes = tuple(_readable(f) for f in folders)
    return LabelledSet("image", root, classes, tuple(samples), "imagenet")


def read_esc50(root: str, folds: Sequence[int] | None = None) -> LabelledSet:
    """ESC-50 (`root/audio/*.wav`, `root/meta/esc50.csv`): class index = `target`, readable name = `category` with
    "_" -> " "; every fold unless `folds` says which (the classes are always all of the csv's).

    ImageBind's ESC-50 zero-shot (66.9) is read here as covering all 2,000 clips, all 5 folds: the paper's text we
    could reach does not name a fold, and MTEB's ImageBind run over all 2,000 clips measured 66.4 (see TEMPLATES).
    Raises InputError naming the path: no csv or audio folder, a missing column, a bad or inconsistent target, a
    listed file that does not exist, an unknown fold.
    """
    if not os.path.isdir(root):
        raise InputError(folder_expected("ESC-50", root))
    root = os.path.abspath(root)
    table, audio_dir = os.path.join(root, ESC50_CSV), os.path.join(root, "audio")
    if not os.path.isfile(table):
        raise InputError(f"{root}: no {ESC50_CSV} (the ESC-50 metadata csv): expected {table}")
    if not os.path.isdir(audio_dir):
        raise InputError(f"{root}: no audio folder: expected {audio_dir}")
    try:
        with open(table, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ESC50_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{table}: no {', '.join(missing)} column (the header is {reader.fieldnames})")
            rows = [(number, row) for number, row in enumerate(reader, 2)]
    except UnicodeDecodeError as e:
        raise InputError(f"{table}: not UTF-8 text ({e})") from None
    categories: dict[int, str] = {}
    parsed = []
    for number, row in rows:
        try:
            target, fold = int(row["target"]), int(row["fold"])
        except (TypeError, ValueError):
            raise InputError(
                f"{table} line {number}: target and fold must be integers, got {row['target']!r} and {row['fold']!r}"
            ) from None
        category = (row["category"] or "").strip()
        if target < 0 or not category:
            raise InputError(f"{table} line {number}: a negative target or an empty category")
        if categories.setdefault(target, category) != category:
            raise InputError(
                f"{table} line {number}: target {target} is {category!r} here and {categories[target]!r} above"
            )
        parsed.append((number, (row["filename"] or "").strip(), fold, target))
    if not parsed:
        raise InputError(f"{table}: no clips listed")
    gaps = [t for t in range(max(categories) + 1) if t not in categories]
    if gaps:
        raise InputError(f"{table}: no clip has target {', '.join(map(str, gaps[:5]))}: targets must run 0..C-1")
    present = sorted({fold for _, _, fold, _ in parsed})
    if folds is not None:
        if not folds:
            raise InputError(f"{table}: no fold chosen; give some of {', '.join(map(str, present))} or none for all")
        unknown = [f for f in folds if f not in present]
        if unknown:
            raise InputError(
                f"{table}: no fold {', '.join(map(str, unknown))}; its folds are {', '.join(map(str, present))}"
            )
    samples = []
    for number, name, fold, target in parsed:
        if folds is not None and fold not in folds:
            continue
        path = os.path.join(audio_dir, name)
        if not name or not os.path.isfile(path):
            raise InputError(f"{table} line {number}: listed audio file not found: {path}")
        samples.append(Sample(path, target))
    classes = tuple(_readable(categories[t]) for t in range(len(categories)))
    return LabelledSet("audio", root, classes, tuple(samples), "esc50")


def read_modelnet40(root: str, split: str = "test") -> LabelledSet:
    """ModelNet40 as Point-BERT, ULIP and Point-Bind read it (`modelnet40_normal_resampled`):
    `root/modelnet40_shape_names.txt` (one name a line; class index = line index), `root/modelnet40_<split>.txt`
    (shape ids such as airplane_0627; the class is the id without its trailing _NNNN) and one file per id,
    `root/<class>/<id>.txt` (comma-separated x,y,z,nx,ny,nz lines). Readable names: the shape name with "_" -> " ".

    Raises InputError naming the path: root, names or split file missing, duplicate names, an id that is not
    <class>_<number> or whose class is not a shape name, a listed cloud file that does not exist.
    """
    if not os.path.isdir(root):
        raise InputError(folder_expected("ModelNet40", root))
    root = os.path.abspath(root)
    names_path, split_path = os.path.join(root, MODELNET_SHAPES), os.path.join(root, f"modelnet40_{split}.txt")
    for path in (names_path, split_path):
        if not os.path.isfile(path):
            raise InputError(f"{root}: no {os.path.basename(path)}: expected {path}")
    shapes = _read_lines(names_path)
    if not shapes:
        raise InputError(f"{names_path}: no shape names")
    index = {}
    for number, shape in enumerate(shapes, 1):
        if index.setdefault(shape, number - 1) != number - 1:
            raise InputError(f"{names_path} line {number}: {shape!r} is also on line {index[shape] + 1}")
    ids = _read_lines(split_path)
    if not ids:
        raise InputError(f"{split_path}: no shape ids")
    samples = []
    for number, shape_id in enumerate(ids, 1):
        m = _SHAPE_ID.match(shape_id)
        if not m:
            raise InputError(f"{split_path} line {number}: {shape_id!r} is not <class>_<number>")
        if m.group(1) not in index:
            raise InputError(f"{split_path} line {number}: class {m.group(1)!r} of {shape_id!r} is not in {names_path}")
        path = os.path.join(root, m.group(1), shape_id + ".txt")
        if not os.path.isfile(path):
            raise InputError(f"{split_path} line {number}: listed point-cloud file not found: {path}")
        samples.append(Sample(path, index[m.group(1)]))
    return LabelledSet("point", root, tuple(_readable(s) for s in shapes), tuple(samples), "modelnet40")


def read_labelled(kind: str, root: str, **options: object) -> LabelledSet:
    """The reader of a kind: image -> read_imagenet, audio -> read_esc50 (folds=), point -> read_modelnet40 (split=)."""
    readers: dict[str, Callable[..., LabelledSet]] = {
        "image": read_imagenet,
        "audio": read_esc50,
        "point": read_modelnet40,
    }
    if kind not in readers:
        raise InputError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    try:
        return readers[kind](root, **options)
    except TypeError as e:  # an option the reader does not take
        raise InputError(f"{kind} sets ({readers[kind].__name__}): {e}") from None


def class_embeddings(
    encoder: ImageBind, classes: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """(C, dim) float32: per class, the mean over `templates` ("{}" = the name) of the L2-normalised text
    embeddings, normalised again (CLIP's prompt ensemble, as Point-Bind's zero_shot.py does it)."""
    if not templates:
        raise ValueError("no prompt templates")
    per_chunk = max(1, 4096 // len(templates))  # a bounded number of texts in memory at once
    out = []
    for start in range(0, len(classes), per_chunk):
        chunk = classes[start : start + per_chunk]
        texts = [t.replace("{}", name) for name in chunk for t in templates]
        emb = F.normalize(encoder.embed_texts(texts, batch_size=batch_size), dim=-1)
        out.append(F.normalize(emb.reshape(len(chunk), len(templates), -1).mean(dim=1), dim=-1))
    return torch.cat(out) if out else torch.empty(0, encoder.dim)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each k (clipped to the number of classes), keyed by the k asked for.

    A sample counts at k when fewer than k classes rank above its true class: a higher score, or an equal score at
    a lower class index (argmax's first-maximum rule, so a tie never helps a later class).
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    n, c = logits.shape
    if n == 0 or c == 0:
        raise ValueError("top-k accuracy needs at least one sample and one class")
    labels = labels.to(logits.device, torch.long)
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in 0..{c - 1}")
    true = logits.gather(1, labels[:, None])
    before = torch.arange(c, device=logits.device)[None, :] < labels[:, None]
    rank = (logits > true).sum(1) + ((logits == true) & before).sum(1)
    return {k: 100.0 * float((rank < min(k, c)).float().mean()) for k in ks}


class Failure(BaseModel):
    """A misclassified sample."""

    path: str
    label: str
    predicted: str


class ZeroShotResult(BaseModel):
    """Zero-shot accuracy of one encoder on one labelled set; percentages."""

    kind: str
    layout: str
    root: str
    classes: int
    samples: int  # scored (read and embedded)
    templates: int
    top1: float
    top5: float  # top-min(5, classes)
    per_class_top1: dict[str, float]  # readable name (suffixed " #<index>" where names repeat) -> %, classes scored
    failures: list[Failure]  # the first MAX_FAILURES misclassified samples, in run order
    unreadable: int  # samples that could not be read or embedded: skipped
    unreadable_reasons: list[str]  # the first MAX_REASONS of them
    encoder_id: str
    seconds: float

    def summary(self) -> str:
        k = min(5, self.classes)
        skipped = f", {self.unreadable} unreadable skipped" if self.unreadable else ""
        layout = LAYOUT_NAMES.get(self.layout, self.layout)
        return (
            f"zero-shot {self.kind} on {layout} layout ({self.classes} classes, {self.samples} samples{skipped}): "
            f"top-1 {self.top1:.2f}%, top-{k} {self.top5:.2f}%"
        )


def read_cloud(path: str) -> torch.Tensor:
    """A cloud file's x, y, z as (N, 3) float32: ModelNet's comma-separated .txt (x,y,z[,nx,ny,nz] lines), or any
    point_files.FORMATS file. Raises PointCloudError naming the file."""
    if not path.lower().endswith(".txt"):
        return torch.from_numpy(read_points(path))
    if not os.path.isfile(path):
        raise PointCloudError(f"{path}: no such point-cloud file")
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2, encoding="utf-8")
    except (ValueError, UnicodeDecodeError) as e:
        raise PointCloudError(f"{path}: not comma-separated numbers ({e})") from None
    if rows.shape[0] == 0 or rows.shape[1] not in (3, 6):
        raise PointCloudError(f"{path}: expected lines of x,y,z or x,y,z,nx,ny,nz, found shape {rows.shape}")
    if not np.isfinite(rows[:, :3]).all():
        raise PointCloudError(f"{path}: a coordinate is NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(rows[:, :3]))


def prepare_clouds(
    clouds: Sequence[torch.Tensor], points: int | None, normalize: bool, seed: int, device: torch.device
) -> list[torch.Tensor]:
    """Point-Bind's evaluation preparation: farthest-point sampling down to `points` (clouds of more points only;
    run on `device`, one batch per cloud size, the first index from `seed` as `seeded_starts`), then centre and scale
    into the unit sphere when `normalize`. A cloud gets the same result alone or in any batch."""
    out = list(clouds)
    if points:
        sizes = sorted({len(c) for c in out if len(c) > points})
        for size in sizes:
            where = [i for i, c in enumerate(out) if len(c) == size]
            xyz = torch.stack([out[i] for i in where]).to(device, torch.float32)
            idx = farthest_points(xyz, points, seeded_starts([size] * len(where), seed))
            chosen = xyz.gather(1, idx[..., None].expand(-1, -1, 3)).cpu()
            for j, i in enumerate(where):
                out[i] = chosen[j]
    return [normalize_cloud(c) if normalize else c for c in out]


def _embedder(
    encoder: ImageBind, kind: str, max_pixels: int | None, normalize: bool, points: int | None, seed: int
) -> Callable[[list[str]], torch.Tensor]:
    """paths -> (len, dim) for a kind; raises ValueError / OSError subclasses for a file it cannot use."""
    if kind == "image":
        return lambda paths: encoder.embed_images(paths, batch_size=len(paths), max_pixels=max_pixels)
    if kind == "audio":
        return lambda paths: encoder.embed_audio(paths, batch_size=len(paths))

    def embed_points(paths: list[str]) -> torch.Tensor:
        clouds = prepare_clouds([read_cloud(p) for p in paths], points, normalize, seed, encoder.device)
        return encoder.embed_points(clouds, batch_size=len(paths), seed=seed)

    return embed_points


def _reason(path: str, error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text if text.startswith(path) else f"{path}: {text}"


def _class_keys(classes: Sequence[str]) -> list[str]:
    """Readable names as unique keys; a repeated name (CLIP's ImageNet names have "missile" twice) gets " #<index>"."""
    counts: dict[str, int] = {}
    for name in classes:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{name} #{i}" for i, name in enumerate(classes)]


def classify(
    encoder: ImageBind,
    data: LabelledSet,
    templates: Sequence[str] | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    max_pixels: int | None = None,
    point_normalize: bool | None = None,
    point_resample: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> ZeroShotResult:
    """Zero-shot top-1/top-5 of `encoder` on `data`: logits = sample embeddings @ class_embeddings(...).T.

    Args:
        templates: prompts with "{}" for the class name (default TEMPLATES[data.kind]).
        batch_size: samples embedded at once (texts go 256 at a time).
        limit: score only the first `limit` samples of a shuffle seeded with `seed`, so a quick check covers
            several classes (None: every sample, in the set's order).
        max_pixels: images above this many pixels are refused (counted unreadable) before decoding.
        point_normalize: centre each cloud and scale it into the unit sphere (None: True, Point-Bind's evaluation).
        point_resample: farthest-point sample each cloud of more points down to this many (None: 8192, Point-Bind's
            evaluation; 0: use every point).
        seed: the shuffle for `limit`, the first farthest-point index of each cloud (both samplings).
        progress: called with (samples done, samples total) after each batch.

    A sample that cannot be read (a missing or corrupt file, too few points) is found by embedding its batch one
    by one, counted in `unreadable` with its reason, and skipped. The point options apply to point sets only.

    Raises:
        InputError: an unknown kind, templates without "{}", a bad limit or batch size, an encoder without a
            vocabulary (no text) or, for points, without Point-Bind's weights; every sample unreadable.
    """
    start = time.perf_counter()
    if data.kind not in KINDS:
        raise InputError(f"unknown kind {data.kind!r}; use one of {', '.join(KINDS)}")
    templates = tuple(TEMPLATES[data.kind] if templates is None else templates)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise InputError(f"each prompt template needs {{}} for the class name: {bad[0]!r}" if bad else "no templates")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise InputError(f"batch_size and limit must be at least 1, got {batch_size} and {limit}")
    if point_resample is not None and point_resample < 0:
        raise InputError(f"point_resample must be 0 (every point) or more, got {point_resample}")
    if encoder.tokenizer is None:
        raise InputError(
            "the encoder has no CLIP BPE vocabulary (model.imagebind_vocab), so the class prompts cannot be embedded"
        )
    if data.kind == "point" and not encoder.has_points:
        raise InputError(
            f"{data.root}: a point set needs Point-Bind's weights, and this ImageBind has no point "
            "branch: set model.point_checkpoint to imagebind_w3D.pth"
        )
    if not data.samples or not data.classes:
        raise InputError(f"{data.root}: no samples or no classes")
    samples = list(data.samples)
    if limit is not None:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:limit]
        samples = [samples[i] for i in order.tolist()]
    normalize = POINT_EVAL_NORMALIZE if point_normalize is None else point_normalize
    points = POINT_EVAL_POINTS if point_resample is None else point_resample
    embed = _embedder(encoder, data.kind, max_pixels, normalize, points or None, seed)
    text = class_embeddings(encoder, data.classes, templates)

    kept: list[Sample] = []
    parts: list[torch.Tensor] = []
    unreadable = 0
    reasons: list[str] = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        try:
            parts.append(embed([s.path for s in batch]))
            kept += batch
        except (ValueError, OSError):  # one or more bad files: find them alone
            for sample in batch:
                try:
                    parts.append(embed([sample.path]))
                    kept.append(sample)
                except (ValueError, OSError) as e:
                    unreadable += 1
                    if len(reasons) < MAX_REASONS:
                        reasons.append(_reason(sample.path, e))
                    log.warning("zero-shot: skipping %s", _reason(sample.path, e))
        if progress is not None:
            progress(min(i + batch_size, len(samples)), len(samples))
    if not kept:
        raise InputError(f"{data.root}: none of the {len(samples)} samples could be read; first: {reasons[0]}")

    logits = torch.cat(parts) @ text.T  # (N, C)
    labels = torch.tensor([s.label for s in kept])
    accuracy = topk_accuracy(logits, labels, (1, 5))
    predicted = logits.argmax(dim=1)
    hits = predicted == labels
    keys = _class_keys(data.classes)
    per_class = {}
    for c in sorted(set(labels.tolist())):
        mask = labels == c
        per_class[keys[c]] = 100.0 * float(hits[mask].float().mean())
    wrong = (~hits).nonzero().flatten()[:MAX_FAILURES].tolist()
    failures = [
        Failure(path=kept[j].path, label=data.classes[kept[j].label], predicted=data.classes[int(predicted[j])])
        for j in wrong
    ]
    return ZeroShotResult(
        kind=data.kind,
        layout=data.layout,
        root=data.root,
        classes=len(data.classes),
        samples=len(kept),
        templates=len(templates),
        top1=accuracy[1],
        top5=accuracy[5],
        per_class_top1=per_class,
        failures=failures,
        unreadable=unreadable,
        unreadable_reasons=reasons,
        encoder_id=encoder.encoder_id,
        seconds=time.perf_counter() - start,
    )
