"""Distill and score a student of the analytic Gaussian-mixture teacher (benchmarks/toy_gmm.py, tests).

The teacher lives on a variance-preserving schedule (the config's abar, eps-prediction) or on a rectified flow
(alpha = 1 - sigma, velocity prediction, optionally shifted as SD3): the same distillation and samplers run on both.
Scores at K sampling steps, from the same initial noise and labels for every model:
  endpoint error  mean ||x_K - x_exact||, x_exact the guided PF-ODE endpoint (RK4, float64)
  sliced W2       sliced Wasserstein-2 distance between the samples and the labels' true mixture
"""

import dataclasses
from dataclasses import dataclass

import torch

from pcm.config import Config, config_from_dict
from pcm.math import NoiseSchedule, SolverGrid, alphas_cumprod, flow_schedule, vp_schedule
from pcm.models.card import ModelCard, card_of_run
from pcm.models.gmm import (
    UNCOND,
    AnalyticTeacher,
    GaussianMixture,
    exact_flow_endpoint,
    exact_ode_endpoint,
    toy_mixture,
)
from pcm.models.toy import ResidualMLPStudent
from pcm.sampling import Sampling, sample
from pcm.train.loop import train
from pcm.train.step import Batch

TOY_SCHEDULES = ("vp", "flow")


@dataclass
class ToyWorld:
    mixture: GaussianMixture
    schedule: NoiseSchedule  # float32; VP: the SD1.5 abar unless the config says otherwise; flow: sigma_t
    teacher: AnalyticTeacher

    @property
    def abar(self) -> torch.Tensor:
        """The VP world's abar (T,)."""
        if self.schedule.kind != "vp":
            raise ValueError("a flow world has no abar: use world.schedule")
        return self.schedule.table


def make_world(cfg: Config, schedule: str = "vp", shift: float = 1.0) -> ToyWorld:
    """The analytic teacher on the config's VP schedule, or on a rectified flow with T timesteps (SD3's shift)."""
    s = cfg.schedule
    if schedule == "vp":
        sched = vp_schedule(alphas_cumprod(s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps))
    elif schedule == "flow":
        sched = flow_schedule(s.num_train_timesteps, shift)
    else:
        raise ValueError(f"unknown toy schedule {schedule!r}; allowed: {', '.join(TOY_SCHEDULES)}")
    mixture = toy_mixture()
    return ToyWorld(mixture, sched, AnalyticTeacher(mixture, sched))


def draw_labels(mixture: GaussianMixture, count: int, generator: torch.Generator) -> torch.Tensor:
    """Class labels drawn with the classes' total mixture weight."""
    class_weights = torch.zeros(mixture.num_classes).index_add_(0, mixture.classes, mixture.weights)
    return torch.multinomial(class_weights, count, replacement=True, generator=generator)


def batch_source(world: ToyWorld, batch_size: int, seed: int):
    """next_batch(step): fresh mixture samples keyed by (seed, step); sample ids are global."""
    def next_batch(step: int) -> Batch:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        labels = draw_labels(world.mixture, batch_size, gen)
        x_0 = world.mixture.sample(labels, gen).float()
        ids = step * batch_size + torch.arange(batch_size)
        return Batch(x_0=x_0, cond=labels, uncond=torch.full_like(labels, UNCOND), ids=ids)

    return next_batch


def distill_student(world: ToyWorld, cfg: Config, progress: bool = False) -> tuple[ResidualMLPStudent, list[float]]:
    """A residual MLP student trained with cfg.distill.method for cfg.train.max_steps steps."""
    torch.manual_seed(cfg.seed)
    student = ResidualMLPStudent(world.teacher, world.mixture.dim, world.mixture.num_classes,
                                 cfg.schedule.num_train_timesteps)
    losses = train(student, world.teacher, batch_source(world, cfg.train.batch_size, cfg.seed), world.schedule, cfg,
                   progress=progress)
    return student, losses


@dataclass
class EvalSet:
    x_T: torch.Tensor  # (B, D) initial noise at t = T - 1
    labels: torch.Tensor  # (B,)
    exact: torch.Tensor  # (B, D) exact guided PF-ODE endpoints, float64
    data: torch.Tensor  # (B, D) true mixture samples for the same labels
    w: float  # solver guidance of the exact ODE (inference CFG scale is 1 + w)


def make_eval_set(world: ToyWorld, count: int, w: float, seed: int = 1234) -> EvalSet:
    gen = torch.Generator().manual_seed(seed)
    labels = draw_labels(world.mixture, count, gen)
    x_T = torch.randn(count, world.mixture.dim, generator=gen)
    table = world.schedule.table.double()
    if world.schedule.kind == "vp":
        exact = exact_ode_endpoint(world.mixture, x_T, labels, w, float(table[-1]), float(table[0]))
    else:  # from sigma_{T-1} to the clean end sigma_0 = 0
        exact = exact_flow_endpoint(world.mixture, x_T, labels, w, float(table[-1]), float(table[0]))
    data = world.mixture.sample(labels, gen)
    return EvalSet(x_T, labels, exact, data, w)


