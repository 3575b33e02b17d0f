"""Image-classification data for the recipes: loading, column detection, timm transforms, collation.

A dataset is a Hub dataset id, a local folder (class sub-folders of images, read by the ``imagefolder``
builder, or parquet files; ``datasets`` picks the builder from the files), a single ``.parquet`` file,
or ``sklearn:digits``, a small real dataset that ships with scikit-learn (for offline demos and tests).
"""
from __future__ import annotations

import functools
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset
from PIL import Image as PILImage

from ..hf.image_processing_ela import _eight_bit

__all__ = [
    "DIGITS_DATASET",
    "EVAL_SPLIT_NAMES",
    "ImageClassificationTransform",
    "build_transforms",
    "recipe_pretrained_cfg",
    "collate_image_batch",
    "load_digits_dataset",
    "load_image_dataset",
    "resolve_columns",
    "class_names",
    "check_labels",
    "split_train_eval",
    "prepare_splits",
    "take_samples",
    "hub_dataset_id",
    "check_images",
    "check_split_images",
]

logger = logging.getLogger(__name__)

DIGITS_DATASET = "sklearn:digits"
# the first of these that exists is the evaluation split
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
_IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "pixel_values")
_LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "target", "class", "category")


def load_digits_dataset(image_size: int = 32, eval_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's handwritten digits (1,797 images, 8x8 grey, 10 classes) as RGB images of ``image_size``.

    The images are upscaled (bilinear) so that a CIFAR network sees CIFAR-sized inputs. The split is
    stratified and fixed by ``seed``: ``train`` and ``validation``.
    """
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size for {DIGITS_DATASET} must be at least 8 (the images are 8x8), got {image_size}")
    digits = load_digits()
    # pixel values are 0..16
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = [
        PILImage.fromarray(p, mode="L").resize((image_size, image_size), PILImage.BILINEAR).convert("RGB")
        for p in pixels
    ]
    names = [str(i) for i in range(10)]
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    full = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    parts = full.train_test_split(test_size=eval_fraction, stratify_by_column="label", seed=seed)
    return DatasetDict(train=parts["train"], validation=parts["test"])


def load_image_dataset(
    dataset: str, config: Optional[str] = None, cache_dir: Optional[str] = None, image_size: int = 32
) -> DatasetDict:
    """Load ``dataset`` (see the module docstring) as a :class:`~datasets.DatasetDict`.

    ``image_size`` only matters for ``sklearn:digits``, whose 8x8 images are upscaled to it.
    """
    if dataset == DIGITS_DATASET:
        return load_digits_dataset(image_size=image_size)
    if not dataset.strip():
        raise ValueError("--dataset is empty: give a Hub dataset id, a local folder, a .parquet file or " + DIGITS_DATASET)
    if dataset.startswith("sklearn:"):
        raise ValueError(
            f"--dataset {dataset!r}: the one scikit-learn dataset of images is {DIGITS_DATASET} (its others, such "
            "as iris, are tables)"
        )
    path = os.path.expanduser(dataset)
    # a relative path whose first folder is here (data/imgs for ./data/imgs): a typo in the rest is a missing
    # folder, not a Hub id to retry for half a minute ("owner/name" ids have no folder of the owner's name here)
    first = dataset.split("/", 1)[0]
    under_here = "/" in dataset and not dataset.startswith((".", "/", "~")) and os.path.isdir(first)
    looks_local = dataset.startswith((".", "/", "~")) or dataset.endswith(".parquet") or under_here
    if looks_local and not os.path.exists(path):
        here = f" (the folder {first}/ is here, so it is read as a local path)" if under_here else ""
        raise ValueError(f"--dataset {dataset!r}: no such file or folder{here}")
    if os.path.isfile(path):
        if not path.endswith(".parquet"):
            raise ValueError(f"--dataset {dataset!r}: a single file must be a .parquet file (or pass a folder)")
        loaded = load_dataset("parquet", data_files={"train": path}, cache_dir=cache_dir)
    else:
        # a local folder or a Hub id: datasets infers the builder (imagefolder, parquet, ...) and the
        # splits from the file names
        if os.path.isdir(path):
            _refuse_linked_folders(path, dataset)
        loaded = load_dataset(path if os.path.isdir(path) else dataset, name=config, cache_dir=cache_dir)
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict(train=loaded)
    # only a local folder that datasets read as parquet: an image folder's tree is not walked again
    if os.path.isdir(path) and any(split.info.builder_name == "parquet" for split in loaded.values()):
        _check_parquet_class_names(path)
    if os.path.isdir(path) and any(split.info.builder_name == "imagefolder" for split in loaded.values()):
        _check_split_folders(path, dataset)
        _name_images_at_another_depth(path, dataset, loaded)
        _check_class_folders(path, dataset, loaded)
    return loaded


def _split_folder_regex(flags: int = 0) -> re.Pattern:
    """A folder name that ``datasets`` reads as a split: a split keyword, alone or set off by ``-._ 0-9``."""
    from datasets.data_files import SPLIT_KEYWORDS

    keywords = "|".join(re.escape(k) for names in SPLIT_KEYWORDS.values() for k in names)
    return re.compile(rf"(.*[-._ 0-9])?({keywords})([-._ 0-9].*)?", flags)


def _subfolders(path: str) -> List[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


@functools.lru_cache(maxsize=None)
def _readable_extensions() -> frozenset:
    """The file extensions (lower case) of the images ``datasets``' image folders read."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return frozenset(extension.lower() for extension in ImageFolder.EXTENSIONS)


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _readable_extensions()


def _holds_images(path: str) -> bool:
    """Whether the folder ``path`` itself holds an image file that ``datasets`` reads (stops at the first)."""
    with os.scandir(path) as entries:
        return any(_is_image_file(e.name) and e.is_file() for e in entries)


# image formats that datasets' image folders leave out (it reads Pillow's formats): phone photos, raw, vector
_UNREAD_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw",
                            ".orf", ".rw2", ".raf", ".raw")


