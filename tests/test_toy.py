"""The toy dataset generator: determinism, the memorized subset's properties, folder and tokenizer."""

import numpy as np
import pytest

from cfgbasin_jax.toy import data as toy


@pytest.fixture(scope="module")
def small():
    return toy.make_dataset(num_plain=200, num_memorized=4, seed=3)


def test_same_seed_same_dataset(small):
    again = toy.make_dataset(num_plain=200, num_memorized=4, seed=3)
    np.testing.assert_array_equal(small.images, again.images)
    assert small.captions == again.captions
    other = toy.make_dataset(num_plain=200, num_memorized=4, seed=4)
    assert not np.array_equal(small.images, other.images)


def test_shipped_dataset_is_stable():
    """The shipped toy model was trained on make_dataset() (seed 0): its first samples must not drift."""
    ds = toy.make_dataset()
    assert ds.images.shape == (3008, 16, 16, 3) and ds.num_memorized == 8
    assert ds.captions[0] == "a yellow cross at the bottom right and a green cross at the bottom left"
    assert ds.backgrounds[:3] == ["gray", "black", "forest"]


def test_memorized_captions_unique_and_share_vocabulary(small):
    mem = [c for c, m in zip(small.captions, small.memorized) if m]
    plain = [c for c, m in zip(small.captions, small.memorized) if not m]
    assert len(mem) == 4 and len(set(mem)) == 4
    assert not set(mem) & set(plain)
    plain_words = {w for c in plain for w in c.split()}
    assert all(set(c.split()) <= plain_words for c in mem)
    assert all(small.memorized[:4]) and not any(small.memorized[4:])


def test_plain_images_distinct_and_captions_match_pixels(small):
    flat = {img.tobytes() for img in small.images}
    assert len(flat) == len(small.images)
    for img, objs, bg in zip(small.images[:20], small.objects[:20], small.backgrounds[:20]):
        np.testing.assert_array_equal(img, toy.render(objs, bg))
        r, c = toy.POSITIONS[objs[0].position]
        r, c = r + objs[0].jitter[0], c + objs[0].jitter[1]
        assert tuple(img[r, c]) == toy.COLOURS[objs[0].colour]  # the centre pixel has the captioned colour


def test_shape_masks_differ():
    masks = {s: toy.shape_mask(s, 7, (8, 8)) for s in toy.SHAPES}
    for a in toy.SHAPES:
        for b in toy.SHAPES:
            if a != b:
                assert (masks[a] != masks[b]).sum() >= 4
    with pytest.raises(ValueError, match="hexagon"):
        toy.shape_mask("hexagon", 5, (8, 8))


def test_folder_and_tokenizer(tmp_path, small):
    from cfgbasin_jax.models.tokenizer import load_tokenizer
    from cfgbasin_jax.training import read_folder

    sub = toy.ToyDataset(small.images[:6], small.captions[:6], small.objects[:6], small.backgrounds[:6], small.memorized[:6])
    toy.write_folder(sub, tmp_path / "data")
    back = read_folder(tmp_path / "data")
    np.testing.assert_array_equal(back.images, sub.images)
    assert back.captions == sub.captions
    tok = load_tokenizer(toy.write_toy_tokenizer(tmp_path / "tok"))
    ids = tok(small.captions[0]).input_ids
    assert len(ids) == len(small.captions[0].split()) + 2  # every toy word is one token
    assert tok.model_max_length == toy.MODEL_MAX_LENGTH >= len(ids)
