"""UniRepLKNet model: exact parameter counts, re-parameterization, official key layout, timm API."""
from __future__ import annotations


import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import unireplknet
from unireplknet import CheckpointMismatchError, UniRepLKNet, export_official, load_official
from unireplknet.checkpoint import read_state_dict
from unireplknet.model import DILATED_BRANCHES, VARIANTS
from unireplknet.tools import max_relative_difference, randomize_statistics

# The spec's exact table (the authors' release), 1000 classes: (training, inference).
PARAMS_1K = {
    "a": (4_649_060, 4_437_300), "f": (6_489_328, 6_235_216), "p": (11_080_520, 10_741_704),
    "n": (18_818_880, 18_318_560), "t": (31_693_420, 31_037_980), "s": (56_456_704, 55_645_984),
    "b": (99_089_416, 98_008_456), "l": (220_076_056, 218_454_616), "xl": (388_690_984, 386_529_064),
}
PARAMS_22K = {
    "s": (72_483_433, 71_672_713), "b": (120_451_441, 119_370_481),
    "l": (252_108_673, 250_487_233), "xl": (431_394_193, 429_232_273),
}
SMALL_DIMS = (16, 32, 64, 128)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_model(family: str, **kwargs) -> UniRepLKNet:
    depths, _, kernels = VARIANTS[family]
    return UniRepLKNet(depths=depths, dims=SMALL_DIMS, kernel_sizes=kernels, **kwargs)


@pytest.mark.parametrize("variant", list(PARAMS_1K))
def test_parameter_counts_match_release(variant):
    train_count, infer_count = PARAMS_1K[variant]
    with torch.device("meta"):
        training = timm.create_model(f"unireplknet_{variant}", num_classes=1000)
        inference = timm.create_model(f"unireplknet_{variant}", num_classes=1000, deploy=True)
    assert count_params(training) == train_count
    assert count_params(inference) == infer_count


@pytest.mark.parametrize("variant", list(PARAMS_22K))
def test_parameter_counts_22k_head(variant):
    train_count, infer_count = PARAMS_22K[variant]
    with torch.device("meta"):
        training = timm.create_model(f"unireplknet_{variant}", num_classes=21841)
        inference = timm.create_model(f"unireplknet_{variant}", num_classes=21841, deploy=True)
    assert count_params(training) == train_count
    assert count_params(inference) == infer_count


def test_reparameterized_counts_equal_deploy_construction():
    model = small_model("t")
    model.reparameterize()
    assert count_params(model) == count_params(small_model("t", deploy=True))
    assert model.deployed


# ---------------------------------------------------------------------------------------------
# An independent functional forward of the training structure, written from the spec, that reads
# the official keys of a state dict. It shares no code with unireplknet.model.

def _ln_cf(x, sd, prefix):
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + 1e-6)
    return sd[prefix + "weight"][:, None, None] * x + sd[prefix + "bias"][:, None, None]


def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"],
                        sd[prefix + "weight"], sd[prefix + "bias"], False, 0.0, 1e-5)


def _dw(x, weight, dilation=1):
    pad = dilation * (weight.shape[-1] - 1) // 2
    return F.conv2d(x, weight, None, 1, pad, dilation, x.shape[1])


