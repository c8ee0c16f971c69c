"""The PCM paper's claims, measured with 95 % intervals on the analytic Gaussian-mixture teacher (issue 17 §5).

(a) PCM with M = K beats the teacher's K-step DDIM on endpoint error, K in {1, 2, 4}
(b) PCM's samples move less than LCM's when the step count changes (step consistency)
(c) a normal-CFG student follows inference CFG (1 -> 3 moves samples toward their class); a small-CFG one saturates
(d) a negative condition pushes a normal-CFG student's samples away from it
(e) K > M: endpoint error of each rule for steps beyond the trained edges (pcm.sampling.K_ABOVE_M_RULES)

Intervals: percentile bootstrap (2000 draws) over evaluation samples; where several distillation seeds exist,
a two-level bootstrap that first resamples seeds, then samples within each, so training variance is covered.

    python benchmarks/claims.py [--quick] [--out-dir benchmarks/results]
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pcm.eval.toy_gmm import (
    class_log_likelihood,
    class_of,
    distance_to_class,
    distill_student,
    make_eval_set,
    make_world,
    sample_model,
    sample_with,
    toy_card,
    toy_config,
)
from pcm.sampling import DEFAULT_K_ABOVE_M, K_ABOVE_M_RULES, Sampling

W = 1.0  # solver guidance of the small-CFG students (inference CFG 1 + W = 2 reproduces their ODE)
CFG_HIGH = 3.0  # the raised inference guidance scale of claim (c)
FULL = {"steps": 3500, "batch_size": 256, "seeds": 3, "eval_samples": 1000}
QUICK = {"steps": 200, "batch_size": 128, "seeds": 2, "eval_samples": 200}
N_BOOT = 2000
EVAL_SEED = 1234  # one evaluation set (noise, labels) for every model and claim


def bootstrap(per_seed: list[torch.Tensor], seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % percentile interval of values (S seeds x B samples): resample seeds, then samples."""
    vals = torch.stack([v.double() for v in per_seed])  # (S, B)
    S, B = vals.shape
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, S, (N_BOOT, S), generator=gen) if S > 1 else torch.zeros(N_BOOT, 1, dtype=torch.long)
    rows = torch.randint(0, B, (N_BOOT, S, B), generator=gen)
    means = vals[seeds[:, :, None], rows].mean((1, 2))
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(vals.mean()), lo, hi


def stat(per_seed: list[torch.Tensor]) -> dict:
    mean, lo, hi = bootstrap(per_seed)
    return {"mean": round(mean, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4), "seeds": len(per_seed)}


