"""The one training loop: a Trainer built from a Config and a Task, run by every launcher."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn as nn

from unireplknet import kernels

from unireplknet.files import atomic_write_json

from . import checkpoint as ckpt
from . import engine
from .best import Best, read_best, weights_of, write_best
from .config import Config, ConfigError, config_to_dict, save_config
from .distributed import WorldInfo, all_reduce_sum, averaged_batchnorm_buffers, batchnorm_buffers, pick_device
from .ema import ModelEMA
from .metrics import Progress, TensorBoard, Throughput, close_run_log, init_logging, memory_stats
from .optim import build_optimizer, build_scheduler
from .preemption import PREEMPTION_SIGNALS, STOP_FILE
from .resume_rules import resume_rules
from .task import Task, build_task

__all__ = ["EvaluationIncompleteError", "NonFiniteLossError", "STOP_FILE", "StopRequests", "TrainResult", "Trainer", "capture_rng", "restore_rng",
           "seed_everything"]

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing was applied for this step."""

    def __init__(self, step: int, last_checkpoint: str | None):
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(f"non-finite loss at step {step}; stopped before applying it; {where}")
        self.step, self.last_checkpoint = step, last_checkpoint


class EvaluationIncompleteError(RuntimeError):
    """An evaluation scored fewer samples than the eval set holds (``loader.eval_incomplete=error``)."""


@dataclass
class TrainResult:
    """How a run ended: ``completed`` the schedule (or ``train.max_steps``) or was ``preempted`` by a signal."""

    status: Literal["completed", "preempted"]
    step: int
    checkpoint: str | None
    eval: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states, as tensors and plain Python values
    (so a checkpoint holding them loads with ``weights_only=True``)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Whatever runs inside (creating loader iterators, evaluation) leaves the training RNG stream as it was,
    so a resumed run draws exactly the numbers an uninterrupted one draws."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


DATA_BOUND_FRACTION = 0.2
"""A logging interval that waited this fraction of its time for data (after the first) logs a warning, once."""


class StopRequests:
    """Preemption requests: SIGTERM / SIGUSR1 (what Slurm and Kubernetes send; recorded instead of dying,
    however many arrive) and ``RUN_DIR/STOP``. Handlers stay installed until the run's last save is done,
    and once a signal came those signals stay ignored (the process is then exiting for requeue)."""

    SIGNALS = PREEMPTION_SIGNALS

    def __init__(self, stop_file: str | None = None):
        self.stop_file = stop_file
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        elif self.stop_file:
            _logger.info("not on the main thread: preemption reaches this worker through %s", self.stop_file)
        return self

    def __exit__(self, *exc) -> None:
        if self.signal is not None:
            # Preempted: the process is on its way out. Further signals of the same volley (Slurm and
            # torchrun signal every process, some twice) must not turn the requeue exit into a kill,
            # also during interpreter shutdown, which resets Python handlers but keeps SIG_IGN.
            for sig in self._previous:
                signal.signal(sig, signal.SIG_IGN)
            self._previous.clear()
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def reason(self) -> str | None:
        """Why this process was asked to stop (None: it was not); the stop file is looked at each call."""
        if self.signal is not None:
            return signal.Signals(self.signal).name
        if self.stop_file and os.path.exists(self.stop_file):
            return self.stop_file
        return None

    def served(self) -> None:
        """The request was acted on (checkpoint written): remove the stop file so the rerun trains."""
        if self.stop_file and os.path.exists(self.stop_file):
            os.remove(self.stop_file)


