"""Two-moons replication of the paper's Figure 1: which consistency formulation helps?

Six labeled points (three per class) and about a thousand unlabeled ones from two moons
(noise 0.1). An MLP is trained full-batch with Adam (default hyper-parameters) on the
cross-entropy of the labeled points plus ``--consistency-weight`` times a KL consistency
term over all points, in four setups (the paper's names; ``T`` is the perturbation):

* ``none``   supervised only, no consistency term (Figure 1a);
* ``1w-cs``  one-way, clean student: ``KL(teacher(T(x)) || student(x))``, the teacher
  output detached (Figure 1b);
* ``2w-c1``  two-way, one input clean: ``KL(model(x) || model(T(x)))`` with gradients
  through both branches (Figure 1d);
* ``1w-ct``  one-way, clean teacher: ``KL(teacher(x) || student(T(x)))``, the teacher
  evaluated without gradient on the clean input -- the paper's proposal (Figure 1c).

The teacher is the current model itself (the paper's "simple" teacher, ``theta' =
theta`` treated as a constant), so for ``1w-ct`` the clean logits are simply detached.
``T`` adds isotropic Gaussian noise of standard deviation ``--perturbation-scale``, drawn
afresh every step. The divergence is ``tpswarp.masked_kl_div`` with the points treated as
pixels: logits ``(seeds, N, 2)`` are passed as ``(B=seeds, C=2, N)`` with
``teacher_is_logits=True``; for ``2w-c1`` the teacher logits require grad and the op
back-propagates into them. In ``1w-cs`` the KL is written teacher-first like the other
two (``masked_kl_div`` is ``KL(teacher || student)``); the paper's notation
``D(h(x), h'(T(x)))`` orders the arguments clean-first instead.

Every seed draws its own data set, labeled points, MLP initialisation and perturbation
noise from its own ``torch.Generator``; the four setups of one seed share all of these,
so the comparison between setups is paired. All ``len(setups) x len(seeds)`` MLPs are
trained at once as one batched MLP (one ``bmm`` per layer); as Adam is element-wise
and the losses of different models are summed, this is the same as training them one
by one (a seed run alone gives the same accuracies as in a batch of seeds). The reported number is the accuracy on the unlabeled points after the last step.

Defaults, chosen so that the whole run (5 seeds x 4 setups) stays well within 3 minutes
on a 2-core CPU -- about 1.5 min measured on a heavily loaded one, see
``examples/README.md`` -- while reproducing the paper's finding that ``1w-ct`` beats
``1w-cs``, with ``2w-c1`` in between (as in the paper, ``1w-cs`` even ends below
``none``):

* ``--steps 1000``. The paper trains 20 000 epochs (one epoch is one full-batch step);
  that is too slow here. The setups are indistinguishable for the first ~300 steps;
  from ~500 steps on the means are ordered ``1w-ct > 2w-c1 > none > 1w-cs`` and the
  gaps widen (checked up to 2000 steps, where mostly ``1w-cs`` keeps degrading).
* ``--hidden 32`` with ``--layers 2`` hidden ReLU layers: ample capacity for the moons,
  and cheap (the cost grows with seeds, steps and width).
* ``--perturbation-scale 0.25``: strong relative to the data noise (0.1), about half
  the gap between the moons -- the regime the paper's argument is about: perturbed
  points of one moon land near the other one, so a teacher fed perturbed inputs gives
  poor targets. Measured on seeds 0-4 at 1000 steps: at 0.15 ``1w-cs`` no longer
  hurts (about ``none``) and ``2w-c1`` matches ``1w-ct``; at 0.4 every consistency
  setup is worse than at 0.25 but the ordering is the same.
* ``--consistency-weight 1`` (the paper uses 0.5 to 1 in its other experiments).
* ``--seeds 0 1 2 3 4``.

Usage::

    python examples/two_moons.py --out out/two_moons
    python examples/two_moons.py --out out/quick --seeds 1 2 5 --steps 500 --no-progress

Output under ``--out``:

* ``results.json``: ``config`` (every option above), ``seeds``, ``setups`` mapping each
  setup to ``{"per_seed": {seed: accuracy}, "mean": ..., "std": ...}`` (accuracy on the
  unlabeled points after the last step), ``history`` (``[{"step", "mean": {setup:
  mean accuracy}}]`` every ``--eval-every`` steps and at the end), ``runtime_s``,
  ``torch_version``, ``masked_kl_div_backend``, ``figure`` and ``plot_seed``;
* ``two_moons.png``: one panel per setup in the paper's order (a)-(d) with the
  unlabeled points (white), the labeled ones (red, blue) and the decision boundary of
  the ``--plot-seed`` model (default: the first seed).

Needs matplotlib and tqdm (``pip install -e ".[demo]"``). ``main(argv)`` runs the same
from Python and returns the ``results.json`` content; ``run(Config(...))`` returns a
``Result`` with the trained batched model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import tpswarp

SETUPS = ("none", "1w-cs", "2w-c1", "1w-ct")
TITLES = {
    "none": "(a) no consistency loss",
    "1w-cs": "(b) one-way, clean student",
    "1w-ct": "(c) one-way, clean teacher",
    "2w-c1": "(d) two-way, one input clean",
}
PLOT_ORDER = ("none", "1w-cs", "1w-ct", "2w-c1")  # the paper's panel order
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "elu": torch.nn.functional.elu}


@dataclass
class Config:
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 1000
    points: int = 1000
    noise: float = 0.1
    labeled_per_class: int = 3
    perturbation_scale: float = 0.25
    hidden: int = 32
    layers: int = 2
    activation: str = "relu"
    consistency_weight: float = 1.0
    setups: Tuple[str, ...] = SETUPS
    eval_every: int = 100  # record the accuracies every this many steps (0: only at the end)


@dataclass
class Result:
    config: Config
    accuracy: Dict[str, List[float]]  # setup -> accuracy on the unlabeled points, per seed
    runtime_s: float
    model: "BatchedMLP"  # models ordered setup-major: index = setup_index * len(seeds) + seed_index
    x: torch.Tensor  # (S, N, 2)
    y: torch.Tensor  # (S, N)
    labeled: torch.Tensor  # (S, 2 * labeled_per_class) indices into the points
    history: List[Tuple[int, Dict[str, List[float]]]]  # (step, accuracy) every eval_every steps

    def mean(self, setup: str) -> float:
        values = self.accuracy[setup]
        return sum(values) / len(values)


def make_moons(n: int, noise: float, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half circles like ``sklearn.datasets.make_moons``, shuffled.
    Returns float32 points ``(n, 2)`` and int64 labels ``(n,)``."""
    n_out = n // 2
    n_in = n - n_out
    t_out = torch.linspace(0, math.pi, n_out, dtype=torch.float64)
    t_in = torch.linspace(0, math.pi, n_in, dtype=torch.float64)
    outer = torch.stack([t_out.cos(), t_out.sin()], 1)
    inner = torch.stack([1 - t_in.cos(), 1 - t_in.sin() - 0.5], 1)
    x = torch.cat([outer, inner]) + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    y = torch.cat([torch.zeros(n_out, dtype=torch.int64), torch.ones(n_in, dtype=torch.int64)])
    perm = torch.randperm(n, generator=generator)
    return x[perm].float(), y[perm]


