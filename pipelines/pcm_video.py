"""The text-to-video pipeline: AnimateDiff (SD1.5 + a motion adapter) on WebVid-style video2dataset shards.
prepare (shard URLs or a DVC repo path; clips -> frames) -> distill per run on 8 GPUs -> evaluate (frame FID,
CLIP score per frame, frame consistency, GIF grids) -> register. Defaults: configs/animatediff-webvid.yaml.

    python pipelines/pcm_video.py compile -o pcm_video.yaml --gpus 8    # then: kfp run create -e EXP -f pcm_video.yaml
    python pipelines/pcm_video.py submit --host URL --experiment pcm-video --arg 'shard_urls=["s3://b/{00000..00999}.tar"]'
    python pipelines/pcm_video.py --params tiny.yaml run --local        # here, with kfp.local, on small params

The motion adapter is teacher.motion_adapter of the params; another one for a run:
--arg 'overrides=["teacher.motion_adapter=/mnt/data/weights/my-adapter"]'.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("pcm-video", demo=False, default_params=ROOT / "configs" / "animatediff-webvid.yaml",
                  teacher_model="stable-diffusion-v1-5/stable-diffusion-v1-5", script=Path(__file__).name))
