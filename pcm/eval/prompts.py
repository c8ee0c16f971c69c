"""Evaluation prompts: a UTF-8 text file with one prompt per line, or held-out captions of the prepared data."""

import json
from pathlib import Path

from pcm.data.shards import iter_tar


def read_prompt_file(path: str | Path) -> tuple[list[str], dict[str, int]]:
    """(prompts, skipped counts) from a text file: one prompt per line, surrounding whitespace stripped.

    Empty lines are skipped and counted ('empty'); a line that is not valid UTF-8 is skipped and counted
    ('not_utf8') instead of failing the whole file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval.prompts={path}: no such file (a UTF-8 text file, one prompt per line; "
                                "empty = held-out captions of data.output_dir)")
    prompts, skipped = [], {"empty": 0, "not_utf8": 0}
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            skipped["not_utf8"] += 1
            continue
        if line:
            prompts.append(line.removeprefix("\ufeff"))
        else:
            skipped["empty"] += 1
    if not prompts:
        raise ValueError(f"eval.prompts={path}: no usable prompt (skipped {skipped})")
    return prompts, skipped


def heldout_captions(prepared_dir: str | Path, count: int) -> list[str]:
    """The captions of the last `count` readable prepared samples, in index order (the demo teacher's held-out
    ones: it trains on all but the last demo_teacher.holdout)."""
    index = Path(prepared_dir) / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: eval.prompts is empty, so the prompts are captions of "
                                "data.output_dir; run `pcm prepare` or set eval.prompts to a prompt file")
    captions = []
    for shard in reversed(json.loads(index.read_text())["shards"]):
        with open(Path(prepared_dir) / shard["name"], "rb") as f:
            found = [r.files["txt"].decode("utf-8", errors="replace").strip() for r in iter_tar(f) if "txt" in r.files]
        captions = [c for c in found if c] + captions
        if len(captions) >= count:
            break
    return captions[-count:]


def load_prompts(prompts_file: str, prepared_dir: str, count: int) -> tuple[list[str], dict[str, int]]:
    """(the first `count` prompts, skipped-line counts) from eval.prompts or the held-out captions."""
    if prompts_file:
        prompts, skipped = read_prompt_file(prompts_file)
        return prompts[:count], skipped
    return heldout_captions(prepared_dir, count), {"empty": 0, "not_utf8": 0}
