"""Checks several test modules run the same way (the task conformance suite, the fine-tuning tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

EVAL_WORKER = textwrap.dedent('''
    """Build the trainer of preset argv[1] with overrides argv[2] (same seed: same initial weights on every rank),
    evaluate once, rank 0 writes the results to argv[3]."""
    import json, sys
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    trainer = Trainer(load_config(sys.argv[1], json.loads(sys.argv[2])))
    try:
        results = trainer.evaluate()
        if trainer.world.is_main:
            with open(sys.argv[3], "w") as f:
                json.dump(results, f)
    finally:
        trainer.close()
''')


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


def evaluate_on_ranks(preset: str, overrides: Callable[[int], list[str]], tmp_path: Path,
                      env: dict[str, str] | None = None) -> dict[int, dict]:
    """Results of one evaluation under torchrun with 1 and with 2 ranks (``overrides(ranks)``; ``env``: the
    workers' environment, default this process's with the checkout on PYTHONPATH)."""
    script = tmp_path / "eval_worker.py"
    script.write_text(EVAL_WORKER)
    outputs = {}
    for ranks in (1, 2):
        out = tmp_path / f"eval_{ranks}.json"
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc-per-node={ranks}", str(script), preset, json.dumps(overrides(ranks)),
                                 str(out)], cwd=REPO, capture_output=True, text=True, timeout=400,
                                env=env or {**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[ranks] = json.loads(out.read_text())
    return outputs


def assert_predict_draws_over(run_dir: Path, images: list[str], out_dir: Path, *options: str) -> None:
    """``python -m finetune predict RUN_DIR IMAGES --out OUT OPTIONS``: one PNG per image, of its size, not
    the image itself."""
    result = subprocess.run([sys.executable, "-m", "finetune", "predict", str(run_dir), *images, "--out",
                             str(out_dir), *options], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = result.stdout.split()
    assert len(written) == len(images)
    for image, drawn in zip(images, written):
        assert Image.open(drawn).size == Image.open(image).size
        assert Image.open(drawn).tobytes() != Image.open(image).convert("RGB").tobytes()


def assert_predict_names_the_images_it_cannot_read(run_dir: Path, images: list[str], out_dir: Path) -> None:
    """``predict`` over two good ``images`` with a text file, a truncated JPEG and a missing file among them: the
    good ones are drawn (stdout lists their PNGs, nothing else), each bad one is named on stderr with the reason,
    exit status 1."""
    not_an_image = out_dir.parent / "notes.jpg"
    not_an_image.write_text("not an image\n")
    truncated = out_dir.parent / "cut.jpg"
    data = Path(images[0]).read_bytes()
    truncated.write_bytes(data[:len(data) // 3])
    missing = out_dir.parent / "absent.jpg"
    batch = [images[0], str(not_an_image), str(truncated), images[1], str(missing)]
    result = subprocess.run([sys.executable, "-m", "finetune", "predict", str(run_dir), *batch, "--out", str(out_dir)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stdout.split() == [str(out_dir / (Path(i).stem + ".png")) for i in images[:2]]
    for image in images[:2]:
        assert Image.open(out_dir / (Path(image).stem + ".png")).size == Image.open(image).size
    for bad, why in ((not_an_image, "UnidentifiedImageError"), (truncated, "truncated"),
                     (missing, "FileNotFoundError")):
        line = next((line for line in result.stderr.splitlines() if line.startswith(f"predict: skipped {bad}: ")), "")
        assert why in line, result.stderr[-3000:]
