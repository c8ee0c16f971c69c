"""`make screenshots`: what a person sees after `make demo`, as PNGs in docs/: the evaluation report (report.html in
headless Chromium: its top, and its labelled sample grids) and the registered model's pages in the MLflow UI, after
checking that every image and animation of the report loads.

    python benchmarks/screenshots.py [PROJECT] [--report PATH] [--out docs] [--check-only]

PROJECT (default .): a folder where `make demo` ran (`make demo QUICK=1`: .demo-quick). Its params.yaml says where the
report is (eval.output_dir/report.html; --report names another) and where `pcm register` wrote its record
(register.output: the model's name, version and tracking store). Needs the `chromium` program and installs nothing;
not part of `make test` or CI.

The check of the report, in two parts: here, every <img>, <video> and <source> it references must exist and decode
(PIL; an animation's frames are counted); in Chromium, a copy of the report marks each <img> and <video> with what the
browser made of it (its decoded width and height, or "broken") and --dump-dom returns the marks after a virtual time
budget. One line per element; exit 1 when any is broken, before any screenshot is taken.
The MLflow UI (`mlflow server` on a free loopback port against the project's tracking store) runs as a child process
group, stopped on every way out (an error, Ctrl-C, SIGTERM).
"""

import argparse
import base64
import binascii
import html.parser
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pcm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
from serve import stop_here  # noqa: E402  pipelines/serve.py: stops a server's process group (SIGTERM, then SIGKILL)

MEDIA = ("img", "video", "source")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
MAX_BYTES = 300_000  # each PNG in docs/ at most this size (downscaled until it fits)
MAX_HEIGHT = 16_000  # Chromium's largest screenshot side
CHECKED = "data-pcm-check"  # the attribute the browser check writes on each element
LAYOUT = "data-pcm-layout"  # and on <html>: the page's height and the top of each section (h2 with an id), in pixels
BROWSER_CHECK = f"""<script>
window.addEventListener("load", () => setTimeout(() => {{
  for (const el of document.querySelectorAll("img"))
    el.setAttribute("{CHECKED}", el.complete && el.naturalWidth > 0 ? el.naturalWidth + "x" + el.naturalHeight
                                                                    : "broken");
  for (const el of document.querySelectorAll("video"))
    el.setAttribute("{CHECKED}", el.readyState >= 2 && el.videoWidth > 0 ? el.videoWidth + "x" + el.videoHeight
                                                                        : "broken");
  const layout = {{height: document.documentElement.scrollHeight}};
  for (const h of document.querySelectorAll("h2[id]")) layout[h.id] = Math.round(h.getBoundingClientRect().top);
  document.documentElement.setAttribute("{LAYOUT}", JSON.stringify(layout));
}}, 500));
</script>"""
SHOT = 1500  # height of each screenshot of the report, in pixels at the window's width


class Broken(Exception):
    """An asset that does not load; the message says why."""


@dataclass(frozen=True)
class Asset:
    tag: str  # img, video or source
    src: str
    name: str  # alt text, or the src shortened: what the line about it shows

    @property
    def where(self) -> str:
        return f"<{self.tag}> {self.name}"


class _Media(html.parser.HTMLParser):
    """The media elements of a page in document order, (tag, attributes), and the attributes of its <html>."""

    def __init__(self):
        super().__init__()
        self.found, self.root = [], {}

    def handle_starttag(self, tag, attrs):
        if tag in MEDIA:
            self.found.append((tag, dict(attrs)))
        elif tag == "html":
            self.root = dict(attrs)


def _parse(page: str) -> _Media:
    parser = _Media()
    parser.feed(page)
    parser.close()
    return parser


def media_elements(page: str) -> list[tuple[str, dict]]:
    return _parse(page).found


def report_assets(page: str) -> list[Asset]:
    """Every <img>/<video>/<source> of the page that references something (src; a video's poster too)."""
    assets = []
    for tag, attrs in media_elements(page):
        for key in ("src", "poster"):
            src = (attrs.get(key) or "").strip()
            if src or (key == "src" and tag != "video"):  # a <video> may take its file from <source> children
                short = src if not src.startswith("data:") else src.split(",", 1)[0] + ",..."
                assets.append(Asset(tag, src, attrs.get("alt") or short or "(no src)"))
    return assets


def asset_bytes(src: str, folder: Path) -> bytes:
    """The bytes a src stands for: a data: URI's payload, or a file relative to the report's folder."""
    if not src:
        raise Broken("no src")
    scheme = urllib.parse.urlsplit(src).scheme
    if scheme == "data":
        header, sep, payload = src[5:].partition(",")
        if not sep:
            raise Broken("a data: URI without a comma")
        try:
            return base64.b64decode(payload, validate=True) if header.endswith(";base64") else \
                urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as err:
            raise Broken(f"its base64 does not decode ({err})") from err
    if scheme in ("http", "https"):
        raise Broken("an external URL: the report should carry its images (a Kubeflow HTML artifact is shown "
                     "offline)")
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(src).path)) if scheme == "file" else folder / src
    if not path.is_file():
        raise Broken(f"{path}: no such file")
    return path.read_bytes()


