"""COCO ``instances_*.json`` files: read once, damaged files named, every annotation checked against one table
of rules (:data:`RULES`).

A file that is not JSON (cut short, a byte flipped), lacks its ``images`` / ``annotations`` / ``categories``
lists, or has an ``images`` or ``categories`` entry without its fields raises :class:`AnnotationFileError`
naming the file (and the entry): those lists define the split. An annotation is checked against the rules in
order and counted under the first it breaks, named by its ``id`` (``#k``, its position in the file's list,
when it has no usable id). What happens to it then:

- Training (``finetune.coco.data.load_split``): it is dropped; its image keeps its other annotations. One
  warning per file gives the count per rule and the first ids; ``CocoSplit.broken`` keeps them and the
  training loader's summary line repeats the counts.
- Evaluation (``finetune.coco.metrics.CocoEvaluator``): pycocotools and faster-coco-eval would load the same
  file and score such ground truth in their own way, changing the AP without a word (an annotation of an
  unknown category is never scored, a two-point polygon decodes as a box). Instead an image holding a broken
  annotation is not scored at all (left out of ``params.imgIds`` with its detections; the evaluation warns
  naming the annotations and rules) and the evaluator's ``samples`` (images scored) falls short of the images
  evaluated, so the trainer reports the evaluation incomplete (``data.eval_incomplete``: ``error`` stops the
  run, ``warn`` goes on with the AP of the other images). Two rules follow COCOeval instead (``Rule.evaluation``):
  an annotation of an image not in ``images`` is dropped (COCOeval never scores it either), and an empty box
  (w or h = 0; train2017 holds two) is scored as COCOeval scores it: an object no detection matches.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Literal

__all__ = ["AnnotationFileError", "BrokenAnnotation", "CheckedInstances", "RULES", "Rule", "check_instances",
           "read_instances"]

EXAMPLES = 5
"""Annotation ids named per rule in a summary."""


class AnnotationFileError(ValueError):
    """A COCO annotation file that cannot be used: not JSON, or its images / categories malformed."""


@dataclass(frozen=True)
class _Context:
    image_sizes: dict[int, tuple[int, int]]
    category_ids: frozenset[int]
    id_counts: Counter


@dataclass(frozen=True)
class Rule:
    """One check on an annotation: ``expected`` says what a valid one has (the messages quote it)."""

    name: str
    expected: str
    holds: Callable[[Any, _Context], bool]
    evaluation: Literal["unscored", "dropped", "scored"] = "unscored"
    """What an evaluation does with an annotation breaking it: ``unscored`` leaves its image out of the score,
    ``dropped`` drops it (COCOeval never scores it either), ``scored`` keeps it as COCOeval scores it."""


def _integer(value: Any) -> bool:
    return type(value) is int  # JSON's integers; not bool


def _number(value: Any) -> bool:
    return type(value) in _NUMBER_TYPES and math.isfinite(value)


def _numbers(values: list) -> bool:
    """All finite numbers (C-level loops: a file holds millions of coordinates)."""
    return set(map(type, values)) <= _NUMBER_TYPES and math.isfinite(sum(values))


_NUMBER_TYPES = {int, float}


def _has_fields(ann: Any, ctx: _Context) -> bool:
    return (type(ann) is dict and type(ann.get("id")) is int and type(ann.get("image_id")) is int
            and type(ann.get("category_id")) is int and type(ann.get("bbox")) is list and len(ann["bbox"]) == 4
            and _numbers(ann["bbox"]) and _number(ann.get("area")) and ann["area"] >= 0
            and type(ann.get("segmentation")) in (list, dict))


def _polygon_holds(ann: dict, ctx: _Context) -> bool:
    segmentation = ann["segmentation"]
    return not isinstance(segmentation, list) or (bool(segmentation) and all(
        isinstance(part, list) and len(part) >= 6 and len(part) % 2 == 0 and _numbers(part) for part in segmentation))


def _rle_holds(ann: dict, ctx: _Context) -> bool:
    segmentation = ann["segmentation"]
    if not isinstance(segmentation, dict):
        return True
    height, width = ctx.image_sizes[ann["image_id"]]
    counts = segmentation.get("counts")
    if segmentation.get("size") != [height, width]:
        return False
    if isinstance(counts, str):
        return bool(counts)
    return (isinstance(counts, list) and bool(counts) and set(map(type, counts)) == {int} and min(counts) >= 0
            and sum(counts) == height * width)


RULES: tuple[Rule, ...] = (
    Rule("fields", "an object with integer id, image_id and category_id, bbox [x, y, w, h] of 4 finite numbers, "
         "a finite area >= 0 and a segmentation (polygon list or RLE object)", _has_fields),
    Rule("unique id", "an id no other annotation of the file has", lambda a, ctx: ctx.id_counts[a["id"]] == 1),
    Rule("image", "an image_id listed in images", lambda a, ctx: a["image_id"] in ctx.image_sizes, "dropped"),
    Rule("category", "a category_id listed in categories", lambda a, ctx: a["category_id"] in ctx.category_ids),
    Rule("iscrowd", "iscrowd 0 or 1 (or none)", lambda a, ctx: a.get("iscrowd", 0) in (0, 1)),
    Rule("bbox", "bbox w >= 0 and h >= 0", lambda a, ctx: a["bbox"][2] >= 0 and a["bbox"][3] >= 0),
    Rule("polygon", "polygon parts of an even number >= 6 of finite coordinates (3 points or more)", _polygon_holds),
    Rule("rle", "RLE size [height, width] of its image, counts a string or integers >= 0 summing to "
         "height x width", _rle_holds),
    Rule("empty box", "bbox w > 0 and h > 0", lambda a, ctx: a["bbox"][2] > 0 and a["bbox"][3] > 0, "scored"),
)


_CONSEQUENCES = {"unscored": "left out of training; an evaluation leaves their images unscored",
                 "dropped": "left out of training; COCOeval never scores them either",
                 "scored": "left out of training; COCOeval scores them as they are"}


@dataclass(frozen=True)
class BrokenAnnotation:
    """An annotation that breaks ``rule``: its ``label`` (``id`` or ``#position``), its image (None when the
    annotation names no image of the file) and the annotation itself."""

    rule: Rule
    label: str
    image_id: int | None
    annotation: Any


@dataclass(frozen=True)
class CheckedInstances:
    """A checked instances file: its ``images`` and ``categories`` (well formed), the ``annotations`` that
    follow every rule, and the ``broken`` ones."""

    file: str
    images: list[dict]
    categories: list[dict]
    annotations: list[dict]
    broken: tuple[BrokenAnnotation, ...]

    @property
    def total(self) -> int:
        """Annotations in the file."""
        return len(self.annotations) + len(self.broken)

    def summary(self, broken: tuple[BrokenAnnotation, ...] | None = None, consequence: bool = False) -> str:
        """``rule (expected): count, id ...`` per rule for ``broken`` (default: all of them), with ``consequence``
        what training and evaluation do with them."""
        broken = self.broken if broken is None else broken
        parts = []
        for rule in RULES:
            labels = [b.label for b in broken if b.rule is rule]
            if labels:
                more = ", ..." if len(labels) > EXAMPLES else ""
                then = f" ({_CONSEQUENCES[rule.evaluation]})" if consequence else ""
                parts.append(f"{rule.name} ({rule.expected}): {len(labels)}, id {', '.join(labels[:EXAMPLES])}{more}"
                             f"{then}")
        return "; ".join(parts)

    def unscored(self) -> tuple[BrokenAnnotation, ...]:
        """The broken annotations for which an evaluation leaves their image unscored."""
        return tuple(b for b in self.broken if b.rule.evaluation == "unscored" and b.image_id is not None)

    def ground_truth(self) -> dict:
        """What COCOeval should load: the images and categories, the valid annotations plus those COCOeval
        scores as they are (``Rule.evaluation == "scored"``), none of an unscored image."""
        unscored = {b.image_id for b in self.unscored()}
        annotations = self.annotations + [b.annotation for b in self.broken if b.rule.evaluation == "scored"]
        return {"images": self.images, "categories": self.categories,
                "annotations": [a for a in annotations if a["image_id"] not in unscored]}


def _entries(data: dict, key: str, fields: dict[str, Callable[[Any], bool]], file: str) -> list[dict]:
    """``data[key]``, each entry with ``fields`` (name -> test) and a unique id; AnnotationFileError otherwise."""
    seen: set[int] = set()
    for position, entry in enumerate(data[key]):
        for name, valid in fields.items():
            if not isinstance(entry, dict) or not valid(entry.get(name)):
                raise AnnotationFileError(
                    f"{file}: {key}[{position}] has no valid {name!r} ({entry!r:.200}); expected {_fields_doc(fields)}")
        if entry["id"] in seen:
            raise AnnotationFileError(f"{file}: {key}[{position}] repeats id {entry['id']}; ids must be unique")
        seen.add(entry["id"])
    return data[key]


def _fields_doc(fields: dict[str, Callable[[Any], bool]]) -> str:
    return ", ".join(f"{name} ({_FIELD_WORDS[valid]})" for name, valid in fields.items())


def _positive(value: Any) -> bool:
    return _integer(value) and value > 0


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


_FIELD_WORDS = {_integer: "an integer", _positive: "an integer > 0", _text: "a non-empty string"}
_IMAGE_FIELDS = {"id": _integer, "file_name": _text, "height": _positive, "width": _positive}
_CATEGORY_FIELDS = {"id": _integer}


def check_instances(data: Any, file: str) -> CheckedInstances:
    """Check a loaded instances file (module docstring); ``file`` names it in messages."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise AnnotationFileError(f"{file}: no {key!r} list; not a COCO instances file")
    images = _entries(data, "images", _IMAGE_FIELDS, file)
    categories = _entries(data, "categories", _CATEGORY_FIELDS, file)
    annotations = data["annotations"]
    ids = Counter(a["id"] for a in annotations if isinstance(a, dict) and _integer(a.get("id")))
    context = _Context({i["id"]: (i["height"], i["width"]) for i in images},
                       frozenset(c["id"] for c in categories), ids)
    kept, broken = [], []
    for position, ann in enumerate(annotations):
        for rule in RULES:
            if not rule.holds(ann, context):
                break
        else:
            kept.append(ann)
            continue
        fields = ann if isinstance(ann, dict) else {}
        label = str(fields["id"]) if _integer(fields.get("id")) else f"#{position}"
        image_id = fields.get("image_id")
        listed = _integer(image_id) and image_id in context.image_sizes
        broken.append(BrokenAnnotation(rule, label, image_id if listed else None, ann))
    return CheckedInstances(file, images, categories, kept, tuple(broken))


def read_instances(url: str) -> CheckedInstances:
    """Read and check ``url`` (a local path or an fsspec URL): AnnotationFileError naming it when it is not
    JSON or not a COCO instances file."""
    import fsspec

    with fsspec.open(url, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise AnnotationFileError(f"{url}: not a valid JSON file ({type(error).__name__}: {error}); a download or "
                                  "copy cut short? Fetch the file again") from None
    return check_instances(data, url)