def reference_forward(sd, x, depths, kernels):
    x = F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], 2, 1)
    x = F.gelu(_ln_cf(x, sd, "downsample_layers.0.1."))
    x = F.conv2d(x, sd["downsample_layers.0.3.weight"], sd["downsample_layers.0.3.bias"], 2, 1)
    x = _ln_cf(x, sd, "downsample_layers.0.4.")
    for s in range(4):
        if s > 0:
            x = F.conv2d(x, sd[f"downsample_layers.{s}.0.weight"], sd[f"downsample_layers.{s}.0.bias"], 2, 1)
            x = _ln_cf(x, sd, f"downsample_layers.{s}.1.")
        for j in range(depths[s]):
            p = f"stages.{s}.{j}."
            k = kernels[s][j]
            if k == 3:
                y = _dw(x, sd[p + "dwconv.weight"])
            else:
                y = _bn(_dw(x, sd[p + "dwconv.lk_origin.weight"]), sd, p + "dwconv.origin_bn.")
                for kk, r in zip(*DILATED_BRANCHES[k]):
                    y = y + _bn(_dw(x, sd[p + f"dwconv.dil_conv_k{kk}_{r}.weight"], r), sd, p + f"dwconv.dil_bn_k{kk}_{r}.")
            y = _bn(y, sd, p + "norm.")
            se = y.mean((2, 3), keepdim=True)
            se = F.relu(F.conv2d(se, sd[p + "se.down.weight"], sd[p + "se.down.bias"]))
            y = y * torch.sigmoid(F.conv2d(se, sd[p + "se.up.weight"], sd[p + "se.up.bias"]))
            y = y.permute(0, 2, 3, 1)
            y = F.gelu(F.linear(y, sd[p + "pwconv1.1.weight"], sd[p + "pwconv1.1.bias"]))
            g = torch.sqrt((y * y).sum(dim=(1, 2), keepdim=True))
            n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
            y = (sd[p + "act.1.gamma"] * n + 1) * y + sd[p + "act.1.beta"]
            y = F.linear(y, sd[p + "pwconv2.0.weight"]).permute(0, 3, 1, 2)
            y = _bn(y, sd, p + "pwconv2.2.")
            x = x + sd[p + "gamma"].view(1, -1, 1, 1) * y
    x = F.layer_norm(x.mean((2, 3)), (x.shape[1],), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def random_model(family, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = small_model(family, num_classes=10, **kwargs)
    randomize_statistics(model, torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


@pytest.mark.parametrize("family", ["a", "n", "t", "s"])
def test_forward_matches_independent_reference(family):
    depths, _, kernels = VARIANTS[family]
    model = random_model(family)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = reference_forward(export_official(model), x, depths, kernels)
        actual = model(x)
    assert max_relative_difference(expected, actual) < 1e-12


@pytest.mark.parametrize("family", ["a", "n", "t", "s"])
def test_reparameterize_equivalence_float64(family):
    model = random_model(family)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        model.reparameterize()
        actual = model(x)
    assert model.deployed
    assert max_relative_difference(expected, actual) < 1e-8
    # Constructed directly in the inference structure, the same weights give the same logits.
    deployed = small_model(family, num_classes=10, deploy=True).to(torch.float64).eval()
    load_official(deployed, export_official(model))
    with torch.no_grad():
        assert max_relative_difference(expected, deployed(x)) < 1e-8


@pytest.mark.parametrize("kernel_size", sorted(DILATED_BRANCHES))
def test_dilated_reparam_block_every_kernel_size(kernel_size):
    torch.manual_seed(kernel_size)
    block = unireplknet.DilatedReparamBlock(6, kernel_size).double()
    randomize_statistics(block, torch.Generator().manual_seed(1))
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight)
    block.eval()
    x = torch.randn(2, 6, 19, 17, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        actual = block(x)
    assert set(dict(block.named_parameters())) == {"lk_origin.weight", "lk_origin.bias"}
    assert max_relative_difference(expected, actual) < 1e-12


def test_reparameterize_is_idempotent_and_keeps_outputs():
    model = random_model("a")
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    model.reparameterize()
    with torch.no_grad():
        once = model(x)
        model.reparameterize()
        twice = model(x)
    assert torch.equal(once, twice)


# ---------------------------------------------------------------------------------------------
# Official key layout, derived from the spec's rules (not from the model).

def expected_official_keys(depths, kernels, deploy=False):
    """Keys of the authors' model, following their constructor: a block with kernel >= 7 holds a
    DilatedReparamBlock (``dwconv.lk_origin``, with bias under ``deploy``; branches and BNs only in
    training); kernels 3 and 5 a plain depthwise ``dwconv`` (bias under ``deploy``). ``deploy``
    drops the block BN ``norm``, GRN's ``beta``, ``gamma`` and ``pwconv2``'s BN, and gives
    ``pwconv2.0`` a bias."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {f"downsample_layers.0.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias")}
    keys |= {f"downsample_layers.{s}.{i}.{p}" for s in (1, 2, 3) for i in (0, 1) for p in ("weight", "bias")}
    keys |= {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    for s in range(4):
        for j in range(depths[s]):
            p = f"stages.{s}.{j}."
            k = kernels[s][j]
            keys |= {p + f"se.{n}.{w}" for n in ("down", "up") for w in ("weight", "bias")}
            keys |= {p + "pwconv1.1.weight", p + "pwconv1.1.bias", p + "act.1.gamma", p + "pwconv2.0.weight"}
            conv = p + ("dwconv.lk_origin." if k >= 7 else "dwconv.")
            keys.add(conv + "weight")
            if deploy:
                keys |= {conv + "bias", p + "pwconv2.0.bias"}
                continue
            keys |= {p + "gamma", p + "act.1.beta"}
            keys |= {p + f"norm.{b}" for b in bn} | {p + f"pwconv2.2.{b}" for b in bn}
            if k >= 7:
                keys |= {p + f"dwconv.origin_bn.{b}" for b in bn}
                for kk, r in zip(*DILATED_BRANCHES[k]):
                    keys.add(p + f"dwconv.dil_conv_k{kk}_{r}.weight")
                    keys |= {p + f"dwconv.dil_bn_k{kk}_{r}.{b}" for b in bn}
    return keys


@pytest.mark.parametrize("family", ["a", "t", "s"])
def test_export_uses_official_key_layout(family):
    depths, _, kernels = VARIANTS[family]
    model = small_model(family)
    assert set(export_official(model)) == expected_official_keys(depths, kernels)
    model.reparameterize()
    assert set(export_official(model)) == expected_official_keys(depths, kernels, deploy=True)
    sd = export_official(model)
    c = SMALL_DIMS[0]
    assert sd["stages.0.0.se.down.weight"].shape == (c // 4, c, 1, 1)
    assert sd["stages.0.0.act.1.gamma"].shape == (1, 1, 1, 4 * c)
    assert sd["stages.1.0.dwconv.lk_origin.weight"].shape == (SMALL_DIMS[1], 1, 13, 13)


def test_load_official_roundtrip_through_file(tmp_path):
    source = random_model("a", dtype=torch.float32, seed=3)
    path = tmp_path / "official.pth"
    torch.save({"model": export_official(source)}, path)
    target = small_model("a", num_classes=10).eval()
    load_official(target, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


@pytest.mark.parametrize("inference_keys", ["deploy", "flat"])
def test_both_inference_key_forms_round_trip(inference_keys):
    model = random_model("a")
    model.reparameterize()
    sd = export_official(model, inference_keys=inference_keys)
    has_lk_origin = any(".dwconv.lk_origin." in k for k in sd)
    assert has_lk_origin == (inference_keys == "deploy")
    target = small_model("a", num_classes=10, deploy=True).double().eval()
    load_official(target, sd)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), target(x))


def test_load_official_lists_mismatches():
    sd = export_official(small_model("a", num_classes=10))
    del sd["stages.1.0.gamma"]
    sd["stages.9.0.extra"] = torch.zeros(1)
    sd["stages.0.0.se.up.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as info:
        load_official(small_model("a", num_classes=10), sd)
    message = str(info.value)
    assert "stages.1.0.gamma" in message and "stages.9.0.extra" in message
    assert "stages.0.0.se.up.bias: checkpoint (3,) vs model (16,)" in message


def test_load_official_structure_and_head_errors():
    training_sd = export_official(small_model("a", num_classes=10))
    with pytest.raises(CheckpointMismatchError, match="training structure"):
        load_official(small_model("a", num_classes=10, deploy=True), training_sd)
    with pytest.raises(CheckpointMismatchError, match="ignore_head"):
        load_official(small_model("a", num_classes=5), training_sd)
    model = small_model("a", num_classes=5)
    head_before = model.head.weight.clone()
    load_official(model, training_sd, ignore_head=True)
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.stages[0][0].gamma, training_sd["stages.0.0.gamma"])


def test_checkpoint_is_loaded_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": export_official(small_model("a")), "object": object()}, path)
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unsupported"):
        load_official(small_model("a"), path)


def _as_numpy1_pickle(path):
    """Rewrite a ``torch.save`` file so its pickle names numpy's scalar as numpy 1.x wrote it
    (``numpy.core.multiarray``), as in the authors' mmcv files of 2023."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entries = {info: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries.items():
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            archive.writestr(info, data)


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-names", "numpy1-names"])
def test_an_mmcv_container_with_numpy_scalars_in_meta_loads_weights_only(tmp_path, numpy1):
    """mmcv's ``{"meta", "state_dict", "optimizer"}`` with numpy scalars in ``meta`` (``save_best``) loads with
    the numpy-scalar allow-list; an array or any other object in the same place is still refused."""
    import numpy as np

    model = small_model("a")
    weights = {f"backbone.{k}": v for k, v in export_official(model).items()}
    meta = {"epoch": 160, "hook_msgs": {"best_score": np.float64(0.4856), "best_iter": np.int64(160000)},
            "scale": np.float32(0.5)}
    path = tmp_path / "upernet.pth"
    torch.save({"meta": meta, "state_dict": weights, "optimizer": {"state": {}, "param_groups": []}}, path)
    if numpy1:
        _as_numpy1_pickle(path)
    loaded = read_state_dict(path)
    assert loaded.keys() == export_official(model).keys()
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unsupported"):
        torch.load(path, weights_only=True)  # what plain weights-only loading says about the same file
    for unsafe in (np.arange(3), object()):
        torch.save({"meta": {"extra": unsafe}, "state_dict": weights}, tmp_path / "unsafe.pth")
        with pytest.raises(Exception, match="(?i)weights only|weights_only|unsupported"):
            read_state_dict(tmp_path / "unsafe.pth")


# ---------------------------------------------------------------------------------------------
# timm integration

def test_timm_create_model_options():
    model = timm.create_model("unireplknet_a", num_classes=7, drop_path_rate=0.2, in_chans=1)
    assert model.num_classes == 7 and model.in_chans == 1
    rates = [b.drop_path.drop_prob for s in model.stages for b in s if hasattr(b.drop_path, "drop_prob")]
    assert rates[-1] == pytest.approx(0.2)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    assert {f"unireplknet_{v}" for v in VARIANTS} <= set(timm.list_models("unireplknet_*"))
    assert "unireplknet_xl.in22k" in timm.list_pretrained("unireplknet_xl*")


def test_timm_pretrained_from_local_file(tmp_path):
    source = timm.create_model("unireplknet_a").eval()
    randomize_statistics(source)
    path = tmp_path / "unireplknet_a_in1k_224_acc77.03.pth"
    torch.save(export_official(source), path)
    model = timm.create_model("unireplknet_a", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x), model(x))
    finetune = timm.create_model("unireplknet_a", pretrained=True, num_classes=3,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert finetune.head.out_features == 3
    assert torch.equal(finetune.stages[2][0].gamma, source.stages[2][0].gamma)
    cfg = timm.create_model("unireplknet_xl.in22k", pretrained=False, num_classes=0).pretrained_cfg
    assert cfg["hf_hub_filename"] == "unireplknet_xl_in22k_pretrain.pth" and cfg["num_classes"] == 21841


def test_features_only(tmp_path):
    model = timm.create_model("unireplknet_a", features_only=True, out_indices=(1, 2, 3))
    assert model.feature_info.channels() == [80, 160, 320]
    assert model.feature_info.reduction() == [8, 16, 32]
    features = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [(2, 80, 8, 12), (2, 160, 4, 6), (2, 320, 2, 3)]
    assert {n for n, _ in model.named_children() if n.startswith("norm")} == {"norm1", "norm2", "norm3"}
    for f in features:  # channels-first LayerNorm at init: zero mean, unit variance over channels
        assert f.mean(1).abs().max() < 1e-4
        assert (f.var(1, unbiased=False) - 1).abs().max() < 1e-2
    classifier_ckpt = export_official(timm.create_model("unireplknet_a"))
    load_official(model, classifier_ckpt)
    assert torch.equal(model.stages[0][0].dwconv.weight, classifier_ckpt["stages.0.0.dwconv.weight"])


def test_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    model = small_model("a", num_classes=10, drop_path_rate=0.0).double()
    randomize_statistics(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain_out, plain_grads = run()
    model.load_state_dict(state)  # undo the running-stat update of the first pass
    model.set_grad_checkpointing(True)
    ckpt_out, ckpt_grads = run()
    assert torch.allclose(plain_out, ckpt_out, rtol=1e-12, atol=1e-12)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], rtol=1e-10, atol=1e-12), name


def test_every_parameter_gets_a_gradient():
    model = small_model("t", num_classes=10).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_group_matcher_layer_decay_groups():
    from timm.optim import param_groups_layer_decay

    model = timm.create_model("unireplknet_t", num_classes=10)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.8, no_weight_decay_list=model.no_weight_decay())
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters()}
    names = {n: p for n, p in model.named_parameters()}
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    stem = scale_of[id(names["downsample_layers.0.0.weight"])]
    early = scale_of[id(names["stages.0.0.pwconv1.1.weight"])]
    late = scale_of[id(names["stages.3.2.pwconv1.1.weight"])]
    head = scale_of[id(names["head.weight"])]
    assert stem < early < late < head == 1.0
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(names["stages.0.0.gamma"])] == 0.0
    assert decay_of[id(names["stages.0.0.act.1.gamma"])] == 0.0
    assert decay_of[id(names["stages.0.0.pwconv1.1.weight"])] == 0.05


