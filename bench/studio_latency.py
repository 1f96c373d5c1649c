"""How long `perceiver-music studio` takes to serve its page, and from Generate to first audio.

What is measured
    startup      from starting `python -m perceiver_music studio` (the bundled model unless
                 --ckpt, a free port, a fresh --out folder) to the first HTTP 200 of its page;
    first audio  from pressing Generate (through Gradio's client, the call the page's button
                 makes: no prompt, --seconds of music, --num variations, seed 0) to the first
                 variation's WAV fetched from the server: model loading, generation, piano roll,
                 FluidSynth, and the transfer. The figures are one run each (--repeats for more,
                 the server restarted for each startup), median reported; JSON on stdout.

    nice -n 10 python bench/studio_latency.py --seconds 20 > studio_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(ckpt: str | None, out: Path) -> tuple[subprocess.Popen, str, float]:
    """The studio running, its address, and the seconds it took to serve its page."""
    port = free_port()
    cmd = [sys.executable, "-m", "perceiver_music", "studio", "--port", str(port), "--out", str(out)]
    cmd += ["--ckpt", ckpt] if ckpt else []
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), GRADIO_ANALYTICS_ENABLED="False")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
            return proc, url, time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the studio exited: {proc.stderr.read()}") from None
            time.sleep(0.05)


def first_audio(url: str, seconds: float, num: int, downloads: Path) -> tuple[float, float]:
    """Seconds from Generate to the first WAV fetched, and that WAV's length in seconds."""
    import soundfile
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=str(downloads))
    t0 = time.perf_counter()
    # The page's inputs: prompt, keep, length, variations, temperature, top-p, min-p, seed,
    # composer, style, guidance.
    values = client.predict(
        None, 60, seconds, num, 1.0, 1.0, 0.0, 0, "(none)", None, 1.0, api_name="/on_generate"
    )
    # The status, then each slot's piano roll, audio and files: the first audio is a .wav path.
    wav = next(v for v in values if isinstance(v, str) and v.endswith(".wav"))
    info = soundfile.info(wav)
    return time.perf_counter() - t0, info.duration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="a run or checkpoint folder (default: the bundled model)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--num", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    startups, firsts, lengths = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            proc, url, startup = start(args.ckpt, Path(tmp) / f"out{k}")
            try:
                first, length = first_audio(url, args.seconds, args.num, Path(tmp) / f"client{k}")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            startups.append(startup)
            firsts.append(first)
            lengths.append(length)
    print(
        json.dumps(
            {
                "model": args.ckpt or "bundled",
                "seconds": args.seconds,
                "num": args.num,
                "cpu_count": os.cpu_count(),
                "startup_s": round(statistics.median(startups), 2),
                "first_audio_s": round(statistics.median(firsts), 2),
                "wav_seconds": round(statistics.median(lengths), 2),
                "runs": {"startup_s": startups, "first_audio_s": firsts},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
