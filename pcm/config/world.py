"""Config sections of the data, the demo world and the evaluation (`data`, `demo`, `demo_teacher`, `eval`)."""

from dataclasses import dataclass, field
from typing import Literal

from pcm.config.errors import require


@dataclass(frozen=True)
class DataConfig:
    """Input shards and their preparation (`pcm prepare`)."""

    inputs: tuple[str, ...] = ("data/shapes/shard-{00000..00003}.tar",)  # shard URLs, brace patterns, folders
    output_dir: str = "data/prepared"  # prepared shards, index.json and stats.json go here (and only here)
    resolution: int = 32  # training image side in pixels: shorter side resized to it, then a square crop
    crop: Literal["center", "random"] = "center"  # random crops store their box for SDXL micro-conditioning
    min_side: int = 32  # skip images whose original shorter side is below this (pixels)
    min_aspect: float = 0.25  # skip images with width / height outside [min_aspect, max_aspect]
    max_aspect: float = 4.0
    min_caption_chars: int = 1  # skip captions shorter than this after stripping whitespace
    max_caption_chars: int = 1000  # skip captions longer than this (characters)
    require_json: dict[str, str] = field(default_factory=dict)  # KEY.json fields that must equal these; applies to
    #   samples that have a KEY.json (a folder of image + caption files has none: kept, counted as samples_without_json)
    shard_size: int = 1000  # samples per prepared shard (the last one may hold fewer)
    num_workers: int = 0  # processes working on input shards in parallel; 0 = one per CPU the container may use
    #   (its cgroup CPU quota and affinity mask, not the node's core count)
    image_format: Literal["jpg", "png"] = "jpg"  # encoding of prepared images (png is lossless)
    jpeg_quality: int = 95  # when image_format = jpg
    max_pixels: int = 89_478_485  # decompression-bomb guard: larger images are skipped unread (PIL's default)
    max_member_bytes: int = 64 * 2**20  # bytes of an image or video file (from its tar header or file size,
    #   before reading it): larger ones are skipped unread as too_large; bounds each worker's memory
    max_text_bytes: int = 2**20  # bytes of a caption (txt) or metadata (json) file; larger ones: too_large, unread
    allow_pipe_urls: bool = False  # pipe: URLs run shell commands; refused unless set explicitly
    modality: Literal["image", "video"] = "image"  # what a prepared folder holds: images (KEY.jpg|png) or clips
    #   (KEY.mp4|webm|mov|mkv|avi -> KEY.frames.npy, (F, H, W, 3) uint8); samples of the other kind are skipped
    frames: int = 8  # video only: frames per clip F
    frame_stride: int = 1  # video only: take every frame_stride-th decoded frame (2 halves the frame rate)
    clip_start: Literal["first", "random"] = "first"  # video only: the clip starts at the first frame, or at a
    #   keyed draw among the frames that leave room for the whole clip (reruns draw the same start)

    def __post_init__(self):
        require(self.resolution >= 8 and self.resolution % 8 == 0,
                 f"data.resolution={self.resolution}: must be a positive multiple of 8 (the VAE factor)")
        require(0 < self.min_aspect <= self.max_aspect,
                 f"data.min_aspect={self.min_aspect}, data.max_aspect={self.max_aspect}: need 0 < min <= max")
        require(0 <= self.min_caption_chars <= self.max_caption_chars,
                 f"data.min_caption_chars={self.min_caption_chars}, data.max_caption_chars="
                 f"{self.max_caption_chars}: need 0 <= min <= max")
        require(self.shard_size >= 1, f"data.shard_size={self.shard_size}: must be >= 1")
        require(self.num_workers >= 0, f"data.num_workers={self.num_workers}: must be >= 0 (0 = all cores)")
        require(1 <= self.jpeg_quality <= 100, f"data.jpeg_quality={self.jpeg_quality}: must be in 1..100")
        require(self.max_pixels >= 1, f"data.max_pixels={self.max_pixels}: must be >= 1")
        require(self.max_member_bytes >= 1,
                 f"data.max_member_bytes={self.max_member_bytes}: must be >= 1 (bytes; default 64 MiB = 67108864)")
        require(1 <= self.max_text_bytes <= self.max_member_bytes,
                 f"data.max_text_bytes={self.max_text_bytes}: must be in [1, data.max_member_bytes="
                 f"{self.max_member_bytes}] (captions and json are far smaller than images; default 1 MiB = 1048576)")
        require(self.min_side >= 1, f"data.min_side={self.min_side}: must be >= 1 pixel")
        require(bool(self.output_dir), "data.output_dir must not be empty")
        require(self.modality in ("image", "video"), f"data.modality={self.modality!r}: allowed values: image, video")
        require(self.frames >= 1, f"data.frames={self.frames}: must be >= 1 (frames per video clip)")
        require(self.frame_stride >= 1, f"data.frame_stride={self.frame_stride}: must be >= 1 (1 = every frame)")
        require(self.clip_start in ("first", "random"),
                 f"data.clip_start={self.clip_start!r}: allowed values: first, random")