def _floats_to_float64(value):
    """Floating-point tensors (in tuples, lists and dicts too) as float64; everything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_floats_to_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: _floats_to_float64(v) for k, v in value.items()}
    return value


class Trainer:
    """Builds model, data, optimizer and DeepSpeed engine from a Config, resumes, and runs :meth:`train`."""

    config: Config
    task: Task
    world: WorldInfo
    device: torch.device
    engine: object
    ema: ModelEMA | None
    train_loader: object
    eval_loader: object | None
    tensorboard: TensorBoard
    step: int

    def __init__(self, config: Config, task: Task | None = None):
        if config.model.weights:
            raise ConfigError("model.weights", "is what `evaluate` scores; a training run starts from model.init_from "
                              "(or resumes its own checkpoints): unset model.weights")
        self._start(config, task, "train.log")
        # decided on rank 0 before anything is built, so a checkpoint that cannot be used fails every rank fast
        self.resume_from = ckpt.choose_checkpoint(self.checkpoint_root, config.checkpoint.resume, self.world,
                                                  config_to_dict(config), resume_rules(config.task))
        seed_everything(config.train.seed)  # identical initial weights on every rank
        model = self._build_model()
        self.train_loader = self.task.build_train_loader(self.world)
        self.eval_loader = self.task.build_eval_loader(self.world)
        ds_config = engine.build_deepspeed_config(config.train, config.optim, self.world.world_size, self.device)
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self.steps_per_epoch = len(self.train_loader) // self.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch has {len(self.train_loader)} micro-batches per rank, fewer than the "
                             f"{self.grad_accum} accumulation steps of one optimizer step: lower "
                             "train.global_batch_size or raise data.samples_per_epoch")
        self.total_steps = config.train.steps or config.train.epochs * self.steps_per_epoch
        self.eval_interval = config.train.eval_every or config.train.eval_every_epochs * self.steps_per_epoch
        """Steps between evaluations during the run (0: only at the end)."""
        self.stop_step = min(self.total_steps, config.train.max_steps or self.total_steps)
        param_groups = self.task.build_param_groups(model, config.optim)
        self.group_names = [g["name"] for g in param_groups]
        self.optimizer = build_optimizer(param_groups, config.optim, self.device)
        scheduler = build_scheduler(self.optimizer, config.optim, self.total_steps, self.steps_per_epoch)
        self.engine = engine.initialize(model, self.optimizer, scheduler, ds_config)
        self.ema = ModelEMA(lambda: engine.ema_targets(self.engine), config.train.ema_decay,
                            after_write=lambda: engine.refresh_gathered_parameters(self.engine)) \
            if config.train.ema_decay else None

        self.step = 0
        self.stop_requests = StopRequests(os.path.join(config.run_dir, STOP_FILE))
        self.stopping: str | None = None
        """Why the run is stopping (a signal name, the stop file, another rank), once any rank was asked."""
        self.early_stopped = False
        """Set when ``train.patience`` evaluations in a row did not improve ``train.best_metric``."""
        self.last_checkpoint: str | None = None
        self._resumed_mid_epoch = False
        self._loss_sum, self._loss_steps = 0.0, 0
        self._loss_terms: dict[str, float] = {}
        self._preview_pending = True
        self._intervals_logged = 0
        self._warned_data_bound = False
        self._eval_previews: list[torch.Tensor] | None = None
        self._resume()
        self.best: Best | None = read_best(self.checkpoint_root, config.train.best_metric, config.train.best_mode) \
            if self.resume_from is not None else None
        """The best evaluation so far by ``train.best_metric`` (None: none yet, or no such metric)."""
        if self.best is not None and self.best.step > self.step:
            _logger.warning("the best %s was recorded at step %d, after the resumed step %d (a later timeline): the "
                            "best is chosen anew from here on", self.best.metric, self.best.step, self.step)
            self.best = None
        if self.world.is_main:  # only once the resume worked: a refused resume leaves the run's config as it was
            save_config(config, os.path.join(config.run_dir, "config.json"))
        self.tensorboard = TensorBoard(os.path.join(config.run_dir, "tensorboard"), self.world.is_main)
        _logger.info("%s on %s x%d, precision %s, ZeRO %d, %d steps/epoch x %d epochs, accumulation %d, from step %d",
                     config.model.name, self.device.type, self.world.world_size, self.precision,
                     config.train.zero_stage, self.steps_per_epoch, config.train.epochs, self.grad_accum, self.step)

    def _start(self, config: Config, task: Task | None, log_name: str) -> None:
        """What a training run and an evaluation share: task, device, process group, log, precision, determinism."""
        from .distributed import world_info_from_env

        self.config = config
        self.task = task or build_task(config)
        self.device = pick_device(config.launch.device, world_info_from_env())
        self.world = engine.init_distributed(self.device)
        self.checkpoint_root = os.path.join(config.run_dir, "checkpoints")
        init_logging(self.world.rank, os.path.join(config.run_dir, log_name))
        self.precision = config.train.precision if config.train.precision in ("bf16", "fp64") else (
            "bf16" if config.train.precision == "auto" and self.device.type == "cuda" else "fp32")
        if self.precision == "bf16" and self.device.type != "cuda":
            raise ValueError("train.precision=bf16 needs a CUDA device; use fp32 or auto on CPU")
        kernels.BACKEND_CHOICES.deterministic = config.train.deterministic
        torch.backends.cudnn.benchmark = not config.train.deterministic
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

    def _build_model(self) -> nn.Module:
        model = self.task.build_model()
        sync = self.config.model.sync_batchnorm
        if sync == "auto":
            sync = self.device.type == "cuda" and self.world.world_size > 1
        if sync:
            if self.device.type != "cuda":
                raise ValueError("model.sync_batchnorm needs CUDA (gloo has no SyncBatchNorm kernels)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # channels_last is applied to the inputs only (Task.prepare_batch): convolutions then run and
        # return NHWC, while parameters stay contiguous, as DeepSpeed's broadcast and ZeRO flattening need.
        return model.to(self.device, torch.float64 if self.precision == "fp64" else None)

    def _prepare(self, batch) -> tuple:
        """The task's (inputs, targets) on the device; in float64 under ``train.precision=fp64``."""
        inputs, targets = self.task.prepare_batch(batch, self.device)
        if self.precision == "fp64":
            inputs, targets = _floats_to_float64(inputs), _floats_to_float64(targets)
        return inputs, targets

    def _resume(self) -> None:
        folder = self.resume_from
        if folder is None:
            seed_everything(self.config.train.seed + 7919 * (self.world.rank + 1))  # per-rank drop path
            return
        state = ckpt.load_checkpoint(self.engine, folder, self.world, self.device)
        self.step = state["step"]
        self.train_loader.load_state_dict(state["loader"])
        self._resumed_mid_epoch = self.step % self.steps_per_epoch != 0
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        kernels.BACKEND_CHOICES.load_state_dict(state.get("kernel_choices", {}))
        self._restore_own_batchnorm(state.get("batchnorm"))
        restore_rng(state["rng"])
        self.last_checkpoint = folder
        _logger.info("resumed from %s at step %d", folder, self.step)

    @torch.no_grad()
    def _restore_own_batchnorm(self, saved: dict[str, torch.Tensor] | None) -> None:
        """This rank's own BatchNorm statistics, as it trained with them (the model files hold the
        average over ranks). Checkpoints written before rank files held them keep the average."""
        if saved is None:
            return
        live = batchnorm_buffers(self.engine.module)
        if saved.keys() != live.keys():
            raise ckpt.CheckpointError(f"{self.resume_from}: the BatchNorm statistics in the rank file do not match "
                                       f"the model ({sorted(saved.keys() ^ live.keys())[:3]} ...)")
        for name, buffer in live.items():
            buffer.copy_(saved[name])

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Step, log, checkpoint, evaluate; until the schedule ends, early stopping (``train.patience``), a stop
        request, or a non-finite loss.

        A step that is both saved and evaluated is saved first, so an evaluation that fails (damaged
        eval data: ``data.eval_incomplete=error``, or any evaluator error) never costs the steps since
        the last checkpoint. A stop request (signal or stop file, on any rank) ends the step in
        progress, skips evaluation and saves. The last checkpoint is written before the final
        evaluation, with the handlers still installed, so a signal during that evaluation (or a
        second one) never costs the checkpoint.
        """
        cfg = self.config
        batches = self._micro_batches()
        throughput = Throughput()
        progress = Progress(self.stop_step, self.step, self.world.is_main)
        results: dict[str, float] = {}
        with self.stop_requests:
            try:
                self._no_longer_improving()  # a resumed run that had stopped early stays stopped
                while self.step < self.stop_step and not self.stopping and not self.early_stopped:
                    self._train_step(batches, throughput)
                    self.step += 1
                    log_now = self.step % cfg.train.log_every == 0 or self.step == self.stop_step or self.stopping
                    progress.update(self.step, self._log(throughput) if log_now else {}, log_now)
                    before_the_end = self.step < self.stop_step and not self.stopping
                    # saved before evaluating: an evaluation that fails (damaged eval data) never costs the step
                    if before_the_end and self.step % cfg.checkpoint.every == 0:
                        self.save()
                    if before_the_end and self.eval_interval and self.step % self.eval_interval == 0:
                        results = self.evaluate()
                        self._keep_if_best(results)
                        if results:
                            self._no_longer_improving()
            finally:
                progress.close()
            self._save_unless_saved()
            if not (self.early_stopped and results):  # an early stop's last evaluation is the final one
                results = {} if self.stopping else self.evaluate()
                self._keep_if_best(results)
            if results and not self.stopping:
                results = {**results, **self.test()}
            if self.stopping:
                _logger.warning("stop requested (%s): checkpoint %s written at step %d; exiting for requeue",
                                self.stopping, self.last_checkpoint, self.step)
                if self.world.is_main:
                    self.stop_requests.served()
        status: Literal["completed", "preempted"] = "preempted" if self.stopping else "completed"
        return TrainResult(status, self.step, self.last_checkpoint, results)

    def _train_step(self, batches: Iterator, throughput: Throughput) -> None:
        """One optimizer step over ``grad_accum`` micro-batches; sets :attr:`stopping` when some rank was asked to stop."""
        for _ in range(self.grad_accum):
            with kernels.BACKEND_CHOICES.collective():  # same shapes on every rank: kernel choices agreed
                self._micro_step(batches, throughput)
        self._loss_steps += 1
        throughput.steps += 1
        if self.ema is not None:
            self.ema.update()

    def _micro_step(self, batches: Iterator, throughput: Throughput) -> None:
        """Forward and backward of one micro-batch (DeepSpeed steps the optimizer at the accumulation boundary)."""
        wait_start = time.perf_counter()
        inputs, targets = self._prepare(next(batches))
        throughput.data_wait += time.perf_counter() - wait_start
        if self._preview_pending:
            preview = self.task.preview(inputs[:32])
            if preview is not None:
                self.tensorboard.image_grid("train/augmented_inputs", preview, self.step)
            self._preview_pending = False
        with self._autocast():
            losses = self.task.training_losses(self.engine, inputs, targets)
        loss = sum(losses.values())
        mean_loss, finite = self._agree(loss.detach())
        if not finite:
            raise NonFiniteLossError(self.step + 1, self.last_checkpoint)
        self.engine.backward(loss)
        self.engine.step()
        self._loss_sum += mean_loss / self.grad_accum
        if len(losses) > 1:
            for name, term in losses.items():
                self._loss_terms[name] = self._loss_terms.get(name, 0.0) + term.item() / self.grad_accum
        throughput.samples += self.task.batch_size(inputs)

    def _stop_reason_here(self) -> str | None:
        """This rank's stop request; the stop file is looked at by one rank per node."""
        reason = self.stop_requests.reason()
        if reason == self.stop_requests.stop_file and self.world.local_rank != 0:
            return None
        return reason

    def _note_stop(self, any_rank_asked: bool) -> None:
        if any_rank_asked and not self.stopping:
            self.stopping = self._stop_reason_here() or "a stop request on another rank"

    def _agree(self, loss: torch.Tensor) -> tuple[float, bool]:
        """One small all-reduce per micro-batch: mean loss, whether every rank's loss is finite; and
        whether any rank was asked to stop (recorded in :attr:`stopping`)."""
        finite = bool(torch.isfinite(loss))
        flags = torch.tensor([loss.item() if finite else 0.0, 0.0 if finite else 1.0,
                              float(self._stop_reason_here() is not None)], dtype=torch.float64, device=self.device)
        all_reduce_sum(flags)
        self._note_stop(flags[2].item() > 0)
        return flags[0].item() / self.world.world_size, flags[1].item() == 0

    def _micro_batches(self) -> Iterator:
        """Micro-batches forever, epoch after epoch, continuing mid-epoch after a resume.

        Loading runs outside the training RNG stream (in-process loading does its work lazily, in
        ``next``, and differently right after a resume), so drop path draws the same masks either way.
        """
        while True:
            epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
            with _rng_untouched():
                if not self._resumed_mid_epoch:
                    self.train_loader.set_epoch(epoch)
                self._resumed_mid_epoch = False
                iterator = iter(self.train_loader)
            for _ in range((self.steps_per_epoch - step_in_epoch) * self.grad_accum):
                with _rng_untouched():
                    batch = next(iterator)
                yield batch

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ monitoring, eval, checkpoints

    def _log(self, throughput: Throughput) -> dict[str, float]:
        perf = throughput.summary()
        totals = all_reduce_sum(torch.tensor([float(throughput.samples), float(self.train_loader.bad_samples)],
                                             dtype=torch.float64, device=self.device))
        loss = self._loss_sum / max(self._loss_steps, 1)
        unit = self.task.throughput_unit
        values = {
            "train/loss": loss,
            f"perf/{unit}_per_s_worker": perf["samples_per_s"],
            f"perf/{unit}_per_s_global": totals[0].item() / perf["elapsed_s"],
            "perf/step_time_s": perf["step_time_s"],
            "perf/data_wait_fraction": perf["data_wait_fraction"],
            "data/bad_samples": totals[1].item(),
            "train/epoch": self.step / self.steps_per_epoch,
        }
        if self._loss_terms:  # every rank has the same terms (the task's): one all-reduce of their sums
            names = sorted(self._loss_terms)
            terms = all_reduce_sum(torch.tensor([self._loss_terms[n] for n in names], dtype=torch.float64,
                                                device=self.device))
            scale = self.world.world_size * max(self._loss_steps, 1)
            values.update({f"train/{n}": t / scale for n, t in zip(names, terms.tolist())})
            self._loss_terms = {}
        grad_norm = engine.global_grad_norm(self.engine)
        if grad_norm is not None:
            values["train/grad_norm"] = grad_norm
        for name, group in zip(self.group_names, self.optimizer.param_groups):
            values[f"lr/{name}"] = group["lr"]
        values.update({f"memory/{k}": v for k, v in memory_stats(self.device).items()})
        self.tensorboard.scalars(values, self.step)
        self.tensorboard.flush()
        self._loss_sum, self._loss_steps = 0.0, 0
        throughput.reset()
        self._intervals_logged += 1
        self._warn_if_data_bound(perf["data_wait_fraction"], perf["samples_per_s"])
        return {"loss": loss, "lr": max(g["lr"] for g in self.optimizer.param_groups),
                f"{unit}/s": values[f"perf/{unit}_per_s_global"], "data_wait": perf["data_wait_fraction"]}

    def _warn_if_data_bound(self, wait_fraction: float, samples_per_s: float) -> None:
        """Say once when the loader, not the model, sets the pace (the first interval holds worker start-up)."""
        if self._warned_data_bound or self._intervals_logged < 2 or wait_fraction < DATA_BOUND_FRACTION:
            return
        self._warned_data_bound = True
        _logger.warning(
            "waited for data %.0f%% of the last %d steps at %.0f %s/s on this rank: the loader sets the pace; %s "
            "(tail perf/data_wait_fraction in TensorBoard)",
            100 * wait_fraction, self.config.train.log_every, samples_per_s, self.task.throughput_unit,
            self.task.data_bound_hint(samples_per_s / max(1e-9, 1 - wait_fraction)))

    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 on the validation shards (and with the EMA weights when enabled), all ranks together.
        A stop request cuts it short (nothing is logged) so the checkpoint fits the grace period."""
        if self.eval_loader is None:
            return {}
        with averaged_batchnorm_buffers(self.engine.module):  # what a checkpoint of this step holds
            return self._evaluate()

    def test(self) -> dict[str, float]:
        """The task's held-out test set, once, after the last evaluation of a completed run: metrics under
        ``test/`` (and ``test_ema/``), added to ``metrics.json``. Tasks without ``build_test_loader`` have none."""
        build = getattr(self.task, "build_test_loader", None)
        loader = build(self.world) if build is not None else None
        if loader is None:
            return {}
        weights = contextlib.nullcontext()
        if self.best is not None and self.best.step != self.step:  # the best evaluation's weights (and EMA)
            folder = os.path.join(self.checkpoint_root, ckpt.tag_of_step(self.best.step))
            ema_state = ckpt.read_rank_state(folder, self.world.rank)["ema"] if self.ema is not None else None
            weights = weights_of(self.engine.module, ckpt.consolidated_state_dict(folder), self.ema, ema_state)
            _logger.info("the test set is scored with the weights of step %d (best %s %.4g), not step %d's",
                         self.best.step, self.best.metric, self.best.value, self.step)
        with weights, averaged_batchnorm_buffers(self.engine.module):
            return self._evaluate(loader, "test")

    def _no_longer_improving(self) -> bool:
        """Early stopping (``train.patience``): whether the last ``patience`` evaluations have not beaten the best.
        Counted from the best's step, which checkpoints keep, so a resumed run stops where it would have."""
        cfg = self.config.train
        if not cfg.patience or self.best is None:
            return False
        if self.step - self.best.step < cfg.patience * self.eval_interval:
            return False
        self.early_stopped = True
        _logger.info("early stop at step %d: %d evaluations without a better %s than %.4g (step %d)", self.step,
                     cfg.patience, self.best.metric, self.best.value, self.best.step)
        return True

    def _keep_if_best(self, results: dict[str, float]) -> None:
        """After an evaluation: when ``train.best_metric`` improved, make sure this step has a checkpoint and
        record it as the best (kept from pruning; its weights score the test set at the end)."""
        cfg = self.config.train
        if not cfg.best_metric or not results:
            return
        if cfg.best_metric not in results:
            raise ValueError(f"train.best_metric {cfg.best_metric!r} is not among the metrics of this task's "
                             f"evaluation ({', '.join(sorted(results))})")
        value = float(results[cfg.best_metric])
        if self.best is not None and not self.best.beaten_by(value):
            return
        self._save_unless_saved()
        self.best = Best(cfg.best_metric, cfg.best_mode, value, self.step)
        if self.world.is_main:
            write_best(self.checkpoint_root, self.best)
        _logger.info("best %s so far: %.4g at step %d", cfg.best_metric, value, self.step)

    def _evaluate(self, loader=None, prefix: str = "eval") -> dict[str, float]:
        loader = self.eval_loader if loader is None else loader
        live = self._evaluate_weights(loader)
        if live is None:
            return {}
        self._check_complete(live, loader, prefix)
        if self._eval_previews:
            self.tensorboard.image_grid(f"{prefix}/predictions", torch.stack(self._eval_previews), self.step)
        results = {f"{prefix}/{k}": v for k, v in live.items()}
        if self.ema is not None:
            with self.ema.swapped_in():
                ema = self._evaluate_weights(loader)
            if ema is None:
                return {}
            results.update({f"{prefix}_ema/{k}": v for k, v in ema.items()})
        self.tensorboard.scalars(results, self.step)
        self.tensorboard.flush()
        if self.world.is_main:
            path = os.path.join(self.config.run_dir, "metrics.json")
            earlier = {}
            if prefix != "eval" and os.path.isfile(path):  # the test figures join this step's evaluation
                with open(path) as f:
                    earlier = json.load(f)
                if earlier.get("step") != self.step:
                    earlier = {}
            atomic_write_json(path, {**earlier, "step": self.step, **results})
        _logger.info("%s at step %d: %s", prefix, self.step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        return results

    def _check_complete(self, results: dict[str, float], loader=None, prefix: str = "eval") -> None:
        """An evaluation must score every sample the evaluation set holds: fewer means damaged data. Every
        task's eval loader tells its share of the set (``num_samples``) and its evaluator the samples scored."""
        loader = self.eval_loader if loader is None else loader
        assigned = getattr(loader, "num_samples", None)
        if assigned is None or "samples" not in results:
            missing = "its eval loader has no num_samples" if assigned is None else "its evaluator reports no samples"
            raise TypeError(f"task {self.config.task!r}: {missing}, so an incomplete evaluation would go unnoticed")
        total = all_reduce_sum(torch.tensor([float(assigned)], dtype=torch.float64, device=self.device)).item()
        if results["samples"] >= total:
            return
        described = getattr(loader, "description", None) or "the evaluation set"
        message = (f"evaluation at step {self.step} scored {results['samples']:.0f} of the {total:.0f} samples of "
                   f"{described}: {total - results['samples']:.0f} could not be read (named in the log)")
        if self.config.loader.eval_incomplete == "error":
            raise EvaluationIncompleteError(message + "; loader.eval_incomplete=warn evaluates what is readable")
        _logger.warning("%s", message)
        self.tensorboard.scalars({f"{prefix}/unreadable_samples": total - results["samples"]}, self.step)

    @torch.no_grad()
    def _evaluate_weights(self, loader) -> dict[str, float] | None:
        """The task's metrics over the whole eval set; None when a stop request cut the pass short."""
        evaluator = self.task.build_evaluator(self.device)
        evaluator.reset()
        self._eval_previews = getattr(evaluator, "previews", None)  # images a task's evaluator may collect
        self.engine.eval()
        try:
            with _rng_untouched(), self._autocast():
                iterator = iter(loader)
                while True:
                    batch = next(iterator, None)
                    flags = all_reduce_sum(torch.tensor([float(batch is not None),
                                                         float(self._stop_reason_here() is not None)],
                                                        device=self.device))
                    self._note_stop(flags[1].item() > 0)
                    if self.stopping:
                        _logger.warning("stop requested (%s) during evaluation: evaluation skipped", self.stopping)
                        return None
                    if flags[0].item() == 0:
                        break
                    if batch is None:
                        dummy = self.task.dummy_input(self.device) if self.config.train.zero_stage == 3 else None
                        if dummy is not None:  # keep ZeRO-3's collective forward passes in step with the other ranks
                            self.engine(_floats_to_float64(dummy) if self.precision == "fp64" else dummy)
                        continue
                    inputs, targets = self._prepare(batch)
                    self.task.evaluation_step(self.engine, inputs, targets, evaluator)
        finally:
            self.engine.train()
        return evaluator.compute(self.world)

    def _save_unless_saved(self) -> None:
        """A checkpoint of this step, unless the last one saved (or resumed from) is of this step."""
        if self.last_checkpoint is None or not self.last_checkpoint.endswith(ckpt.tag_of_step(self.step)):
            self.save()

    def save(self) -> str:
        """A complete checkpoint of this step. The model holds the BatchNorm statistics averaged over
        ranks; each rank's own (which it keeps training with) go into its rank file."""
        rank_state = {
            "step": self.step,
            "rank": self.world.rank,
            "world_size": self.world.world_size,
            "loader": self.train_loader.state_dict(),
            "rng": capture_rng(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "kernel_choices": kernels.BACKEND_CHOICES.sync(),  # rank 0's, so a resumed run keeps its kernels
            "batchnorm": {name: b.detach().cpu().clone() for name, b in batchnorm_buffers(self.engine.module).items()},
        }
        with averaged_batchnorm_buffers(self.engine.module):
            self.last_checkpoint = ckpt.save_checkpoint(
                self.engine, self.checkpoint_root, self.step, rank_state, self.world,
                keep=self.config.checkpoint.keep, zero_stage=self.config.train.zero_stage,
                config=config_to_dict(self.config), protect=(self.best.step,) if self.best is not None else ())
        _logger.info("saved %s", self.last_checkpoint)
        return self.last_checkpoint

    def close(self) -> None:
        self.tensorboard.close()
        engine.shutdown_distributed()
        close_run_log()