def _class_folder_files(path: str) -> Tuple[int, Dict[str, int], Dict[str, int]]:
    """``(images, kinds, left_out)`` under the folder ``path``: the number of images ``datasets`` reads; the count
    of each other kind of file (extension, or name); and of those, the images of a format it does not read
    (``_UNREAD_IMAGE_EXTENSIONS``) with no readable image of the same name beside them (``IMG_1.HEIC`` without an
    ``IMG_1.jpg`` or ``IMG_1.HEIC.jpg`` converted from it), by kind. Hidden files and folders, and linked folders,
    are passed over, as ``datasets`` does."""
    readable = _readable_extensions()
    images, kinds, left_out = 0, {}, {}
    pending = [path]
    while pending:
        stems, unread = set(), []
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if not entry.is_symlink():  # datasets does not follow linked folders (and a link may loop)
                        pending.append(entry.path)
                    continue
                stem, extension = os.path.splitext(entry.name)
                extension = extension.lower()
                if extension in readable:
                    images += 1
                    stems.add(stem.lower())
                else:
                    kind = extension or entry.name
                    kinds[kind] = kinds.get(kind, 0) + 1
                    if kind in _UNREAD_IMAGE_EXTENSIONS:
                        unread.append((stem.lower(), entry.name.lower(), kind))
        for stem, name, kind in unread:  # a converted twin: IMG_1.jpg, or IMG_1.HEIC.jpg
            if stem not in stems and name not in stems:
                left_out[kind] = left_out.get(kind, 0) + 1
    return images, kinds, left_out


def _refuse_linked_folders(path: str, dataset: str) -> None:
    """Symbolic links to folders, as split folders or class folders: ``datasets`` does not follow them, so
    their images would be left out without a word (a class missing from the model, or a whole split)."""
    splits = _split_folder_regex()
    linked = []
    for entry in os.scandir(path):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if entry.is_symlink():
            linked.append(entry.name + "/")
        elif splits.fullmatch(entry.name):  # class folders inside a split folder (not the images of a flat one)
            linked += [f"{entry.name}/{e.name}/" for e in os.scandir(entry.path)
                       if e.is_symlink() and e.is_dir() and not e.name.startswith(".")]
    if linked:
        linked.sort()
        raise ValueError(
            f"--dataset {dataset!r}: {', '.join(linked[:5])}{' ...' if len(linked) > 5 else ''} "
            f"{'is a symbolic link' if len(linked) == 1 else 'are symbolic links'} to a folder, which datasets does "
            "not follow: those images would be left out without a word. Copy the folders in (or link the images "
            "one by one, which works)"
        )


