"""Load time of the review app's in-page viewer on a large CT (issue #23, point 1).

Builds a small review lake (synthesize -> crawl -> deid -> tensors -> infer, as the browser test
does), adds a CT of ``--shape`` (slices rows columns; int16 HU, as the tensors stage stores CT)
with a uint8 mask of a ball (``tests/review_factory.py``), starts the app on loopback, and opens
the finding page in headless Chromium (WebGL2 through SwiftShader, the CPU) ``--runs`` times.
Each run is timed from the navigation to the viewer's ``data-loaded`` (volume and mask loaded,
first frame drawn), with the viewer's own steps (``window.pacsflowViewer.timings``: module,
volume, mask, first frame; ms since the navigation) and the browser's resource timings of the
NIfTI requests. The server's side is timed apart: each NIfTI route over HTTP, cold (first
request) and warm.

    python bench/viewer_load.py                         # 300 x 512 x 512, 3 runs
    python bench/viewer_load.py --shape 120 256 256 --runs 2
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

KEY = b"v" * 32
USER, PASSWORD = "bench", "bench-password-for-loopback"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _lake(root: Path, shape: tuple[int, int, int]) -> tuple[Any, str]:
    from review_factory import add_big_ct, build_review_lake

    from pipeline.lake import read_table

    t0 = time.perf_counter()
    lake = build_review_lake(root, KEY, seed=6262)
    like = next(f for f in read_table(lake, "findings").to_pylist() if f.get("mask_path"))
    key = add_big_ct(lake, like, shape)
    print(f"lake built in {time.perf_counter() - t0:.1f} s", flush=True)
    return lake, key


def _serve(lake: Any) -> tuple[str, Any, threading.Thread]:
    import uvicorn

    from pipeline.config import load_config
    from pipeline.lake import AuditLog
    from pipeline.lake.keys import LakeKeys
    from pipeline.review.app import create_app, hash_password, server_config

    cfg = load_config(
        overrides={
            "lake": str(lake.root),
            "review": {"users": {USER: {"password_hash": hash_password(PASSWORD), "role": "lead"}}},
        },
        environ={},
    )
    port = _free_port()
    app = create_app(cfg, lake, audit=AuditLog(lake, LakeKeys(KEY), witness="none"), secret="b")
    srv = uvicorn.Server(server_config(app, host="127.0.0.1", port=port))
    thread = threading.Thread(target=srv.run, name="bench-uvicorn", daemon=True)
    thread.start()
    while not srv.started:
        if not thread.is_alive():
            raise SystemExit("the review app did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", srv, thread


def _server_side(base: str, key: str) -> dict[str, Any]:
    """Each NIfTI route over HTTP: seconds and bytes, cold then warm."""
    import re

    import requests

    out: dict[str, Any] = {}
    with requests.Session() as s:
        page = s.get(base + "/login", timeout=30).text
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        data = {"username": USER, "password": PASSWORD}
        if token:
            data["csrf"] = token.group(1)
        s.post(base + "/login", data=data, timeout=60)
        for route in ("volume.nii", "mask.nii"):
            for attempt in ("cold", "warm"):
                t0 = time.perf_counter()
                r = s.get(f"{base}/{route}", params={"key": key}, timeout=300)
                r.raise_for_status()
                out[f"{route} {attempt}"] = {
                    "s": round(time.perf_counter() - t0, 3),
                    "MB": round(len(r.content) / 1e6, 1),
                    "encoding": r.headers.get("content-encoding", "identity"),
                }
    return out


_STATE = """
const v = window.pacsflowViewer, el = document.getElementById('nv');
if (!v || !(v.ready || v.error)) return null;
const res = performance.getEntriesByType('resource')
  .filter((e) => /nii|niivue/.test(e.name))
  .map((e) => ({name: e.name.split('?')[0].split('/').pop(), start: Math.round(e.startTime),
                end: Math.round(e.responseEnd), kB: Math.round(e.encodedBodySize / 1024)}));
const n = performance.getEntriesByType('navigation')[0];
const page = {response: Math.round(n.responseStart), html: Math.round(n.responseEnd),
              interactive: Math.round(n.domInteractive)};
return {error: v.error, loaded: el.dataset.loaded || null, preview: el.dataset.preview || null,
        first: el.dataset.first || null, renderer: v.renderer, why: v.rendererWhy,
        timings: v.timings, page: page,
        resources: res};
