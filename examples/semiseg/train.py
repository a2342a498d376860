"""Semi-supervised semantic segmentation with one-way consistency (SwiftNet + PhTPS).

Quick start (CPU, a few minutes): generate a synthetic street-scene dataset in the
Cityscapes layout, train supervised and one-way consistency, print the mIoU table and
write PNGs of predictions and perturbations:

    python -m examples.semiseg.train --preset quick

Real Cityscapes (ROOT holds leftImg8bit/ and gtFine/), the paper's schedules:

    python -m examples.semiseg.train --preset cityscapes-half --data-root ROOT --labeled-fraction 1/4 --method 1w-ct
    python -m examples.semiseg.train --preset cityscapes-full --data-root ROOT --labeled-fraction 1/4 --method mt
    torchrun --nproc_per_node 2 -m examples.semiseg.train --preset cityscapes-full --data-root ROOT

Every configuration key is a flag (``--crop-size 448``) or a YAML key (``--config x.yaml``);
``--resume auto`` continues from OUT/last.pt. ``python examples/semiseg/train.py`` works too.
"""
from __future__ import annotations

import os
import sys
import time

# OpenMP's default spin-waiting makes multi-threaded CPU training up to 10x slower when the
# cores are shared with other processes; passive waiting costs little when they are not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):  # run as a script: make `examples.semiseg` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import examples.semiseg  # noqa: F401

    __package__ = "examples.semiseg"

from typing import TYPE_CHECKING, Dict, List, Optional  # noqa: E402

from .config import Config, parse_args  # noqa: E402  (light: torch is imported after parsing)

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import DistInfo
    from .engine import Trainer


def _log(dist: "DistInfo", *a) -> None:
    if dist.is_main:
        print(*a, flush=True)


def build_trainer(cfg: Config, explicit: Dict, dist: "DistInfo") -> "Trainer":
    """A trainer for ``cfg``; with ``resume`` the checkpoint's configuration (plus the keys
    given explicitly on this command line) and state are restored."""
    from .engine import Trainer, load_checkpoint

    path = cfg.resume
    if path == "auto":
        path = os.path.join(cfg.out, "last.pt")
        path = path if os.path.isfile(path) else ""
    if not path:
        return Trainer(cfg, dist)
    ckpt = load_checkpoint(path)
    overrides = {k: v for k, v in explicit.items() if k not in ("resume", "compare")}
    saved = Config.from_dict(ckpt["config"])
    cfg = Config.from_dict(dict(overrides, out=cfg.out), saved)
    trainer = Trainer(cfg, dist)
    trainer.load_state_dict(ckpt)
    _log(dist, f"[semiseg] resumed from {path} at step {trainer.step}/{trainer.total_steps}")
    return trainer


def describe(t: "Trainer") -> str:
    import torch

    c = t.cfg
    img = t.val.load(0)[0] if t.val is not None else None
    res = f"{img.shape[-1]}x{img.shape[-2]}" if img is not None else "?"
    unl = f", {len(t.train_u)} unlabeled" if t.train_u is not None else ""
    teacher = f", {c.teacher} teacher ({c.resolved_teacher_bn} BN)" if t.semi else ""
    return (f"[semiseg] {c.method}{teacher}: {c.arch} on {c.data_root} ({c.resolution} res., val {res}), "
            f"{len(t.train_l)} labeled{unl}, crops {c.crop_size}, batches ({c.batch_labeled}, "
            f"{c.batch_unlabeled if t.semi else 0}) x {t.dist.world_size} proc., {t.total_steps} steps, "
            f"device {t.device}, {torch.get_num_threads()} threads, tpswarp backend "
            f"{__import__('tpswarp').backends()['selected'][t.device.type]['warped_kl_div']}")


def run(cfg: Config, explicit: Dict, dist: "DistInfo") -> "Trainer":
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, explicit, dist)
    _log(dist, describe(trainer))
    if trainer.cfg.eval_only:
        trainer.results = trainer.evaluate(progress=True)
        trainer.seconds = time.perf_counter() - t0
        if dist.is_main:
            png = trainer.visualize(os.path.join(trainer.cfg.out, "vis", f"eval_step_{trainer.step:07d}.png"))
            print(results_table({trainer.cfg.method: trainer}))
            print(f"wrote {png}")
        return trainer
    trainer.results = trainer.fit()
    trainer.seconds = time.perf_counter() - t0
    _log(dist, f"[semiseg] {trainer.cfg.method}: done in {trainer.seconds:.0f} s, outputs in {trainer.cfg.out}")
    return trainer


