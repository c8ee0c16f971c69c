"""benchmarks/reference_side_by_side.py: the torchvision stand-in, the step clock's arithmetic, and a quick run of both
sides on a tiny world.

The quick run uses the PCM authors' repository when a clone or mirror of it is at hand ($PCM_REFERENCE_SOURCE, or
the mirror on our build machines), cloned at the pinned commit exactly as `make bench-reference` does. Where none is
(CI has only this repository; PCM_REFERENCE_SOURCE=fixture forces it), it uses a fixture repository whose script
has the reference's shape: the same imports (torchvision among them, so the stand-in serves them), the same dataset
class with a hard-coded folder, the arguments the benchmark passes, a training bar named "Steps" and a LoRA saved
where theirs is.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
MIRROR = Path("/work/.mirror/G-U-N+Phased-Consistency-Model/repo")  # our build machines' mirror; CI has none


def _load(name: str, path: Path):
    """A module from its file, under a name of its own: the stand-in never becomes `torchvision` in this process
    (transformers would then take torchvision as installed)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("reference_side_by_side", BENCH / "reference_side_by_side.py")
transforms = _load("standin_transforms", BENCH / "torchvision_standin" / "torchvision" / "transforms.py")


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_standin_resize_keeps_the_aspect_and_resamples_with_pil():
    image = _image(64, 48)
    resize = transforms.Resize(32, interpolation=transforms.InterpolationMode.LANCZOS)
    out = resize(image)
    assert out.size == (42, 32)  # the shorter side to 32, the longer int(32 * 64 / 48)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((42, 32), Image.Resampling.LANCZOS)))
    assert transforms.Resize(32)(_image(48, 64)).size == (32, 42)
    assert transforms.Resize((20, 30))(image).size == (30, 20)  # a pair is (height, width)
    with pytest.raises(ValueError, match="allowed"):
        transforms.Resize(32, interpolation="lanczos")


def test_standin_center_crop_takes_the_middle_and_pads_small_images():
    image = _image(42, 32)
    out = transforms.CenterCrop(32)(image)
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out), np.asarray(image)[:, 5:37])  # left = round((42 - 32) / 2)
    padded = np.asarray(transforms.CenterCrop(6)(_image(4, 4)))
    assert padded.shape == (6, 6, 3)
    assert (padded[0] == 0).all() and (padded[:, 0] == 0).all()
    assert np.array_equal(padded[1:5, 1:5], np.asarray(_image(4, 4)))


