"""Cost of one distillation step against its floor, on the tiny SDXL-shaped teacher (CPU here; any device).

Everything is timed in one run (machines are noisy; ratios are what is reported):
- overhead ratio: a full training step (draws, teacher solver step, target, student forward + backward, losses,
  optimizer step) / the sum of the passes it cannot avoid, each timed alone: student forward + backward, the
  teacher's forward over the batched conditions (2B for small CFG, B for normal CFG), the target forward, and
  with the adversarial loss the D pass (real + fake, heads' backward) and the G pass (backward to the input);
- batched vs separate teacher passes: the step with cond and uncond in one forward vs two;
- adversarial alternate vs joint: student updates per second;
- peak memory of the one-UNet design vs a run that holds a second UNet copy as the teacher (child processes,
  with a wider UNet: 128/256/512 channels, so the copy is not lost in the runtime's own memory).
Latents and text conditions are made once (as precomputed ones would be); one comparison adds the VAE encoder
pass that a step without `pcm precompute` makes, and one child process runs without the VAE loaded.

    python benchmarks/train_step.py [--batch 8] [--repeats 5]
"""

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pcm.config import config_from_dict
from pcm.math import SolverGrid
from pcm.models.denoiser import cat_cond
from pcm.models.discriminator import Discriminator
from pcm.models.families import load_teacher
from pcm.models.lora import adapters_off, attach_lora
from pcm.models.tiny import TinySizes, build_tokenizer, tiny_sdxl_components
from pcm.train.step import Batch, Nets, make_loss

PROMPTS = ["a red circle in the center on a gray background", "a blue square at the top left on a white background"]
SIZES = TinySizes(unet_channels=(32, 64, 128), attention_from=1, attention_head_dim=2, cross_attention_dim=32,
                  text_hidden=32, vae_channels=(16, 32), sample_size=16)
# The memory comparison needs a UNet that is large beside the torch runtime (~0.5 GB resident on its own).
MEMORY_SIZES = TinySizes(unet_channels=(128, 256, 512), attention_from=1, attention_head_dim=8, cross_attention_dim=32,
                         text_hidden=32, vae_channels=(16, 32), sample_size=16)
