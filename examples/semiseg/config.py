"""Training configuration: one flat dataclass; defaults < ``--preset`` < ``--config file.yaml``
< command-line flags. The resolved configuration is saved as ``config.yaml`` in the run
folder and inside every checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

METHODS = ("supervised", "1w-ct", "1w-cs", "2w-c1", "1w-p2")
METHOD_ALIASES = {"simple": "1w-ct", "simple-phtps": "1w-ct", "one-way": "1w-ct", "sup": "supervised"}
MEAN_TEACHER_ALIASES = ("mt", "mt-phtps")  # = method 1w-ct with teacher ema
TEACHERS = ("live", "frozen", "ema")


@dataclass
class Config:
    # -- run ---------------------------------------------------------------------------
    out: str = "runs/semiseg"                 # run folder (config.yaml, logs, checkpoints, PNGs)
    seed: int = 0
    device: str = "auto"                      # auto | cpu | cuda | cuda:N
    threads: int = 0                          # torch CPU threads (0: torch's default)
    compare: List[str] = field(default_factory=list)  # train these methods one after another into OUT/<method>
    resume: str = ""                          # checkpoint path, or "auto" (OUT/last.pt when present)
    eval_only: bool = False                   # evaluate (the resumed checkpoint) and write the PNG; no training
    # -- data --------------------------------------------------------------------------
    data_root: str = "data/cityscapes"
    generate: bool = False                    # write the synthetic dataset to data_root first (if absent)
    synthetic_train: int = 96
    synthetic_val: int = 24
    synthetic_size: List[int] = field(default_factory=lambda: [256, 512])   # H W of generated images
    train_split: str = "train"
    val_split: str = "val"
    resolution: str = "half"                  # half | full | a scale factor
    crop_size: int = 448
    scale_range: List[float] = field(default_factory=lambda: [1 / 1.5, 1.5])  # log-uniform random scale
    flip: bool = True
    labeled_fraction: str = "1/4"             # 1/8, 1/4, 1/2, 1 (seeded permutation)
    split_file: str = ""                      # or an explicit list of labeled images (one name per line)
    split_seed: int = 0                       # seed of the permutation (the paper's 5 splits: 0..4)
    unlabeled: str = "all"                    # all (the paper: labeled images too) | rest
    num_workers: int = 2
    cache: bool = False                       # keep decoded images in memory
    max_val_images: int = 0                   # 0: all
    # -- model ---------------------------------------------------------------------------
    arch: str = "swiftnet_rn18"               # swiftnet_rn18 | swiftnet_rn34
    pretrained: str = ""                      # local ImageNet ResNet weights (torchvision state dict)
    # -- method --------------------------------------------------------------------------
    method: str = "1w-ct"                     # supervised | 1w-ct | 1w-cs | 2w-c1 | 1w-p2
    teacher: str = "live"                     # live (the student under no_grad, as the authors) | frozen | ema
    teacher_bn: str = "auto"                  # auto | batch | population (auto: live -> batch, frozen/ema -> population)
    ema_decay: float = 0.99
    alpha: float = 0.5                        # consistency weight
    geometric_strength: float = 1.0           # sG
    photometric_strength: float = 1.0         # sP
    warp_teacher_logits: bool = False         # warp logits then softmax (authors' code) instead of probabilities
    consistency_resolution: str = "input"     # input | stride4 (loss on upsampled stride-4 logits)
    bn_update_perturbed: bool = False         # update BN running statistics on perturbed inputs too
    # -- optimisation --------------------------------------------------------------------
    batch_labeled: int = 8
    batch_unlabeled: int = 8
    steps: int = 0                            # 0: epochs_full * floor(N_train / batch_labeled)
    epochs_full: float = 200.0                # the paper: 200 (half res.), 250 (full res.)
    lr: float = 4e-4                          # randomly initialised parameters
    lr_pretrained: float = 1e-4               # the encoder when `pretrained` is given
    weight_decay: float = 1e-4
    weight_decay_pretrained: float = 2.5e-5
    weight_decay_semi_scale: float = 1.0      # weight-decay factor of semi-supervised runs (paper, full res.: 0.25)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    schedule: str = "quarter-cosine"          # quarter-cosine (lr * cos(pi/2 * t)) | cosine | constant
    amp: str = "none"                         # none | bf16 | fp16
    grad_clip: float = 0.0                    # max gradient norm (0: off)
    # -- operations ----------------------------------------------------------------------
    eval_every: int = 2000
    ckpt_every: int = 1000
    keep_checkpoints: bool = False            # also keep step_XXXXXXX.pt at every checkpoint
    log_every: int = 20
    eval_batch_size: int = 2
    vis_images: int = 3
    tensorboard: bool = True
    progress: bool = True

    # ------------------------------------------------------------------------------------
    def validate(self) -> "Config":
        if self.method in MEAN_TEACHER_ALIASES:
            self.method, self.teacher = "1w-ct", "ema"
        self.method = METHOD_ALIASES.get(self.method, self.method)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.method == "2w-c1" and self.teacher != "live":
            raise ValueError("2w-c1 (two-way) has no separate teacher: use teacher=live")
        if self.teacher_bn not in ("auto", "batch", "population"):
            raise ValueError(f"teacher_bn must be auto, batch or population, got {self.teacher_bn!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.schedule not in ("quarter-cosine", "cosine", "constant"):
            raise ValueError(f"schedule must be quarter-cosine, cosine or constant, got {self.schedule!r}")
        if self.consistency_resolution not in ("input", "stride4"):
            raise ValueError("consistency_resolution must be input or stride4")
        if self.unlabeled not in ("all", "rest"):
            raise ValueError("unlabeled must be all or rest")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be two numbers 0 < lo <= hi, got {self.scale_range}")
        for m in self.compare:
            if METHOD_ALIASES.get(m, m) not in METHODS and m not in MEAN_TEACHER_ALIASES:
                raise ValueError(f"compare: unknown method {m!r}; choose from {METHODS}")
        return self

    @property
    def resolved_teacher_bn(self) -> str:
        if self.teacher_bn != "auto":
            return self.teacher_bn
        return "batch" if self.teacher == "live" else "population"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw).validate()

    @classmethod
    def from_dict(cls, d: Dict[str, Any], base: Optional["Config"] = None) -> "Config":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        cfg = dataclasses.replace(base or cls(), **{k: _coerce(k, v) for k, v in d.items()})
        return cfg.validate()


def _coerce(name: str, value: Any) -> Any:
    f = {f.name: f for f in fields(Config)}[name]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        inner = type(default[0]) if default else str
        return [inner(v) for v in value]
    if isinstance(default, float):
        return float(eval_number(value))
    if isinstance(default, int):
        return int(value)
    return str(value) if value is not None else ""


def eval_number(v: Any) -> float:
    if isinstance(v, str) and "/" in v:
        a, b = v.split("/")
        return float(a) / float(b)
    return float(v)


# ---------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------
PRESETS: Dict[str, Dict[str, Any]] = {
    # The README's first command: generate the synthetic dataset, train supervised and
    # one-way consistency (1w-ct) on CPU in a few minutes, print the mIoU table, write PNGs.
    "quick": dict(
        out="runs/quick", data_root="runs/semiseg-synth", generate=True,
        synthetic_train=96, synthetic_val=24, synthetic_size=[128, 256],
        resolution="half", crop_size=64, scale_range=[0.75, 1.5],
        labeled_fraction="1/24", split_seed=0, batch_labeled=4, batch_unlabeled=4,
        steps=200, eval_every=100, ckpt_every=100, log_every=10, eval_batch_size=8,
        num_workers=0, cache=True, compare=["supervised", "1w-ct"], method="1w-ct",
    ),
    # The paper's half-resolution Cityscapes setup for SwiftNet-RN18 (Table 1): 448 crops,
    # scale in [1/1.5, 1.5], (Bl, Bu) = (8, 8), 200 * 2975 / |Dl| epochs = 74,200 steps.
    "cityscapes-half": dict(
        out="runs/cs-half", data_root="data/cityscapes", resolution="half", crop_size=448,
        scale_range=[1 / 1.5, 1.5], batch_labeled=8, batch_unlabeled=8, epochs_full=200.0,
        weight_decay_semi_scale=1.0, bn_update_perturbed=False, eval_every=4000, ckpt_every=2000,
        num_workers=4, eval_batch_size=4,
    ),
    # Full resolution (Table 3): 768 crops, scale in [0.5, 2], 250 epochs = 92,750 steps,
    # 4x smaller weight decay and BN statistics updated in the perturbed student too.
    "cityscapes-full": dict(
        out="runs/cs-full", data_root="data/cityscapes", resolution="full", crop_size=768,
        scale_range=[0.5, 2.0], batch_labeled=8, batch_unlabeled=8, epochs_full=250.0,
        weight_decay_semi_scale=0.25, bn_update_perturbed=True, eval_every=4000, ckpt_every=2000,
        num_workers=6, eval_batch_size=2,
    ),
}


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration (then YAML, then flags)")
    p.add_argument("--config", help="YAML file of configuration keys")
    g = p.add_argument_group("configuration (every key of Config; see examples/semiseg/config.py)")
    for f in fields(Config):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=f"(default {default})")
        elif isinstance(default, list):
            g.add_argument(flag, dest=f.name, nargs="*", help=f"(default {' '.join(map(str, default)) or 'none'})")
        else:
            g.add_argument(flag, dest=f.name, help=f"(default {default!r})")
    return p


def load_yaml(path: str) -> Dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: '{path}'")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must hold a mapping of keys to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_args(argv: Optional[List[str]] = None, description: str = "") -> Tuple[Config, Dict[str, Any]]:
    """Returns the resolved config and the keys given explicitly (YAML or flags), which a
    resumed run applies on top of the checkpoint's configuration."""
    ns = vars(build_parser(description).parse_args(argv))
    preset = ns.pop("preset", None)
    yaml_path = ns.pop("config", None)
    explicit: Dict[str, Any] = {}
    if yaml_path:
        explicit.update(load_yaml(yaml_path))
    explicit.update(ns)
    cfg = Config()
    if preset:
        cfg = Config.from_dict(PRESETS[preset], cfg)
    cfg = Config.from_dict(explicit, cfg)
    return cfg, {k: _coerce(k, v) for k, v in explicit.items()}


def save_yaml(cfg: Config, path: str) -> None:
    import yaml

    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    os.replace(tmp, path)


def dumps(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)
