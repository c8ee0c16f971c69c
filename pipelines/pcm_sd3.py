"""The SD3 pipeline on your shards: prepare (shard URLs or a DVC repo path) -> distill per run on 8 GPUs -> evaluate
(the teacher's rows are its own Euler) -> register. Defaults: configs/sd3-cc3m.yaml (the PCM authors' SD3 run).

    python pipelines/pcm_sd3.py compile -o pcm_sd3.yaml --gpus 8       # then: kfp run create -e EXP -f pcm_sd3.yaml
    python pipelines/pcm_sd3.py submit --host URL --experiment pcm-sd3 --arg 'shard_urls=["s3://b/{00000..00331}.tar"]'
    python pipelines/pcm_sd3.py --params tiny.yaml run --local         # here, with kfp.local, on small params

SD3 medium is a gated hub model: the tasks that load it read HF_TOKEN from the pipeline's secret; weights on the data
PVC instead: --arg teacher_model=/mnt/data/weights/sd3-medium (or --teacher-uri at compile time).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("pcm-sd3", demo=False, default_params=ROOT / "configs" / "sd3-cc3m.yaml",
                  teacher_model="stabilityai/stable-diffusion-3-medium-diffusers", script=Path(__file__).name))