def test_standin_to_tensor_and_normalize_give_their_scripts_pixels():
    image = _image(8, 4)
    pipeline = transforms.Compose([transforms.Resize(4, interpolation=transforms.InterpolationMode.LANCZOS),
                                   transforms.CenterCrop(4), transforms.ToTensor(),
                                   transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])])
    tensor = transforms.ToTensor()(image)
    assert tensor.shape == (3, 4, 8) and tensor.dtype == torch.float32
    assert torch.equal(tensor, torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    out = pipeline(image)
    assert out.shape == (3, 4, 4)
    expected = torch.from_numpy(np.array(image)[:, 2:6]).permute(2, 0, 1).float() / 127.5 - 1  # (x - .5) / .5
    assert torch.allclose(out, expected, atol=1e-6)


def test_summarize_splits_a_run_into_start_up_steps_and_finish():
    clock = {"steps": [[10.0, 5.0], [11.0, 5.5], [12.5, 6.1], [13.5, 6.6]], "returned": [15.0, 7.0],
             "exit": [15.5, 7.1]}
    result = bench.summarize(start=0.0, end=16.0, cpu_total=7.5, clock=clock)
    assert result["steps"] == 4
    assert result["step_s"] == pytest.approx(1.0) and result["step_cpu_s"] == pytest.approx(0.5)  # medians
    assert result["startup_s"] == pytest.approx(9.0)  # the first step's end, less one step
    assert result["finish_s"] == pytest.approx(2.5)
    assert result["after_steps_s"] == pytest.approx(1.5) and result["exit_s"] == pytest.approx(1.0)
    assert result["startup_cpu_s"] == pytest.approx(4.5) and result["finish_cpu_s"] == pytest.approx(0.9)
    ratios = bench.compare([result], [{**result, "step_s": 2.0, "total_s": 32.0}])["ratios"]
    assert ratios["per_step_speedup_wall"] == pytest.approx(2.0) and ratios["whole_run_time_ratio"] == 0.5
    with pytest.raises(RuntimeError, match="at least 2"):
        bench.summarize(0.0, 1.0, 1.0, {"steps": [[0.5, 0.1]]})


FIXTURE_SCRIPT = '''"""The shape of the PCM authors' train_pcm_lora_sd15.py that the benchmark relies on."""
import argparse
import os

import torch
import torch.nn.functional as F
from PIL import Image
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel

from diffusers import AutoencoderKL, UNet2DConditionModel


class CustomImageDataset(Dataset):
    def __init__(self, img_dir, sample_size):
        self.img_dir = img_dir
        self.img_names = [f for f in os.listdir(img_dir) if f.endswith((".png", ".jpg"))]
        self.transform = transforms.Compose([
            transforms.Resize(sample_size, interpolation=transforms.InterpolationMode.LANCZOS),
            transforms.CenterCrop(sample_size), transforms.ToTensor(),
            transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])])

    def __len__(self):
        return len(self.img_names)

    def __getitem__(self, idx):
        name = self.img_names[idx]
        image = self.transform(Image.open(os.path.join(self.img_dir, name)).convert("RGB"))
        with open(os.path.join(self.img_dir, name.rsplit(".", 1)[0] + ".txt")) as f:
            return image, f.read().strip()


def parse_args():
    parser = argparse.ArgumentParser()
    for name in ("pretrained_teacher_model", "output_dir", "mixed_precision", "lr_scheduler", "loss_type"):
        parser.add_argument("--" + name, type=str)
    for name in ("resolution", "train_batch_size", "max_train_steps", "dataloader_num_workers", "lora_rank",
                 "num_ddim_timesteps", "multiphase", "seed", "validation_steps", "checkpointing_steps"):
        parser.add_argument("--" + name, type=int)
    for name in ("learning_rate", "huber_c", "adam_weight_decay", "max_grad_norm", "w_min", "w_max"):
        parser.add_argument("--" + name, type=float)
    return parser.parse_args()


def main(args):
    torch.manual_seed(args.seed)
    model = args.pretrained_teacher_model
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet = get_peft_model(unet, LoraConfig(r=args.lora_rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.adam_weight_decay)
    dataset = CustomImageDataset("/mnt/data/wangfuyun/cc3m", args.resolution)
    loader = DataLoader(dataset, shuffle=True, batch_size=args.train_batch_size,
                        num_workers=args.dataloader_num_workers)
    bar = tqdm(range(args.max_train_steps), desc="Steps")
    step = 0
    while step < args.max_train_steps:
        for image, text in loader:
            ids = tokenizer(list(text), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                cond = text_encoder(ids)[0]
                latents = vae.encode(image).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (len(latents),))
            loss = F.mse_loss(unet(latents + noise, t, encoder_hidden_states=cond).sample, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            bar.update(1)
            step += 1
            if step >= args.max_train_steps:
                break
    os.makedirs(os.path.join(args.output_dir, "unet_lora"), exist_ok=True)
    lora = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(lora, os.path.join(args.output_dir, "unet_lora", "pytorch_lora_weights.safetensors"))


if __name__ == "__main__":
    main(parse_args())
'''


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def fixture_repository(root: Path) -> tuple[str, str]:
    """(url, commit) of a git repository holding FIXTURE_SCRIPT at the reference script's path."""
    script = root / bench.SCRIPT
    script.parent.mkdir(parents=True)
    script.write_text(FIXTURE_SCRIPT)
    _git("init", "-q", cwd=root)
    _git("add", "code", cwd=root)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "fixture", cwd=root)
    return str(root), _git("rev-parse", "HEAD", cwd=root)


