"""The Ray Serve app (serving/) on a real local Ray cluster (the session's ``ray_head``) with a tiny
checkpoint: the HTTP API end to end (T2V, I2V, seeds, cancel, auth, malformed requests, a bounded load
test) and the page in headless Chromium. Sizes are tiny (4-8 frames, 32-64 px, 2 steps) and the
weights random: the videos are not meant to look like anything.

The request bodies and the tables of malformed requests are in tests/helpers/serving_requests.py; the
request parsing and the settings on their own, without Ray, in tests/test_serving_requests.py."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from helpers.checkpoints import tiny_checkpoint, tiny_schedule
from helpers.ffprobe import mp4_info
from helpers.ray_cluster import free_port
from helpers.serving_requests import (AUTH, GOOD, KEY, LIMITS, MALFORMED, NAMED, OTHER, SMALL, b64,
                                      nested_multipart, png_bytes)
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
APP = "fdreamer-test"


@pytest.fixture(scope="module")
def checkpoint(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve-ckpt") / "tiny", tiny_dir,
                           schedule=tiny_schedule(prediction_type="v_prediction"))


@pytest.fixture(scope="module")
def server(ray_head: dict[str, str], checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The app on ``ray_head``: Serve's HTTP proxy on a free loopback port; yields its base URL."""
    import ray
    from ray import serve

    from serving.app import bind_app

    store = tmp_path_factory.mktemp("serve-store")
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(address=ray_head["address"], namespace="fdreamer-serving-tests", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 180})
    args = {"checkpoint": str(checkpoint), "store": str(store), "max_jobs_in_flight": 10,
            "progress_interval_s": 0.1, "limits": LIMITS}
    t0 = time.monotonic()
    serve.run(bind_app(args, actor_env={"FDREAMER_API_KEY": KEY, "OMP_NUM_THREADS": "1"}), name=APP,
              route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url)
    print(f"serve app up in {time.monotonic() - t0:.1f} s at {url}")
    try:
        yield {"url": url, "store": store, "checkpoint": checkpoint, "dashboard": ray_head["dashboard"]}
    finally:
        serve.delete(APP)
        serve.shutdown()
        if owns_ray:
            ray.shutdown()


def _wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError("the serve app did not become ready")


def post(url: str, body: dict | None = None, *, wait: bool = False, headers: dict | None = None,
         **kw) -> requests.Response:
    return requests.post(f"{url}/v1/videos", params={"wait": "true"} if wait else None,
                         json=body, headers=AUTH if headers is None else headers, timeout=180, **kw)


def wait_status(url: str, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = requests.get(f"{url}/v1/videos/{job_id}", headers=AUTH, timeout=30).json()
        if rec["status"] in statuses:
            return rec
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {rec['status']}")


def decode_frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)


