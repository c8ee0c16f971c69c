"""benchmarks/screenshots.py (`make screenshots`), the parts that need no browser: the check that every image and
animation of a report exists and decodes, the browser check's page and what it reads back, the size limit of the
PNGs, and the one-line errors (a project without a demo, a machine without chromium)."""

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import screenshots  # noqa: E402  benchmarks/screenshots.py


def _png(size=(8, 6), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def _gif(path: Path, frames: int = 3) -> Path:
    images = [Image.new("RGB", (10, 10), (40 * i, 0, 0)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _report(folder: Path, *elements: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    page = folder / "report.html"
    page.write_text(f"<!doctype html><html><head><title>r</title></head><body>{''.join(elements)}</body></html>")
    return page


def test_every_image_and_animation_is_decoded_and_each_broken_one_named(tmp_path, capsys):
    _gif(tmp_path / "grid.gif")
    truncated = _png((64, 64))[:-30]  # header intact, pixels cut short
    page = _report(tmp_path, f'<img src="{_data_uri(_png())}" alt="fid">', '<img src="grid.gif" alt="pcm-M2">',
                   f'<img src="{_data_uri(truncated)}" alt="lcm">', '<img src="grids/missing.png" alt="pcm-M4">',
                   '<img src="https://example.com/x.png" alt="remote">', '<img alt="empty">')
    broken = screenshots.check_assets(page)
    out = capsys.readouterr().out
    assert "ok      <img> fid: PNG 8x6" in out and "ok      <img> pcm-M2: GIF 10x10, 3 frames" in out
    assert [line.split(":")[0] for line in broken] == ["BROKEN  <img> lcm", "BROKEN  <img> pcm-M4",
                                                       "BROKEN  <img> remote", "BROKEN  <img> empty"]
    assert "does not decode" in broken[0] and "missing.png: no such file" in broken[1]
    assert "external URL" in broken[2] and "no src" in broken[3]
    assert "2 of 6 images and animations" in out


def test_a_good_report_has_no_broken_assets(tmp_path):
    page = _report(tmp_path, f'<img src="{_data_uri(_png())}" alt="a">',
                   f'<video poster="{_data_uri(_png())}"><source src="clip.webm"></video>')
    (tmp_path / "clip.webm").write_bytes(b"\x1aE\xdf\xa3 not decoded here")
    assert [(a.tag, a.src[:10]) for a in screenshots.report_assets(page.read_text())] == [
        ("img", "data:image"), ("video", "data:image"), ("source", "clip.webm")]
    assert screenshots.check_assets(page) == []


def test_bad_base64_and_a_non_image_are_broken(tmp_path):
    page = _report(tmp_path, '<img src="data:image/png;base64,%%%" alt="bad">',
                   f'<img src="{_data_uri(b"plain text", "text/plain")}" alt="text">')
    broken = screenshots.check_assets(page)
    assert len(broken) == 2 and "base64 does not decode" in broken[0] and "not an image" in broken[1]


def test_the_browser_check_page_and_what_it_reads_back(tmp_path):
    page = screenshots.instrumented("<html><head></head><body><img src='a.png'></body></html>", tmp_path)
    assert f'<base href="{tmp_path.resolve().as_uri()}/">' in page and page.index("<script>") < page.index("</body>")
    dom = ('<html data-pcm-layout=\'{"height": 5000, "samples": 3200}\'><body><img src="a" data-pcm-check="8x6">'
           '<img src="b" data-pcm-check="broken"><video data-pcm-check="64x64"><source src="c"></video>'
           '<img src="d"></body></html>')
    assert screenshots.browser_marks(dom) == [("img", "8x6"), ("img", "broken"), ("video", "64x64"),
                                              ("img", "not checked")]
    assert screenshots.page_layout(dom) == {"height": 5000, "samples": 3200}
    assert screenshots.page_layout("<html><body></body></html>") == {}


def test_a_screenshot_over_the_limit_is_downscaled_until_it_fits(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(path)
    assert path.stat().st_size > 200_000
    assert screenshots.shrink(path, 200_000) == path.stat().st_size <= 200_000
    shrunk = Image.open(path)
    assert shrunk.width < 800 and abs(shrunk.width / shrunk.height - 800 / 600) < 0.01


def _project(tmp_path: Path, report: bool = True, record: bool = True) -> Path:
    (tmp_path / "params.yaml").write_text("eval:\n  output_dir: reports/eval\n")
    if report:
        _report(tmp_path / "reports" / "eval", f'<img src="{_data_uri(_png())}" alt="fid">')
    if record:
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "registered.json").write_text(json.dumps(
            {"model_name": "pcm-demo", "version": 1, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    return tmp_path


@pytest.mark.parametrize("setup, expected", [
    (lambda p: p, "no params.yaml; give the folder where `make demo` ran"),
    (lambda p: _project(p, report=False), "report.html: no such file; run `make demo` (or `make demo QUICK=1`)"),
    (lambda p: _project(p, record=False), "registered.json (register.output): no such file"),
])
def test_a_folder_without_a_demo_is_one_line_and_exit_2(tmp_path, capsys, setup, expected):
    assert screenshots.main([str(setup(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("python benchmarks/screenshots.py: error:") and expected in err


def test_without_chromium_it_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(screenshots, "BROWSERS", ("no-such-browser-pcm",))
    assert screenshots.main([str(_project(tmp_path)), "--out", str(tmp_path / "docs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("chromium not found; install it: apt-get install -y chromium") and "\n" not in err
    assert not (tmp_path / "docs").exists()
    assert screenshots.main([str(tmp_path), "--check-only"]) == 0  # the report's own check needs no browser


def test_a_broken_report_exits_1_before_any_browser_runs(tmp_path, capsys, monkeypatch):
    project = _project(tmp_path)
    _report(project / "reports" / "eval", '<img src="gone.png" alt="pcm-M4">')
    monkeypatch.setattr(screenshots, "chromium", lambda *a, **k: pytest.fail("the browser ran"))
    assert screenshots.main([str(project)]) == 1
    assert "BROKEN  <img> pcm-M4:" in capsys.readouterr().out