def _check_split_folders(path: str, dataset: str) -> None:
    """Top-level folders of an image folder that ``datasets`` silently mis-reads. Only folders are listed: the
    top level, the split folders, and the few other top-level folders the checks below ask about (each once), so
    a flat folder of classes is not walked through its images.

    - Split-like names it does not recognise (``Train/``, ``Validation/``: it matches lower case only) make it
      read the folder as one split whose classes are those names' sub-folders: validation images would be
      trained on. Two or more such folders are an error, one a warning (it may be a class).
    - Beside recognised split folders, any other folder (``holdout/``) is not read at all: a warning.
    - A class folder named like a split (``train/val_birds/``, CIFAR-100's ``train/``) is read into that split
      too: training images would be evaluated (or the reverse). An error.
    - In a flat folder of classes, class folders named like a split (``test tube/``) are read as splits, and the
      other classes left out. An error (only where folders of images sit beside them: split folders of images
      alone are datasets' metadata layout, or an unlabelled test set).
    """
    exact, loose = _split_folder_regex(), _split_folder_regex(re.IGNORECASE)
    top = _subfolders(path)
    splits = [name for name in top if exact.fullmatch(name)]

    def holds_splits(children: List[str]) -> bool:  # e.g. imagenet/train/: datasets reads it one level down
        return any(exact.fullmatch(child) for child in children)

    if not splits:
        children = {name: _subfolders(os.path.join(path, name)) for name in top if loose.fullmatch(name)}
        # a look-alike holds class folders (and no split folders); a folder of images directly is a class
        # (Open Images' "Train")
        look_alike = [name for name, sub in children.items() if sub and not holds_splits(sub)]
        if look_alike:
            message = (
                f"--dataset {dataset!r}: the folders {', '.join(n + '/' for n in look_alike)} look like splits, but "
                "datasets recognises split folders in lower case only (train/, validation/, test/, ...), so it reads "
                "every image as training data, with these folders' sub-folders as classes. Rename them in lower case"
            )
            if len(look_alike) > 1:
                raise ValueError(message)
            logger.warning(message + " (or ignore this if it is a class)")
        return
    children = {name: _subfolders(os.path.join(path, name)) for name in top}
    # a flat folder of classes where some class names hold a split keyword (test tube/, evaluation_set/): datasets
    # reads those as splits and leaves the other classes (folders of images beside them) out. Split folders of
    # images without class folders are datasets' metadata layout (train/metadata.csv), or a test set without labels
    flat = [name for name in splits if not children[name] and _holds_images(os.path.join(path, name))]
    others = [name for name in top if name not in splits and _holds_images(os.path.join(path, name))] if flat else []
    if others:
        raise ValueError(
            f"--dataset {dataset!r}: the folders {', '.join(n + '/' for n in flat)} hold images directly, as the class "
            f"folders beside them do ({', '.join(n + '/' for n in others[:3])}{' ...' if len(others) > 3 else ''}), "
            "but datasets reads a folder named like a split (train, validation, test, eval, ... in lower case, alone or "
            "set off by -._ space or digits) as a split, and would leave the other classes out. Rename these class "
            "folders (capitalised, e.g. 'Test tube', they are read as classes)"
        )
    claimed = sorted(f"{split}/{cls}/" for split in splits for cls in children[split] if exact.fullmatch(cls))
    if claimed:
        raise ValueError(
            f"--dataset {dataset!r}: the class folders {', '.join(claimed[:5])}{' ...' if len(claimed) > 5 else ''} "
            "are named like a split (train, val, test, ... alone or set off by -._ or digits), so datasets also puts "
            "their images into that split: training and evaluation images would mix. Rename these class folders"
        )
    ignored = [name for name in top if name not in splits and not holds_splits(children[name])]
    if ignored:
        logger.warning(
            f"--dataset {dataset!r}: the folders {', '.join(n + '/' for n in ignored)} are not read: beside the split "
            f"folders ({', '.join(n + '/' for n in splits)}) datasets takes only folders named like a split "
            "(train, validation, test, ... in lower case)"
        )