def pick_labeled(y: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``per_class`` random points of every class."""
    picks = []
    for c in range(int(y.max()) + 1):
        members = (y == c).nonzero().squeeze(1)
        picks.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.cat(picks)


def linear_init(fan_in: int, fan_out: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.nn.Linear``'s default initialisation; the weight is stored ``(in, out)``."""
    bound = 1 / math.sqrt(fan_in)
    w = (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound
    b = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
    return w, b


class BatchedMLP(torch.nn.Module):
    """``M`` independent MLPs evaluated with one ``baddbmm`` per layer:
    ``(M, N, in) -> (M, N, out)``. ``inits[m]`` lists model ``m``'s ``(weight, bias)``."""

    def __init__(self, inits: Sequence[Sequence[Tuple[torch.Tensor, torch.Tensor]]], activation: str = "relu"):
        super().__init__()
        n_layers = len(inits[0])
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.stack([m[i][0] for m in inits])) for i in range(n_layers)])
        self.biases = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.stack([m[i][1] for m in inits])[:, None, :]) for i in range(n_layers)])
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, models: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: ``(M, N, in)``, or ``(len(models), N, in)`` for the subset ``models`` (indices)."""
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if models is not None:
                w, b = w.index_select(0, models), b.index_select(0, models)
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = self.act(x)
        return x


def consistency_loss(setup: str, clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Consistency term of ``setup`` for logits ``(S, N, 2)`` of S independent models.

    The points are pixels: ``(S, N, 2)`` becomes ``(B=S, C=2, N)``. ``masked_kl_div``'s
    mean over all ``S * N`` points times ``S`` is the sum over models of each model's
    mean, so every model gets exactly the gradient of its own loss."""
    clean = clean.transpose(1, 2)
    perturbed = perturbed.transpose(1, 2)
    if setup == "1w-cs":  # teacher on the perturbed input, student on the clean one
        student, teacher = clean, perturbed.detach()
    elif setup == "2w-c1":  # gradients through both branches
        student, teacher = perturbed, clean
    elif setup == "1w-ct":  # no-grad teacher on the clean input, student on the perturbed one
        student, teacher = perturbed, clean.detach()
    else:
        raise ValueError(f"no consistency term for setup {setup!r}")
    return clean.shape[0] * tpswarp.masked_kl_div(student, teacher, teacher_is_logits=True)


