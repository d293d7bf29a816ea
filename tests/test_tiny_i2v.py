"""The committed tiny image-to-video model (``fdreamer/toy/assets/tiny_i2v``): the model follows its caption.

Trained by this platform from the committed tiny T2I (``training/configs/tiny_i2v.yaml``, then ``fdreamer
export-video-model``; the commands, steps, wall time and metrics are in its ``training.json``) and installed
by ``fdreamer make-tiny-models`` as ``i2v/``. Evaluation only (no training): the test that fails when the
model stops learning, or when inference stops reading what training wrote (the motion caption for T5, the
concatenated first frame, the schedule).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fdreamer.toy.tiny_models import TINY_I2V_ASSET_DIR, make_tiny_models


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny models with the committed T2I and I2V, and the held-out clips of the 320-clip sample set
    (never trained on: the I2V's training clips are the ``train`` split)."""
    from fdreamer.toy.sample_data import write_sample_data

    root = tmp_path_factory.mktemp("i2v")
    manifest = make_tiny_models(root / "models")
    assert manifest["i2v_trained"] is True and manifest["unet_trained"] is True
    write_sample_data(root / "heldout", 320, seed=0, split="heldout")
    return {"models": root / "models", "heldout": root / "heldout", "root": root}


@pytest.mark.slow
def test_committed_tiny_i2v_moves_the_subject_the_captions_way(installed: dict[str, Path]) -> None:
    """Image-to-video on 16 of the held-out clips (their first frame + motion caption, 10 DDIM steps to keep CI
    short, the evaluation's default guidance): the subject's motion class is the caption's in >= 50% (chance
    1/8; measured 0.75 on these 16; on all 32: 0.78 at 10 steps, 0.84 at 20, training.json) and frame 0 keeps
    the conditioning frame (PSNR >= 26 dB; measured 29.6 on these 16, 28.8 on 32)."""
    from fdreamer.eval.evaluate import EvalSettings, evaluate

    trained = json.loads((TINY_I2V_ASSET_DIR / "training.json").read_text())
    assert trained["eval_i2v"]["direction_accuracy"] >= 0.6
    res = evaluate(installed["models"] / "i2v", installed["heldout"], modes=("i2v",), num=16,
                   settings=EvalSettings(steps=10), log=False, out=installed["root"] / "eval_i2v", save_videos=0)
    s = res.summary["i2v"]
    assert s["n"] == 16
    assert s["direction_accuracy"] >= 0.5, s
    assert s["psnr0"] >= 26.0, s
    assert res.summary["real"]["direction_accuracy"] >= 0.9  # the classifier reads the real clips


@pytest.mark.slow
def test_text_to_video_through_the_committed_t2i_draws_the_prompts_colour(installed: dict[str, Path]) -> None:
    """Text-to-video the paper's way: the committed T2I draws frame 0 from the full caption, the I2V animates
    it (10 DDIM steps each). The subject of the video has the caption's colour in >= 80% of 6 held-out
    captions (measured 10/10 on the first 10)."""
    from fdreamer.eval.evaluate import EvalSettings, evaluate

    res = evaluate(installed["models"] / "i2v", installed["heldout"], modes=("t2v",), num=6,
                   settings=EvalSettings(steps=10, t2i_path=str(installed["models"])), log=False,
                   out=installed["root"] / "eval_t2v", save_videos=0)
    s = res.summary["t2v"]
    assert s["n"] == 6 and s["colour_accuracy"] >= 0.8, s