def _name_images_at_another_depth(path: str, dataset: str, loaded: DatasetDict) -> None:
    """``datasets`` turns an image folder's labels off for the whole dataset when its images are not all at one
    depth: a single stray ``train/x.png`` beside ``train/cat/1.png``. Only when no split has labels (and no
    metadata file gives the columns instead) is the folder walked, to name the images that sit elsewhere."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if any("label" in split.features for split in loaded.values()):
        return
    depths: Dict[int, List[str]] = {}
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if any(f in ImageFolder.METADATA_FILENAMES for f in files):
            return  # the metadata file's columns are the dataset's: resolve_columns lists them
        for file in sorted(files):
            if _is_image_file(file):
                relative = os.path.relpath(os.path.join(root, file), path)
                depths.setdefault(relative.count(os.sep), []).append(relative.replace(os.sep, "/"))
    if len(depths) < 2:
        return  # one depth: one class folder, or no class folders at all (resolve_columns says so)
    usual = max(depths, key=lambda d: len(depths[d]))
    strays = [f for d in sorted(depths) if d != usual for f in depths[d]]
    example = depths[usual][0]
    raise ValueError(
        f"--dataset {dataset!r}: {len(strays)} image(s) sit at another folder depth than the other "
        f"{len(depths[usual])} (like {example}): {', '.join(strays[:5])}{' ...' if len(strays) > 5 else ''}. datasets "
        "then turns the class labels off for the whole dataset: move them into a class folder (or remove them)"
    )


def _check_class_folders(path: str, dataset: str, loaded: DatasetDict) -> None:
    """Class folders whose images ``datasets`` leaves out without a word: it names the classes after the folders
    of the images it reads, and does not read some formats (``.heic`` phone photos, raw, vector). A class folder
    holding only such images is an error (the class would be missing, from the model or from a split); one that
    is empty a warning; one where they sit beside images it reads, not converted (no ``IMG_1.jpg`` beside
    ``IMG_1.HEIC``), a warning naming how many are left out. Class folders are listed, not their images read."""
    classes = {name for split in loaded.values() if isinstance(split.features.get("label"), ClassLabel)
               for name in split.features["label"].names}
    if not classes:
        return  # no labels at all: prepare_splits says why
    exact = _split_folder_regex()
    top = _subfolders(path)
    # the class folders: inside the split folders, at the top or one level down (data/train/cat/, beside which
    # other folders such as assets/ are not read); else the top-level folders of a flat folder of classes
    splits = [name for name in top if exact.fullmatch(name)]
    if not splits:
        splits = [f"{name}/{sub}" for name in top for sub in _subfolders(os.path.join(path, name))
                  if exact.fullmatch(sub)]
    folders = [f"{s}/{c}" for s in splits for c in _subfolders(os.path.join(path, s))] if splits else top
    unread: Dict[str, Dict[str, int]] = {}
    empty: List[str] = []
    partly: Dict[str, Tuple[int, Dict[str, int]]] = {}
    for folder in folders:
        images, kinds, left_out = _class_folder_files(os.path.join(path, folder))
        if images and left_out:
            partly[folder] = images, left_out
        elif images:
            continue
        elif any(kind in _UNREAD_IMAGE_EXTENSIONS for kind in kinds):
            unread[folder] = kinds
        else:
            empty.append(folder)

    def counts(kinds: Dict[str, int]) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))

    if unread:
        described = "; ".join(f"{folder}/: {counts(kinds)}" for folder, kinds in sorted(unread.items())[:5])
        raise ValueError(
            f"--dataset {dataset!r}: no image that datasets reads in the class folder(s) {described}"
            f"{'; ...' if len(unread) > 5 else ''}: their images would be left out without a word. Convert them to "
            "JPEG or PNG (e.g. with pillow-heif for .heic)"
        )
    if empty:
        logger.warning(
            f"--dataset {dataset!r}: the folders {', '.join(f + '/' for f in sorted(empty)[:10])}"
            f"{' ...' if len(empty) > 10 else ''} hold no image that datasets reads: no class (or no image of that "
            f"class in that split) comes from them; the {len(classes)} classes are the folders with images"
        )
    if partly:
        total = sum(n for _, left_out in partly.values() for n in left_out.values())
        described = "; ".join(f"{folder}/: {counts(left_out)} beside {images} read"
                              for folder, (images, left_out) in sorted(partly.items())[:5])
        logger.warning(
            f"--dataset {dataset!r}: {total} image(s) of a format datasets does not read are left out, in the class "
            f"folder(s) {described}{'; ...' if len(partly) > 5 else ''}. Convert them to JPEG or PNG (e.g. with "
            "pillow-heif for .heic) to train and evaluate on them"
        )


def _check_parquet_class_names(path: str) -> None:
    """The parquet files under the folder ``path`` must agree on every ClassLabel's name -> id mapping.

    ``datasets`` reads all files with the first file's features without remapping ids, so a validation file
    written with its classes in another order would be scored against the wrong names.
    """
    import glob
    import json

    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    seen: Dict[str, Tuple[str, List[str]]] = {}
    for file in files:
        try:
            meta = (pq.read_schema(file).metadata or {}).get(b"huggingface")
            features = json.loads(meta)["info"]["features"] if meta else {}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge here; loading reports unreadable files
        for column, feature in features.items():
            if not (isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and "names" in feature):
                continue
            names = list(feature["names"])
            if column not in seen:
                seen[column] = (file, names)
                continue
            first_file, first = seen[column]
            clash = [n for n in set(first) & set(names) if first.index(n) != names.index(n)]
            if clash:
                raise ValueError(
                    f"the parquet files disagree on the classes of column {column!r}: "
                    f"{os.path.relpath(first_file, path)} has {first}, {os.path.relpath(file, path)} has {names} "
                    f"(e.g. {sorted(clash)[:3]} have other ids); datasets would read every file's ids with one "
                    "file's names. Write all splits with the same ClassLabel names"
                )


def hub_dataset_id(dataset: str) -> Optional[str]:
    """``dataset`` if it names a Hub dataset (for the model card's metadata), else None."""
    if dataset == DIGITS_DATASET or os.path.exists(os.path.expanduser(dataset)):
        return None
    if dataset.startswith((".", "/", "~")) or dataset.endswith(".parquet"):
        return None
    return dataset


def resolve_columns(
    dataset: Dataset, image_column: Optional[str] = None, label_column: Optional[str] = None
) -> Tuple[str, str]:
    """The image and label columns of ``dataset``: the ones named, else detected from the features.

    Detection prefers typed features (``Image``, ``ClassLabel``) and falls back to common names; a label
    column must hold integers or class names (strings, which :func:`prepare_splits` turns into a ``ClassLabel``).
    Raises ``ValueError`` naming the columns there are when none fits.
    """
    features = dataset.features
    columns = list(features)
    described = ", ".join(f"{c} ({_describe(features[c])})" for c in columns)

    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"--image_column {image_column!r} is not a column of the dataset; columns: {described}")
    else:
        typed = [c for c in columns if isinstance(features[c], Image)]
        named = [c for c in _IMAGE_COLUMN_NAMES if c in features]
        if not typed and not named:
            raise ValueError(f"the dataset has no image column; columns: {described}. Name it with --image_column")
        image_column = (typed or named)[0]

    if label_column is not None:
        if label_column not in features:
            raise ValueError(f"--label_column {label_column!r} is not a column of the dataset; columns: {described}")
        if not (_is_integer_label(features[label_column]) or _is_string(features[label_column])):
            raise ValueError(
                f"--label_column {label_column!r} holds {_describe(features[label_column])}, not class ids; "
                "a label column must be a ClassLabel, an integer column or a column of class names (strings)"
            )
    else:
        class_labels = [c for c in columns if isinstance(features[c], ClassLabel)]
        if len(class_labels) > 1:
            preferred = [c for c in _LABEL_COLUMN_NAMES if c in class_labels]
            if not preferred:
                raise ValueError(
                    f"the dataset has several label columns ({', '.join(class_labels)}); choose one with --label_column"
                )
            class_labels = preferred
        named = [c for c in _LABEL_COLUMN_NAMES
                 if c in features and (_is_integer_label(features[c]) or _is_string(features[c]))]
        if not class_labels and not named:
            if columns and all(isinstance(features[c], Image) for c in columns):
                # imagefolder: no labels at all means the folder layout did not give classes
                raise ValueError(
                    f"the dataset has images but no labels (columns: {described}). For a folder of images the "
                    "classes are the sub-folder names: every image must sit exactly one level below train/ (and "
                    "validation/), e.g. train/cat/1.png; a single image at another depth (train/x.png, "
                    "train/cat/more/y.png) turns the labels off for the whole dataset, and so does a folder with a "
                    "single class (a classifier needs at least 2)"
                )
            metadata = ("" if (dataset.info.builder_name or "") != "imagefolder" else
                        " (a folder of images with a metadata.csv, .jsonl or .parquet file takes its columns from that "
                        "file, not its class folders: give the file a label column, or remove it to use the folders)")
            raise ValueError(
                f"the dataset has no usable label column (a ClassLabel, or an integer or string column named one "
                f"of {', '.join(_LABEL_COLUMN_NAMES)}); columns: {described}. Name it with --label_column{metadata}"
            )
        label_column = (class_labels or named)[0]
    if label_column == image_column:
        raise ValueError(f"the image and label columns are the same column {image_column!r}")
    return image_column, label_column