def run(cfg: Config, progress: bool = True) -> Result:
    """Train every setup for every seed; return the accuracies on the unlabeled points."""
    start = time.perf_counter()
    for setup in cfg.setups:
        if setup not in SETUPS:
            raise ValueError(f"unknown setup {setup!r}; choose from {SETUPS}")
    if len(set(cfg.setups)) != len(cfg.setups) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError("setups and seeds must not repeat")
    seeds = [int(s) for s in cfg.seeds]
    setups = list(cfg.setups)
    n_seeds, n_setups, n = len(seeds), len(setups), cfg.points
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    data = [make_moons(n, cfg.noise, g) for g in gens]
    labeled = torch.stack([pick_labeled(y, cfg.labeled_per_class, g) for (_, y), g in zip(data, gens)])
    sizes = [2] + [cfg.hidden] * cfg.layers + [2]
    inits = [[linear_init(a, b, g) for a, b in zip(sizes[:-1], sizes[1:])] for g in gens]
    x = torch.stack([d[0] for d in data])  # (S, N, 2)
    y = torch.stack([d[1] for d in data])  # (S, N)
    x_lab = torch.gather(x, 1, labeled[:, :, None].expand(-1, -1, 2))
    y_lab = torch.gather(y, 1, labeled)

    # Models are setup-major: the models of setup k are k * S ... (k + 1) * S - 1.
    model = BatchedMLP([init for _ in setups for init in inits], cfg.activation)
    opt = torch.optim.Adam(model.parameters())
    x_all = x.repeat(n_setups, 1, 1)
    x_lab_all = x_lab.repeat(n_setups, 1, 1)
    y_lab_all = y_lab.repeat(n_setups, 1).reshape(-1)
    n_lab = labeled.shape[1]
    # Only the models of setups with a consistency term see perturbed inputs.
    consistent = [s for s in setups if s != "none"]
    perturbed_models = torch.tensor(
        [k * n_seeds + i for k, s in enumerate(setups) if s != "none" for i in range(n_seeds)], dtype=torch.int64)

    unlabeled = torch.ones(n_seeds, n, dtype=torch.bool).scatter_(1, labeled, False)

    def accuracy() -> Dict[str, List[float]]:
        with torch.no_grad():
            pred = model(x_all).argmax(-1).view(n_setups, n_seeds, n)
        correct = ((pred == y[None]) & unlabeled[None]).sum(-1).double()
        acc = correct / unlabeled.sum(-1).double()[None]
        return {s: acc[k].tolist() for k, s in enumerate(setups)}

    history = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc="two moons", unit="step", dynamic_ncols=True)
    for step in range(1, cfg.steps + 1):
        out = model(torch.cat([x_lab_all, x_all], 1))  # labeled and clean points in one pass
        # Cross-entropy: mean over each model's labeled points, summed over models.
        loss = torch.nn.functional.cross_entropy(out[:, :n_lab].reshape(-1, 2), y_lab_all, reduction="sum") / n_lab
        if consistent:
            noise = torch.stack([torch.randn(n, 2, generator=g) for g in gens]) * cfg.perturbation_scale
            perturbed = model((x + noise).repeat(len(consistent), 1, 1), perturbed_models)
            j = 0  # block of `perturbed` holding setup k's models
            for k, setup in enumerate(setups):
                if setup == "none":
                    continue
                clean = out[k * n_seeds:(k + 1) * n_seeds, n_lab:]
                loss = loss + cfg.consistency_weight * consistency_loss(
                    setup, clean, perturbed[j * n_seeds:(j + 1) * n_seeds])
                j += 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            history.append((step, accuracy()))
            if bar is not None:
                bar.set_postfix({s: f"{sum(a) / len(a):.3f}" for s, a in history[-1][1].items()}, refresh=False)
        if bar is not None:
            bar.update()
    final = accuracy()
    history.append((cfg.steps, final))
    if bar is not None:
        bar.set_postfix({s: f"{sum(a) / len(a):.3f}" for s, a in final.items()})
        bar.close()
    return Result(cfg, final, time.perf_counter() - start, model, x, y, labeled, history)