def reference_source(tmp_path: Path) -> tuple[str, str, bool]:
    """(url, commit, whether it is the authors' repository) for the quick run; PCM_REFERENCE_SOURCE=fixture runs
    the fixture even where a mirror is at hand (what CI does)."""
    if os.environ.get("PCM_REFERENCE_SOURCE") == "fixture":
        return (*fixture_repository(tmp_path / "fixture-repo"), False)
    for candidate in (os.environ.get("PCM_REFERENCE_SOURCE"), MIRROR):
        if candidate and Path(candidate).exists():
            return str(candidate), bench.PINNED_COMMIT, True
    return (*fixture_repository(tmp_path / "fixture-repo"), False)


@pytest.mark.slow
def test_quick_side_by_side_runs_both_scripts_on_the_same_world(tmp_path, capsys):
    url, commit, authors = reference_source(tmp_path)
    out = tmp_path / "result.json"
    steps = 3
    results = bench.main(["--url", url, "--commit", commit, "--cache", str(tmp_path / "cache"), "--work",
                          str(tmp_path / "work"), "--steps", str(steps), "--batch-size", "2", "--resolution", "16",
                          "--images", "16", "--threads", "1", "--out", str(out)])
    # the reference came through the clone path, at the commit asked for, with only code/ checked out
    clone = tmp_path / "cache" / commit[:12]
    assert (clone / bench.SCRIPT).is_file() and _git("rev-parse", "HEAD", cwd=clone) == commit
    assert not (clone / "_assets_").exists()
    # their dataset read our folder: the prepared shards' own image files and captions
    work = tmp_path / "work"
    images = sorted((work / "images").glob("*.png"))
    assert len(images) == 16 and all(p.with_suffix(".txt").is_file() for p in images)
    # both ran every step and saved their LoRA
    for side in ("ours", "reference"):
        run = results["runs"][side][0]
        assert run["steps"] == steps, side
        assert 0 < run["step_s"] < run["total_s"] and run["startup_s"] > 0 and run["finish_s"] > 0
        assert run["after_steps_s"] + run["exit_s"] == pytest.approx(run["finish_s"])
    assert (work / "runs" / "ours-0" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (work / "runs" / "reference-0" / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
    log = (work / "runs" / "reference-0" / "run.log").read_text()
    # the stand-in served their import, and transformers kept its torchvision-free path (it says so, not installed)
    assert "No module named" not in log and "Traceback" not in log
    saved = json.loads(out.read_text())
    assert saved["ratios"]["per_step_speedup_wall"] == pytest.approx(
        saved["reference"]["step_s"] / saved["ours"]["step_s"])
    assert saved["settings"]["reference_commit"] == commit
    printed = capsys.readouterr().out
    assert "| per step, s |" in printed and "start-up + finish" in printed
    if authors:  # their script's own settings reached it: rank 64 on the reference's 14 target module names
        config = json.loads((work / "runs" / "reference-0" / "adapter_config.json").read_text())
        assert config["r"] == 64 and "time_emb_proj" in config["target_modules"]


@pytest.mark.slow
def test_the_stand_in_is_hidden_from_the_libraries_in_a_child(tmp_path):
    """The child's order of things: libraries asked first say torchvision is absent; then the stand-in serves a
    plain `from torchvision import transforms`."""
    code = ("import sys; sys.argv = ['x']; import importlib.util as u\n"
            f"spec = u.spec_from_file_location('b', {str(BENCH / 'reference_side_by_side.py')!r})\n"
            "b = u.module_from_spec(spec); spec.loader.exec_module(b)\n"
            "b._hide_standin_from_libraries(); sys.path.insert(0, str(b.STANDIN))\n"
            "from torchvision import transforms\n"
            "from transformers.utils.import_utils import is_torchvision_available\n"
            "from diffusers.utils import is_torchvision_available as diffusers_sees\n"
            "print(transforms.__file__, is_torchvision_available(), diffusers_sees())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    path, transformers_sees, diffusers_sees = out.stdout.split()
    assert Path(path).parent.parent == BENCH / "torchvision_standin"
    assert transformers_sees == "False" and diffusers_sees == "False"
