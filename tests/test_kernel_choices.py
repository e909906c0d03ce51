"""Which depthwise kernel "auto" picks: once per bucketed key, agreed across ranks in training, restored
on resume, never timed under ``train.deterministic``. Real 2-rank gloo groups; timing is replaced by
timers that disagree between ranks (on CPU nothing is timed: the CUDA path is what this protects)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from unireplknet.kernels import BackendChoices

REPO = Path(__file__).resolve().parents[1]


def key_of(shape, kernel=13, dtype=torch.float32, channels_last=False):
    x = torch.empty(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return BackendChoices.key("forward", x, torch.empty(shape[1], 1, kernel, kernel, dtype=dtype), 1)


def test_keys_bucket_the_pixel_count_and_keep_everything_else():
    # 2x56x56 = 6272 and 2x60x50 = 6000 pixels share the bucket 2^13; 2x100x100 = 20000 is 2^15
    assert key_of((2, 64, 56, 56)) == key_of((2, 64, 60, 50))
    assert key_of((2, 64, 56, 56)).endswith("px<=2^13") and key_of((2, 64, 100, 100)).endswith("px<=2^15")
    assert key_of((2, 64, 64, 64)).endswith("px<=2^13")  # exactly 8192 stays in 2^13
    different = {key_of((2, 64, 56, 56), kernel=7), key_of((2, 32, 56, 56)), key_of((2, 64, 56, 56), dtype=torch.bfloat16),
                 key_of((2, 64, 56, 56), channels_last=True), key_of((2, 64, 56, 56))}
    assert len(different) == 5


def test_a_decision_is_timed_once_per_key_and_deterministic_never_times():
    choices, calls = BackendChoices(), []

    def timer(ms):
        return lambda: calls.append(ms) or ms

    key = key_of((2, 64, 56, 56))
    assert choices.decide(key, torch.device("cpu"), timer(1.0), timer(2.0)) == "triton"
    assert choices.decide(key, torch.device("cpu"), timer(9.0), timer(2.0)) == "triton"
    assert calls == [1.0, 2.0]
    deterministic = BackendChoices()
    deterministic.deterministic = True
    assert deterministic.decide(key, torch.device("cpu"), timer(1.0), timer(2.0)) == "torch"
    assert calls == [1.0, 2.0]
    with pytest.raises(ValueError, match="'triton' or 'torch'"):
        choices.load_state_dict({key: "cudnn"})


TWO_RANKS = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    from unireplknet.kernels import BackendChoices

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    choices = BackendChoices()
    x, w = torch.empty(2, 64, 56, 56), torch.empty(64, 1, 13, 13)
    agreed, local = BackendChoices.key("forward", x, w, 1), BackendChoices.key("grad_input", x, w, 1)
    triton_ms, torch_ms = (1.0, 2.0) if rank == 0 else (3.0, 2.0)  # rank 0 finds Triton faster, rank 1 not
    with choices.collective():
        in_training = choices.decide(agreed, torch.device("cpu"), lambda: triton_ms, lambda: torch_ms)
    alone = choices.decide(local, torch.device("cpu"), lambda: triton_ms, lambda: torch_ms)
    synced = choices.sync()
    with open(sys.argv[1] + f".{rank}", "w") as f:
        json.dump({"in_training": in_training, "alone": alone, "synced": synced[local]}, f)
    dist.destroy_process_group()
''')


def test_decisions_in_training_are_rank_0s_and_sync_spreads_the_table(tmp_path):
    script, out = tmp_path / "two_ranks.py", tmp_path / "out"
    script.write_text(TWO_RANKS)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(script), str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    assert rank0["in_training"] == rank1["in_training"] == "triton"
    assert (rank0["alone"], rank1["alone"]) == ("triton", "torch")
    assert rank0["synced"] == rank1["synced"] == "triton"


def test_kernel_choices_are_kept_in_checkpoints_and_restored_on_resume(pretrain_shards, tmp_path):
    from pretrain.config import load_config
    from pretrain.trainer import Trainer
    from test_pretrain_train import tiny_overrides
    from unireplknet.kernels import BACKEND_CHOICES

    recorded = {key_of((16, 64, 8, 8)): "triton", key_of((16, 128, 4, 4)): "torch"}

    def run(max_steps):
        config = load_config("demo", tiny_overrides(pretrain_shards, tmp_path / "run", **{
            "train.max_steps": max_steps}))
        trainer = Trainer(config)
        try:
            trainer.train()
        finally:
            trainer.close()

    BACKEND_CHOICES.clear()
    try:
        BACKEND_CHOICES.load_state_dict(recorded)  # as a GPU run's first steps would have decided
        run(2)
        saved = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer_rank00000.pt",
                           weights_only=True)["kernel_choices"]
        assert saved == recorded
        BACKEND_CHOICES.clear()
        run(3)
        assert BACKEND_CHOICES.state_dict() == recorded
    finally:
        BACKEND_CHOICES.clear()
