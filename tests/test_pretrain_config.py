"""pretrain.config and pretrain.optim: validation naming the key, recipes, --set parsing, param groups, schedule."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unireplknet
from pretrain.config import ConfigError, all_presets, apply_overrides, config_from_dict, config_to_dict, load_config
from pretrain.optim import build_param_groups, build_scheduler, cosine_with_warmup
from pretrain.config import OptimConfig

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", sorted(all_presets()))
def test_every_preset_validates_and_round_trips_through_json(name):
    config = load_config(name)
    again = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert config_to_dict(again) == config_to_dict(config)


def test_recipes_carry_the_papers_numbers():
    xl = load_config("xl_in22k_192")
    assert (xl.model.num_classes, xl.data.img_size, xl.model.drop_path_rate) == (21841, 192, 0.2)
    assert (xl.optim.lr, xl.optim.weight_decay, xl.optim.warmup_epochs, xl.train.epochs) == (1e-3, 0.05, 5, 90)
    assert (xl.train.global_batch_size, xl.train.micro_batch_size, xl.train.label_smoothing) == (4096, 32, 0.1)
    assert (xl.data.mixup_alpha, xl.data.cutmix_alpha, xl.data.random_erasing) == (0.8, 1.0, 0.25)
    assert xl.data.auto_augment == "rand-m9-mstd0.5-inc1"
    assert load_config("xl_in22k_384").data.img_size == 384
    s = load_config("s_in22k_224")
    assert (s.data.img_size, s.model.drop_path_rate, s.optim.lr) == (224, 0.1, 4e-3)
    ft = load_config("xl_in1k_ft_384")
    assert (ft.model.num_classes, ft.data.img_size, ft.model.head_init_scale) == (1000, 384, 0.001)
    assert (ft.optim.layer_decay, ft.train.ema_decay is not None, ft.train.label_smoothing) == (0.8, True, 0.3)
    assert (ft.optim.lr, ft.optim.weight_decay, ft.optim.warmup_epochs, ft.train.global_batch_size) == (5e-5, 1e-8, 0, 512)
    assert (ft.data.mixup_alpha, ft.data.cutmix_alpha, ft.model.drop_path_rate, ft.train.epochs) == (0, 0, 0.3, 20)


@pytest.mark.parametrize("override, key, expected", [
    (["train.zero_stage=5"], "train.zero_stage", "one of 0, 1, 2, 3"),
    (["train.zero_stag=1"], "train.zero_stag", "unknown key"),
    (["trian.epochs=1"], "trian.epochs", "unknown key"),
    (["optim.lr=fast"], "optim.lr", "expected a number"),
    (["train.epochs=1.5"], "train.epochs", "expected an integer"),
    (["optim.name=sgd"], "optim.name", "one of 'adamw', 'adam', 'lamb'"),
    (["optim.name=lamb"], "train.zero_stage", "expected 0 with optim.name=lamb"),
    (["train.global_batch_size=100", "train.micro_batch_size=32"], "train.global_batch_size", "multiple"),
    (["data.img_size=100"], "data.img_size", "multiple of 32"),
    (["optim.layer_decay=0"], "optim.layer_decay", "(0.0, 1.0]"),
    (["model.depths=1,2,3"], "model.depths", "4 positive integers"),
    (["launch.num_workers=2"], "launch.num_workers", "torchrun or ray"),
    (["model.channels_last=maybe"], "model.channels_last", "true or false"),
    (["model.fused_branches=true", "model.sync_batchnorm=true"], "model.fused_branches", "sync_batchnorm"),
    (["model"], "model", "key=value"),
    (["model=3"], "model", "is a section"),
])
def test_bad_values_fail_naming_the_key(override, key, expected):
    with pytest.raises(ConfigError) as error:
        load_config("demo", override)
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}: ") and expected in str(error.value)


def test_overrides_are_parsed_by_annotation():
    config = apply_overrides(load_config("demo"), [
        "model.dims=8,16,32,64", "model.kernel_sizes=[[3],[7],[7,3],[7]]", "optim.clip_grad=none",
        "train.ema_decay=0.99", "optim.betas=0.8,0.9", "data.auto_augment=", "model.channels_last=true",
        "train.max_steps=7",
    ])
    assert config.model.dims == (8, 16, 32, 64) and config.model.kernel_sizes == ((3,), (7,), (7, 3), (7,))
    assert config.optim.clip_grad is None and config.train.ema_decay == 0.99 and config.optim.betas == (0.8, 0.9)
    assert config.data.auto_augment == "" and config.model.channels_last is True and config.train.max_steps == 7


def test_overrides_coerce_words_by_the_field_type():
    """none/off/true are words for string fields, None only where None is allowed, booleans only for bools."""
    config = load_config("demo", [
        "checkpoint.resume=none", "run_dir=true", "data.auto_augment=off", "model.init_from=none",
        "train.max_steps=none", "optim.clip_grad=null", "model.channels_last=off", "model.grad_checkpointing=yes",
        "train.ema_decay=none", "data.val_urls=none"])
    assert config.checkpoint.resume == "none" and config.run_dir == "true"
    assert config.data.auto_augment == "" and config.model.init_from == "" and config.data.val_urls == ""
    assert config.train.max_steps is None and config.optim.clip_grad is None and config.train.ema_decay is None
    assert config.model.channels_last is False and config.model.grad_checkpointing is True
    assert load_config("demo", ["checkpoint.resume=off"]).checkpoint.resume == "off"


@pytest.mark.parametrize("override, key, expected", [
    (["optim.lr=Infinity"], "optim.lr", "expected a finite number, got inf"),
    (["optim.lr=NaN"], "optim.lr", "expected a finite number, got nan"),
    (["optim.betas=0.9,nan"], "optim.betas[1]", "finite"),
    (["train.ema_decay=inf"], "train.ema_decay", "finite"),
    (["data.auto_augment=rand-bogus9"], "data.auto_augment", "timm policy"),
    (["train.max_steps=ten"], "train.max_steps", "expected an integer or none, got 'ten'"),
    (["model.channels_last=none"], "model.channels_last", "true or false"),
])
def test_non_finite_numbers_and_bad_words_fail_naming_the_key(override, key, expected):
    with pytest.raises(ConfigError) as error:
        load_config("demo", override)
    assert error.value.key == key and expected in str(error.value), str(error.value)


def test_cli_resume_none_and_a_json_config_with_non_finite_lr(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pretrain", "--config", "demo", "--resume", "none", "--dry-run"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["checkpoint"]["resume"] == "none"
    values = config_to_dict(load_config("demo"))
    values["optim"]["lr"] = float("inf")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))  # Python's json writes Infinity, and reads it back
    with pytest.raises(ConfigError, match="^optim.lr: expected a finite number"):
        load_config(str(path))


@pytest.mark.parametrize("launch_args, env, message", [
    (["launch.launcher=torchrun", "launch.num_workers=3"], {},
     "train.global_batch_size: 64 is not a multiple of train.micro_batch_size x world size (16 x 3)"),
    (["launch.launcher=ray", "launch.num_workers=8", "launch.device=cpu"], {},
     "(16 x 8)"),
    ([], {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}, "(16 x 3)"),
])
def test_dry_run_checks_the_batch_split_with_the_launch_world_size(launch_args, env, message):
    import os

    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", "demo", "--dry-run", "--set", "train.global_batch_size=64",
         "train.micro_batch_size=16", *launch_args],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_cli_rejects_a_bad_config_before_training(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", "demo", "--set", f"run_dir={run_dir}", "train.zero_stage=7"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "train.zero_stage: expected one of 0, 1, 2, 3, got 7" in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("changes, message", [
    ({"data.train_urls": "{missing}"}, "data.train_urls: no info.json at {missing}/info.json"),
    ({"model.num_classes": 5}, "model.num_classes: expected at least the 10 classes of data.train_urls"),
    ({"model.init_from": "{missing}.pth"}, "model.init_from: no such file: {missing}.pth"),
])
def test_preflight_rejects_missing_data_too_few_classes_and_missing_weights(changes, message, pretrain_shards,
                                                                          tmp_path):
    """Caught in the launching process, before workers start or a model is built (no run directory)."""
    run_dir, missing = tmp_path / "run", str(tmp_path / "nowhere")
    values = {"run_dir": run_dir, "data.source": "shards", "data.train_urls": pretrain_shards["train"],
              "data.val_urls": pretrain_shards["val"], **changes}
    overrides = [f"{key}={str(value).format(missing=missing)}" for key, value in values.items()]
    result = subprocess.run([sys.executable, "-m", "pretrain", "--config", "demo", "--set", *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message.format(missing=missing) in result.stderr
    assert not run_dir.exists()


def test_cli_dry_run_prints_the_effective_config():
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", "xl_in22k_384", "--set", "optim.lr=2e-3", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["optim"]["lr"] == 2e-3 and printed["data"]["img_size"] == 384
    assert printed["model"]["name"] == "unireplknet_xl"


# ----------------------------------------------------------------------------- optimizer


def tiny_model():
    return unireplknet.UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                                   kernel_sizes=((3,), (13,), (13, 3), (13,)), num_classes=10)


def test_no_weight_decay_for_norms_biases_layer_scale_and_grn():
    model = tiny_model()
    groups = build_param_groups(model, OptimConfig(weight_decay=0.05))
    decay_of = {name: g["weight_decay"] for g in groups for name in g["param_names"]}
    assert set(decay_of) == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        exempt = (param.ndim <= 1 or name.endswith((".gamma", ".beta")) or ".norm." in name or "bn" in name
                  or name.endswith(".bias"))
        assert decay_of[name] == (0.0 if exempt else 0.05), name
    assert decay_of["stages.1.0.act.1.gamma"] == 0.0 and decay_of["stages.1.0.pwconv1.1.weight"] == 0.05


def test_layer_decay_matches_timm_and_follows_block_order():
    from timm.optim import param_groups_layer_decay

    model = tiny_model()
    groups = build_param_groups(model, OptimConfig(lr=1.0, weight_decay=0.05, layer_decay=0.5))
    mine = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    reference = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                         layer_decay=0.5)
    expected = {id(p): (g["lr_scale"], g["weight_decay"]) for g in reference for p in g["params"]}
    assert mine.keys() == expected.keys()
    for key, (lr, decay) in expected.items():
        assert mine[key] == (pytest.approx(lr, rel=1e-12), decay)
    lr_of = {name: mine[id(p)][0] for name, p in model.named_parameters()}
    blocks = [f"stages.{s}.{b}.pwconv1.1.weight" for s, depth in enumerate((1, 1, 2, 1)) for b in range(depth)]
    assert all(lr_of[a] < lr_of[b] for a, b in zip(blocks, blocks[1:]))
    assert lr_of["downsample_layers.0.0.weight"] < lr_of[blocks[0]] < lr_of["head.weight"] == 1.0


def test_cosine_schedule_with_warmup_matches_the_formula():
    factor = cosine_with_warmup(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    for step in (10, 37, 64, 99):
        expected = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))
        assert factor(step) == pytest.approx(expected)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr": 2.0}, {"params": [model.bias], "lr": 1.0}], lr=1.0)
    scheduler = build_scheduler(optimizer, OptimConfig(lr=2.0, min_lr=0.02, warmup_epochs=1), total_steps=100,
                                steps_per_epoch=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.0, 1.0])


def test_training_flops_of_the_demo_net_whose_last_stage_is_1x1():
    """Forward FLOPs of one sample, counted independently on one image in eval mode (BatchNorm accepts a batch of 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    import unireplknet
    from pretrain.bench import forward_flops_per_sample
    from pretrain.task import build_task

    model = unireplknet.UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=10,
                                    kernel_sizes=((3,), (13,), (13, 3), (13,))).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert forward_flops_per_sample(build_task(load_config("demo"))) == pytest.approx(counter.get_total_flops())