def decode(data: bytes, tag: str) -> str:
    """'PNG 700x420' or 'GIF 512x384, 16 frames': the image decoded to its last pixel and every frame counted; a
    video file (which PIL does not read) is only checked to be non-empty."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, size, frames = image.format, image.size, getattr(image, "n_frames", 1)
            for frame in range(frames):
                image.seek(frame)
                image.load()
    except UnidentifiedImageError as err:
        if tag in ("video", "source") and data:
            return f"video file, {len(data)} bytes (not decoded here)"
        raise Broken("not an image PIL can read") from err
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        raise Broken(f"does not decode ({type(err).__name__}: {err})") from err
    animated = f", {frames} frames" if frames > 1 else ""
    return f"{kind} {size[0]}x{size[1]}{animated}"


def check_assets(report: Path) -> list[str]:
    """A line per asset of report ('ok ...' or 'BROKEN ...'), printed; returns the broken ones' lines."""
    broken = []
    assets = report_assets(report.read_text(encoding="utf-8"))
    for asset in assets:
        try:
            line = f"ok      {asset.where}: {decode(asset_bytes(asset.src, report.parent), asset.tag)}"
        except Broken as err:
            line = f"BROKEN  {asset.where}: {err}"
            broken.append(line)
        print(line)
    print(f"{len(assets) - len(broken)} of {len(assets)} images and animations in {report} decode")
    return broken


def browser_marks(dom: str) -> list[tuple[str, str]]:
    """(tag, the browser check's mark) of every <img> and <video> in a dumped DOM."""
    return [(tag, attrs.get(CHECKED) or "not checked") for tag, attrs in media_elements(dom) if tag != "source"]


def page_layout(dom: str) -> dict[str, int]:
    """{'height': the page's, '<section id>': its top} as the browser check measured them ({} if it did not run)."""
    return json.loads(_parse(dom).root.get(LAYOUT) or "{}")


def instrumented(page: str, folder: Path) -> str:
    """The report with the browser check appended and a <base> at its own folder (relative files still resolve)."""
    base = f'<base href="{folder.resolve().as_uri()}/">'
    page = page.replace("<head>", f"<head>{base}", 1) if "<head>" in page else base + page
    return page.replace("</body>", BROWSER_CHECK + "</body>", 1) if "</body>" in page else page + BROWSER_CHECK


def chromium(browser: str, url: str, *flags: str, budget_ms: int = 5000) -> str:
    """Headless Chromium on url with flags; its stdout (the DOM with --dump-dom). A profile of its own, thrown away."""
    with tempfile.TemporaryDirectory(prefix="pcm-chromium-") as profile:
        done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *flags, url],
                              capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"{browser} on {url} exited {done.returncode}: {done.stderr.strip()[-1500:]}")
    return done.stdout


def check_in_browser(browser: str, report: Path, width: int) -> tuple[list[str], dict[str, int]]:
    """The browser's marks on a copy of the report, a line per <img>/<video> printed; (the broken ones' lines, the
    page's layout at this window width)."""
    with tempfile.TemporaryDirectory(prefix="pcm-report-") as folder:
        copy = Path(folder) / "report.html"
        copy.write_text(instrumented(report.read_text(encoding="utf-8"), report.parent), encoding="utf-8")
        dom = chromium(browser, copy.as_uri(), "--dump-dom", f"--window-size={width},{SHOT}")
    marks = browser_marks(dom)
    expected = [tag for tag, _ in media_elements(report.read_text(encoding="utf-8")) if tag != "source"]
    broken = [f"BROKEN  in Chromium: <{tag}> #{i}: {mark}" for i, (tag, mark) in enumerate(marks)
              if mark in ("broken", "not checked")]
    loaded = len(marks) - len(broken)
    if len(marks) != len(expected):
        broken.append(f"BROKEN  in Chromium: the DOM has {len(marks)} <img>/<video> elements, the report "
                      f"{len(expected)}")
    for line in broken:
        print(line)
    print(f"Chromium: {loaded} of {len(expected)} <img>/<video> elements loaded "
          f"({', '.join(mark for _, mark in marks)})")
    return broken, page_layout(dom)