def results_table(trainers: Dict[str, "Trainer"]) -> str:
    """Markdown table: per-class IoU and mIoU (%) of each run's student (and EMA teacher)."""
    cols = []
    for name, t in trainers.items():
        for model, r in t.results.items():
            cols.append((name if model == "student" else f"{name} (teacher)", r))
    any_t = next(iter(trainers.values()))
    classes = [c for c in any_t.class_names if any(r["iou"].get(c) is not None for _, r in cols)]
    lines = ["| class | " + " | ".join(n for n, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for c in classes:
        vals = [r["iou"].get(c) for _, r in cols]
        lines.append(f"| {c} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in vals) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{100 * r['miou']:.1f}**" for _, r in cols) + " |")
    lines.append("| mIoU, classes in ground truth only | " + " | ".join(f"{100 * r['miou_gt']:.1f}" for _, r in cols) + " |")
    lines.append("| pixel acc. | " + " | ".join(f"{100 * r['pixel_acc']:.1f}" for _, r in cols) + " |")
    lines.append("| wall time (s) | " + " | ".join(f"{trainers[n.split(' ')[0]].seconds:.0f}" for n, _ in cols) + " |")
    return "\n".join(lines)


def compare_png(trainers: Dict[str, "Trainer"], path: str, n: int = 3) -> str:
    """Validation images, ground truth and each run's prediction; then a PhTPS perturbation
    of the same images, the warped ground truth and each run's prediction on it."""
    import torch

    from . import visualize as V
    from .labels import IGNORE_INDEX

    first = next(iter(trainers.values()))
    n = min(n, len(first.val))
    xs, ys = zip(*[first.val[i] for i in range(n)])
    x, y = torch.stack(xs), torch.stack(ys)
    ph = first.phtps
    params = ph.sample(n, x.shape[-2:], generator=torch.Generator().manual_seed(1))
    xp, _ = ph.perturb(x, params)
    yw = ph.warp_labels(y, params, ignore_index=IGNORE_INDEX)
    preds, preds_p = {}, {}
    with torch.no_grad():
        for name, t in trainers.items():
            was = t.student.training
            t.student.eval()
            preds[name] = t.student(x.to(t.device)).argmax(1).cpu()
            preds_p[name] = t.student(xp.to(t.device)).argmax(1).cpu()
            t.student.train(was)
    rows = []
    for i in range(n):
        rows.append([("image", V.image_panel(x[i])), ("ground truth", V.label_panel(y[i]))]
                    + [(name, V.label_panel(p[i])) for name, p in preds.items()])
    for i in range(n):
        rows.append([("PhTPS perturbed", V.image_panel(xp[i])), ("warped ground truth", V.label_panel(yw[i]))]
                    + [(f"{name} on perturbed", V.label_panel(p[i])) for name, p in preds_p.items()])
    return V.save_grid(path, rows, title="validation: " + " vs ".join(trainers))


def compare(cfg: Config, explicit: Dict, dist: "DistInfo") -> Dict[str, "Trainer"]:
    t0 = time.perf_counter()
    trainers: Dict[str, Trainer] = {}
    for entry in cfg.compare:
        sub = cfg.replace(method=entry, compare=[], out=os.path.join(cfg.out, entry))
        sub_explicit = {k: v for k, v in explicit.items() if k not in ("method", "out", "compare")}
        trainers[entry] = run(sub, sub_explicit, dist)
    if dist.is_main:
        table = results_table(trainers)
        t = next(iter(trainers.values()))
        head = (f"mIoU (%) on {t.cfg.data_root} {t.cfg.val_split} ({len(t.val)} images, {t.cfg.resolution} res.), "
                f"{len(t.train_l)} labeled / {t.num_train} training images, {t.total_steps} steps each; "
                "Cityscapes 19-class protocol: classes absent from ground truth and predictions are left out, "
                "a class predicted but absent from the ground truth counts 0")
        png = compare_png(trainers, os.path.join(cfg.out, "compare.png"), n=cfg.vis_images)
        with open(os.path.join(cfg.out, "results.md"), "w") as fh:
            fh.write(head + "\n\n" + table + "\n")
        print("\n" + head + "\n\n" + table + "\n")
        print(f"wrote {png} and {os.path.join(cfg.out, 'results.md')} "
              f"(per-run PNGs in {cfg.out}/<method>/vis/); total {time.perf_counter() - t0:.0f} s")
    return trainers


def main(argv: Optional[List[str]] = None):
    cfg, explicit = parse_args(argv, __doc__)
    from .distributed import cleanup_distributed, init_distributed

    dist = init_distributed(cfg.device)
    try:
        if cfg.compare:
            return compare(cfg, explicit, dist)
        return run(cfg, explicit, dist)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