def class_names(dataset: Dataset, label_column: str) -> List[str]:
    """Class names from a ``ClassLabel`` feature, else ``"0" .. str(max label)`` for an integer column."""
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    labels = np.asarray(dataset.with_format("numpy")[label_column])
    if labels.size == 0:
        raise ValueError(f"label column {label_column!r} is empty")
    if labels.min() < 0:
        raise ValueError(f"label column {label_column!r} has negative class ids (min {labels.min()}); unlabeled split?")
    return [str(i) for i in range(int(labels.max()) + 1)]


def check_labels(dataset: Dataset, label_column: str, num_classes: int, split: str) -> None:
    """Every label of ``split`` must be a class id in ``[0, num_classes)`` (test splits often hold -1)."""
    labels = np.asarray(dataset.with_format("numpy")[label_column])
    if labels.size and labels.min() < 0:
        raise ValueError(
            f"split {split!r}: label column {label_column!r} has negative values (min {labels.min()}): an "
            "unlabeled split? Choose a labeled one with --eval_split"
        )
    if labels.size and labels.max() >= num_classes:
        unknown = sorted({int(v) for v in labels if v >= num_classes})
        raise ValueError(
            f"split {split!r}: label column {label_column!r} has classes {unknown[:10]} that the training split "
            f"does not have (it has the {num_classes} classes [0, {num_classes - 1}])"
        )


def take_samples(dataset: Dataset, n: Optional[int], seed: int = 0) -> Dataset:
    """``n`` rows of ``dataset`` drawn at random (fixed by ``seed``), or all of it when ``n`` is None.

    Shuffled first: image folders and many parquet files are sorted by class, so the first rows would
    be the first classes only.
    """
    if n is None or n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def prepare_splits(
    train: Dataset,
    evaluation: Dataset,
    eval_name: str,
    *,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    class_source: Optional[Dataset] = None,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
    seed: int = 0,
    decode_images: bool = True,
) -> Tuple[Dataset, Dataset, str, str, List[str]]:
    """The recipes' checks and subsets: ``(train, evaluation, image_column, label_column, class names)``.

    Columns are resolved on both splits, an image column of encoded bytes, ``{bytes, path}`` structs or
    file paths becomes an ``Image`` feature, the class names come from ``class_source`` (the whole
    training split before any held-out part; default ``train``), every evaluation label must be one of
    them, and ``max_*_samples`` draw random subsets (:func:`take_samples`). Classes that the returned
    training split has no image of are logged as a warning.

    ``decode_images=False`` leaves the image column undecoded (``Image(decode=False)``: ``{bytes, path}``
    rows) for :class:`ImageClassificationTransform` to decode, so that an unreadable image file is reported
    with its path (``datasets`` itself reports e.g. "image file is truncated" without naming the file).
    """
    image_column, label_column = resolve_columns(train, image_column, label_column)
    resolve_columns(evaluation, image_column, label_column)
    train = _as_image(train, image_column, decode_images)
    evaluation = _as_image(evaluation, image_column, decode_images)
    source = train if class_source is None else class_source
    if _is_string(source.features[label_column]):  # class names (pandas' usual form): ids in sorted name order
        train, evaluation, source = _encode_class_names(train, evaluation, source, label_column, eval_name)
    labels = class_names(source, label_column)
    check_labels(evaluation, label_column, len(labels), eval_name)
    _check_eval_classes_are_trained(source, evaluation, label_column, labels, eval_name)
    train = take_samples(train, max_train_samples, seed)
    evaluation = take_samples(evaluation, max_eval_samples, seed)
    _warn_missing_classes(train, label_column, labels, subset=max_train_samples is not None)
    return train, evaluation, image_column, label_column, labels


