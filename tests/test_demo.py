"""cfgbasin-demo: metric sanity, the pixel alignment check, the shipped toy model, a reduced run."""

import numpy as np
import pytest

from cfgbasin_jax.apps import demo
from cfgbasin_jax.toy import data as toy
from cfgbasin_jax.toy import scoring


@pytest.fixture(scope="module")
def dataset():
    return toy.make_dataset()


def test_memorization_metric_sanity(dataset):
    train = dataset.images
    picks = [0, 5, 100, 2000]
    sims, idx = scoring.nearest_training(train[picks], train)
    np.testing.assert_allclose(sims, 1.0, atol=1e-5)
    np.testing.assert_array_equal(idx, picks)
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    noise_sims, _ = scoring.nearest_training(noise, train)
    assert noise_sims.max() < 0.35
    threshold = scoring.copy_threshold(dataset)
    assert noise_sims.max() < threshold < 0.99
    # a caption-satisfying non-copy of a duplicated image mostly scores below the threshold
    variants = scoring.caption_variants(dataset.objects[0], 200, seed=99)
    below = scoring.similarity(variants, np.repeat(train[:1], 200, 0)) < threshold
    assert below.mean() > 0.9


def test_alignment_reads_the_caption_from_pixels(dataset):
    scores = [scoring.alignment(img, objs) for img, objs in zip(dataset.images[:300], dataset.objects[:300])]
    assert np.mean(scores) > 0.97
    blank = np.zeros((16, 16, 3), np.uint8)
    assert scoring.alignment(blank, dataset.objects[10]) == 0.0
    obj = toy.ShapeSpec("red", "circle", "top left", 7)
    img = toy.render([obj], "black")
    assert scoring.object_checks(img, obj) == (True, True)
    assert scoring.object_checks(img, toy.ShapeSpec("blue", "circle", "top left", 7))[0] is False
    assert scoring.object_checks(img, toy.ShapeSpec("red", "circle", "bottom right", 7))[0] is False
    assert scoring.object_checks(img, toy.ShapeSpec("red", "cross", "top left", 7)) == (True, False)


def test_missing_weights_fall_back_with_a_notice(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SHIPPED_MODEL", tmp_path / "nothing")
    lines = []
    pipe, desc, is_toy = demo.load_demo_pipeline(None, log=lines.append)
    assert not is_toy and "random" in desc
    assert any("NOTICE" in line and "random_components" in line for line in lines)
    with pytest.raises(ValueError, match="--model"):
        demo.load_demo_pipeline(str(tmp_path), log=lines.append)


def test_shipped_model_loads_and_reduced_demo_writes_the_table(tmp_path, dataset):
    pipe, desc, is_toy = demo.load_demo_pipeline(None)
    assert is_toy, "the shipped toy weights (cfgbasin_jax/data/toy) are missing"
    assert pipe.vae is None and pipe.default_size == 16
    cfg = demo.DemoConfig(outdir=str(tmp_path / "out"), num_mem_prompts=8, num_plain_prompts=1,
                          samples_per_prompt=1, num_inference_steps=10, num_calibration_prompts=8)
    result = demo.run_demo(cfg, log=lambda *_: None)
    report = (tmp_path / "out" / "report.md").read_text()
    assert demo.format_table(result["rows"]) in report
    for name in demo.DEFAULT_METHODS:
        assert f"| {name} |" in report
        assert (tmp_path / "out" / demo.grid_file(name)).is_file()
    assert "gated STP" in demo.DEFAULT_METHODS and "gated OG+STP" in demo.DEFAULT_METHODS
    # detect, then mitigate: flagged samples are the mitigation's images, the others CFG's (same seeds)
    runs = result["runs"]
    for name, mitigation in (("gated STP", "STP"), ("gated OG+STP", "OG+STP")):
        res = runs[name]["result"]
        flagged = res.gate_flagged
        for b in range(len(flagged)):
            want = runs[mitigation if flagged[b] else "CFG"]["result"].images[b]
            np.testing.assert_array_equal(res.images[b], want)
        assert res.gate_score[flagged].min() > result["gate"]["threshold"] >= res.gate_score[~flagged].max()
    assert 0.5 < result["gate"]["auc"] <= 1.0 and "Detection AUC" in report
    assert (tmp_path / "out" / "noise_diff.png").is_file()
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["CFG"]["unet_evals_per_sample"] == 20.0  # both halves at each of 10 steps
    assert rows["OG+DTP"]["unet_evals_per_sample"] == 40.0  # the exact rule's two passes
    assert rows["STP"]["unet_evals_per_sample"] < 20.0  # only the unconditional half before t
    # the shipped model memorized: constant CFG reproduces the duplicated images' objects exactly
    # (measured: 8/8 at seeds 0 and 1) and is close to the whole duplicate (similarity ~0.9)
    assert rows["CFG"]["layout_copy_rate_mem"] >= 0.75
    assert rows["CFG"]["sim_own_mem"] > 0.7
