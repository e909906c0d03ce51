"""The point-cloud demo set: trimesh primitives with random pose, anisotropic scale and noise, written in both
ModelNet layouts (``python -m finetune make-demo-data pointcloud OUT``, issue 22 point 4)::

    OUT/mesh/<class>/{train,test}/<class>_NNNN.off     the raw layout; every third file's header glued to its
                                                       counts (``OFF8 12 0``), as in ModelNet40
    OUT/resampled/modelnet40_shape_names.txt, modelnet40_{train,test}.txt, <class>/<class>_NNNN.txt
                                                       ``points`` surface samples, ``x,y,z,nx,ny,nz`` per line

The same shapes in both (sample ``k`` of a class is one mesh, sampled for the text layout)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "primitive", "write_demo"]

_logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("box", "capsule", "cone", "cylinder", "icosphere", "torus")
"""Class names in label order (sorted, as the mesh layout's folders list them)."""


def primitive(name: str, rng: np.random.Generator):
    """One ``name`` mesh (see :data:`CLASSES`) with a random anisotropic scale (0.6-1.4 per axis), rotation and
    offset."""
    import trimesh
    from trimesh.transformations import random_rotation_matrix

    if name == "box":
        mesh = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    elif name == "capsule":
        mesh = trimesh.creation.capsule(height=1.0, radius=0.35, count=(16, 16))
    elif name == "cone":
        mesh = trimesh.creation.cone(radius=0.5, height=1.0, sections=24)
    elif name == "cylinder":
        mesh = trimesh.creation.cylinder(radius=0.5, height=1.0, sections=24)
    elif name == "icosphere":
        mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    elif name == "torus":
        mesh = trimesh.creation.torus(major_radius=0.5, minor_radius=0.18, major_sections=24, minor_sections=12)
    else:
        raise ValueError(f"unknown primitive {name!r}; expected one of {', '.join(CLASSES)}")
    mesh.apply_scale(rng.uniform(0.6, 1.4, size=3))
    mesh.apply_transform(random_rotation_matrix(rng.random(3)))
    mesh.apply_translation(rng.uniform(-0.3, 0.3, size=3))
    return mesh


def _off_text(mesh, glued: bool) -> str:
    counts = f"{len(mesh.vertices)} {len(mesh.faces)} 0"
    lines = [f"OFF{counts}" if glued else f"OFF\n{counts}"]
    lines += [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.vertices]
    lines += [f"3 {a} {b} {c}" for a, b, c in mesh.faces]
    return "\n".join(lines) + "\n"


def write_demo(out: str | os.PathLike, train_per_class: int = 40, test_per_class: int = 10, points: int = 2048,
               noise: float = 0.01, seed: int = 0) -> dict:
    """Write the demo set under ``out`` (both layouts, see the module docstring); each sampled point is moved by
    Gaussian noise of ``noise`` (the mesh files stay exact). Returns ``{"mesh", "resampled", "classes"}``."""
    import trimesh

    out = Path(out)
    mesh_root, text_root = out / "mesh", out / "resampled"
    split_ids: dict[str, list[str]] = {"train": [], "test": []}
    for label, name in enumerate(CLASSES):
        (text_root / name).mkdir(parents=True, exist_ok=True)
        number = 0
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            (mesh_root / name / split).mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                number += 1
                rng = np.random.default_rng([seed, label, number])
                mesh = primitive(name, rng)
                shape_id = f"{name}_{number:04d}"
                (mesh_root / name / split / f"{shape_id}.off").write_text(_off_text(mesh, glued=number % 3 == 0))
                sampled, faces = trimesh.sample.sample_surface(mesh, points, seed=rng)
                sampled = sampled + rng.normal(0.0, noise, size=sampled.shape)
                rows = np.concatenate([sampled, mesh.face_normals[faces]], axis=1)
                (text_root / name / f"{shape_id}.txt").write_text(
                    "\n".join(",".join(f"{v:.6f}" for v in row) for row in rows) + "\n")
                split_ids[split].append(shape_id)
    (text_root / "modelnet40_shape_names.txt").write_text("\n".join(CLASSES) + "\n")
    for split, ids in split_ids.items():
        (text_root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
    _logger.info("wrote %d + %d demo shapes of %d classes to %s (mesh and resampled layouts)",
                 len(split_ids["train"]), len(split_ids["test"]), len(CLASSES), out)
    return {"mesh": str(mesh_root), "resampled": str(text_root), "classes": CLASSES}
