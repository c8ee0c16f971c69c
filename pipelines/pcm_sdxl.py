"""The SDXL pipeline on your shards: prepare (shard URLs or a DVC repo path) -> distill per run on 8 GPUs ->
evaluate -> register. Defaults: configs/sdxl-cc3m.yaml (the reference hyperparameters).

    python pipelines/pcm_sdxl.py compile -o pcm_sdxl.yaml --gpus 8     # then: kfp run create -e EXP -f pcm_sdxl.yaml
    python pipelines/pcm_sdxl.py submit --host URL --experiment pcm-sdxl --arg 'shard_urls=["s3://b/{00000..00331}.tar"]'
    python pipelines/pcm_sdxl.py --params tiny.yaml run --local        # here, with kfp.local, on small params
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("pcm-sdxl", demo=False, default_params=ROOT / "configs" / "sdxl-cc3m.yaml",
                  teacher_model="stabilityai/stable-diffusion-xl-base-1.0", script=Path(__file__).name))
