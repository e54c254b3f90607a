"""The MoRe training loop (docs/METHOD.md: Losses, Maps and labels, Recipes): one readable step, logging, evaluation, checkpoints.

A step: the training forward (grad); the no-grad multi-scale CAM passes, reusing the training
forward for the unflipped scale-1.0 pass; labels from the CAMs (and PAR pseudo labels once the
decoder joins); the losses; AdamW. With `--compile` the model and the losses are compiled
(fullgraph). Nothing in the step waits for the device except on logging iterations (and, with
`on_nonfinite="skip"`, the finiteness check of every step; under torchrun, the ranks' agreement on
stopping every STOP_CHECK_EVERY iterations).
"""
from __future__ import annotations

import json
import math
import pathlib
import signal
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels

from .. import cam
from .. import losses
from ..artifacts import ArtifactMeter, format_artifacts
from ..data import normalize
from ..device import resolve_device
from ..model.network import MoReNet, MoReOutput
from . import state, tb, threads
from .config import RECIPES, TrainConfig
from .data import build_dataset, eval_loader, resolve_data_root, shutdown_workers, train_loader
from .evaluate import evaluate, format_table
from .optim import build_optimizer, build_scheduler
from .telemetry import format_eta, gpu_telemetry, peak_flops

TERMS = ("cls", "aux", "mct", "ptc", "cre", "ure", "seg", "reg")


class NonFiniteLoss(RuntimeError):
    pass


class BadSampleStop(RuntimeError):
    """A training sample could not be read; the message (one line) names it and the checkpoint."""


class TrainingStopped(Exception):
    """A stop signal ended the run after a checkpoint of the step in flight."""

    def __init__(self, signum: int, iteration: int, iters: int, path: pathlib.Path, out: pathlib.Path):
        self.signum, self.iteration, self.iters, self.path, self.out = signum, iteration, iters, path, out
        self.exit_code = state.STOP_SIGNALS[signum]
        super().__init__(f"stopped by {signal_name(signum)} after iteration {iteration} of {iters}: checkpoint {path}")


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


# under torchrun the ranks agree on stopping (a signal, or an unreadable sample on any rank) every
# this many iterations: one tiny all-reduce, a host sync, then rather than at every step
STOP_CHECK_EVERY = 10
# validation map whose mIoU picks the best checkpoint, the one --keep-checkpoints always keeps
BEST_MAP = "lam"


def differs_from_recipe(cfg: TrainConfig) -> dict:
    """The fields whose value is not the one of the run's recipe (--data): what a run changed."""
    recipe = TrainConfig(**RECIPES[cfg.data]).to_dict()
    return {name: value for name, value in cfg.to_dict().items() if value != recipe[name]}


def loss_weights(cfg: TrainConfig, it: int) -> dict[str, float]:
    """The loss terms active at iteration `it` (0-based) and their weights (docs/METHOD.md, Total loss and phases).

    A term whose weight is 0 is left out, so it is not computed at all: w_cre = w_ure = 0 is the
    ablation without LIR."""
    w = {"cls": 1.0, "aux": 1.0, "mct": 1.0}
    # as the published scripts: a term joins after its start (COCO `if n_iter <= 8000:` is the phase
    # before L_ptc), and a start of 0 means from the first iteration (VOC's script has no condition)
    if it > cfg.scaled("ptc_start") or cfg.scaled("ptc_start") == 0:
        w["ptc"] = cfg.w_ptc
    if it > cfg.scaled("lir_start") or cfg.scaled("lir_start") == 0:
        w["cre"] = cfg.w_cre
        w["ure"] = cfg.w_ure
    if it > cfg.scaled("seg_start"):
        w["seg"] = cfg.w_seg
        w["reg"] = cfg.w_reg
    return {name: value for name, value in w.items() if value != 0}


@dataclass
class StepLabels:
    ptc: torch.Tensor  # B x N
    cre: torch.Tensor  # B x N
    ure_index: torch.Tensor  # B x S
    ure_valid: torch.Tensor  # B x S
    seg: Optional[torch.Tensor]  # B x H x W