"""


def _top_functions(profile: dict[str, Any], n: int = 25) -> list[tuple[str, float]]:
    """The ``n`` functions of a CDP CPU profile with the most self time (ms)."""
    nodes = {node["id"]: node for node in profile["nodes"]}
    deltas = profile.get("timeDeltas") or []
    self_ms: dict[str, float] = {}
    for sample, delta in zip(profile.get("samples") or [], [*deltas[1:], 0], strict=False):
        frame = nodes[sample]["callFrame"]
        name = f"{frame['functionName'] or '(anonymous)'} {frame['url'].split('/')[-1]}"
        name += f":{frame['lineNumber'] + 1}"
        self_ms[name] = self_ms.get(name, 0.0) + delta / 1000
    return sorted(self_ms.items(), key=lambda kv: -kv[1])[:n]


def _browser_runs(
    base: str, key: str, runs: int, wait_s: float, profile: bool = False, viewer: str = ""
) -> list[dict[str, Any]]:
    from review_factory import headless_chromium
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    out = []
    with headless_chromium(webgl=True) as driver:
        driver.set_script_timeout(wait_s)
        driver.get(base + "/login")
        driver.find_element(By.ID, "username").send_keys(USER)
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        submit = driver.find_element(By.ID, "login-submit")
        submit.click()
        WebDriverWait(driver, 60).until(expected_conditions.staleness_of(submit))
        for run in range(runs):
            if profile:
                driver.execute_cdp_cmd("Profiler.enable", {})
                driver.execute_cdp_cmd("Profiler.setSamplingInterval", {"interval": 1000})
                driver.execute_cdp_cmd("Profiler.start", {})
            before = driver.execute_script("return performance.timeOrigin")
            t0 = time.perf_counter()
            # navigate without waiting for the load event (a renderer busy in SwiftShader
            # would time the command out), then wait for the new page's viewer
            driver.execute_script(
                "location.href = arguments[0]",
                f"{base}/finding?key={quote(key, safe='')}"
                + (f"&viewer={viewer}" if viewer else ""),
            )
            WebDriverWait(
                driver, wait_s, poll_frequency=0.05, ignored_exceptions=(TimeoutException,)
            ).until(lambda d, b=before: d.execute_script("return performance.timeOrigin") != b)
            # a renderer busy for over a minute (SwiftShader) makes a poll time out: poll again
            state = WebDriverWait(
                driver, wait_s, poll_frequency=0.05, ignored_exceptions=(TimeoutException,)
            ).until(lambda d: d.execute_script(_STATE))
            state["wall_s"] = round(time.perf_counter() - t0, 2)
            if profile:
                top = _top_functions(driver.execute_cdp_cmd("Profiler.stop", {})["profile"])
                for name, ms in top:
                    print(f"  {ms:9.0f} ms  {name}")
            state["run"] = run + 1
            print(json.dumps(state), flush=True)
            if state["error"]:
                raise SystemExit(f"the viewer failed: {state['error']}")
            out.append(state)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--wait", type=float, default=600.0, help="seconds a run may take")
    ap.add_argument("--profile", action="store_true", help="print the JS functions' self time")
    ap.add_argument(
        "--viewer",
        choices=("niivue", "slices"),
        help="force a renderer (default: the page's own choice: slices on CPU WebGL)",
    )
    args = ap.parse_args(argv)
    shape = (int(args.shape[0]), int(args.shape[1]), int(args.shape[2]))
    with tempfile.TemporaryDirectory(prefix="pacsflow-viewer-bench-") as tmp:
        lake, key = _lake(Path(tmp), shape)
        base, srv, thread = _serve(lake)
        try:
            server = _server_side(base, key)
            print("server:", json.dumps(server), flush=True)
            runs = _browser_runs(base, key, args.runs, args.wait, args.profile, args.viewer or "")
        finally:
            srv.should_exit = True
            thread.join(timeout=30)
    steps = (
        "script",
        "probe",
        "module",
        "attached",
        "preview-volume",
        "preview",
        "planes",
        "first",
        "volume",
        "mask",
        "frame",
    )
    print(f"\nshape {shape}: ms since navigation (Chromium headless, SwiftShader)")
    print("| run | " + " | ".join(steps) + " | wall s |")
    print("|---" * (len(steps) + 2) + "|")
    for r in runs:
        t = r["timings"]
        cells = " | ".join(str(t.get(s, "")) for s in steps)
        print(f"| {r['run']} | {cells} | {r['wall_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