@dataclass(frozen=True)
class DemoConfig:
    """The shapes demo world (`pcm demo-data`), written as img2dataset-layout input shards."""

    output_dir: str = "data/shapes"  # input shards shard-00000.tar, ... (data.inputs points here)
    num_images: int = 4000  # captioned images (clips with video) to generate
    image_size: int = 64  # generated side in pixels; `pcm prepare` resizes to data.resolution
    min_shapes: int = 1  # objects per image, in distinct cells of a 3x3 grid
    max_shapes: int = 1  # one object: the tiny teacher learns colour and kind of 6-9 px shapes in a CPU budget;
    # 2+ objects exercise multi-object prompts but need several times the teacher's training
    shard_size: int = 1000  # images (clips) per input shard
    video: bool = False  # write video2dataset-layout clips (KEY.mp4) of one shape moving left, right, up or down
    #   instead of still images; min_shapes and max_shapes are then unused (one shape per clip)
    frames: int = 8  # video: frames per generated clip
    fps: int = 8  # video: frame rate written into the mp4 (frames per second)

    def __post_init__(self):
        require(self.num_images >= 1, f"demo.num_images={self.num_images}: must be >= 1")
        require(self.image_size >= 24, f"demo.image_size={self.image_size}: must be >= 24 pixels")
        require(1 <= self.min_shapes <= self.max_shapes <= 9,
                 f"demo.min_shapes={self.min_shapes}, demo.max_shapes={self.max_shapes}: need 1 <= min <= max <= 9")
        require(self.shard_size >= 1, f"demo.shard_size={self.shard_size}: must be >= 1")
        require(self.frames >= 2, f"demo.frames={self.frames}: must be >= 2 (a motion needs two frames)")
        require(self.fps >= 1, f"demo.fps={self.fps}: must be >= 1 frame per second")
        require(not self.video or self.image_size % 2 == 0,
                 f"demo.image_size={self.image_size}: must be even when demo.video is set (yuv420p halves the chroma)")