def err(x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (x.double() - exact).norm(dim=1)


def train_all(world, settings: dict) -> dict:
    """Every student the claims need, per seed: PCM M in {1, 2, 4} and LCM with W in the solver (small CFG),
    and PCM M = 4 distilled without guidance, caption dropout 0.1 (normal CFG)."""
    runs = [("pcm", 1, True), ("pcm", 2, True), ("pcm", 4, True), ("lcm", 1, True), ("pcm", 4, False)]
    students = {}
    for method, M, guided in runs:
        for seed in range(settings["seeds"]):
            cfg = toy_config(method, M, guided, settings["steps"], settings["batch_size"], seed=seed,
                             w=W if guided else 0.0)
            name = ("LCM" if method == "lcm" else f"PCM M={M}") + ("" if guided else " normal-CFG")
            start = time.perf_counter()
            students.setdefault(name, []).append((distill_student(world, cfg)[0], cfg))
            print(f"distilled {name} seed {seed} in {time.perf_counter() - start:.1f} s", flush=True)
    return students


def pcm_samples(world, model, ev, K: int, rule: str = DEFAULT_K_ABOVE_M, scale: float = 1.0,
                neg_labels: torch.Tensor | None = None) -> torch.Tensor:
    student, cfg = model
    return sample_with(world, student, ev, Sampling(toy_card(cfg), K, scale, k_above_m=rule), neg_labels)


def claim_a(world, students, ev) -> dict:
    """PCM M = K vs teacher DDIM at K (CFG 1 + W) on the distance to the exact guided ODE endpoint."""
    rows = []
    for K in (1, 2, 4):
        teacher = err(sample_model(world, world.teacher, students["LCM"][0][1], ev, K, "ddim"), ev.exact)
        pcm = [err(pcm_samples(world, m, ev, K), ev.exact) for m in students[f"PCM M={K}"]]
        gap = stat([teacher - p for p in pcm])
        rows.append({"K": K, "teacher_ddim": stat([teacher]), "pcm": stat(pcm), "teacher_minus_pcm": gap,
                     "per_seed_pcm": [round(float(p.mean()), 4) for p in pcm], "holds": gap["ci_low"] > 0})
    return {"claim": "PCM with M = K is closer to the exact endpoint than teacher DDIM at K", "rows": rows,
            "holds": all(r["holds"] for r in rows)}


def step_consistency(world, models, ev, kind: str, K: int, rule: str) -> list[torch.Tensor]:
    """Per seed, per sample: ||x_K - x_2K||, both from the same x_T and the same generator seed."""
    out = []
    for student, cfg in models:
        if kind == "lcm":
            a, b = (sample_model(world, student, cfg, ev, k, "lcm") for k in (K, 2 * K))
        else:
            a, b = (pcm_samples(world, (student, cfg), ev, k, rule) for k in (K, 2 * K))
        out.append(err(a, b))
    return out


def claim_b(world, students, ev) -> dict:
    """Step consistency of PCM M = 4 (sub-steps beyond M, so K > M is not trivially 0) vs LCM, K -> 2K."""
    rows = []
    for K in (1, 2, 4, 8):
        pcm = step_consistency(world, students["PCM M=4"], ev, "pcm", K, "substeps")
        lcm = step_consistency(world, students["LCM"], ev, "lcm", K, "substeps")
        gap = stat([lc - pc for lc, pc in zip(lcm, pcm, strict=True)])
        rows.append({"K": K, "pcm_m4": stat(pcm), "lcm": stat(lcm), "lcm_minus_pcm": gap, "holds": gap["ci_low"] > 0})
    return {"claim": "PCM M=4 moves less than LCM from K to 2K steps (mean ||x_K - x_2K||, same noise)",
            "rows": rows, "holds": all(r["holds"] for r in rows if r["K"] >= 2)}


def cfg_metrics(world, x: torch.Tensor, ev) -> dict[str, torch.Tensor]:
    """Per sample: the class margin log p(x | label) - max over other classes log p(x | c) (grows as a sample
    moves toward its class and away from the others), the Bayes class accuracy, and the norm (saturation)."""
    mix = world.mixture
    log_lik = torch.stack([class_log_likelihood(mix, x, torch.full_like(ev.labels, c))
                           for c in range(mix.num_classes)], 1)
    own = log_lik.gather(1, ev.labels[:, None]).squeeze(1)
    others = log_lik.scatter(1, ev.labels[:, None], -torch.inf).max(1).values
    return {"class_margin": own - others, "class_accuracy": (class_of(mix, x) == ev.labels).double(),
            "norm": x.double().norm(dim=1)}


def claim_c(world, students, ev) -> dict:
    """Inference CFG 1 -> 3: normal-CFG gains class margin; small-CFG overshoots the norm of the exact CFG-3 ODE."""
    exact3 = make_eval_set(world, len(ev.labels), CFG_HIGH - 1.0, seed=EVAL_SEED).exact
    out = {"exact_cfg3_norm": round(float(exact3.norm(dim=1).mean()), 4),
           "data_norm": round(float(ev.data.norm(dim=1).mean()), 4)}
    for name in ("PCM M=4 normal-CFG", "PCM M=4"):
        per_scale = {}
        for scale in (1.0, CFG_HIGH):
            xs = [pcm_samples(world, m, ev, 4, scale=scale) for m in students[name]]
            per_scale[scale] = [cfg_metrics(world, x, ev) for x in xs]
        out[name] = {f"{metric}@{scale:g}": stat([m[metric] for m in per_scale[scale]])
                     for scale in per_scale for metric in per_scale[scale][0]}
        out[name]["margin_gain"] = stat([b["class_margin"] - a["class_margin"]
                                           for a, b in zip(per_scale[1.0], per_scale[CFG_HIGH], strict=True)])
        out[name]["norm_over_exact_cfg3"] = stat([m["norm"] - exact3.norm(dim=1) for m in per_scale[CFG_HIGH]])
    normal, small = out["PCM M=4 normal-CFG"], out["PCM M=4"]
    out["holds_normal_follows_cfg"] = normal["margin_gain"]["ci_low"] > 0
    out["holds_small_saturates"] = small["norm_over_exact_cfg3"]["ci_low"] > normal["norm_over_exact_cfg3"]["ci_high"]
    out["claim"] = ("CFG 1 -> 3: the normal-CFG student's class margin rises; the small-CFG student's mean norm "
                    "overshoots the exact CFG-3 ODE's by more than the normal-CFG student's")
    out["holds"] = out["holds_normal_follows_cfg"] and out["holds_small_saturates"]
    return out


def claim_d(world, students, ev) -> dict:
    """CFG 3 with neg = the next class instead of UNCOND: distance to the negative class's nearest mean grows."""
    neg = (ev.labels + 1) % world.mixture.num_classes
    gaps, dist = [], []
    for model in students["PCM M=4 normal-CFG"]:
        plain = pcm_samples(world, model, ev, 4, scale=CFG_HIGH)
        negated = pcm_samples(world, model, ev, 4, scale=CFG_HIGH, neg_labels=neg)
        dist.append(distance_to_class(world.mixture, negated, neg))
        gaps.append(dist[-1] - distance_to_class(world.mixture, plain, neg))
    gap = stat(gaps)
    return {"claim": "a negative label pushes the normal-CFG student's samples away from that class (CFG 3, M=K=4)",
            "distance_to_negative_class": stat(dist), "gain_over_uncond_negative": gap, "holds": gap["ci_low"] > 0}


def table_e(world, students, ev) -> dict:
    """Endpoint error per K > M rule, K in {4, 8, 16}, M in {1, 2, 4} (the K = M and teacher rows for scale)."""
    cfg = students["LCM"][0][1]
    rows = [{"model": "teacher DDIM", "rule": "-", "K": K,
             "error": stat([err(sample_model(world, world.teacher, cfg, ev, K, "ddim"), ev.exact)])}
            for K in (1, 2, 4, 8, 16)]
    for M in (1, 2, 4):
        models = students[f"PCM M={M}"]
        rows.append({"model": f"PCM M={M}", "rule": "K = M", "K": M,
                     "error": stat([err(pcm_samples(world, m, ev, M), ev.exact) for m in models])})
        for rule in K_ABOVE_M_RULES:
            for K in (k for k in (4, 8, 16) if k > M):
                rows.append({"model": f"PCM M={M}", "rule": rule, "K": K,
                             "error": stat([err(pcm_samples(world, m, ev, K, rule), ev.exact) for m in models])})
    mean_of = {rule: sum(r["error"]["mean"] for r in rows if r["rule"] == rule) for rule in K_ABOVE_M_RULES}
    best = min(mean_of, key=mean_of.get)
    return {"claim": f"best K > M rule by summed mean endpoint error: {best}", "rows": rows, "best_rule": best,
            "summed_error": {k: round(v, 4) for k, v in mean_of.items()}, "default_rule": DEFAULT_K_ABOVE_M,
            "holds": best == DEFAULT_K_ABOVE_M}


def fmt(st: dict) -> str:
    return f"{st['mean']:.3f} [{st['ci_low']:.3f}, {st['ci_high']:.3f}]"


def markdown(result: dict) -> str:
    """The claims and the K > M table as Markdown (benchmarks/results/claims.md)."""
    s = result["settings"]
    lines = [f"# PCM claims on the analytic teacher ({'quick' if s['quick'] else 'full'})", "",
             f"{s['seeds']} distillation seeds x {s['eval_samples']} evaluation samples, {s['steps']} training steps "
             f"of batch {s['batch_size']}; mean [95 % CI], two-level percentile bootstrap (seeds, then samples).",
             "", "| claim | measured | holds |", "|---|---|---|"]
    for r in result["a"]["rows"]:
        lines.append(f"| (a) K={r['K']}: teacher DDIM - PCM M=K endpoint error | {fmt(r['teacher_minus_pcm'])} "
                     f"(DDIM {fmt(r['teacher_ddim'])}, PCM {fmt(r['pcm'])}) | {'yes' if r['holds'] else 'no'} |")
    for r in result["b"]["rows"]:
        lines.append(f"| (b) K={r['K']}->{2 * r['K']}: LCM - PCM M=4 of mean ||x_K - x_2K|| | {fmt(r['lcm_minus_pcm'])}"
                     f" (PCM {fmt(r['pcm_m4'])}, LCM {fmt(r['lcm'])}) | {'yes' if r['holds'] else 'no'} |")
    c = result["c"]
    for name in ("PCM M=4 normal-CFG", "PCM M=4"):
        m = c[name]
        lines.append(f"| (c) {name}: class log-likelihood margin, CFG 1 -> 3 | {fmt(m['class_margin@1'])} -> "
                     f"{fmt(m['class_margin@3'])}; gain {fmt(m['margin_gain'])} | "
                     f"{'yes' if c['holds_normal_follows_cfg'] else 'no'} |" if "normal" in name else
                     f"| (c) {name} (small CFG): mean norm at CFG 3 minus exact CFG-3 ODE's | "
                     f"{fmt(m['norm_over_exact_cfg3'])} (normal-CFG: "
                     f"{fmt(c['PCM M=4 normal-CFG']['norm_over_exact_cfg3'])}) | "
                     f"{'yes' if c['holds_small_saturates'] else 'no'} |")
    d = result["d"]
    lines.append(f"| (d) negative label vs UNCOND: distance gain from the negative class | "
                 f"{fmt(d['gain_over_uncond_negative'])} | {'yes' if d['holds'] else 'no'} |")
    lines += ["", "## (e) K > M: endpoint error by rule (guided, w = 1)", "",
              "| model | rule | K=4 | K=8 | K=16 |", "|---|---|---|---|---|"]
    e = result["e"]
    for model in dict.fromkeys(r["model"] for r in e["rows"]):
        for rule in dict.fromkeys(r["rule"] for r in e["rows"] if r["model"] == model):
            cells = {r["K"]: fmt(r["error"]) for r in e["rows"] if (r["model"], r["rule"]) == (model, rule)}
            label = f"K = M: {', '.join(f'K={k} {v}' for k, v in cells.items())}" if rule == "K = M" else None
            if label:
                lines.append(f"| {model} | {label} | | | |")
            else:
                lines.append(f"| {model} | {rule} | " + " | ".join(cells.get(k, "") for k in (4, 8, 16)) + " |")
    lines += ["", f"Best rule: **{e['best_rule']}** (summed mean error {e['summed_error']}); "
              f"default in pcm/sampling.py: {e['default_rule']}.", "",
              f"Total {result['total_s']:.0f} s on {result['machine']}, {s['threads']} threads."]
    return "\n".join(lines) + "\n"


def run(settings: dict) -> dict:
    start = time.perf_counter()
    base = toy_config("pcm", 4, True, settings["steps"], settings["batch_size"], w=W)
    world = make_world(base)
    ev = make_eval_set(world, settings["eval_samples"], W, seed=EVAL_SEED)
    train_start = time.perf_counter()
    students = train_all(world, settings)
    train_s = time.perf_counter() - train_start
    result = {"settings": settings, "train_s": round(train_s, 1)}
    for key, claim in (("a", claim_a), ("b", claim_b), ("c", claim_c), ("d", claim_d), ("e", table_e)):
        result[key] = claim(world, students, ev)
    result["total_s"] = round(time.perf_counter() - start, 1)
    result["machine"] = platform.processor() or platform.machine()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute (tests)")
    parser.add_argument("--seeds", type=int, help="distillation seeds (default 3, quick 2)")
    parser.add_argument("--steps", type=int, help="training steps per student (default 3500, quick 300)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads: a 2-D MLP gains nothing from more, "
                        "and on a loaded machine 2 threads ran 7x slower than 1")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {**(QUICK if args.quick else FULL), "quick": args.quick, "threads": args.threads}
    settings.update({k: v for k, v in (("seeds", args.seeds), ("steps", args.steps)) if v})
    result = run(settings)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "claims.json").write_text(json.dumps(result, indent=2))
    (args.out_dir / "claims.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
