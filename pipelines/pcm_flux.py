"""The FLUX pipeline on your shards: prepare (shard URLs or a DVC repo path) -> distill per run on 8 GPUs -> evaluate
(the teacher's rows are its own Euler at FLUX.1-dev's embedded guidance 3.5) -> register. Defaults:
configs/flux-cc3m.yaml (the reference's SD3 run carried over to FLUX.1-dev; its schedule is shifted for the
data.resolution it fixes, 1024 px, and every stage reads that side: evaluation from the params, the registry from the
LoRA's card).

    python pipelines/pcm_flux.py compile -o pcm_flux.yaml --gpus 8     # then: kfp run create -e EXP -f pcm_flux.yaml
    python pipelines/pcm_flux.py submit --host URL --experiment pcm-flux --arg 'shard_urls=["s3://b/{00000..00331}.tar"]'
    python pipelines/pcm_flux.py --params tiny.yaml run --local        # here, with kfp.local, on small params

FLUX.1-dev is a gated hub model: the tasks that load it read HF_TOKEN from the pipeline's secret; weights on the data
PVC instead: --arg teacher_model=/mnt/data/weights/flux1-dev (or --teacher-uri at compile time).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("pcm-flux", demo=False, default_params=ROOT / "configs" / "flux-cc3m.yaml",
                  teacher_model="black-forest-labs/FLUX.1-dev", script=Path(__file__).name))