@dataclass(frozen=True)
class DemoTeacherConfig:
    """Training of the tiny demo teacher on the prepared shapes shards (`pcm demo-teacher`)."""

    family: Literal["sd15", "sdxl", "animatediff", "sd3"] = "sd15"  # SD1.5-shaped (the demo), SDXL-shaped (exercises
    # the SDXL family), AnimateDiff-shaped (SD1.5 + motion modules, trained on prepared clips: data.modality=video) or
    # SD3-shaped (a rectified flow: joint-attention transformer, CLIP-L/CLIP-G/T5 encoders, 16-channel VAE with a
    # shift; pcm.demo.flow_teacher). sd3's transformer: 2 layers of 2 heads, width unet_channels[-1]
    output_dir: str = "models/demo-teacher"  # the saved diffusers pipeline (save_pretrained, safetensors)
    image_teacher: str = "models/demo-teacher"  # animatediff: the trained image demo teacher that gets the motion
    #   modules (its VAE, spatial UNet and text encoder are kept; only the motion modules and text encoder train)
    vae_channels: tuple[int, ...] = (16, 32)  # VAE widths; downsampling factor 2 ** (len - 1)
    unet_channels: tuple[int, ...] = (32, 64, 128)  # UNet widths, one level each; the deepest has no attention
    attention_heads: int = 2  # UNet attention heads per block (diffusers' attention_head_dim); few, wide heads are
    # fast on CPU
    attention_from: int = 1  # first UNet level with cross-attention (0 = full latent resolution, SD1.5's layout);
    # 1 is SDXL's layout and trains ~1.6x faster on CPU: attention over all 16x16 positions is the costliest layer
    text_hidden: int = 64  # text encoder width
    text_layers: int = 2  # text encoder depth
    max_sequence_length: int = 16  # sd3: T5 tokens per caption in training and evaluation (one-shape captions are
    #   <= 15 tokens); distill such a teacher with the same teacher.max_sequence_length
    vae_steps: int = 800  # VAE optimizer steps
    vae_batch_size: int = 32
    unet_steps: int = 2400  # UNet + text encoder optimizer steps
    unet_batch_size: int = 32
    vae_learning_rate: float = 1e-3  # AdamW of the VAE phase (2e-3 ends 4 dB lower: 27 vs 31.8 dB after 800 steps)
    learning_rate: float = 2e-3  # AdamW of the UNet + text encoder phase
    ema_decay: float = 0.995  # EMA of the UNet and text encoder weights that are saved
    caption_dropout: float = 0.1  # fraction of captions replaced by "" so CFG works
    noise_weight_cap: float = 1.0  # UNet phase: the eps loss at step t weighted by min(1 / abar_t, cap), normalized
    #   to mean 1 over t; 1 = the plain loss. Larger caps weigh high noise up (1 / abar is v-prediction's weight), where
    #   only the caption can say what is hidden (the video teacher: which way a shape will move)
    holdout: int = 200  # prepared images kept out of training: VAE PSNR, and their captions are the eval prompts
    eval_prompts: int = 200  # held-out captions scored by the oracle after training (DDIM with CFG), <= holdout
    eval_steps: int = 50  # steps of the evaluation sampler: DDIM (sd3: the flow's Euler, pcm.sampling)
    eval_guidance_scale: float = 4.0  # CFG scale of the evaluation sampler
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where to train; auto = cuda when available. Random draws come
    # from a CPU generator either way, so a run is the same draw sequence on every device

    def __post_init__(self):
        require(all(c % 8 == 0 for c in self.vae_channels + self.unet_channels),
                 "demo_teacher.vae_channels and unet_channels must be multiples of 8 (GroupNorm with 8 groups)")
        require(0 <= self.attention_from < len(self.unet_channels) - 1,
                 f"demo_teacher.attention_from={self.attention_from}: must be in [0, {len(self.unet_channels) - 2}] "
                 f"for unet_channels={list(self.unet_channels)} (the deepest level has no attention)")
        require(self.vae_steps >= 1 and self.unet_steps >= 1, "demo_teacher.vae_steps and unet_steps must be >= 1")
        require(1 <= self.eval_prompts <= self.holdout,
                 f"demo_teacher.eval_prompts={self.eval_prompts}: must be in [1, demo_teacher.holdout={self.holdout}] "
                 "(the prompts are held-out captions)")
        require(self.eval_steps >= 1, f"demo_teacher.eval_steps={self.eval_steps}: must be >= 1")
        require(self.max_sequence_length >= 1,
                f"demo_teacher.max_sequence_length={self.max_sequence_length}: must be >= 1 (T5 tokens per caption)")
        require(0 <= self.caption_dropout < 1, f"demo_teacher.caption_dropout={self.caption_dropout}: in [0, 1)")
        require(self.noise_weight_cap >= 1, f"demo_teacher.noise_weight_cap={self.noise_weight_cap}: must be >= 1")
        require(0 <= self.ema_decay < 1, f"demo_teacher.ema_decay={self.ema_decay}: must be in [0, 1)")