VARIANTS = {  # name: (distill section, adversarial schedule or None)
    "pcm small-cfg": ({"method": "pcm", "guidance": "small_cfg"}, None),
    "pcm normal-cfg": ({"method": "pcm", "guidance": "normal_cfg", "caption_dropout": 0.1}, None),
    "lcm": ({"method": "lcm", "num_phases": 1}, None),
    "pcm small-cfg + adv joint": ({"method": "pcm", "guidance": "small_cfg"}, "joint"),
}


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build(folder: Path, batch: int, sizes: TinySizes = SIZES, with_vae: bool = True):
    """The tiny SDXL teacher saved and loaded back (no VAE, no encoders kept), a LoRA, a batch of latents."""
    tok = build_tokenizer(PROMPTS)
    parts = tiny_sdxl_components(tok, sizes)
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**parts).save_pretrained(folder)
    cfg = config_from_dict({"teacher": {"family": "sdxl", "model": str(folder)}, "data": {"resolution": 32}})
    teacher = load_teacher(cfg.teacher, DEVICE, with_vae=with_vae, resolution=cfg.data.resolution)
    cond = teacher.encode_prompts([PROMPTS[i % 2] for i in range(batch)], target_size=32)
    torch.manual_seed(0)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "ff.net.0.proj", "ff.net.2", "proj_in",
               "proj_out", "time_emb_proj")
    params = attach_lora(teacher.backbone, 16, 16, targets)
    x_0 = torch.randn(batch, 4, 16, 16, device=DEVICE)
    return teacher, params, Batch(x_0, cond, teacher.uncond(batch, like=cond), torch.arange(batch))


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_step(teacher, params, batch, distill: dict, schedule, separate=False, turn="joint", shared_fake=True):
    cfg = config_from_dict({"distill": {"num_solver_steps": 50, "num_phases": 4, **distill}})
    grid = SolverGrid(len(teacher.schedule), cfg.distill.num_solver_steps, cfg.distill.num_phases)
    opt = torch.optim.AdamW(params, lr=1e-6)
    disc = Discriminator(teacher.backbone, 1).to(DEVICE) if schedule else None
    d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-6) if disc else None

    def frozen(x, t, c):
        with adapters_off(teacher.backbone):
            if separate and len(x) == 2 * len(batch.x_0):
                halves = [{k: v.chunk(2)[i] for k, v in c.items()} for i in (0, 1)]
                return torch.cat([teacher.eps_fn(x.chunk(2)[i], t.chunk(2)[i], halves[i]) for i in (0, 1)])
            return teacher.eps_fn(x, t, c)

    def student(x, t, c):
        with torch.no_grad() if turn == "d" else torch.enable_grad():
            return teacher.eps_fn(x, t, c)

    def target(x, t, c):
        return teacher.eps_fn(x, t, c)

    def disc_fn(x, r, c, train_heads, fake=None):
        if fake is None or shared_fake:
            return disc(x, r, c, train_heads=train_heads, fake=fake)
        # the earlier joint layout: D over [real; fake.detach()], then the fake through the backbone again for G
        logits = disc(torch.cat([x, fake.detach()]), torch.cat([r, r]), cat_cond(c, c), train_heads=True)
        d_real, d_fake = zip(*(head.chunk(2) for head in logits), strict=True)
        return d_real, d_fake, disc(fake, r, c, train_heads=False)

    counter = {"k": 0}
    loss = make_loss(cfg.distill, grid, teacher.schedule, 0, adversarial_weight=0.1)
    nets = Nets(student, frozen, target, disc_fn if disc else None)
    turn = turn if disc else "g"

    def step():
        out = loss(nets, batch, counter["k"], turn)
        counter["k"] += 1
        out["total"].backward()
        if turn != "d":
            opt.step()
        if disc and turn != "g":
            d_opt.step()
        opt.zero_grad(set_to_none=True)
        if d_opt:
            d_opt.zero_grad(set_to_none=True)
        return out["total"].detach()  # for callers that compare losses (gpu_check: eager vs compiled)

    return step, disc


def floor(teacher, batch, distill: dict, disc, repeats: int) -> dict[str, float]:
    """The unavoidable passes of one step, each timed alone."""
    x, cond, b = batch.x_0, batch.cond, len(batch.x_0)
    t = torch.full((b,), 499, device=x.device)
    two = distill.get("guidance", "small_cfg") == "small_cfg"  # the batched cond + uncond forward

    def student():
        teacher.eps_fn(x, t, cond).pow(2).mean().backward()

    def teacher_pass():
        with torch.no_grad(), adapters_off(teacher.backbone):
            if two:
                teacher.eps_fn(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, batch.uncond))
            else:
                teacher.eps_fn(x, t, cond)

    def target_pass():
        with torch.no_grad():
            teacher.eps_fn(x, t, cond)

    passes = {"student fwd+bwd": timed(student, repeats), "teacher fwd": timed(teacher_pass, repeats),
              "target fwd": timed(target_pass, repeats)}
    if disc is not None:
        def d_pass():
            heads = disc(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, cond), train_heads=True)
            sum(h.mean() for h in heads).backward()  # one logit map per head

        def g_pass():
            fake = x.clone().requires_grad_()
            sum(h.mean() for h in disc(fake, t, cond, train_heads=False)).backward()

        passes |= {"D fwd+bwd": timed(d_pass, repeats), "G fwd+bwd": timed(g_pass, repeats)}
    for p in teacher.backbone.parameters():
        p.grad = None
    return passes