@pytest.mark.parametrize("img_size", [224, 384])
def test_evaluation_follows_the_authors_protocol(img_size, tmp_path):
    """The authors' datasets.py: at >= 384 warp to img_size x img_size (no crop), below resize the shorter
    side to int(img_size / 0.875) and center-crop; both bicubic, ImageNet mean/std."""

    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from pretrain.distributed import WorldInfo
    from pretrain.classification.task import ImageClassification
    from shards import write_dataset

    rng = np.random.default_rng(0)
    for index, (width, height) in enumerate([(500, 330), (330, 480)]):
        folder = tmp_path / "tree" / f"class{index}"
        folder.mkdir(parents=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "image.jpg", quality=95)
    write_dataset(str(tmp_path / "tree"), str(tmp_path / "val"), progress=False)
    config = load_config("demo", [f"data.img_size={img_size}", f"data.val_urls={tmp_path / 'val'}",
                                  "loader.num_workers=0", "model.num_classes=2"])
    loader = ImageClassification(config).build_eval_loader(WorldInfo())
    images, labels = next(iter(loader))

    if img_size >= 384:
        resize = [transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC)]
    else:
        resize = [transforms.Resize(int(img_size / (224 / 256)), interpolation=transforms.InterpolationMode.BICUBIC),
                  transforms.CenterCrop(img_size)]
    authors = transforms.Compose([*resize, transforms.ToTensor(),
                                  transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    for image, label in zip(images, labels):
        original = Image.open(tmp_path / "tree" / f"class{int(label)}" / "image.jpg").convert("RGB")
        assert torch.allclose(image, authors(original), atol=1e-5)

    import timm

    cfg = timm.data.resolve_data_config({}, model=timm.create_model("unireplknet_s.in22k_ft_in1k_384",
                                                                    pretrained=False))
    assert (cfg["crop_pct"], cfg["crop_mode"]) == (1.0, "squash")