def results_dict(result: Result) -> dict:
    """The content of ``results.json``."""
    cfg = result.config
    setups = {}
    for setup, values in result.accuracy.items():
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        setups[setup] = {
            "per_seed": {str(s): v for s, v in zip(cfg.seeds, values)},
            "mean": mean,
            "std": std,
        }
    config = asdict(cfg)
    config["seeds"] = list(cfg.seeds)
    config["setups"] = list(cfg.setups)
    return {
        "task": "two moons, accuracy on the unlabeled points",
        "config": config,
        "seeds": list(cfg.seeds),
        "setups": setups,
        "history": [{"step": step, "mean": {s: sum(a) / len(a) for s, a in acc.items()}}
                    for step, acc in result.history],
        "runtime_s": result.runtime_s,
        "torch_version": torch.__version__,
        "masked_kl_div_backend": tpswarp.backends()["selected"]["cpu"]["masked_kl_div"],
    }


def plot_boundaries(result: Result, path: str, seed_index: int = 0) -> None:
    """One panel per setup: the unlabeled points (white), the labeled ones (red, blue) and
    the decision boundary of the model of seed ``seed_index``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfg = result.config
    setups = [s for s in PLOT_ORDER if s in cfg.setups]
    n_seeds = len(cfg.seeds)
    x, y, lab = result.x[seed_index], result.y[seed_index], result.labeled[seed_index]
    lo, hi = (x.min(0).values - 0.4).tolist(), (x.max(0).values + 0.4).tolist()
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 200), torch.linspace(lo[1], hi[1], 150), indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    models = torch.tensor([list(cfg.setups).index(s) * n_seeds + seed_index for s in setups])
    with torch.no_grad():
        probs = torch.softmax(result.model(grid.expand(len(setups), -1, -1), models), -1)[..., 1].numpy()
    gx, gy, x, y, lab = gx.numpy(), gy.numpy(), x.numpy(), y.numpy(), lab.numpy()

    cols = 2 if len(setups) > 1 else 1
    rows = math.ceil(len(setups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(setups):]:
        ax.axis("off")
    unl = np.ones(x.shape[0], dtype=bool)
    unl[lab] = False
    for ax, setup, p in zip(axes.flat, setups, probs):
        p = p.reshape(gx.shape)
        ax.contourf(gx, gy, p, levels=[-0.01, 0.5, 1.01], colors=["#f6c9c9", "#c9d6f6"], alpha=0.8)
        ax.contour(gx, gy, p, levels=[0.5], colors="k", linewidths=1.5)
        ax.scatter(x[unl, 0], x[unl, 1], s=9, c="white", edgecolors="0.35", linewidths=0.5)
        for cls, color in ((0, "#d62728"), (1, "#1f4fd6")):
            pts = x[lab][y[lab] == cls]
            ax.scatter(pts[:, 0], pts[:, 1], s=110, c=color, edgecolors="k", linewidths=1.2, zorder=3)
        accs = result.accuracy[setup]
        ax.set_title(f"{TITLES[setup]}\nacc {accs[seed_index]:.3f} (seed {cfg.seeds[seed_index]}), "
                     f"mean {sum(accs) / len(accs):.3f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
    fig.suptitle(f"Two moons: {cfg.steps} steps, perturbation N(0, {cfg.perturbation_scale}^2), "
                 f"{len(cfg.seeds)} seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/two_moons", help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="random seeds")
    p.add_argument("--steps", type=int, default=d.steps, help="full-batch Adam steps")
    p.add_argument("--points", type=int, default=d.points, help="number of points (labeled included)")
    p.add_argument("--noise", type=float, default=d.noise, help="std of the moons' Gaussian noise")
    p.add_argument("--labeled-per-class", type=int, default=d.labeled_per_class)
    p.add_argument("--perturbation-scale", type=float, default=d.perturbation_scale,
                   help="std of the additive Gaussian perturbation T")
    p.add_argument("--hidden", type=int, default=d.hidden, help="MLP hidden width")
    p.add_argument("--layers", type=int, default=d.layers, help="number of hidden layers")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default=d.activation)
    p.add_argument("--consistency-weight", type=float, default=d.consistency_weight)
    p.add_argument("--setups", nargs="+", choices=SETUPS, default=list(d.setups))
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="record the accuracies every this many steps in the history of results.json (0: only at the end)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: leave torch's default); 1 is fastest for these small matrices")
    p.add_argument("--plot-seed", type=int, default=None, help="seed whose boundaries are drawn (first seed)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the experiment from command-line arguments; returns what it writes to results.json.
    The thread count and deterministic-algorithms flag are restored on return."""
    args = parse_args(argv)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        torch.use_deterministic_algorithms(True)
        return _main(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _main(args: argparse.Namespace) -> dict:
    cfg = Config(seeds=tuple(args.seeds), steps=args.steps, points=args.points, noise=args.noise,
                 labeled_per_class=args.labeled_per_class, perturbation_scale=args.perturbation_scale,
                 hidden=args.hidden, layers=args.layers, activation=args.activation,
                 consistency_weight=args.consistency_weight, setups=tuple(args.setups),
                 eval_every=args.eval_every)
    if args.plot_seed is not None and args.plot_seed not in cfg.seeds:
        raise SystemExit(f"--plot-seed {args.plot_seed} is not one of --seeds {list(cfg.seeds)}")
    result = run(cfg, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    seed_index = cfg.seeds.index(args.plot_seed) if args.plot_seed is not None else 0
    figure = os.path.join(args.out, "two_moons.png")
    plot_boundaries(result, figure, seed_index)
    summary = results_dict(result)
    summary["figure"] = os.path.basename(figure)
    summary["plot_seed"] = cfg.seeds[seed_index]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{'setup':8s} {'mean':>6s}  per seed ({', '.join(map(str, cfg.seeds))})")
    for setup, r in summary["setups"].items():
        print(f"{setup:8s} {r['mean']:6.3f}  " + " ".join(f"{v:.3f}" for v in r["per_seed"].values()))
    print(f"training took {result.runtime_s:.1f} s; wrote {os.path.join(args.out, 'results.json')} and {figure}")
    return summary


if __name__ == "__main__":
    main()