@dataclass(frozen=True)
class EvalConfig:
    """`pcm evaluate`: the teacher's DDIM and every LoRA sampled at several step counts from the same noises, scored
    and reported (metrics.json, steps.csv, steps.md, plots, grids, report.html under output_dir)."""

    loras: tuple[str, ...] = ("models/pcm/lora",)  # exported LoRA folders (`pcm distill` writes train.output_dir/lora)
    prompts: str = ""  # UTF-8 text file, one prompt per line (empty lines and undecodable ones are skipped and
    #   counted); empty = the captions of the last num_prompts prepared samples (the demo teacher's held-out ones)
    num_prompts: int = 200  # the first this many prompts are used
    seeds: tuple[int, ...] = (0,)  # initial noises per prompt: one sample per (prompt, seed), the same for every row
    steps: tuple[int, ...] = (1, 2, 4, 8, 16)  # sampling steps of every row
    guidance_scales: tuple[float, ...] = (1.0,)  # inference CFG of the LoRA rows, one row set per scale
    gammas: tuple[float, ...] = (0.0,)  # stochasticity of the PCM rows (TCD's rule), one row set per gamma; rows at
    #   gamma != 0 are labelled <model>-g<gamma>. LCM rows (already re-noised every step) and the teacher's run at 0
    teacher_guidance_scale: float = 5.5  # CFG of the teacher's DDIM rows and of its reference samples: the scale the
    #   students were distilled towards (1 + the mean solver w for small_cfg: 1 + 4.5)
    reference_steps: int = 50  # teacher DDIM steps of the reference samples (FID-teacher, trajectory error)
    reference_images: str = ""  # prepared-shards folder of the FID reference images; empty = data.output_dir
    num_reference: int = 1000  # reference images read (the first ones in index order)
    features: Literal["inception", "shapes"] = "shapes"  # FID features: Inception-v3 pool3 (real data) or the
    #   small shapes CNN (the demo world), trained once and cached under cache_dir
    inception_weights: str = ""  # pytorch-fid's Inception weights as safetensors (`pcm convert-inception` makes it)
    clip_model: str = ""  # local CLIP model directory (transformers); empty = no CLIP score
    oracle: bool = True  # the shapes oracle's per-attribute adherence (demo prompts only)
    batch_size: int = 50  # samples generated and scored per batch
    grid_prompts: int = 6  # prompts (rows) in each model's sample grid (columns: step counts), the first seed
    plot_x: Literal["steps", "nfe"] = "steps"  # x axis of the metric plots: sampling steps, or NFE (network
    #   evaluations per sample: steps x 2 for a row with CFG > 1)
    shapes_net_steps: int = 600  # optimizer steps of the shapes feature CNN (trained once per prepared dataset)
    output_dir: str = "reports/eval"  # the report
    note: str = ""  # a line above the step table (steps.md, report.html), e.g. what kind of run made it
    cache_dir: str = "models/eval-cache"  # teacher reference samples, reference statistics, the shapes CNN
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where generation and features run; auto = cuda if available
    bootstrap_resamples: int = 200  # resamples of the prompt set behind every metric's 95 % interval (ci_low,
    #   ci_high); 0 = no intervals. Draws seeded from eval.seeds. Each costs two FIDs per row: ~3 ms at the demo's
    #   128-d features and N = 200 (200 resamples add ~14 s to its 26 rows on 2 cores, 1000 ~62 s)

    def __post_init__(self):
        require(len(self.steps) > 0 and all(k >= 1 for k in self.steps),
                 f"eval.steps={list(self.steps)}: list at least one step count, each >= 1")
        require(len(self.seeds) > 0, "eval.seeds: list at least one seed")
        require(len(self.guidance_scales) > 0 and all(g >= 0 for g in self.guidance_scales),
                 f"eval.guidance_scales={list(self.guidance_scales)}: list at least one scale, each >= 0")
        require(len(self.gammas) > 0 and all(0 <= g <= 1 for g in self.gammas),
                f"eval.gammas={list(self.gammas)}: list at least one gamma, each in [0, 1] (0 = deterministic PCM)")
        require(self.teacher_guidance_scale >= 0, "eval.teacher_guidance_scale must be >= 0")
        require(self.reference_steps >= 1, f"eval.reference_steps={self.reference_steps}: must be >= 1")
        require(self.num_prompts >= 2, f"eval.num_prompts={self.num_prompts}: must be >= 2 (FID needs a covariance)")
        require(self.num_reference >= 2, f"eval.num_reference={self.num_reference}: must be >= 2")
        require(self.batch_size >= 1 and self.grid_prompts >= 1, "eval.batch_size and eval.grid_prompts must be >= 1")
        require(self.shapes_net_steps >= 1, "eval.shapes_net_steps must be >= 1")
        require(self.bootstrap_resamples >= 0, f"eval.bootstrap_resamples={self.bootstrap_resamples}: must be >= 0 "
                "(0 turns the intervals off)")
        require(self.features != "inception" or bool(self.inception_weights),
                 "eval.features=inception needs eval.inception_weights: the path of pytorch-fid's weights as "
                 "safetensors (convert pt_inception-2015-12-05-6726825d.pth with `pcm convert-inception`)")