def test_reset_classifier():
    model = timm.create_model("unireplknet_a")
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 320)
    assert model.forward_head(model.forward_features(torch.randn(1, 3, 64, 64)), pre_logits=True).shape == (1, 320)


def test_sync_batchnorm_conversion_keeps_keys_and_outputs():
    model = random_model("a", dtype=torch.float32)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(random_model("a", dtype=torch.float32)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert set(export_official(converted)) == set(export_official(model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), converted(x))
    converted.reparameterize()
    with torch.no_grad():
        assert max_relative_difference(model(x), converted(x)) < 1e-4


def test_model_stats_counts_activations_per_image_without_the_weights():
    """Against real tensors on CPU: saved storages, minus the parameters' storages, at batch 1 and 2."""
    from unireplknet.tools import model_stats

    def build(deploy: bool):
        return UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=10,
                           kernel_sizes=((3,), (13,), (13, 3), (13,)), deploy=deploy)

    torch.manual_seed(0)
    model = build(False).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_activation_bytes(batch: int) -> int:
        storages: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(batch, 3, 64, 64))
        return sum(storages.values())

    one, two = saved_activation_bytes(1), saved_activation_bytes(2)
    assert two == pytest.approx(2 * one, rel=0.02)  # per-image memory: nothing batch-independent is left
    assert model_stats(build, 64).activation_mib == pytest.approx(one / 2**20, rel=0.02)