def sliced_w2(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 between two equal-size point sets (B, D), over fixed random directions."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs).sort(dim=0).values, (b.double() @ dirs).sort(dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())


def score(samples: torch.Tensor, ev: EvalSet) -> dict[str, float]:
    return {
        "endpoint_error": float((samples.double() - ev.exact).norm(dim=1).mean()),
        "sliced_w2": sliced_w2(samples, ev.data),
    }


def toy_card(cfg: Config) -> ModelCard:
    """The card of a student distilled with cfg from the analytic teacher."""
    d = cfg.distill
    grid = SolverGrid(cfg.schedule.num_train_timesteps, d.num_solver_steps, d.num_phases)
    return dataclasses.replace(card_of_run(cfg, grid), family="gmm", base_model="analytic Gaussian mixture")


def sample_model(
    world: ToyWorld, eps_fn, cfg: Config, ev: EvalSet, K: int, kind: str, generator_seed: int = 0
) -> torch.Tensor:
    """K-step samples of a model kind: 'pcm' or 'lcm' (a student sampled as its card says) or 'ddim' (the teacher,
    guided with CFG scale 1 + w)."""
    if kind not in ("pcm", "lcm", "ddim"):
        raise ValueError(f"unknown model kind {kind!r}; allowed: pcm, lcm, ddim")
    if kind != "ddim" and kind != cfg.distill.method:
        raise ValueError(f"model kind {kind!r} but the config distills with {cfg.distill.method!r}")
    how = Sampling(None, K, 1.0 + ev.w) if kind == "ddim" else Sampling(toy_card(cfg), K)
    return sample_with(world, eps_fn, ev, how, generator_seed=generator_seed)


def sample_with(world: ToyWorld, eps_fn, ev: EvalSet, how: Sampling, neg_labels: torch.Tensor | None = None,
                generator_seed: int = 0) -> torch.Tensor:
    """Samples of any Sampling from the eval set's noise and labels; the negative label defaults to UNCOND."""
    neg = torch.full_like(ev.labels, UNCOND) if neg_labels is None else neg_labels
    return sample(eps_fn, ev.x_T, ev.labels, neg, world.schedule, how, torch.Generator().manual_seed(generator_seed))


def class_log_likelihood(mixture: GaussianMixture, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(x | class) under the class's own components (weights renormalized within it); (B, D) -> (B,)."""
    x, means, stds = x.double(), mixture.means.double(), mixture.stds.double()
    log_n = (-0.5 * (x[:, None, :] - means).pow(2).sum(-1) / stds**2
             - mixture.dim * (stds.log() + 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))))
    class_weight = torch.zeros(mixture.num_classes, dtype=torch.float64).index_add_(
        0, mixture.classes, mixture.weights.double())
    log_w = (mixture.weights.double() / class_weight[mixture.classes]).log()
    member = labels[:, None] == mixture.classes
    return torch.where(member, log_w + log_n, torch.full_like(log_n, -torch.inf)).logsumexp(1)


def class_of(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """The most likely class of each point under the true mixture (Bayes rule with the class weights); (B,)."""
    labels = torch.arange(mixture.num_classes)
    log_lik = torch.stack([class_log_likelihood(mixture, x, torch.full((len(x),), int(c))) for c in labels], 1)
    class_weight = torch.zeros(mixture.num_classes).index_add_(0, mixture.classes, mixture.weights)
    return (log_lik + class_weight.double().log()).argmax(1)


def distance_to_class(mixture: GaussianMixture, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Distance from each point to the nearest component mean of its given class; (B,)."""
    dist = (x.double()[:, None, :] - mixture.means.double()).norm(dim=-1)
    return torch.where(labels[:, None] == mixture.classes, dist, torch.full_like(dist, torch.inf)).min(1).values


def toy_config(method: str, num_phases: int, guided: bool, steps: int, batch_size: int = 256, seed: int = 0,
               w: float = 1.0) -> Config:
    """The toy run's config: SD1.5 schedule, N = 50, solver guidance w fixed (or the normal-CFG variant)."""
    distill = {"method": method, "num_solver_steps": 50, "num_phases": num_phases, "loss": "l2"}
    if guided:
        distill.update(guidance="small_cfg", w_min=w, w_max=w)
    else:
        distill.update(guidance="normal_cfg", caption_dropout=0.1, w_min=0.0, w_max=0.0)
    return config_from_dict({
        "seed": seed, "distill": distill,
        "train": {"batch_size": batch_size, "learning_rate": 1e-3, "max_steps": steps, "lr_schedule": "cosine",
                  "max_grad_norm": 0.0},
    })