def avoid_single_image_batch(
    train: Dataset, model: str, image_size: int, per_device_batch_size: int, world_size: int = 1,
    drop_last: bool = False,
) -> Dataset:
    """``train``, one image shorter where an epoch's last batch would hold a single image and the model's last
    stage is 1x1 at ``image_size``: batch norm cannot normalise one value per channel in training.

    Only a single process can get such a batch (with several, Accelerate fills the last batch up with images from
    the start of the epoch); evaluation is not affected (batch norm uses its running statistics there).
    """
    from .arguments import final_feature_size

    if (world_size > 1 or drop_last or final_feature_size(model, image_size) > 1
            or len(train) % per_device_batch_size != 1 or len(train) <= 1):
        return train
    logger.info(f"{model} at {image_size}x{image_size} has a 1x1 last stage and {len(train)} training images would "
                f"leave a batch of one image at the end of each epoch: one image (drawn at random) is left out")
    return take_samples(train, len(train) - 1)


def _label_ids(dataset: Dataset, label_column: str) -> set:
    return set(np.unique(np.asarray(dataset.with_format("numpy")[label_column])).tolist())


def _check_eval_classes_are_trained(source: Dataset, evaluation: Dataset, label_column: str, labels: List[str],
                                    eval_name: str) -> None:
    """Every class the evaluation split has images of must have training images: an image folder's classes
    are the sub-folders of every split, so ``validation/owl/`` (or ``Cat/`` beside ``train/cat/``) would add a
    class that is never trained and always scored wrong."""
    trained = _label_ids(source, label_column)
    untrained = sorted(_label_ids(evaluation, label_column) - trained)
    if untrained:
        trained_names = [labels[t] for t in trained]
        names = ", ".join(repr(labels[i]) + _look_alike(labels[i], trained_names) for i in untrained[:10])
        names += ", ..." if len(untrained) > 10 else ""
        raise ValueError(
            f"split {eval_name!r} has images of {len(untrained)} class(es) the training split has no image of: "
            f"{names}. The classes are those of the training split; for a folder of images the class folders "
            "must have the same names (case included) under every split"
        )


def _look_alike(name: str, trained: List[str]) -> str:
    """`` (training has 'X': ...)`` when ``name`` differs from a trained class name only in ways that do not show:
    Unicode normalisation, spaces at the ends, case (each named where it plays a part)."""
    import unicodedata

    steps = (("Unicode normalisation (an accent stored as its own character in one, joined to its letter in the "
              "other, as folders copied from a Mac can be)", lambda n: unicodedata.normalize("NFC", n)),
             ("spaces at the ends", str.strip),
             ("case", str.casefold))

    def key(n: str, skip: int = -1) -> str:
        for k, (_, step) in enumerate(steps):
            n = n if k == skip else step(n)
        return n

    for other in trained:
        if key(name) == key(other):  # the differences that matter: those the other steps alone do not undo
            reasons = [why for k, (why, _) in enumerate(steps) if key(name, skip=k) != key(other, skip=k)]
            return f" (training has {other!r}: the names differ in {' and '.join(reasons)})"
    return ""


def _warn_missing_classes(train: Dataset, label_column: str, labels: List[str], subset: bool) -> None:
    """Log a warning naming the classes that ``train`` has no image of (the model can never learn them)."""
    present = _label_ids(train, label_column)
    missing = [name for i, name in enumerate(labels) if i not in present]
    if not missing:
        return
    why = " (--max_train_samples drew a subset without them)" if subset else ""
    logger.warning(
        f"{len(missing)} of the {len(labels)} classes have no training images{why}: "
        f"{', '.join(repr(n) for n in missing[:10])}{', ...' if len(missing) > 10 else ''}"
    )


def _as_image(dataset: Dataset, column: str, decode: bool = True) -> Dataset:
    feature = dataset.features[column]
    if isinstance(feature, Image):
        return dataset if feature.decode == decode else dataset.cast_column(column, Image(decode=decode))
    encoded = isinstance(feature, Value) and feature.dtype in ("binary", "large_binary", "string", "large_string")
    struct = isinstance(feature, dict) and "bytes" in feature
    if not (encoded or struct):
        raise ValueError(
            f"image column {column!r} holds {_describe(feature)}; it must be an Image feature, encoded image "
            "bytes, a {'bytes', 'path'} struct or file paths (name another with --image_column)"
        )
    return dataset.cast_column(column, Image(decode=decode))


