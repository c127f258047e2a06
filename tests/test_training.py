"""Training library: the recipe's sampling, folder errors, a short run lowers the loss, resume."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from cfgbasin_jax import training as T
from cfgbasin_jax.models.components import load_pixel_components
from cfgbasin_jax.toy import data as toy
from cfgbasin_jax.toy import model as toy_model

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"],
    "block_out_channels": [32],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
}


def tiny_configs():
    configs = toy_model.toy_model_configs()
    configs["unet"] = dict(TINY_UNET)
    configs["text_encoder"] = {**configs["text_encoder"], "hidden_size": 32, "intermediate_size": 32,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 32}
    return configs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    ds = toy.make_dataset(num_plain=24, num_memorized=2, seed=1)
    return toy.write_folder(ds, tmp_path_factory.mktemp("toy") / "data")


def test_epoch_indices_follow_the_recipe():
    idx, mem = T.epoch_indices(100, end=4, repeats=5, non_mem_ratio=3)
    assert idx.size == 4 * 5 + 12 and mem.sum() == 20
    assert sorted(set(idx[mem].tolist())) == [0, 1, 2, 3]
    assert sorted(idx[~mem].tolist()) == list(range(4, 16))
    idx_all, _ = T.epoch_indices(100, end=4, repeats=5, non_mem_ratio=None)
    assert idx_all.size == 20 + 96
    with pytest.raises(T.TrainingError, match="--end 200"):
        T.epoch_indices(100, end=200, repeats=1, non_mem_ratio=None)


def test_batches_depend_only_on_seed_and_step():
    idx, _ = T.epoch_indices(50, end=2, repeats=10, non_mem_ratio=None)
    a = [T.batch_indices(idx, 16, seed=0, step=s) for s in range(10)]
    b = [T.batch_indices(idx, 16, seed=0, step=s) for s in reversed(range(10))][::-1]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    share = np.mean(np.concatenate(a) < 2)
    assert 0.15 < share < 0.45  # 20 of 68 epoch entries are memorized copies
    assert not np.array_equal(a[0], T.batch_indices(idx, 16, seed=1, step=0))


def test_folder_errors_name_the_files(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "a.png")
    (d / "a.txt").write_text("a red square at the top")
    (d / "b.txt").write_text("orphan caption")
    with pytest.raises(T.TrainingError, match="b.txt"):
        T.read_folder(d)
    (d / "c.png").write_bytes(b"not a png")
    (d / "c.txt").write_text("broken image")
    with pytest.raises(T.TrainingError, match="b.txt"):
        T.read_folder(d)
    (d / "b.txt").unlink()
    with pytest.raises(T.TrainingError, match="c.png"):
        T.read_folder(d)
    ds = T.read_folder(d, skip_bad=True)
    assert ds.names == ["a"] and ds.skipped == 1
    with pytest.raises(T.TrainingError, match="not a directory"):
        T.read_folder(tmp_path / "missing")


def test_config_errors_name_the_flag():
    with pytest.raises(T.TrainingError, match="--cond_dropout"):
        T.TrainConfig(data="x", output_dir="y", cond_dropout=1.5).check()
    with pytest.raises(T.TrainingError, match="--repeats"):
        T.TrainConfig(data="x", output_dir="y", repeats=0).check()


def test_short_run_lowers_loss_resumes_and_refuses_other_config(tmp_path, data_dir):
    comps = toy_model.init_toy_components(seed=0, configs=tiny_configs())
    common = dict(data=str(data_dir), output_dir=str(tmp_path / "run"), end=2, repeats=6, train_batch_size=8,
                  learning_rate=3e-3, lr_warmup_steps=2, train_text_encoder=True, checkpointing_steps=10,
                  eval_steps=0, log_steps=5, resolution=8, save_dtype="float32", progress=False, seed=0)
    steps = T.StepCache()  # the caller's compiled step, shared by the run and its resume
    first = T.train(T.TrainConfig(max_train_steps=10, **common), components=comps, steps=steps)
    assert first["steps"] == 10
    logs = []
    second = T.train(T.TrainConfig(max_train_steps=30, **common), components=comps, log=logs.append, steps=steps)
    assert second["steps"] == 30 and any("resumed" in line and "step 10" in line for line in logs)
    assert steps.builds == 1  # the resume reused the held step
    rows = (tmp_path / "run" / "loss_log.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [5, 10, 15, 20, 25, 30]

    # the denoising loss on fixed noise / timesteps went down
    ds = T.read_folder(data_dir, resolution=8)
    probe = T.make_probe(comps, True, ds.images, ds.captions)
    frozen = {"alphas_cumprod": jax.numpy.asarray(T.alphas_cumprod(comps.scheduler_config))}
    before = float(np.mean(probe({"unet": comps.params["unet"], "text_encoder": comps.params["text_encoder"]}, frozen)))
    trained = second["components"].params
    after = float(np.mean(probe({"unet": trained["unet"], "text_encoder": trained["text_encoder"]}, frozen)))
    assert after < 0.6 * before, (before, after)

    # the saved model loads back (float32 here, exact)
    loaded = load_pixel_components(second["output"])
    np.testing.assert_array_equal(
        np.asarray(loaded.params["unet"]["conv_in"]["kernel"]), np.asarray(trained["unet"]["conv_in"]["kernel"])
    )
    assert json.loads((second["output"] / "model.json").read_text())["steps"] == 30

    with pytest.raises(T.TrainingError, match="learning_rate"):
        T.train(T.TrainConfig(max_train_steps=40, **{**common, "learning_rate": 1e-4}), components=comps)


def test_fine_tunes_a_latent_model_with_vae(tmp_path, data_dir):
    """The SD path: VAE-encoded latents, frozen text encoder, saved as a converted directory."""
    from cfgbasin_jax.loading import load_components
    from cfgbasin_jax.models.tiny import random_components

    comps = random_components("sd1", seed=0)
    unet_before = np.asarray(comps.params["unet"]["conv_in"]["kernel"]).copy()
    cfg = T.TrainConfig(data=str(data_dir), output_dir=str(tmp_path / "sd"), model="unused", max_train_steps=2, resolution=8,
                        train_batch_size=2, learning_rate=1e-3, eval_steps=0, log_steps=1, checkpointing_steps=2,
                        save_dtype="float32", progress=False)
    result = T.train(cfg, components=comps)
    loaded = load_components(result["output"])
    unet_after = np.asarray(loaded.params["unet"]["conv_in"]["kernel"])
    assert not np.allclose(unet_after, unet_before)
    for a, b in zip(jax.tree.leaves(loaded.params["text_encoder"]), jax.tree.leaves(comps.params["text_encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # frozen
    assert np.isfinite(float(result["final_loss"]))


def test_a_run_folder_in_use_is_refused(tmp_path, data_dir):
    """Two trainings never write one --output_dir: the folder's lock (runtime.files.LockFile) is held."""
    from cfgbasin_jax.runtime import files as F

    out = tmp_path / "run"
    out.mkdir()
    cfg = T.TrainConfig(data=str(data_dir), output_dir=str(out), max_train_steps=1, train_batch_size=1, resolution=8,
                        progress=False)
    with F.LockFile(out / T.loop.LOCK_FILE, "training run"):
        with pytest.raises(T.TrainingError, match="in use by another training run"):
            T.train(cfg, components=toy_model.init_toy_components(seed=0, configs=tiny_configs()))
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, the lock file gone with its holder
