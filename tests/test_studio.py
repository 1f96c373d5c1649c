"""`perceiver-music studio`: the page driven in headless Chromium, and its checks without one.

The browser tests start the real command in a subprocess with a tiny checkpoint and drive the
page through selenium and chromedriver (Debian's `chromium` and `chromium-driver`, which
scripts/setup.sh installs); they skip, saying what is missing, only where those are absent.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from perceiver_music.render import rendering_available, roll_data
from perceiver_music.studio import (
    MAX_VARIATIONS,
    Job,
    Studio,
    UploadError,
    check_midi_upload,
    model_info,
    safe_name,
)

from conftest import ASAP, REPO, write_midi

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TAIL_SECONDS = 3.0  # what render keeps at most after the last note
SECONDS = 3  # of continuation asked for in the browser tests

needs_browser = pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None
    or importlib.util.find_spec("selenium") is None
    or CHROMIUM is None
    or CHROMEDRIVER is None
    or not rendering_available(),
    reason="the studio's browser tests need gradio and selenium (pip install -e '.[studio]'), "
    "chromium and chromium-driver, and fluidsynth (apt-get install chromium chromium-driver fluidsynth; "
    "scripts/setup.sh installs them all)",
)


def a_prompt(folder: Path) -> Path:
    """A real performance where ASAP is at hand, else a MIDI file written here."""
    if ASAP.is_dir():
        return sorted(ASAP.rglob("*.mid"))[0]
    notes = [(i * 250, i * 250 + 400, 60 + (i * 5) % 17, 70) for i in range(40)]
    return write_midi(folder / "theme.mid", notes)


# ----------------------------------------------------------------------------- without a browser


def test_safe_name_keeps_names_inside_their_folder():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("my théme (2).mid") == "my_th_me_2_.mid"
    assert safe_name("..") == "file"
    assert safe_name("") == "file"
    assert "/" not in safe_name("a/b\\c:d") and len(safe_name("x" * 500)) == 80


def test_new_folders_stay_in_the_output_folder(tiny_run, tmp_path):
    studio = Studio(model_info(tiny_run / "run"), tmp_path / "out", tiny_run / "run")
    a = studio.new_folder("uploads", "../../../escape")
    b = studio.new_folder("uploads", "../../../escape")
    assert a != b
    for folder in (a, b):
        assert folder.resolve().is_relative_to((tmp_path / "out").resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_uploads_are_checked(tmp_path):
    text = tmp_path / "notes.mid"
    text.write_text("not a MIDI file at all\n")
    with pytest.raises(UploadError, match=r"notes\.mid: not a MIDI file"):
        check_midi_upload(text)
    wav = tmp_path / "song.wav"
    wav.write_bytes(b"RIFF0000WAVE")
    with pytest.raises(UploadError, match=r"song\.wav: not a MIDI file \(expected \.mid or \.midi\)"):
        check_midi_upload(wav)
    empty = write_midi(tmp_path / "empty.mid", [])
    with pytest.raises(UploadError, match="empty.mid: no notes"):
        check_midi_upload(empty)
    good = write_midi(tmp_path / "good.mid", [(0, 500, 60, 80), (1000, 2500, 64, 80)])
    info = check_midi_upload(good)
    assert (info.name, info.notes, info.seconds) == ("good.mid", 2, 2.5)
    huge = tmp_path / "huge.mid"
    huge.write_bytes(good.read_bytes() + bytes(11 * 2**20))
    with pytest.raises(UploadError, match=r"huge\.mid: 11\.0 MB is over the studio's limit of 10 MB"):
        check_midi_upload(huge)


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("basic_pitch", "onnxruntime")) or not rendering_available(),
    reason="needs the transcribe extra and fluidsynth (scripts/setup.sh installs both)",
)
def test_a_recording_prompt_is_transcribed_once_and_continued(tiny_run, tmp_path):
    from perceiver_music.render import render_files

    line = write_midi(tmp_path / "line.mid", [(i * 400, i * 400 + 300, 55 + 3 * i, 90) for i in range(6)])
    render_files([line], tmp_path / "rec", png=False, sample_rate=22050)
    recording = tmp_path / "rec" / "line.wav"
    studio = Studio(model_info(tiny_run / "run"), tmp_path / "out", tiny_run / "run")
    info, png = studio.preview(recording)
    assert info.name == "line.wav" and info.notes >= 4 and info.path.suffix == ".mid" and png.is_file()
    assert info.path.resolve().is_relative_to((tmp_path / "out" / "uploads").resolve())
    result = studio.generate(Job(prompt=recording, seconds=1, num=1))
    assert studio.prompt_midi(recording) == info.path  # transcribed once, not at every use
    job = result.out_dir
    assert (job / "prompt_line.mid").is_file() and result.prompt_tokens > info.notes
    bad = tmp_path / "noise.wav"
    bad.write_text("not a recording")
    with pytest.raises(UploadError, match=r"noise\.wav: not audio that libsndfile can read"):
        studio.preview(bad)


def test_model_card_bundled_and_run(tiny_run):
    bundled = model_info(None)
    assert bundled.bundled and "CC BY-NC-SA 4.0" in bundled.card
    run = model_info(tiny_run / "run")
    assert not run.bundled and run.labels == [] and run.style is False
    assert "1 layers of width 32" in run.card and "64 tokens, 16 latents" in run.card


def test_conditioning_is_passed_only_when_set(tiny_run, tmp_path, monkeypatch):
    from perceiver_music import generate

    info = model_info(tiny_run / "run")
    studio = Studio(info, tmp_path / "out", tiny_run / "run")
    style = write_midi(tmp_path / "my style.mid", [(0, 500, 60, 80)])
    with pytest.raises(ValueError, match="not conditioned on composers"):
        studio.generate(Job(composer="Bach", guidance=2.0))
    assert not (tmp_path / "out" / "jobs").exists()  # refused before anything is written

    calls = []

    def fake(ckpt, out_dir, prompt=None, composer=None, style=None, guidance=1.0, **settings):
        calls.append({"composer": composer, "style": style, "guidance": guidance, **settings})
        return "done"

    monkeypatch.setattr(generate, "generate_midi", fake)
    studio.info.condition, studio.info.labels = ["label", "style"], ["Bach"]  # as a conditioned model's
    assert studio.generate(Job(seconds=5, guidance=3.0)) == "done"
    assert calls[-1]["composer"] is None and calls[-1]["style"] is None and calls[-1]["guidance"] == 1.0
    studio.generate(Job(seconds=5, composer="Bach", style=style, guidance=3.0))
    assert calls[-1]["composer"] == "Bach" and calls[-1]["guidance"] == 3.0
    assert calls[-1]["style"].name == "style_my_style.mid" and calls[-1]["style"].is_file()
    assert calls[-1]["style"].resolve().is_relative_to((tmp_path / "out" / "jobs").resolve())


@pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None, reason="needs gradio (pip install -e '.[studio]')"
)
def test_conditioning_controls_only_for_models_that_have_them(tiny_run, tmp_path):
    from perceiver_music.studio import build_app

    def visible(info) -> dict[str, bool]:
        app = build_app(Studio(info, tmp_path / "out", tiny_run / "run"))
        props = [c["props"] for c in app.config["components"]]
        return {
            p["elem_id"]: p.get("visible", True)
            for p in props
            if p.get("elem_id") in ("composer", "style", "upsample")
        }

    plain = model_info(tiny_run / "run")
    assert visible(plain) == {"composer": False, "style": False, "upsample": False}
    plain.labels, plain.style = ["Bach", "Chopin"], True
    assert visible(plain) == {"composer": True, "style": True, "upsample": False}
    plain.upsamplers = True  # an audio model with levels below the top: the page may skip them
    assert visible(plain)["upsample"] is True


def test_other_commands_do_not_import_gradio():
    probe = (
        "import sys\n"
        "from perceiver_music.cli import build_parser\n"
        "build_parser().parse_args(['studio', '--port', '1'])\n"
        "print('gradio' in sys.modules, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), check=True
    ).stdout
    assert out.split() == ["False", "False"]


def test_studio_without_a_checkpoint_is_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "perceiver_music", "studio", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    if importlib.util.find_spec("gradio") is None:
        assert done.returncode == 1 and "the studio needs Gradio" in done.stderr
    else:
        assert done.returncode == 2 and f"{tmp_path / 'nope'}: no checkpoint here" in done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- in the browser


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), GRADIO_ANALYTICS_ENABLED="False", **extra)
    env.pop("GRADIO_TEMP_DIR", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """The studio command on a free port with the tiny checkpoint, run from an empty folder with
    a temporary folder of its own, so the tests can see that it writes nowhere but --out."""
    root = tmp_path_factory.mktemp("studio")
    cwd, tmp, out = root / "cwd", root / "tmp", root / "out"
    cwd.mkdir()
    tmp.mkdir()
    port = _free_port()
    cmd = [sys.executable, "-m", "perceiver_music", "studio", "--ckpt", str(tiny_run / "run")]
    cmd += ["--port", str(port), "--out", str(out), "--device", "cpu"]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=_env(TMPDIR=str(tmp)))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            _fetch(url)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the studio did not serve {url}: {(root / 'server.log').read_text()}")
            time.sleep(0.25)
    yield {"url": url, "out": out, "cwd": cwd, "tmp": tmp, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1500",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # nothing but this machine
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def _wait(driver, what, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: what(d))


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _src(driver, selector) -> str | None:
    """The source of the first element matching `selector` that has one, if any."""
    return next((e.get_attribute("src") for e in _css(driver, selector) if e.get_attribute("src")), None)


# The player (wavesurfer) plays from an <audio> in a shadow root, its source a blob: URL of the
# file it fetched: read those bytes in the page, as the browser has them.
_AUDIO_BYTES = """
const [id, done] = arguments;
let src = null;
(function walk(node) {
  for (const e of node.querySelectorAll('*')) {
    if (e.tagName === 'AUDIO' && e.src) src = src || e.src;
    if (e.shadowRoot) walk(e.shadowRoot);
  }
})(document.getElementById(id));
if (!src) { done(null); return; }
fetch(src).then(r => r.arrayBuffer()).then(buffer => {
  const bytes = new Uint8Array(buffer);
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  done(btoa(text));
}, () => done(null));
"""


def _audio_bytes(driver, elem_id: str) -> bytes | None:
    encoded = driver.execute_async_script(_AUDIO_BYTES, elem_id)
    return base64.b64decode(encoded) if encoded else None


def _set_number(driver, elem_id: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    box = _css(driver, f"#{elem_id} input[type=number]")[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.ENTER)


def _upload(driver, path: Path) -> None:
    _css(driver, "#prompt input[type=file]")[0].send_keys(str(path))


def _clear_upload(driver) -> None:
    _css(driver, "#prompt button[aria-label=Clear]")[0].click()
    _wait(driver, lambda d: _css(d, "#prompt input[type=file]"))


def _generate_and_check(driver, variations: int, scratch: Path) -> list[float]:
    """Press Generate, wait for the results, and check each variation's piano roll and audio:
    a PNG, and a WAV as long as its MIDI's music plus at most the render's tail."""
    import soundfile
    from selenium.webdriver.common.by import By

    _css(driver, "#generate")[0].click()
    _wait(driver, lambda d: len(_css(d, "#job-status li")) >= variations)
    status = driver.find_element(By.ID, "job-status").text
    said = [float(s) for s in re.findall(r"sample_\d\d\.mid: ([\d.]+) s", status)]
    assert len(said) == variations, status
    lengths = []
    for i in range(variations):
        src = _wait(driver, lambda d, i=i: _src(d, f"#roll-{i} img"))
        assert _fetch(src).startswith(b"\x89PNG"), src
        wav = _wait(driver, lambda d, i=i: _audio_bytes(d, f"audio-{i}"))
        assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
        data, rate = soundfile.read(io.BytesIO(wav))
        links = [a.get_attribute("href") for a in _css(driver, f"#files-{i} a[download]")]
        assert [Path(u).suffix for u in links] == [".mid", ".wav"], links
        midi = scratch / f"download_{i}.mid"
        midi.write_bytes(_fetch(links[0]))
        music_end = float(roll_data(midi, sustain=True).notes[:, 1].max())
        assert abs(music_end - said[i]) <= 0.05 + 1e-9  # the page shows tenths
        assert music_end - 0.011 <= len(data) / rate <= music_end + TAIL_SECONDS + 0.011
        lengths.append(len(data) / rate)
    for i in range(variations, MAX_VARIATIONS):  # the slots not used stay hidden
        assert not any(e.is_displayed() for e in _css(driver, f"#roll-{i}, #audio-{i}"))
    return lengths


@needs_browser
def test_upload_generate_listen(server, browser, tmp_path):
    prompt = a_prompt(tmp_path)
    browser.get(server["url"])
    _wait(browser, lambda d: _css(d, "#prompt input[type=file]"))
    _upload(browser, prompt)
    _wait(browser, lambda d: prompt.name in _css(d, "#prompt-status")[0].text)
    assert " s, " in _css(browser, "#prompt-status")[0].text
    roll = _wait(browser, lambda d: _src(d, "#prompt-roll img"))
    assert _fetch(roll).startswith(b"\x89PNG")
    _set_number(browser, "keep", 4)
    _set_number(browser, "seconds", SECONDS)
    _set_number(browser, "num", 2)
    lengths = _generate_and_check(browser, 2, tmp_path)
    assert min(lengths) > 0
    browser.save_screenshot(str(tmp_path / "studio.png"))
    # The job's own folder holds its prompt (a safe name) and everything generated.
    (job,) = (server["out"] / "jobs").iterdir()
    names = sorted(p.name for p in job.iterdir())
    assert f"prompt_{safe_name(prompt.name)}" in names and "sample_01.wav" in names, names
    # Nothing written outside --out: not in the folder it ran from, not left in its temp folder.
    assert list(server["cwd"].iterdir()) == [] and list(server["tmp"].iterdir()) == []
    assert (server["out"] / ".gradio").is_dir()  # Gradio's uploads and served files


@needs_browser
def test_bad_upload_is_refused_and_the_server_keeps_serving(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    bad = tmp_path / "bad.mid"
    bad.write_text("these are words, not music\n")
    browser.get(server["url"])
    _wait(browser, lambda d: _css(d, "#prompt input[type=file]"))
    _upload(browser, bad)
    message = "bad.mid: not a MIDI file (starts with b'thes', expected b'MThd')"
    _wait(browser, lambda d: message in _css(d, "#prompt-status")[0].text)
    assert "Refused" in browser.find_element(By.ID, "prompt-status").text
    assert not _css(browser, "#prompt-roll img")
    # Generate with the refused file still there: an error in the page, nothing generated.
    jobs = server["out"] / "jobs"
    before = sorted(jobs.iterdir()) if jobs.is_dir() else []
    _css(browser, "#generate")[0].click()
    # (The upload's warning says the same: wait for the error toast of Generate itself.)
    _wait(
        browser,
        lambda d: any(t.text.startswith("Error") and message in t.text for t in _css(d, ".toast-body")),
    )
    assert (sorted(jobs.iterdir()) if jobs.is_dir() else []) == before
    browser.save_screenshot(str(tmp_path / "refused.png"))
    # The server still serves: a good prompt, then a generation.
    _clear_upload(browser)
    good = write_midi(tmp_path / "good.mid", [(i * 300, i * 300 + 250, 60 + i % 12, 80) for i in range(20)])
    _upload(browser, good)
    _wait(browser, lambda d: "good.mid" in _css(d, "#prompt-status")[0].text)
    _set_number(browser, "seconds", SECONDS)
    _set_number(browser, "num", 1)
    _generate_and_check(browser, 1, tmp_path)
    assert server["proc"].poll() is None
