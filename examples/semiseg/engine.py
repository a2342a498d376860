"""The trainer: supervised and consistency training steps (Algorithm 1 of the paper),
evaluation, logging, checkpoints and resume.

One training step (``Trainer.train_step``), in Algorithm 1's order:

1. supervised: ``CE(h_θ(x_l), y_l)``, backward (frees its activations);
2. teacher without gradient (``1w-ct``: on the clean unlabeled batch);
3. student on the PhTPS-perturbed batch, ``alpha * masked KL`` through
   ``tpswarp.PhTPS.consistency_loss`` (``tpswarp.warped_kl_div``), backward (gradients add up);
4. gradient clipping (optional), Adam step, learning-rate schedule, EMA teacher update.

Methods (the paper's Table 5): ``supervised``; ``1w-ct`` one-way, clean teacher, perturbed
student; ``1w-cs`` one-way, clean student, perturbed teacher; ``2w-c1`` two-way, one input
clean (gradients through both branches); ``1w-p2`` one-way, both inputs perturbed (the
teacher prediction is brought to the student's frame through the inverse of its warp,
approximated by the TPS through the swapped control points; the paper forward-warps).

Teachers: ``live`` (the student itself under ``no_grad``, as in the authors' code: train
mode, batch statistics, BN running statistics updated on the clean batch), ``frozen`` (a copy
of the student taken at the start of each step: θ' <- frozen copy(θ)), ``ema`` (Mean Teacher:
exponential moving average, decay 0.99, over parameters and BN buffers). ``teacher_bn``:
``batch`` statistics or the ``population`` ones (eval mode); frozen/ema teachers never
update their statistics. The student's BN running statistics are updated on clean inputs
only unless ``bn_update_perturbed``.

Randomness is a function of ``(seed, step, rank)`` (data order, jitter and perturbations),
so a resumed run repeats exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import copy
import csv
import inspect
import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tpswarp

from . import data as D
from .config import Config, save_yaml
from .distributed import DistInfo, all_reduce_sum, barrier, convert_sync_batchnorm
from .labels import IGNORE_INDEX, NUM_CLASSES, class_names
from .metrics import confusion_matrix, summarize
from .swiftnet import build_swiftnet
from . import visualize as V

CHECKPOINT_FORMAT = "tpswarp-semiseg/1"
PHTPS_STREAM = 7919  # seed-mixing stream of the perturbation generator


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
@contextmanager
def frozen_bn_stats(module: nn.Module, enabled: bool = True):
    """BN layers in train mode use batch statistics but leave their running statistics
    (and ``num_batches_tracked``) untouched inside this context."""
    if not enabled:
        yield
        return
    bns = [m for m in module.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """A checkpoint is data, never code: ``torch.load(weights_only=True)``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: '{path}'")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot load checkpoint '{path}' (weights_only=True): {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"'{path}' is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux: KiB)
    except Exception:  # pragma: no cover
        return float("nan")


def resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", dist_info.local_rank)
    return dev


# ---------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------
TRAIN_COLUMNS = ["step", "lr", "loss", "loss_sup", "loss_cons", "valid_frac", "grad_norm", "images_per_s",
                 "peak_mem_mb", "elapsed_s"]


