"""The SD1.5 pipeline on the demo world: shapes -> prepare -> tiny teacher -> distill per run -> evaluate -> register.

    python pipelines/pcm_sd15.py compile -o pcm_sd15.yaml          # for `kfp run create -f pcm_sd15.yaml`
    python pipelines/pcm_sd15.py run --local                      # here, with kfp.local (no cluster)
    python pipelines/pcm_sd15.py submit --host URL --experiment pcm
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("pcm-sd15-demo", demo=True, default_params=ROOT / "params.yaml", teacher_model="",
                  script=Path(__file__).name))
