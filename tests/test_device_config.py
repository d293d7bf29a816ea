"""Device choice against the GPUs a process was given (serving replicas, evaluation actors), and the batch
copies (``fdreamer.device``): refused in one line at config load, before anything starts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_device_and_num_gpus_must_agree() -> None:
    from fdreamer.device import DeviceConfigError, check_device_matches_gpus, device_for_gpus

    assert device_for_gpus("auto", 0, "x") == "cpu" and device_for_gpus("auto", 0.25, "x") == "cuda"
    assert device_for_gpus("cuda:0", 1, "x") == "cuda:0" and device_for_gpus("cpu", 0, "x") == "cpu"
    for device, gpus, needle in (("cuda", 0, "num_gpus 0"), ("cpu", 0.5, "would idle"), ("gpu", 1, "must be")):
        with pytest.raises(DeviceConfigError, match=needle) as info:
            check_device_matches_gpus(device, gpus, "deployment X")
        assert str(info.value).startswith("deployment X: ") and "\n" not in str(info.value)


def _serve_config(device: str, video_gpus: float | None, t2i_gpus: float | None = 0) -> dict:
    cfg = copy.deepcopy(yaml.safe_load((REPO / "serving/config.yaml").read_text()))
    app = cfg["applications"][0]
    app["args"]["device"] = device
    for dep in app["deployments"]:
        gpus = {"VideoModel": video_gpus, "TextToImage": t2i_gpus}.get(dep["name"])
        if dep["name"] in ("VideoModel", "TextToImage"):
            if gpus is None:
                dep["ray_actor_options"].pop("num_gpus", None)  # the deployment's default (0)
            else:
                dep["ray_actor_options"]["num_gpus"] = gpus
    return cfg


def test_serve_config_refuses_a_device_that_contradicts_num_gpus(tmp_path: Path, capsys) -> None:
    from fdreamer.device import DeviceConfigError
    from serving.settings import check_serve_config, load_serve_config, main

    load_serve_config(REPO / "serving/config.yaml")  # the shipped file: device auto, num_gpus 0
    check_serve_config(_serve_config("auto", 0.5, 0.25))
    check_serve_config(_serve_config("cuda", 0.5, 0.25))
    with pytest.raises(DeviceConfigError, match=r"application 'fdreamer', deployment VideoModel: device 'cuda' but "
                                                r"num_gpus 0\.0"):
        check_serve_config(_serve_config("cuda", None))
    with pytest.raises(DeviceConfigError, match="deployment TextToImage: device 'cuda' but num_gpus 0"):
        check_serve_config(_serve_config("cuda", 1, 0))
    with pytest.raises(DeviceConfigError, match="deployment VideoModel: device 'cpu' but num_gpus 0.5"):
        check_serve_config(_serve_config("cpu", 0.5))
    with pytest.raises(ValueError, match="`dtype` must be"):
        check_serve_config({"applications": [{"import_path": "serving.app:build_app", "args": {"dtype": "fp8"}}]})
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump(_serve_config("cuda", 0)))
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "deployment VideoModel: device 'cuda'" in err


def test_evaluate_job_refuses_cuda_without_gpus_before_ray(capsys) -> None:
    from training.evaluate_job import main

    assert main(["--checkpoint", "/nonexistent", "--device", "cuda", "--num_gpus", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate_job: GenerateAndScore actors: device 'cuda' but num_gpus 0") and len(err.splitlines()) == 1


def test_to_device_keeps_the_batch_and_inference_dtype() -> None:
    from fdreamer.data.batching import JointBatch
    from fdreamer.device import inference_dtype, pin, to_device
    from helpers import resume as R

    cfg = R.train_config("tiny")
    video = R.synthetic_batch(cfg, 0)
    image = type(video)(video.latents[:, :, :1], video.cond, None, video.clip_ids, None, True)
    joint = JointBatch(video, image)
    moved = to_device(pin(joint), "cpu")  # no CUDA here: pin is a no-op, the copy a plain .to
    assert isinstance(moved, JointBatch) and moved.image.is_image and moved.video.clip_ids == video.clip_ids
    assert torch.equal(moved.video.cond.t5_mask, video.cond.t5_mask) and moved.video.flow is None
    assert inference_dtype("cuda", None) == torch.bfloat16 and inference_dtype("cpu", None) is None
    assert inference_dtype("cuda", torch.float16) == torch.float16