def peak_rss_child(two_unets: bool, batch: int, vae: bool = True) -> float:
    """Peak memory (MB; RSS on CPU, allocated GPU memory on CUDA) of a child process that runs 3 PCM steps,
    optionally holding a second UNet as the teacher."""
    out = subprocess.run([sys.executable, __file__, "--child", str(int(two_unets)), "--batch", str(batch),
                          "--device", DEVICE, "--child-vae", str(int(vae))], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def child(two_unets: bool, batch: int, vae: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        teacher, params, b = build(Path(tmp) / "teacher", batch, MEMORY_SIZES, with_vae=vae)
        keep = copy.deepcopy(teacher.backbone) if two_unets else None  # what the reference code holds
        step, _ = make_step(teacher, params, b, VARIANTS["pcm small-cfg"][0], None)
        for _ in range(3):
            step()
        del keep
    if DEVICE == "cuda":  # the device's peak; on CPU the process's peak resident set
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=DEVICE, choices=["cpu", "cuda"])
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-vae", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args()
    DEVICE = args.device
    if args.child is not None:
        child(bool(args.child), args.batch, bool(args.child_vae))
        return
    torch.manual_seed(0)
    results = {"batch": args.batch, "device": DEVICE, "torch_threads": torch.get_num_threads(),
               "platform": platform.processor() or platform.machine(), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        teacher, params, batch = build(Path(tmp) / "teacher", args.batch)
        print(f"{'variant':28s} {'step s':>8s} {'floor s':>8s} {'overhead':>9s}")
        for name, (distill, schedule) in VARIANTS.items():
            step, disc = make_step(teacher, params, batch, distill, schedule)
            step_s = timed(step, args.repeats)
            passes = floor(teacher, batch, distill, disc, args.repeats)
            ratio = step_s / sum(passes.values())
            results["variants"][name] = {"step_s": step_s, "passes_s": passes, "overhead_ratio": ratio}
            print(f"{name:28s} {step_s:8.3f} {sum(passes.values()):8.3f} {ratio:9.2f}")
        batched, _ = make_step(teacher, params, batch, VARIANTS["pcm small-cfg"][0], None)
        separate, _ = make_step(teacher, params, batch, VARIANTS["pcm small-cfg"][0], None, separate=True)
        results["separate_over_batched"] = timed(separate, args.repeats) / timed(batched, args.repeats)
        pixels = torch.rand(args.batch, 3, 32, 32, device=DEVICE) * 2 - 1

        def on_the_fly():  # what a step adds without `pcm precompute`: the VAE encoder pass
            with torch.no_grad():
                latents = teacher.vae.encode(pixels).latent_dist.mean  # noqa: F841  (timed, not used)
            batched()

        results["on_the_fly_over_precomputed"] = timed(on_the_fly, args.repeats) / timed(batched, args.repeats)
        joint, _ = make_step(teacher, params, batch, VARIANTS["pcm small-cfg"][0], "joint")
        g_step, _ = make_step(teacher, params, batch, VARIANTS["pcm small-cfg"][0], "alternate", turn="g")
        d_step, _ = make_step(teacher, params, batch, VARIANTS["pcm small-cfg"][0], "alternate", turn="d")
        twice, _ = make_step(teacher, params, batch, VARIANTS["pcm small-cfg"][0], "joint", shared_fake=False)
        results["joint_fake_twice_over_shared"] = timed(twice, args.repeats) / timed(joint, args.repeats)
        joint_ups = 1 / timed(joint, args.repeats)
        alternate_ups = 1 / (timed(g_step, args.repeats) + timed(d_step, args.repeats))  # one update per G+D pair
        results["student_updates_per_s"] = {"joint": joint_ups, "alternate": alternate_ups}
    one, two = peak_rss_child(False, args.batch), peak_rss_child(True, args.batch)
    no_vae = peak_rss_child(False, args.batch, vae=False)
    results["peak_rss_mb"] = {"one_unet": one, "two_unets": two, "ratio_two_over_one": two / one,
                              "precomputed_no_vae": no_vae}
    print(f"teacher cond+uncond separate / batched step time: {results['separate_over_batched']:.2f}")
    print(f"student updates/s: joint {joint_ups:.2f}, alternate {alternate_ups:.2f} "
          f"(joint / alternate {joint_ups / alternate_ups:.2f})")
    print(f"step with the VAE encoder pass / with precomputed latents: {results['on_the_fly_over_precomputed']:.2f}")
    print(f"adversarial joint step, fake through the backbone twice / once: "
          f"{results['joint_fake_twice_over_shared']:.2f}")
    print(f"peak RSS: one UNet {one:.0f} MB, two UNets {two:.0f} MB (ratio {two / one:.3f}); "
          f"precomputed latents, no VAE loaded: {no_vae:.0f} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
