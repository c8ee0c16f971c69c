"""What a registered version carries of the evaluation that let it through the gate: the report files as artifacts
(under `evaluation/` of the version's model) and the step table in its description, so the MLflow UI shows how the
version samples at each step count beside the teacher without opening the run that measured it.

Only an evaluation of this very LoRA file is attached (pcm.registry.eval_metrics checks the sha256 that
`pcm evaluate` records); the input data of each stage's run are logged by pcm.tracking (shards_dataset)."""

import shutil
from pathlib import Path

REPORT_FILES = ("report.html", "steps.md", "steps.csv", "metrics.json", "info.json")
DESCRIPTION_LIMIT = 5000  # characters of a model version's description in MLflow's SQL stores (String(5000))


def evaluation_files(report: Path, into: Path) -> Path:
    """The evaluation folder's report files and plots (plots/*.png: each metric against steps, the step table
    plotted) copied into `into`, which is returned; a file the evaluation did not write is left out."""
    into.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        if (report / name).is_file():
            shutil.copy2(report / name, into / name)
    for plot in sorted((report / "plots").glob("*.png")):
        (into / "plots").mkdir(exist_ok=True)
        shutil.copy2(plot, into / "plots" / plot.name)
    return into


def step_table(report: Path, label: str) -> tuple[str, list[str]]:
    """(the line above the table, its markdown lines) from steps.md: the header, the teacher's rows and the rows of
    `label` (this LoRA, at each inference CFG and gamma evaluated); ("", []) without steps.md."""
    path = report / "steps.md"
    if not path.is_file():
        return "", []
    lines = path.read_text(encoding="utf-8").splitlines()
    above = next((line for line in lines if line.strip() and not line.startswith("|")), "")
    table = [line for line in lines if line.startswith("|")]

    def ours(line: str) -> bool:
        model = line.split("|")[1].strip()
        return model.startswith("teacher") or model == label or model.startswith((f"{label}-cfg", f"{label}-g"))

    return above, table[:2] + [line for line in table[2:] if ours(line)]


def with_evaluation(description: str, report: Path, label: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The model card followed by its evaluation: the step table (teacher and `label` rows), cut to the store's
    description limit with a note when it would not fit."""
    above, table = step_table(report, label)
    if not table:
        return description
    head = f"{description}\n## Evaluation\n\n{above}\n\n"
    tail = (f"\nRows: the teacher's own sampler (DDIM, or Euler on a flow) and this version (`{label}`). The full "
            "table (`steps.md`, `steps.csv`), "
            "`report.html` and the plots against steps (`plots/`) are this version's artifacts under "
            "`evaluation/`.\n")
    cut = "| ... | (more rows in evaluation/steps.md) |"
    rows = table[2:]
    while rows and len(head + "\n".join(table[:2] + rows) + tail) > limit:
        rows = rows[:-1]
    shown = table[:2] + rows + ([cut] if len(rows) < len(table) - 2 else [])
    text = head + "\n".join(shown) + "\n" + tail
    return text if len(text) <= limit else description