class RunLogger:
    """CSV (``train_log.csv``, ``eval_log.csv``) and TensorBoard (``tb/``) on the main process."""

    def __init__(self, out: str, enabled: bool, tensorboard: bool):
        self.enabled, self.out, self.writer = enabled, out, None
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(out, "tb"))
            except Exception as e:  # tensorboard not installed
                print(f"[semiseg] TensorBoard logging off ({e})")

    def _append(self, name: str, columns: List[str], row: dict) -> None:
        path = os.path.join(self.out, name)
        new = not os.path.isfile(path)
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})

    def train(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        self._append("train_log.csv", TRAIN_COLUMNS, dict(row, step=step))
        if self.writer:
            for k, v in row.items():
                if k != "step" and v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)

    def eval(self, step: int, results: Dict[str, dict], names: List[str]) -> None:
        if not self.enabled:
            return
        cols = ["step", "model", "miou", "miou_gt", "pixel_acc"] + names
        for model, r in results.items():
            row = {"step": step, "model": model, "miou": r["miou"], "miou_gt": r["miou_gt"],
                   "pixel_acc": r["pixel_acc"], **r["iou"]}
            self._append("eval_log.csv", cols, row)
            if self.writer:
                self.writer.add_scalar(f"eval/miou_{model}", r["miou"], step)
                self.writer.add_scalar(f"eval/pixel_acc_{model}", r["pixel_acc"], step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


# ---------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------
class Trainer:
    """Builds model, teacher, optimizer, schedule and (unless ``data=False``) the datasets
    from a :class:`Config`; ``fit()`` trains, ``train_step()`` runs one step of Algorithm 1."""

    def __init__(self, cfg: Config, dist_info: Optional[DistInfo] = None, *, data: bool = True):
        self.cfg = cfg.validate()
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(cfg.device, self.dist)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.main = self.dist.is_main
        self.class_names = class_names()
        self.step = 0
        self.history: List[dict] = []

        self.train_l = self.train_u = self.val = None
        if data:
            self.setup_data()
        self.total_steps = self._total_steps()

        torch.manual_seed(cfg.seed)  # model initialisation
        student = build_swiftnet(cfg.arch, NUM_CLASSES, cfg.pretrained or None)
        if self.dist.enabled:
            student = convert_sync_batchnorm(student, self.device)
        self.student = student.to(self.device)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # SyncBN keeps the BN buffers equal: no buffer broadcast before every forward
            sync_kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})
            self.model = DDP(self.student, device_ids=ids, **sync_kw)
        else:
            self.model = self.student
        self.semi = cfg.method != "supervised"
        self.teacher: Optional[nn.Module] = None
        if self.semi and cfg.teacher in ("frozen", "ema"):
            self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()

        self.phtps = tpswarp.PhTPS(cfg.geometric_strength, cfg.photometric_strength)
        self.optimizer = self._adam()
        T = max(1, self.total_steps)
        sched = {
            "quarter-cosine": lambda s: math.cos(math.pi / 2 * min(s, T) / T),
            "cosine": lambda s: 0.5 * (1 + math.cos(math.pi * min(s, T) / T)),
            "constant": lambda s: 1.0,
        }[cfg.schedule]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, sched)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    # -- construction ----------------------------------------------------------------------
    def _param_groups(self) -> List[dict]:
        cfg = self.cfg
        pre = bool(cfg.pretrained)
        s = cfg.weight_decay_semi_scale if cfg.method != "supervised" else 1.0
        return [
            dict(params=list(self.student.encoder_parameters()), name="encoder",
                 lr=cfg.lr_pretrained if pre else cfg.lr,
                 weight_decay=(cfg.weight_decay_pretrained if pre else cfg.weight_decay) * s),
            dict(params=list(self.student.decoder_parameters()), name="decoder", lr=cfg.lr,
                 weight_decay=cfg.weight_decay * s),
        ]

    def _adam(self) -> torch.optim.Optimizer:
        """Adam with L2 regularisation (``weight_decay``, not AdamW), as in the paper; the
        fused kernel where this torch has it for the device (several times faster on CPU)."""
        groups, betas = self._param_groups(), tuple(self.cfg.betas)
        try:
            return torch.optim.Adam(groups, betas=betas, fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.Adam(groups, betas=betas)

    def setup_data(self) -> None:
        cfg = self.cfg
        if cfg.generate:
            if self.main:
                from .synthetic import generate

                generate(cfg.data_root, train=cfg.synthetic_train, val=cfg.synthetic_val,
                         height=cfg.synthetic_size[0], width=cfg.synthetic_size[1], seed=0, quiet=True)
            barrier()
        jitter = D.Jitter(cfg.crop_size, tuple(cfg.scale_range), cfg.flip)
        train = D.find_samples(cfg.data_root, cfg.train_split, labels=True)
        names = [s.name for s in train]
        lab = D.labeled_indices(names, fraction=cfg.labeled_fraction, seed=cfg.split_seed,
                                split_file=cfg.split_file or None)
        self.num_train = len(train)
        self.train_l = D.CityscapesSegmentation(cfg.data_root, cfg.train_split, resolution=cfg.resolution,
                                                jitter=jitter, indices=lab, cache=cfg.cache, samples=train)
        if cfg.method != "supervised":
            unl = [s for s in D.find_samples(cfg.data_root, cfg.train_split, labels=False)]
            if cfg.unlabeled == "rest":
                labeled = {names[i] for i in lab}
                unl = [s for s in unl if s.name not in labeled]
            self.train_u = D.CityscapesSegmentation(cfg.data_root, cfg.train_split, resolution=cfg.resolution,
                                                    labels=False, jitter=jitter, cache=cfg.cache, samples=unl)
        val = D.find_samples(cfg.data_root, cfg.val_split, labels=True)
        if cfg.max_val_images > 0:
            val = val[: cfg.max_val_images]
        self.val = D.CityscapesSegmentation(cfg.data_root, cfg.val_split, resolution=cfg.resolution,
                                            cache=cfg.cache, samples=val)

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.steps > 0:
            return cfg.steps
        if self.train_l is None:
            raise ValueError("steps must be > 0 when the trainer is built without data")
        return max(1, round(cfg.epochs_full * (self.num_train // cfg.batch_labeled)))

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- forward passes ----------------------------------------------------------------------
    def _upsample_logits(self) -> bool:
        return self.cfg.consistency_resolution == "input"

    def _teacher_out(self, x: torch.Tensor, *, perturbed: bool, upsample: bool) -> torch.Tensor:
        """Teacher logits without gradient (float32)."""
        cfg = self.cfg
        net = self.teacher if self.teacher is not None else self.student
        with torch.no_grad(), self.autocast():
            if cfg.resolved_teacher_bn == "population":
                was = net.training
                net.eval()
                try:
                    out = net(x, upsample=upsample)
                finally:
                    net.train(was)
            else:
                net.train()
                # only the live teacher (= the student) updates statistics, on clean inputs
                update = self.teacher is None and (not perturbed or cfg.bn_update_perturbed)
                with frozen_bn_stats(net, not update):
                    out = net(x, upsample=upsample)
                if self.teacher is not None:
                    net.eval()
        return out.float()

    def _student(self, x: torch.Tensor, *, perturbed: bool, upsample: bool = True) -> torch.Tensor:
        with frozen_bn_stats(self.student, perturbed and not self.cfg.bn_update_perturbed), self.autocast():
            return self.model(x, upsample=upsample).float()

    def _target(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        return teacher_logits if self.cfg.warp_teacher_logits else teacher_logits.softmax(1)

    def _warped_kl(self, student: torch.Tensor, target: torch.Tensor, params, size) -> torch.Tensor:
        """The fused consistency loss; stride-4 logits are upsampled to ``size`` on the fly
        (``size=``: as F.interpolate bilinear, without the full-resolution tensors)."""
        logits = self.cfg.warp_teacher_logits
        if tuple(student.shape[-2:]) != tuple(size):
            return tpswarp.warped_kl_div(student, target, params.src, params.tps, teacher_is_logits=logits,
                                         align_corners=self.phtps.align_corners, size=tuple(size))
        return self.phtps.consistency_loss(student, target, params, teacher_is_logits=logits)

    def _consistency(self, xu: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, float]:
        """The unsupervised term (before ``alpha``) and the fraction of valid pixels."""
        cfg, ph = self.cfg, self.phtps
        B, _, H, W = xu.shape
        params = ph.sample(B, (H, W), generator=gen, device=xu.device)
        method = cfg.method
        if method == "1w-ct":
            up = self._upsample_logits()
            target = self._target(self._teacher_out(xu, perturbed=False, upsample=up))   # clean teacher
            xp, valid = ph.perturb(xu, params)
            student = self._student(xp, perturbed=True, upsample=up)                      # perturbed student
            loss = self._warped_kl(student, target, params, (H, W))
        elif method == "2w-c1":
            clean = self._student(xu, perturbed=False)                                    # with gradient
            xp, valid = ph.perturb(xu, params)
            student = self._student(xp, perturbed=True)
            loss = ph.consistency_loss(student, self._target(clean), params,
                                       teacher_is_logits=cfg.warp_teacher_logits)
        elif method == "1w-cs":
            xp, valid = ph.perturb(xu, params)
            target = self._teacher_out(xp, perturbed=True, upsample=True).softmax(1)     # perturbed teacher
            student = self._student(xu, perturbed=False)                                  # clean student
            warped, valid = ph.warp(student, params)                                      # to the perturbed frame
            loss = tpswarp.masked_kl_div(warped, target, valid)
        elif method == "1w-p2":
            p2 = ph.sample(B, (H, W), generator=gen, device=xu.device)
            x1, _ = ph.perturb(xu, params)
            with torch.no_grad():
                t1 = self._teacher_out(x1, perturbed=True, upsample=True).softmax(1)
                inv = tpswarp.tps_solve(params.dst, params.src, check_singular=False)
                t_clean, v_clean = tpswarp.tps_warp(t1, params.dst, inv, align_corners=ph.align_corners)
                target, valid = ph.warp(t_clean, p2)
                vc, _ = ph.warp(v_clean.to(t1.dtype), p2)
                valid = valid & (vc > 0.999)
                target = target / target.sum(1, keepdim=True).clamp_min(1e-12)
            xp, _ = ph.perturb(xu, p2)
            student = self._student(xp, perturbed=True)
            loss = tpswarp.masked_kl_div(student, target, valid)
        else:  # pragma: no cover
            raise ValueError(method)
        return loss, float(valid.float().mean())

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, xl: torch.Tensor, yl: torch.Tensor, xu: Optional[torch.Tensor] = None) -> Dict[str, float]:
        cfg, dev = self.cfg, self.device
        nb = dev.type == "cuda"
        xl, yl = xl.to(dev, non_blocking=nb), yl.to(dev, non_blocking=nb)
        self.model.train()
        if cfg.teacher == "frozen" and self.teacher is not None:
            self.teacher.load_state_dict(self.student.state_dict())   # θ' <- frozen copy(θ)
        self.optimizer.zero_grad(set_to_none=True)
        out: Dict[str, float] = {}

        # 1. supervised loss and its gradient (activations freed by backward)
        no_sync = self.model.no_sync() if (self.semi and isinstance(self.model, DDP)) else nullcontext()
        with no_sync:
            with self.autocast():
                logits = self.model(xl)
            loss_sup = F.cross_entropy(logits.float(), yl, ignore_index=IGNORE_INDEX)
            self.scaler.scale(loss_sup).backward()
        del logits
        out["loss_sup"] = float(loss_sup.detach())
        total = out["loss_sup"]

        # 2-3. teacher without gradient, perturbed student, consistency gradient
        if self.semi:
            if xu is None:
                raise ValueError(f"method {cfg.method} needs an unlabeled batch")
            xu = xu.to(dev, non_blocking=nb)
            gen = torch.Generator().manual_seed(D.mix_seed(cfg.seed, PHTPS_STREAM, self.step, self.dist.rank))
            loss_cons, valid = self._consistency(xu, gen)
            self.scaler.scale(cfg.alpha * loss_cons).backward()
            out["loss_cons"] = float(loss_cons.detach())
            out["valid_frac"] = valid
            total += cfg.alpha * out["loss_cons"]
        out["loss"] = total
        if not math.isfinite(total) and cfg.amp != "fp16":
            raise FloatingPointError(f"step {self.step}: non-finite loss {out}")

        # 4. update
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        out["lr"] = self.optimizer.param_groups[-1]["lr"]
        self.scheduler.step()
        if self.teacher is not None and cfg.teacher == "ema":
            self._ema_update()
        self.step += 1
        return out

    @torch.no_grad()
    def _ema_update(self) -> None:
        d = self.cfg.ema_decay
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.lerp_(s.detach(), 1 - d)
        for t, s in zip(self.teacher.buffers(), self.student.buffers()):
            if t.dtype.is_floating_point:
                t.lerp_(s, 1 - d)
            else:
                t.copy_(s)

    # -- evaluation ---------------------------------------------------------------------------
    def eval_models(self) -> Dict[str, nn.Module]:
        nets = {"student": self.student}
        if self.teacher is not None and self.cfg.teacher == "ema":
            nets["teacher"] = self.teacher
        return nets

    @torch.no_grad()
    def evaluate(self, dataset: Optional[D.CityscapesSegmentation] = None, progress: bool = False) -> Dict[str, dict]:
        """mIoU and per-class IoU of the student (and the EMA teacher) on ``dataset``."""
        dataset = dataset or self.val
        cfg = self.cfg
        loader = D.make_loader(dataset, sampler=D.ShardSampler(len(dataset), self.dist.rank, self.dist.world_size),
                               batch_size=cfg.eval_batch_size, num_workers=min(cfg.num_workers, 2))
        nets = self.eval_models()
        modes = {k: n.training for k, n in nets.items()}
        cms = {k: torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64) for k in nets}
        it = loader
        if progress and self.main and cfg.progress:
            from tqdm import tqdm

            it = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)
        try:
            for n in nets.values():
                n.eval()
            for x, y in it:
                x = x.to(self.device)
                for k, n in nets.items():
                    with self.autocast():
                        pred = n(x).argmax(1).cpu()
                    cms[k] += confusion_matrix(pred, y, NUM_CLASSES)
        finally:
            for k, n in nets.items():
                n.train(modes[k])
        out = {}
        for k, cm in cms.items():
            cm = all_reduce_sum(cm.to(self.device)).cpu()
            out[k] = summarize(cm, self.class_names)
        return out

    @torch.no_grad()
    def visualize(self, path: str, n: Optional[int] = None) -> Optional[str]:
        """PNG: validation images, ground truth, predictions; then the PhTPS perturbation of
        the same images, the teacher's warped target, the student's prediction on it and the
        validity mask."""
        n = min(n or self.cfg.vis_images, len(self.val))
        if n < 1:
            return None
        xs, ys = zip(*[self.val[i] for i in range(n)])
        x, y = torch.stack(xs).to(self.device), torch.stack(ys)
        nets = self.eval_models()
        modes = {k: m.training for k, m in nets.items()}
        rows = []
        try:
            for m in nets.values():
                m.eval()
            preds = {k: m(x).argmax(1).cpu() for k, m in nets.items()}
            ph = self.phtps
            params = ph.sample(n, x.shape[-2:], generator=torch.Generator().manual_seed(self.cfg.seed), device=x.device)
            xp, valid = ph.perturb(x, params)
            teacher = nets.get("teacher", self.student)
            target, _ = ph.warp(teacher(x).softmax(1), params)
            sp = self.student(xp).argmax(1).cpu()
        finally:
            for k, m in nets.items():
                m.train(modes[k])
        for i in range(n):
            row = [("image", V.image_panel(x[i])), ("ground truth", V.label_panel(y[i]))]
            row += [(f"{k} prediction", V.label_panel(p[i])) for k, p in preds.items()]
            rows.append(row)
            rows.append([("PhTPS perturbed", V.image_panel(xp[i])), ("warped teacher target",
                         V.label_panel(torch.where(valid[i, 0].cpu(), target[i].argmax(0).cpu(), IGNORE_INDEX))),
                         ("student on perturbed", V.label_panel(sp[i])), ("validity mask", V.mask_panel(valid[i]))])
        title = f"{self.cfg.method} ({self.cfg.teacher} teacher)" if self.semi else "supervised"
        return V.save_grid(path, rows, title=f"{title}, step {self.step}")

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "history": self.history,
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["model"])
        if self.teacher is not None:
            if ckpt.get("teacher") is None:
                raise RuntimeError("the checkpoint has no teacher but this run needs one")
            self.teacher.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history") or [])
        _set_rng_state(ckpt["rng"])

    def save(self, path: str) -> None:
        if self.main:
            atomic_save(self.state_dict(), path)

    def resume(self, path: str) -> None:
        self.load_state_dict(load_checkpoint(path))

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> Dict[str, dict]:
        cfg = self.cfg
        out = cfg.out
        logger = RunLogger(out, self.main, cfg.tensorboard)
        if self.main:
            os.makedirs(out, exist_ok=True)
            save_yaml(cfg, os.path.join(out, "config.yaml"))
        w, r = self.dist.world_size, self.dist.rank
        pin = self.device.type == "cuda"
        ls = D.StepSampler(len(self.train_l), cfg.batch_labeled, self.total_steps, start_step=self.step,
                           seed=cfg.seed, stream=1, rank=r, world_size=w)
        batches_l = D.make_loader(self.train_l, ls, num_workers=cfg.num_workers, pin_memory=pin)
        if self.semi:
            us = D.StepSampler(len(self.train_u), cfg.batch_unlabeled, self.total_steps, start_step=self.step,
                               seed=cfg.seed, stream=2, rank=r, world_size=w)
            batches_u = D.make_loader(self.train_u, us, num_workers=cfg.num_workers, pin_memory=pin)
        else:
            batches_u = iter(lambda: None, 0)  # endless Nones
        pbar = None
        if self.main and cfg.progress:
            from tqdm import tqdm

            pbar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.method}", dynamic_ncols=True,
                        mininterval=1.0)
        window, t_window, t_start = [], time.perf_counter(), time.perf_counter()
        per_step = (cfg.batch_labeled + (cfg.batch_unlabeled if self.semi else 0)) * w
        results = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for (xl, yl), xu in zip(batches_l, batches_u):
            stats = self.train_step(xl, yl, xu)
            window.append(stats)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix({k: f"{stats[k]:.3f}" for k in ("loss_sup", "loss_cons") if k in stats}, refresh=False)
            last = self.step == self.total_steps
            if self.step % cfg.log_every == 0 or last:
                now = time.perf_counter()
                row = {k: sum(s[k] for s in window if k in s) / max(1, sum(k in s for s in window))
                       for k in ("loss", "loss_sup", "loss_cons", "valid_frac", "grad_norm") if any(k in s for s in window)}
                row.update(lr=stats["lr"], images_per_s=per_step * len(window) / max(1e-9, now - t_window),
                           peak_mem_mb=_peak_memory_mb(self.device), elapsed_s=now - t_start)
                logger.train(self.step, row)
                window, t_window = [], time.perf_counter()
            if self.step % cfg.eval_every == 0 or last:
                results = self.evaluate(progress=True)
                entry = {"step": self.step, **{k: {m: v[m] for m in ("miou", "miou_gt", "pixel_acc")}
                                       for k, v in results.items()}}
                self.history.append(entry)
                logger.eval(self.step, results, self.class_names)
                if self.main:
                    self.visualize(os.path.join(out, "vis", f"step_{self.step:07d}.png"))
                    msg = ", ".join(f"{k} mIoU {100 * v['miou']:.2f}" for k, v in results.items())
                    (pbar.write if pbar else print)(f"[{cfg.method}] step {self.step}: {msg}")
            if self.step % cfg.ckpt_every == 0 or last:
                self.save(os.path.join(out, "last.pt"))
                if cfg.keep_checkpoints and self.main:
                    shutil.copyfile(os.path.join(out, "last.pt"), os.path.join(out, f"step_{self.step:07d}.pt"))
        if pbar is not None:
            pbar.close()
        if results is None:  # nothing left to train (resumed at the end)
            results = self.evaluate()
        if self.main:
            atomic_save({"format": "tpswarp-semiseg-weights/1", "model": self.student.state_dict(),
                         "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                         "config": cfg.to_dict()}, os.path.join(out, "model.pt"))
            with open(os.path.join(out, "metrics.json"), "w") as fh:
                json.dump({"step": self.step, "results": results, "history": self.history}, fh, indent=1)
        logger.close()
        barrier()
        return results