def cpu_has_fast_bf16() -> bool:
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(cfg: TrainConfig, device: torch.device) -> tuple[Optional[torch.dtype], str]:
    """bf16 autocast on CUDA; on the CPU only where bf16 matmuls are native (not slower)."""
    if not cfg.amp:
        return None, "amp off (fp32)"
    if device.type == "cuda":
        return torch.bfloat16, "amp on: bf16 autocast on CUDA"
    if cpu_has_fast_bf16():
        return torch.bfloat16, "amp on: bf16 autocast on the CPU (avx512_bf16/amx present)"
    return None, "amp requested but off: this CPU has no native bf16, where bf16 is slower than fp32"


class TrainStep:
    """One MoRe training step on a model: forward, no-grad CAM passes and labels, losses, AdamW.

    Owns the optimizer, the schedule, the L_ure sampler's generator and the compiled callables.
    `step(it, batch)` takes a batch dict with "image" (B x 3 x H x W uint8) and "cls_label" (B x K).
    """

    def __init__(self, model: MoReNet, cfg: TrainConfig, device: torch.device, wrapped=None,
                 backend: Optional[str] = None):
        self.model, self.cfg, self.device = model, cfg, device
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.amp_dtype, self.amp_note = resolve_amp(cfg, device)
        # --kernels resolved once for this device and held (the Trainer's, or here: a "triton" that
        # cannot run on this device raises now)
        self.backend = backend or kernels.choose_backend(cfg.kernels, device)
        self.ure_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.skipped = 0
        self.wrap(wrapped if wrapped is not None else model)

    def wrap(self, wrapped) -> None:
        """(Re)build the compiled callables around `wrapped` (the model, or its DDP wrapper)."""
        cfg = self.cfg
        self.ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        self.forward = torch.compile(wrapped, fullgraph=True) if cfg.compile else wrapped
        self.features = torch.compile(self.model.forward_features, fullgraph=True) if cfg.compile else None
        self.losses = torch.compile(losses.compute_losses, fullgraph=True) if cfg.compile else losses.compute_losses

    @torch.no_grad()
    def make_labels(self, x: torch.Tensor, image: torch.Tensor, out: MoReOutput, cls_labels: torch.Tensor,
                    it: int, weights: dict) -> StepLabels:
        cfg = self.cfg
        reuse = self.model.cams(out)  # the unflipped scale-1.0 CAMs from the training forward
        maps = cam.multiscale_maps(self.model, x, cfg.cam_scales, reuse=reuse, backbone=self.features)
        grid = out.grid
        cam_grid = cam.resize_to_grid(maps["cam"], grid)
        aux = cam.resize_to_grid(maps["aux_cam"], grid)
        aux_labels = cam.cam_labels(aux, cls_labels, cfg.cam_high, cfg.cam_low)  # B x h x w: L_ptc's, and L_ure's at first
        if it <= cfg.scaled("label_switch"):  # published: `aux if n_iter <= 10000 else cam`
            cre = cam.cam_labels(aux, cls_labels, cfg.cre_high, cfg.cam_low)
            ure = aux_labels
        else:
            cre = cam.cam_labels(cam_grid, cls_labels, cfg.lir_high, cfg.lir_low)
            ure = cre
        noise = torch.rand(ure.shape[0], ure.shape[1] * ure.shape[2], generator=self.ure_gen, device=self.device)
        ure_index, ure_valid = losses.ure_sample(ure, noise)
        seg = (cam.par_pseudo_labels(image, maps["cam"], cls_labels, cfg.cam_high, cfg.cam_low, cfg.par_affinity)
               if "seg" in weights or "reg" in weights else None)
        return StepLabels(aux_labels.flatten(1), cre.flatten(1), ure_index, ure_valid, seg)

    def _all_finite(self, total: torch.Tensor) -> bool:
        """Whether every rank's loss is finite (ranks must agree on skipping a step)."""
        flag = torch.isfinite(total.detach()).float()
        if self.ddp:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def step(self, it: int, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with kernels.use_backend(self.backend):
            return self._step(it, batch)

    def _step(self, it: int, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        images_u8 = batch["image"].to(self.device, non_blocking=True)
        cls_labels = batch["cls_label"].to(self.device, non_blocking=True)
        x = normalize(images_u8)  # B x 3 x H x W, normalized on the device
        image = images_u8.float()  # 0..255 for PAR and L_reg
        weights = loss_weights(cfg, it)
        amp = dict(device_type=self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                   enabled=self.amp_dtype is not None)
        with torch.autocast(**amp):
            out = self.forward(x)
            labels = self.make_labels(x, image, out, cls_labels, it, weights)
            total, terms = self.losses(out, cls_labels, labels.ptc, labels.cre, labels.ure_index,
                                       labels.ure_valid, labels.seg, image, weights, cfg.cre_temperature,
                                       cfg.reg_scale, cfg.reg_sigma_rgb, cfg.reg_sigma_xy)
            if "seg" not in weights and "reg" not in weights:  # as the published 0 * L_seg: the decoder gets
                # zero gradients, so AdamW decays it and counts its steps from iteration 1 (and DDP sees
                # every output used)
                total = total + 0.0 * out.seg.float().sum()
        if cfg.on_nonfinite == "skip" and not self._all_finite(total):  # a sync, only in skip mode
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return total.detach(), {k: v.detach() for k, v in terms.items()}
        total.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total.detach(), {k: v.detach() for k, v in terms.items()}



class _Clock:
    """Seconds per training iteration between log lines, leaving out evaluation and saving."""

    def __init__(self, iteration: int):
        self.start = self.last = time.perf_counter()
        self.last_iter = iteration

    def lap(self, iteration: int) -> float:
        now = time.perf_counter()
        sec_per_it = (now - self.last) / max(1, iteration - self.last_iter)
        self.last, self.last_iter = now, iteration
        return sec_per_it

    def pause(self) -> None:
        self.last = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1, log=print):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.is_main = rank == 0
        self._log = log
        self.device = resolve_device(cfg.device)
        self.backend = kernels.choose_backend(cfg.kernels, self.device)  # before any work: it can refuse
        note, self.workers = threads.apply(cfg.workers)  # intra-op threads and DataLoader workers from the cores free now
        self.log(note)
        self.out = pathlib.Path(cfg.out)
        self.tb = tb.open_log(cfg.tensorboard, self.out, self.is_main)  # does nothing unless --tensorboard
        state.seed_all(cfg.seed)
        root = resolve_data_root(cfg) if self.is_main else None  # rank 0 alone writes a synthetic set
        if world > 1:
            dist.barrier()
            root = root or resolve_data_root(cfg)
        self.train_set = build_dataset(cfg, root, cfg.train_split, True, cfg.split_list)
        self.val_set = build_dataset(cfg, root, cfg.val_split, False)
        self.model = MoReNet(cfg.backbone, cfg.num_classes, cfg.num_registers, cfg.topk_ratio, cfg.gcr_score,
                             attn_impl=cfg.attn_impl, depth=cfg.depth, decoder_dim=cfg.decoder_dim,
                             patch_size=cfg.patch_size, gcr=cfg.gcr)
        if cfg.pretrained:
            from ..model.pretrained import pretrained_state_dict

            unused = self.model.encoder.load_pretrained_vit(pretrained_state_dict(cfg.pretrained))
            self.log(f"initialized the backbone from {cfg.pretrained} ({len(unused)} checkpoint tensors unused)")
        self.model.to(self.device).train()
        self.start_iter = 0
        wrapped = self.model
        if world > 1:
            wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False)  # every parameter gets a gradient (TrainStep adds 0 * seg)
        self.train_step = TrainStep(self.model, cfg, self.device, wrapped, self.backend)
        self.best, self.bad_samples, self.bad_count = None, [], 0  # (iteration, mIoU); unreadable files, skips
        if self.is_main:
            for path in state.remove_partial_checkpoints(self.out):
                self.log(f"removed {path}: the partial file of a save that never finished")
        if cfg.resume:
            self._resume(pathlib.Path(cfg.resume))
        chosen = self.backend if self.backend == cfg.kernels else f"{self.backend} (--kernels {cfg.kernels})"
        self.log(f"device {self.device} | {self.train_step.amp_note} | compile {'on' if cfg.compile else 'off'} | "
                 f"kernels {chosen} | world size {world}")
        self._log_schedule()
        changed = differs_from_recipe(cfg)
        self.log(f"config: the {cfg.data} recipe" + (" with " + ", ".join(f"{k}={v}" for k, v in changed.items())
                                                      if changed else ", unchanged"))

    # ---------------------------------------------------------------- utilities
    def log(self, msg: str) -> None:
        if self.is_main:
            self._log(msg)

    def _log_schedule(self) -> None:
        cfg = self.cfg
        t = cfg.total_iters
        joins = lambda name: f"after {cfg.scaled(name)}" if cfg.scaled(name) else "from 0"  # noqa: E731
        note = "" if t >= cfg.reference_iters else f" (the recipe's {cfg.reference_iters}-iteration thresholds scaled by {t}/{cfg.reference_iters})"
        self.log(f"schedule: {t} iterations, running {cfg.iters}; warm-up {cfg.scaled('warmup_iters')}, "
                 f"L_seg/L_reg after {cfg.scaled('seg_start')}, LIR labels from the CAM after "
                 f"{cfg.scaled('label_switch')}{note}")
        self.log(f"recipe: batch {cfg.batch_size * self.world} ({self.world} x {cfg.batch_size}), CAM scales "
                 f"{tuple(cfg.cam_scales)}, L_ptc {joins('ptc_start')}, L_cre/L_ure "
                 f"{joins('lir_start')} (w_cre {cfg.w_cre}, w_ure {cfg.w_ure}, "
                 f"temperature {cfg.cre_temperature}), "
                 f"aux-CAM/PAR high threshold {cfg.cam_high}, validation background {cfg.eval_bkg}, "
                 f"pretrained {cfg.pretrained or 'none'}")

    def _resume(self, folder: pathlib.Path) -> None:
        ckpt, path = state.load_latest(folder, map_location="cpu")
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no readable checkpoint in {folder}")
        t = self.train_step
        self.model.load_state_dict(ckpt["model"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.scheduler.load_state_dict(ckpt["scheduler"])
        state.set_rng_state(ckpt["rng"])
        t.ure_gen.set_state(ckpt["ure_generator"])
        self.start_iter = int(ckpt["iteration"])
        t.skipped = int(ckpt.get("skipped", 0))
        self.best = tuple(ckpt["best"]) if ckpt.get("best") else None
        by_rank = ckpt.get("bad_samples_by_rank")  # each rank's own (files, count); older checkpoints: rank 0's
        if by_rank is not None and len(by_rank) == self.world:
            files, count = by_rank[self.rank]
        elif self.is_main:
            files, count = ckpt.get("bad_samples", []), ckpt.get("bad_count", 0)
        else:
            files, count = [], 0
        self.bad_samples, self.bad_count = list(files), int(count)
        self.log(f"resumed from {path} at iteration {self.start_iter}")

    def _bad_samples_of_all_ranks(self) -> tuple[list[list], list[str], int]:
        """(each rank's [files, count], the files of all ranks in rank order, the total count)."""
        mine = [list(self.bad_samples), self.bad_count]
        by_rank = [mine]
        if self.world > 1:
            by_rank = [None] * self.world
            dist.all_gather_object(by_rank, mine)
        files = list(dict.fromkeys(f for rank_files, _ in by_rank for f in rank_files))
        return by_rank, files, sum(count for _, count in by_rank)

    def checkpoint(self, done: int, losses: Optional[dict] = None, evaluate: bool = False) -> pathlib.Path:
        """Every save of a run goes through here: at an evaluation, at --save-every, on a stop signal
        and on an unreadable sample. With the step's `losses` and --on-nonfinite stop, refuses to
        save a diverged model; `evaluate` runs the validation first (the best map follows it, in
        self.results). Rank 0 writes atomically and prunes; every rank takes part (collectives)."""
        if losses is not None and self.cfg.on_nonfinite == "stop":
            self._check_finite(done, self._reduce(losses))
        if evaluate:
            self.results = self.evaluate(done)
            if BEST_MAP in self.results and (self.best is None or self.results[BEST_MAP] > self.best[1]):
                self.best = (done, self.results[BEST_MAP])
        by_rank, files, count = self._bad_samples_of_all_ranks()
        path = state.checkpoint_path(self.out, done)
        if self.is_main:
            state.save_atomic({
                "model": self.model.state_dict(),
                "model_config": self.model.config,
                "optimizer": self.train_step.optimizer.state_dict(),
                "scheduler": self.train_step.scheduler.state_dict(),
                "rng": state.rng_state(),
                "ure_generator": self.train_step.ure_gen.get_state(),
                "iteration": done,
                "skipped": self.train_step.skipped,
                "best": self.best,
                "bad_samples": files,
                "bad_count": count,
                "bad_samples_by_rank": by_rank,
                "config": self.cfg.to_dict(),
            }, path)
            if self.cfg.keep_checkpoints:
                state.prune_checkpoints(self.out, self.cfg.keep_checkpoints, self.best[0] if self.best else None)
        self.log(f"checkpoint {path}")
        self._clock.pause()  # evaluation and saving are not training throughput
        return path

    # ---------------------------------------------------------------- the run
    def _check_finite(self, it: int, values: dict[str, float]) -> None:
        """Stop on a non-finite loss; `values` are reduced over ranks, so every rank stops together."""
        for name in sorted(values, key=lambda n: n == "loss"):  # name the term before the total
            value = values[name]
            if not math.isfinite(value):
                last = state.list_checkpoints(self.out) if self.out.exists() else []
                keep = f"; the last good checkpoint is {last[0]}" if last else "; no checkpoint was written yet"
                term = "total loss" if name == "loss" else f"loss term '{name}'"
                raise NonFiniteLoss(f"non-finite {term} ({value}) at iteration {it}{keep}")

    def _reduce(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.world > 1:
            names = sorted(values)
            stacked = torch.stack([values[n].float() for n in names])
            dist.all_reduce(stacked)
            return {n: float(v) / self.world for n, v in zip(names, stacked)}
        return {n: float(v) for n, v in values.items()}

    def evaluate(self, it: int) -> dict[str, float]:
        with kernels.use_backend(self.backend):
            return self._evaluate(it)

    def _evaluate(self, it: int) -> dict[str, float]:
        cfg = self.cfg
        meter = ArtifactMeter(cfg.num_classes, self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            def report(msg: str) -> None:  # every rank reports the unreadable images of its shard
                print(f"warning: validation at iteration {it}: {msg}", file=sys.stderr, flush=True)
            with eval_loader(self.val_set, cfg, self.device, self.rank, self.world, report,
                             workers=self.workers) as loader:
                results = evaluate(self.model, loader, cfg.num_classes, self.device, cfg.cam_scales, cfg.eval_bkg,
                                   amp_dtype=self.train_step.amp_dtype,
                                   panel_dir=self.out / "panels" / f"iter_{it:08d}" if self.is_main else None,
                                   num_panels=cfg.num_panels, artifacts=meter,
                                   features=self.train_step.features)  # the compiled backbone under --compile
        self.artifact = meter.result()
        self.log(format_table(results, it))
        self.log(format_artifacts(self.artifact))
        self._write_metrics({"iter": it, "eval": results, "artifact": self.artifact})
        self.tb.panels(self.out / "panels" / f"iter_{it:08d}", it)
        return results

    def _write_metrics(self, record: dict) -> None:
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.tb.record(record)

    def run(self) -> dict[str, float]:
        # before the loader forks its workers, which then inherit handlers that leave stopping to us
        self.stop = state.StopSignals(quiet=not self.is_main).install()
        self._batches = None  # the training loader's iterator, once _run has started it
        try:
            return self._run()
        finally:
            try:
                shutdown_workers(self._batches)  # on a failure too: see shutdown_workers
            finally:
                self._batches = None
                self.stop.restore()

    def _run(self) -> dict[str, float]:
        """Step, log, evaluate / save, stop: the loop. Each part is one method below."""
        cfg = self.cfg
        batches = self._start()
        for it in range(self.start_iter, cfg.iters):
            batch = next(batches)
            self._bad_batch(batch, it)
            total, terms = self.train_step.step(it, batch)
            losses, done = {"loss": total, **terms}, it + 1
            if done % cfg.log_every == 0 or done == cfg.iters or done == self.start_iter + 1:
                self._log_step(done, losses)
            saved = None
            if done % cfg.eval_every == 0 or done == cfg.iters:
                saved = self.checkpoint(done, losses, evaluate=True)
            elif done % cfg.save_every == 0:
                saved = self.checkpoint(done, losses)
            self._stop_if_asked(done, losses, saved)
        if self.start_iter >= cfg.iters:  # nothing to train: evaluate the checkpoint
            self.results = self.evaluate(self.start_iter)
        self._finish()
        return self.results

    def _start(self) -> Iterator[dict]:
        """config.json, the loader (from the resumed position), the FLOP count and the clock."""
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(
                {**cfg.to_dict(), "differs_from_recipe": differs_from_recipe(cfg)}, indent=2))
        if self.start_iter >= cfg.iters:
            self.log(f"nothing to do: the checkpoint is at iteration {self.start_iter} >= --iters {cfg.iters}")
        # under torchrun a rank cannot stop alone: an unreadable sample is replaced until the ranks agree
        on_bad = cfg.on_bad_sample if self.world == 1 else "skip"
        self._bad_pending: Optional[str] = None
        self.results: dict[str, float] = {}
        self._flops = self.model.train_step_flops(cfg.crop_size, cfg.batch_size * self.world, cfg.cam_scales)
        self._peak = peak_flops(self.device)
        self._clock = _Clock(self.start_iter)
        self._batches = iter(train_loader(self.train_set, cfg, self.start_iter * cfg.batch_size, self.device,
                                          self.rank, self.world, on_bad, workers=self.workers))
        return self._batches

    def _log_step(self, done: int, losses: dict[str, torch.Tensor]) -> None:
        """The log line and metrics record of iteration `done` (the one place a step waits for the device)."""
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        sec_per_it = self._clock.lap(done)
        ips = cfg.batch_size * self.world / sec_per_it
        values = self._reduce(losses)
        if cfg.on_nonfinite == "stop":
            self._check_finite(done, values)
        lr = {group["name"]: group["lr"] for group in self.train_step.optimizer.param_groups}
        mfu = f" | MFU {100 * self._flops / sec_per_it / self._peak:.1f}%" if self._peak else ""
        parts = " ".join(f"{k} {values[k]:.4f}" for k in TERMS if k in values)
        first = done == self.start_iter + 1  # its time includes compilation and warm-up
        eta = "n/a (first step)" if first else format_eta(sec_per_it * (cfg.iters - done))
        self.log(f"it {done:>6}/{cfg.iters} | loss {values['loss']:.4f} ({parts}) | "
                 f"lr {lr['backbone']:.2e}/{lr['classifiers']:.2e} | {ips:.1f} img/s | "
                 f"{self._flops / sec_per_it / 1e12:.3f} TFLOP/s{mfu} | ETA {eta}")
        self._write_metrics({"iter": done, **values, "lr": lr["backbone"], "img_per_s": ips,
                             "skipped": self.train_step.skipped, **gpu_telemetry(self.device)})

    def _stop_if_asked(self, done: int, losses: dict[str, torch.Tensor], saved: Optional[pathlib.Path]) -> None:
        """Stop after iteration `done` when the ranks agree on a stop signal or an unreadable sample."""
        signum, bad = self._agree_to_stop(done)
        if bad:
            raise self._stop_on_bad(self._bad_pending, done)
        if signum and done < self.cfg.iters:
            saved = saved or self.checkpoint(done, losses)
            self._write_metrics({"iter": done, "stopped": signal_name(signum), "checkpoint": str(saved)})
            if self.world > 1:
                dist.barrier()  # every rank leaves after the checkpoint is complete
            raise TrainingStopped(signum, done, self.cfg.iters, saved, self.out)

    def _finish(self) -> None:
        """results.json and the closing lines: the skipped samples of every rank, the artifact ratio."""
        _, files, count = self._bad_samples_of_all_ranks()
        if not self.is_main:
            return
        artifact = getattr(self, "artifact", None)
        summary = {"iter": self.cfg.iters, "miou": self.results, "artifact": artifact}
        if count:
            summary.update(skipped_samples=files, skipped_samples_total=count)
            self.log(f"skipped {count} unreadable samples ({len(files)} files: {', '.join(files)}), "
                     "each replaced by another of the split")
        (self.out / "results.json").write_text(json.dumps(summary, indent=2))
        if artifact:
            self.log("artifact ratio at the end: " + ", ".join(
                f"{label} {'n/a' if artifact[k] is None else format(artifact[k], '.3f')}"
                for k, label in (("attention", "class-patch attention"), ("lam", "LAM"))) + " (lower is better)")
        self.log(f"done in {format_eta(self._clock.elapsed())}; outputs in {self.out} "
                 f"(metrics.jsonl, results.json, panels/, checkpoints/)")

    def _bad_batch(self, batch: dict, it: int) -> None:
        """Act on the unreadable samples a batch reports (SeededSamples: "path\tmessage" lines)."""
        lines = [line for entry in batch.get("bad", ()) for line in entry.splitlines() if line]
        if not lines:
            return
        if self.cfg.on_bad_sample == "stop":
            if self.world == 1:  # the batch holds a placeholder: stop before using it
                raise self._stop_on_bad(lines[0].split("\t", 1)[1], it)
            self._bad_pending = lines[0].split("\t", 1)[1]  # replaced meanwhile; the ranks stop at the next check
            return
        for line in lines:
            path, message = line.split("\t", 1)
            self.bad_count += 1
            if path not in self.bad_samples:
                self.bad_samples.append(path)
                print(f"warning: skipped, replaced by another sample of the split: {message}", file=sys.stderr, flush=True)
        self._write_metrics({"iter": it + 1, "skipped_samples": [line.split("\t", 1)[0] for line in lines],
                             "skipped_samples_total": self.bad_count})

    def _stop_on_bad(self, message: str, n: int) -> BadSampleStop:
        """Save iteration n (the last finished one) and describe the stop in one line."""
        if n > 0:
            where = f"checkpoint of iteration {n}: {self.checkpoint(n)}"
        else:
            where = "no iteration had finished: nothing saved"
        if self.world > 1:
            dist.barrier()  # every rank leaves after the checkpoint is complete
        if message is None:
            message = "an unreadable training sample on another rank (named in that rank's message)"
        return BadSampleStop(f"{message}; {where}; fix or remove it from the split list (or pass --on-bad-sample "
                             f"skip) and resume with --resume {self.out}")

    def _agree_to_stop(self, done: int) -> tuple[int, bool]:
        """(stop signal, an unreadable sample in stop mode) as the ranks agree, at the check cadence."""
        if self.world == 1:
            return self.stop.signum, False
        if done % STOP_CHECK_EVERY and done != self.cfg.iters:
            return 0, False
        flags = torch.tensor([self.stop.signum, int(self._bad_pending is not None)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, bad = flags.tolist()
        return int(signum), bool(bad)