def content(url: str, job_id: str, tmp_path: Path) -> Path:
    r = requests.get(f"{url}/v1/videos/{job_id}/content", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{job_id}.mp4"
    path.write_bytes(r.content)
    return path


# ---------------------------------------------------------------------------------- the app and its config


def test_config_yaml_is_a_valid_serve_config_and_builds(checkpoint: Path, tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serving.app import build_app

    raw = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.request_timeout_s > 0
    app_cfg = raw["applications"][0]
    assert app_cfg["import_path"] == "serving.app:build_app"
    deps = {d["name"]: d for d in app_cfg["deployments"]}
    assert set(deps) == {"Api", "VideoModel", "TextToImage"}
    for name in ("VideoModel", "TextToImage"):
        assert "autoscaling_config" in deps[name] and "max_queued_requests" in deps[name]
        assert "num_gpus" in deps[name]["ray_actor_options"] and deps[name]["graceful_shutdown_timeout_s"] > 0
    args = {**app_cfg["args"], "checkpoint": str(checkpoint), "store": str(tmp_path / "store")}
    # binds without a cluster, through the same check `serve run/deploy` applies to the import path;
    # the settings' own checks (unknown keys, wrong types) are in tests/test_serving_requests.py
    call_user_app_builder_with_args_if_necessary(build_app, args)


def test_healthz_open_auth_required(server: dict) -> None:
    url = server["url"]
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{url}/", timeout=10).status_code == 200
    assert requests.get(f"{url}/static/app.js", timeout=10).status_code == 200
    assert requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]["/v1/videos"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", "/v1/limits")):
            r = requests.request(method, f"{url}{path}", json={"prompt": "x"}, headers=headers, timeout=10)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error_type"] == "unauthorized"
    assert requests.get(f"{url}/v1/limits", headers=AUTH, timeout=30).json()["limits"]["size_multiple_t2v"] == 8


# ---------------------------------------------------------------------------------- T2V / I2V / seeds


def test_t2v_and_i2v_produce_the_requested_mp4s(server: dict, tmp_path: Path) -> None:
    url = server["url"]
    # text-to-video, asynchronous: 202, poll, content
    r = post(url, {"prompt": "a red ball bounces", "num_frames": 6, "height": 48, "width": 40,
                   "num_inference_steps": 2, "seed": 3, "fps": 5})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and r.headers["location"] == f"/v1/videos/{job['id']}"
    rec = wait_status(url, job["id"])
    assert rec["status"] == "succeeded", rec
    assert rec["mode"] == "t2v" and rec["seed"] == 3 and rec["timings"]["total"] > 0 and rec["timings"]["t2i"] > 0
    assert mp4_info(content(url, job["id"], tmp_path)) == {"codec": "h264", "frames": 6, "width": 40, "height": 48}
    # image-to-video from a JSON base64 image, synchronous
    r = post(url, {"prompt": "it moves left", "image": b64(png_bytes()), "num_frames": 5, "height": 36,
                   "width": 44, "num_inference_steps": 2, "seed": 1}, wait=True)
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["status"] == "succeeded" and rec["mode"] == "i2v" and rec["content_url"]
    assert mp4_info(content(url, rec["id"], tmp_path)) == {"codec": "h264", "frames": 5, "width": 44, "height": 36}
    # image-to-video from a multipart upload
    files = {"image": ("first.png", png_bytes(seed=2), "image/png")}
    data = {"prompt": "it moves right", "num_frames": "4", "height": "32", "width": "32", "num_inference_steps": "2",
            "seed": "9"}
    r = requests.post(f"{url}/v1/videos?wait=true", data=data, files=files, headers=AUTH, timeout=180)
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "i2v" and r.json()["seed"] == 9
    assert mp4_info(content(url, r.json()["id"], tmp_path))["frames"] == 4
    # the recent list has them, newest first
    recent = requests.get(f"{url}/v1/videos?limit=3", headers=AUTH, timeout=30).json()["data"]
    assert recent[0]["id"] == r.json()["id"] and len(recent) == 3


def test_same_seed_same_video_and_equal_to_the_pipeline(server: dict, tmp_path: Path) -> None:
    from fdreamer.inference.pipeline import VideoPipeline, VideoRequest, save_video

    url = server["url"]
    body = {"prompt": "a blue square slides", "seed": 1234, "guidance_scale": 3.0, **SMALL}
    a, b, b2 = (post(url, body, wait=True).json() for _ in range(3))
    c = post(url, {**body, "seed": 1235}, wait=True).json()
    va, vb, vb2, vc = (content(url, r["id"], tmp_path).read_bytes() for r in (a, b, b2, c))
    assert va == vb == vb2 and va != vc
    # the served T2V (T2I deployment, then I2V deployment) equals one direct pipeline call (run, like
    # the replicas, on one torch thread: other thread counts reduce in another order)
    import torch

    pipe = VideoPipeline.from_checkpoint(server["checkpoint"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = pipe(VideoRequest(**body, fps=6.0))
    finally:
        torch.set_num_threads(threads)
    # frames, not bytes: this process's MKL was loaded without MKL_CBWR (see serving/deployments.py)
    served = decode_frames(tmp_path / f"{a['id']}.mp4")
    mine = decode_frames(save_video(direct, tmp_path / "direct.mp4"))
    assert served.shape == mine.shape and np.abs(served - mine).mean() < 1.0


# ---------------------------------------------------------------------------------- cancel, overload


def test_cancel_and_overload(server: dict) -> None:
    url = server["url"]
    long = {"prompt": "a long one", "num_frames": 8, "height": 64, "width": 64, "num_inference_steps": 200}
    job = post(url, long).json()
    rec = wait_status(url, job["id"], statuses=("running",), timeout=60)
    deadline = time.monotonic() + 60
    while rec["progress"]["step"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        rec = requests.get(f"{url}/v1/videos/{job['id']}", headers=AUTH, timeout=30).json()
    assert rec["progress"]["step"] >= 1 and rec["progress"]["total"] == 200
    r = requests.delete(f"{url}/v1/videos/{job['id']}", headers=AUTH, timeout=30)
    assert r.status_code == 202 and r.json()["cancel_requested"]
    t0 = time.monotonic()
    rec = wait_status(url, job["id"], timeout=30)
    assert rec["status"] == "cancelled", rec
    assert rec["progress"]["step"] < 200
    print(f"cancelled at {rec['progress']} in {time.monotonic() - t0:.2f} s")
    assert requests.get(f"{url}/v1/videos/{job['id']}/content", headers=AUTH, timeout=30).status_code == 409
    # overload: more than max_jobs_in_flight (10) queued + running -> 429 with Retry-After
    ids = []
    for _ in range(10):
        r = post(url, long)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    r = post(url, long)
    assert r.status_code == 429 and r.json()["error_type"] == "too_many_jobs" and int(r.headers["retry-after"]) > 0
    for i in ids:
        assert requests.delete(f"{url}/v1/videos/{i}", headers=AUTH, timeout=30).status_code in (200, 202)
    assert all(wait_status(url, i, timeout=60)["status"] == "cancelled" for i in ids)
    deadline = time.monotonic() + 30  # the ingress sees them finish
    while post(url, {"prompt": "after", **SMALL}, wait=True).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.5)


# ---------------------------------------------------------------------------------- malformed requests


def api_replicas(dashboard: str) -> set[str]:
    """The actor ids of the app's live ``Api`` replicas."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=dashboard, filters=[
        ("class_name", "=", f"ServeReplica:{APP}:Api"), ("state", "=", "ALIVE")])}


def test_malformed_requests_get_4xx_then_a_good_request_succeeds(server: dict) -> None:
    url = server["url"]
    assert len(MALFORMED) + len(OTHER) >= 20
    replicas = api_replicas(server["dashboard"])
    assert len(replicas) == 1
    failures = []
    for name, kwargs, status, error_type in MALFORMED:
        if kwargs == "nested":
            ctype, data = nested_multipart(3000)
            kwargs = {"data": data, "headers": {**AUTH, "Content-Type": ctype}}
        kwargs = {"headers": AUTH, **kwargs}
        r = requests.post(f"{url}/v1/videos", timeout=60, **kwargs)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        ok = (r.status_code == status and set(body) == {"error", "error_type"}
              and (error_type is None or body["error_type"] == error_type) and "Traceback" not in r.text
              and body["error"].startswith(NAMED.get(name, "")))
        if not ok:
            failures.append((name, status, error_type, r.status_code, r.text[:300]))
    for name, method, path, status in OTHER:
        r = requests.request(method, f"{url}{path}", headers=AUTH, timeout=60)
        if r.status_code != status or set(r.json()) != {"error", "error_type"}:
            failures.append((name, status, None, r.status_code, r.text[:300]))
    assert not failures, "\n".join(map(str, failures))
    r = post(url, {**GOOD, "seed": 5}, wait=True)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    assert api_replicas(server["dashboard"]) == replicas  # the same replica served them all


# ---------------------------------------------------------------------------------- load


def test_bounded_load_no_5xx_all_complete(server: dict) -> None:
    url = server["url"]
    n, concurrency = 24, 8

    def one(i: int) -> tuple[int, float, str]:
        t0 = time.perf_counter()
        r = post(url, {"prompt": f"load {i}", "seed": i, **SMALL}, wait=True)
        status = r.json().get("status", "") if r.status_code == 200 else r.text[:200]
        return r.status_code, time.perf_counter() - t0, status

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    codes = [c for c, _, _ in results]
    lat = np.array([t for _, t, _ in results])
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    print(f"load: {n} requests at concurrency {concurrency} in {wall:.1f} s ({n / wall:.2f} req/s); latency "
          f"p50 {p50:.2f} s, p90 {p90:.2f} s, p99 {p99:.2f} s, max {lat.max():.2f} s; codes {sorted(set(codes))}")
    assert not [c for c in codes if c >= 500], results
    assert all(c == 200 and s == "succeeded" for c, _, s in results), results


# ---------------------------------------------------------------------------------- the page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium + chromium-driver (.ci/run)")
def test_page_in_headless_chromium(server: dict, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--autoplay-policy=no-user-gesture-required", "--window-size=900,1100", "--mute-audio"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(server["url"] + "/")
        driver.find_element(By.ID, "apiKey").send_keys(KEY)
        driver.find_element(By.ID, "prompt").send_keys("a green ball rolls")
        driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        for name, value in (("num_frames", 4), ("height", 32), ("width", 32), ("seed", 7)):
            driver.find_element(By.NAME, name).send_keys(str(value))
        steps = driver.find_element(By.NAME, "num_inference_steps")
        steps.clear()
        steps.send_keys("2")
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 90, poll_frequency=0.25).until(
            lambda d: d.execute_script("const v = document.getElementById('video');"
                                       "return v.src !== '' && v.readyState >= 2;"))
        info = driver.execute_script("const v = document.getElementById('video');"
                                     "return [v.videoWidth, v.videoHeight, v.duration, v.src];")
        assert info[0] == 32 and info[1] == 32 and info[2] > 0 and info[3].startswith("blob:")
        assert "succeeded" in driver.find_element(By.ID, "status").text
        WebDriverWait(driver, 10).until(lambda d: "succeeded" in d.find_element(By.ID, "recent").text)
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        assert shot.is_file() and shot.stat().st_size > 5000
        with Image.open(shot) as im:
            assert im.size[0] >= 600 and len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank page
        print(f"screenshot: {shot}")
    finally:
        driver.quit()
