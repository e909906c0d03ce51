"""Class maps: which class name gets which integer label.

ImageNet-22K uses timm's sorted fall11 WordNet ids (21841 of them, ``timm.data.ImageNetInfo``),
the order of the authors' 22K head, so a label means the same class even when a local copy
lacks some synsets. Other trees use their sorted folder names.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from functools import lru_cache

import fsspec

CLASS_MAPS = ("auto", "folders", "imagenet22k", "imagenet1k")
_WNID = re.compile(r"^n\d{8}$")


def is_wnid(name: str) -> bool:
    """True for a WordNet id such as ``n01440764``."""
    return bool(_WNID.match(name))


@lru_cache(maxsize=None)
def imagenet_synsets(subset: str) -> tuple[str, ...]:
    """The sorted WordNet ids timm ships for ``imagenet-22k`` (21841) or ``imagenet-1k`` (1000)."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo(subset).label_names())


def resolve_classes(class_map: str, present: Collection[str], *, archive_layout: bool) -> tuple[list[str], str]:
    """Return ``(classes, how)``: the label order for the classes found in a source.

    ``class_map`` is ``auto`` (ImageNet-22K ids for the fall11 archive layout and for trees of
    WordNet ids that are not all ImageNet-1K classes, else sorted folder names), ``folders``,
    ``imagenet22k``, ``imagenet1k``, or the URL of a text file with one class name per line.
    Raises ``ValueError`` naming the classes a fixed map does not contain.
    """
    if class_map == "auto":
        if archive_layout or (present and all(map(is_wnid, present)) and not set(present) <= set(imagenet_synsets("imagenet-1k"))):
            class_map = "imagenet22k"
        else:
            class_map = "folders"
    if class_map == "folders":
        return sorted(present), "folders"
    if class_map == "imagenet22k":
        classes, how = list(imagenet_synsets("imagenet-22k")), "imagenet22k (timm imagenet22k_synsets.txt)"
    elif class_map == "imagenet1k":
        classes, how = list(imagenet_synsets("imagenet-1k")), "imagenet1k (timm imagenet_synsets.txt)"
    else:
        with fsspec.open(class_map, "rt", encoding="utf-8") as f:
            classes, how = [line.strip() for line in f if line.strip()], class_map
    _check_known(present, classes, how)
    return classes, how


def _check_known(present: Collection[str], classes: Sequence[str], how: str) -> None:
    unknown = sorted(set(present) - set(classes))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(
            f"class {shown} is not in the {how} class list ({len(classes)} classes); "
            "remove it from the source, or write with --classes folders to label by folder name"
        )