def shrink(path: Path, max_bytes: int = MAX_BYTES) -> int:
    """The PNG at path rewritten as a 256-colour PNG, downscaled in steps of 15 % until it has at most max_bytes;
    returns its size."""
    original = Image.open(path).convert("RGB")
    scale = 1.0
    while True:
        size = (round(original.width * scale), round(original.height * scale))
        image = original if scale == 1.0 else original.resize(size, Image.Resampling.LANCZOS)
        image.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
        if path.stat().st_size <= max_bytes or scale < 0.3:
            return path.stat().st_size
        scale *= 0.85


def screenshot(browser: str, url: str, out: Path, size: tuple[int, int], budget_ms: int = 5000) -> Path:
    chromium(browser, url, f"--screenshot={out}", f"--window-size={size[0]},{min(size[1], MAX_HEIGHT)}",
             budget_ms=budget_ms)
    if not out.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot of {url} to {out}")
    print(f"wrote {out} ({shrink(out) // 1000} KB)")
    return out


def report_shots(browser: str, report: Path, out: Path, width: int, layout: dict[str, int]) -> None:
    """docs/report.png (the page's top: step table, first plots) and docs/report-samples.png (the labelled grids),
    cut from one screenshot of the whole page (Chromium's --screenshot draws nothing when scrolled to an anchor)."""
    with tempfile.TemporaryDirectory(prefix="pcm-shot-") as folder:
        whole = Path(folder) / "whole.png"
        chromium(browser, report.resolve().as_uri(), f"--screenshot={whole}",
                 f"--window-size={width},{min(layout.get('height', SHOT), MAX_HEIGHT)}")
        page = Image.open(whole)
        page.load()
    samples = max(0, layout.get("samples", 0) - 16)
    for name, top in (("report.png", 0), ("report-samples.png", samples)):
        page.crop((0, top, page.width, min(page.height, top + SHOT))).save(out / name)
        print(f"wrote {out / name} ({shrink(out / name) // 1000} KB)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(store: str, log: Path, seconds: float = 120):
    """`mlflow server` on store, on a free loopback port, in a process group of its own; yields its URL once /health
    answers. The group (the server and its uvicorn workers) is stopped when the block ends, however it ends."""
    port = _free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store, "--host",
               "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runners: 7 processes a UI never uses
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + seconds
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command)} did not answer /health in {seconds:g} s: "
                                   f"{log.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        stop_here(process)


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through mlflow_ui's finally, as Ctrl-C does


def project_files(project: Path, report: str) -> tuple[Path, dict]:
    """(report.html, the registration record) of a project, or ValueError naming what is missing and the fix."""
    if not (project / "params.yaml").is_file():
        raise ValueError(f"{project}: no params.yaml; give the folder where `make demo` ran (`make demo QUICK=1`: "
                         ".demo-quick)")
    cfg = load_config(project / "params.yaml")
    page = Path(report) if report else project / cfg.eval.output_dir / "report.html"
    if not page.is_file():
        raise ValueError(f"{page}: no such file; run `make demo` (or `make demo QUICK=1`) first, or pass --report")
    record = project / cfg.register.output
    if not record.is_file():
        raise ValueError(f"{record} (register.output): no such file; the demo's register stage writes it (run "
                         "`make demo`)")
    return page, json.loads(record.read_text())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/screenshots.py", description=__doc__.split("\n\n")[0])
    p.add_argument("project", nargs="?", default=".", help="a folder where `make demo` ran (default: .)")
    p.add_argument("--report", default="", help="another report.html (default: the project's eval.output_dir)")
    p.add_argument("--out", default=str(ROOT / "docs"), help="where the PNGs go (default: docs/)")
    p.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    p.add_argument("--check-only", action="store_true", help="check the report's images only; no Chromium")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    fail = f"{parser().prog}: error:"
    try:
        report, record = project_files(Path(args.project), args.report)
    except ValueError as err:
        print(f"{fail} {err}", file=sys.stderr)
        return 2
    if check_assets(report):
        return 1
    if args.check_only:
        return 0
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        print(f"{fail} chromium not found; install it: apt-get install -y chromium", file=sys.stderr)
        return 2
    broken, layout = check_in_browser(browser, report, args.width)
    if broken:
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    report_shots(browser, report, out, args.width, layout)
    model, version = urllib.parse.quote(record["model_name"]), record["version"]
    with tempfile.TemporaryDirectory(prefix="pcm-mlflow-ui-") as logs, \
            mlflow_ui(record["tracking_uri"], Path(logs) / "mlflow-ui.log") as url:
        screenshot(browser, f"{url}/#/models/{model}", out / "mlflow-model.png", (1440, 900), budget_ms=15000)
        screenshot(browser, f"{url}/#/models/{model}/versions/{version}", out / "mlflow-model-version.png",
                   (1440, 1100), budget_ms=15000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