def split_train_eval(
    data: DatasetDict,
    train_split: str = "train",
    eval_split: Optional[str] = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> Tuple[Dataset, Dataset, str]:
    """``(train, eval, eval_name)``: the named splits, the first of ``EVAL_SPLIT_NAMES`` that exists, or
    ``eval_fraction`` of ``train`` held out (fixed by ``seed``) when the dataset has no evaluation split."""
    if train_split not in data:
        raise ValueError(f"the dataset has no split {train_split!r}; splits: {', '.join(data)}")
    if eval_split is not None:
        if eval_split not in data:
            raise ValueError(f"the dataset has no split {eval_split!r}; splits: {', '.join(data)}")
        return data[train_split], data[eval_split], eval_split
    for name in EVAL_SPLIT_NAMES:
        if name in data and name != train_split:
            return data[train_split], data[name], name
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"the dataset has no evaluation split and eval_fraction={eval_fraction} is not in (0, 1)")
    parts = data[train_split].train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"], f"{train_split}[held out {eval_fraction:.0%}]"


def recipe_pretrained_cfg(model: str, recipe: str, image_size: Optional[int] = None) -> Dict:
    """The timm ``pretrained_cfg`` a recipe trains ``model`` with and writes into its export: the model's own,
    at ``image_size``. For ``recipe="cifar"`` it describes the CIFAR evaluation transform (every image resized
    to the input size, bilinear, no crop: ``crop_mode="squash"``, ``crop_pct=1``), so that timm's transforms
    and the image processor of the release see images exactly as the recipe's evaluation did."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model).to_dict()
    if image_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], image_size, image_size)
    if recipe == "cifar":
        cfg.update(crop_mode="squash", crop_pct=1.0, interpolation="bilinear")
    return cfg


def build_transforms(
    data_config: Dict, recipe: str, hflip: float = 0.5
) -> Tuple[Callable[[PILImage.Image], torch.Tensor], Callable[[PILImage.Image], torch.Tensor]]:
    """``(train_transform, eval_transform)`` from a timm data config (``timm.data.resolve_data_config``).

    ``recipe="imagenet"``: timm's RandomResizedCrop + flip for training and resize + center crop
    (``crop_pct``) for evaluation; no colour jitter (the paper's recipe has none).
    ``recipe="cifar"``: random crop with 4 pixels of zero padding + flip for training; evaluation sees the
    image as it is. Images whose size differs from the model's input are resized to it first.
    Both normalise with the config's mean and std.
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    size = int(data_config["input_size"][-1])
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    if recipe == "imagenet":
        train = create_transform(
            data_config["input_size"], is_training=True, hflip=hflip, color_jitter=None,
            interpolation=data_config["interpolation"], mean=mean, std=std,
        )
        evaluate = create_transform(
            data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
            mean=mean, std=std, crop_pct=data_config["crop_pct"],
        )
    elif recipe == "cifar":
        resize = _ResizeIfNeeded(size)
        normalize = [T.ToTensor(), T.Normalize(mean, std)]
        train = T.Compose([resize, T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(hflip), *normalize])
        evaluate = T.Compose([resize, *normalize])
    else:
        raise ValueError(f"recipe must be 'imagenet' or 'cifar', got {recipe!r}")
    return train, evaluate


class _ResizeIfNeeded:
    """Resize to ``size`` x ``size`` only when the image is not that size already (CIFAR images are)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: PILImage.Image) -> PILImage.Image:
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), PILImage.BILINEAR)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class ImageClassificationTransform:
    """``Dataset.set_transform`` callable: a batch of rows -> ``pixel_values`` and ``labels``.

    A class rather than a closure so that dataloader worker processes can pickle it. Images may be PIL
    images, arrays, or undecoded ``{bytes, path}`` rows (``Image(decode=False)``, see :func:`prepare_splits`),
    which are decoded here; a file that cannot be read raises ``ValueError`` naming it.
    """

    def __init__(self, transform: Callable, image_column: str, label_column: str):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, batch: Dict[str, Sequence]) -> Dict[str, List]:
        images = [_to_rgb(_decode(img)) for img in batch[self.image_column]]
        return {
            "pixel_values": [self.transform(img) for img in images],
            "labels": [int(y) for y in batch[self.label_column]],
        }


def _decode(value):
    """An undecoded ``{bytes, path}`` row (or a path) -> a PIL image, as ``datasets`` decodes it, with the
    file named in the error when it cannot be read."""
    if not isinstance(value, (dict, str)):
        return value
    try:
        return Image().decode_example(value)
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        path = value if isinstance(value, str) else value.get("path")
        source = f"image file {path!r}" if path else "an image (embedded bytes without a file name)"
        raise ValueError(f"cannot read {source}: {type(error).__name__}: {error}") from error


def check_images(dataset: Dataset, image_column: str, split: str, num_threads: Optional[int] = None,
                 max_listed: int = 10, progress: bool = True) -> None:
    """Decode every image of ``dataset`` once, before training, and raise one ``ValueError`` naming the files
    that cannot be read (up to ``max_listed`` of them, and how many in all).

    The recipes call it on the evaluation split (``--check_images eval``, the default), whose first reading
    would otherwise come after a whole training epoch, before any checkpoint is saved; ``--check_images all``
    checks the training split too. Images are decoded as training decodes them (so a truncated file fails here
    exactly when it would fail there), by ``num_threads`` threads (default: the CPU cores, at most 8; Pillow
    decodes without holding the GIL), with a progress bar on the main process (``progress=False``: none). Under
    ``torch.distributed`` every process checks its share of the images and all of them raise the same error.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch.distributed as dist
    from tqdm.auto import tqdm

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    # the rows as stored (not through a set_transform), images left undecoded for _decode to read
    rows = _as_image(dataset.with_format(None).select_columns([image_column]), image_column, decode=False)
    if world > 1:  # every process a strided share, so the work is split and each image is read once
        rows = rows.select(range(rank, len(rows), world))
    if num_threads is None:
        num_threads = max(1, min(8, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))

    def problem(row: int, value) -> Optional[Tuple[int, str]]:
        try:
            if value is None or (isinstance(value, dict) and value.get("bytes") is None and not value.get("path")):
                raise ValueError("no image (an empty value)")
            _to_rgb(_decode(value))
        except Exception as error:  # noqa: BLE001 - _decode names the file; anything else is a failure too
            found = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            named = isinstance(value, str) or (isinstance(value, dict) and value.get("path"))
            return row, found if named else f"row {row}: {found}"  # the row is all there is to find it by
        return None

    problems: List[Tuple[int, str]] = []
    count = start = 0
    with ThreadPoolExecutor(num_threads) as pool, tqdm(
        total=len(dataset), desc=f"checking the {split} images", unit="img", disable=rank != 0 or not progress,
    ) as bar:
        for batch in rows.iter(batch_size=256):
            values = batch[image_column]
            rows_here = [rank + world * (start + i) for i in range(len(values))]  # row numbers in ``dataset``
            for found in pool.map(problem, rows_here, values):
                count += found is not None
                if found is not None and len(problems) < max_listed:
                    problems.append(found)
            start += len(values)
            bar.update(min(len(values) * world, bar.total - bar.n))  # (the shares differ by one at most)
    if distributed:  # every process raises the same error, so none waits for the others in a collective
        shares: List = [None] * world
        dist.all_gather_object(shares, (count, problems))
        count = sum(c for c, _ in shares)
        problems = sorted(p for _, found in shares for p in found)[:max_listed]
    if count:
        listed = "\n  ".join(message for _, message in problems) + ("\n  ..." if count > len(problems) else "")
        raise ValueError(
            f"{count} of the {len(dataset)} images of split {split!r} cannot be read:\n  {listed}\n"
            "Remove or replace these files (the recipes' --check_images none skips this check)"
        )


def check_split_images(which: str, train: Dataset, evaluation: Dataset, image_column: str, train_name: str,
                       eval_name: str, progress: bool = True) -> None:
    """The recipes' ``--check_images``: ``"eval"`` checks ``evaluation``, ``"all"`` both splits, ``"none"``
    nothing (:func:`check_images`). With both, one error lists the unreadable images of each split."""
    if which not in ("eval", "all", "none"):
        raise ValueError(f"--check_images must be eval, all or none, got {which!r}")
    splits = ([(train, train_name)] if which == "all" else []) + ([(evaluation, eval_name)] if which != "none" else [])
    errors = []
    for dataset, name in splits:
        try:
            check_images(dataset, image_column, name, progress=progress)
        except ValueError as error:
            errors.append(str(error))
    if errors:
        raise ValueError("\n".join(errors))


def _to_rgb(img) -> PILImage.Image:
    if not isinstance(img, PILImage.Image):
        img = PILImage.fromarray(np.asarray(img))
    img = _eight_bit(img)  # 16-bit grey: Pillow's convert would clip at 255 (a white image)
    # grey, palette, CMYK and RGBA images all become 3-channel RGB, which every model here expects
    return img if img.mode == "RGB" else img.convert("RGB")


def collate_image_batch(examples: Sequence[Dict]) -> Dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
    }


def _is_string(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _encode_class_names(train: Dataset, evaluation: Dataset, source: Dataset, label_column: str,
                        eval_name: str) -> Tuple[Dataset, Dataset, Dataset]:
    """A label column of class names as a ``ClassLabel`` of their names, sorted (as an image folder's classes
    are); a missing name is an error. An evaluation split's name that the training split lacks gets an id too,
    for :func:`_check_eval_classes_are_trained` to refuse by name, as it does a folder's."""
    train_names, eval_names = source.unique(label_column), evaluation.unique(label_column)
    for split, values in (("training split", train_names), (f"split {eval_name!r}", eval_names)):
        if any(v is None or not str(v).strip() for v in values):
            raise ValueError(f"the {split}'s label column {label_column!r} has rows without a class name (empty "
                             "or missing); label every image or leave the unlabelled ones out")
    feature = ClassLabel(names=sorted(set(train_names) | set(eval_names)))
    return tuple(d.cast_column(label_column, feature) for d in (train, evaluation, source))


def _is_integer_label(feature) -> bool:
    return isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")))


def _describe(feature) -> str:
    if isinstance(feature, Value):
        return feature.dtype
    return type(feature).__name__
