"""Prompt-set readers (cfgbasin_jax.runs.prompts): the reference scripts' selection rules, validation,
and SD's CLIP tokenization (truncation to 77 tokens) of the 500 real memorized prompts."""

import gzip
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cfgbasin_jax.runs import prompts as P
from cfgbasin_jax.pipeline import Pipeline

DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------------------------ LAION-10K


def test_laion_first_captions_in_file_order():
    entries = P.read_laion_captions(DATA / "laion_combined_captions.json")
    raw = json.loads((DATA / "laion_combined_captions.json").read_text())
    assert entries == [(k, v[0]) for k, v in raw.items()]


@pytest.mark.parametrize("n", [1, 7, 40])
def test_laion_draw_matches_reference(n):
    """The reference: text = [v[0] for v in d.values()]; np.random.seed(42); np.random.choice(text, n)."""
    raw = json.loads((DATA / "laion_combined_captions.json").read_text())
    text = [v[0] for k, v in raw.items()]
    state = np.random.get_state()
    try:
        np.random.seed(42)
        expected = [str(x) for x in np.random.choice(text, n)]
    finally:
        np.random.set_state(state)
    ps = P.load_prompt_set("laion10k", DATA / "laion_combined_captions.json", n_draw=n)
    assert list(ps.prompts) == expected
    assert [text.index(p) for p in ps.prompts] == [list(raw).index(e["key"]) for e in ps.extras]
    assert ps.source == str((DATA / "laion_combined_captions.json").absolute())


def test_laion_draw_prefix_does_not_depend_on_n():
    """A run extended from --end_iter 7 to 40 keeps the prompts of indices 0..6."""
    a = P.load_prompt_set("laion10k", DATA / "laion_combined_captions.json", n_draw=7)
    b = P.load_prompt_set("laion10k", DATA / "laion_combined_captions.json", n_draw=40)
    assert b.prompts[:7] == a.prompts


def test_draw_leaves_numpy_global_state_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    P.draw_with_replacement(10, 5)
    assert np.random.rand() == expected


# ------------------------------------------------------------------------------------ Imagenette


def test_imagenette_matches_reference():
    objects = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
               "garbage truck", "gas pump", "golf ball", "parachute"]
    state = np.random.get_state()
    try:
        np.random.seed(42)
        temp = list(np.random.choice(objects, 10000))
    finally:
        np.random.set_state(state)
    ps = P.load_prompt_set("imagenette")
    assert list(ps.prompts) == [f"An image of {x}" for x in temp]
    assert len(set(ps.prompts)) == 10
    assert ps.source == "builtin:imagenette"


# ------------------------------------------------------------------------------------ JSON lines


def test_packaged_sdv1_500():
    ps = P.load_prompt_set("sdv1_pretrained")
    assert len(ps) == 500 and ps.source == "package:sdv1_500_memorized.jsonl"
    assert ps.prompts[0] == "The No Limits Business Woman Podcast"
    assert ps.extras[0] == {"laion_index": 1030727993, "url": "https://onlinecoach1.hipcast.com/albumart/1000_1618923228.jpg"}
    lines = P.packaged_file("sdv1_500_memorized.jsonl").read_text(encoding="utf-8").splitlines()
    assert list(ps.prompts) == [json.loads(line)["caption"] for line in lines]


def test_jsonl_reader_keeps_fields_and_skips_blank_lines():
    ps = P.load_prompt_set("sdv1_pretrained", DATA / "captions.jsonl")
    assert list(ps.prompts) == ["The No Limits Business Woman Podcast", "Mothers influence on her young hippo", "a photo of a cat"]
    assert ps.extras[1] == {"laion_index": 17, "url": "https://example.com/b.jpg"}


def test_jsonl_broken_line_is_named():
    with pytest.raises(P.PromptError, match=r"broken\.jsonl:3: not valid JSON"):
        P.load_prompt_set("sdv1_pretrained", DATA / "broken.jsonl")


def test_jsonl_missing_caption_is_named():
    with pytest.raises(P.PromptError, match=r"no_caption\.jsonl:2: missing key 'caption'"):
        P.load_prompt_set("sdv1_pretrained", DATA / "no_caption.jsonl")


@pytest.mark.parametrize("content, message", [
    ("\n\n", "empty prompt set"),
    ('"just a string"\n', r":1: expected a JSON object"),
    ('{"caption": 3}\n', r":1: key 'caption': caption must be a string"),
    ('{"caption": "  "}\n', r":1: key 'caption': empty caption"),
])
def test_jsonl_validation(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(P.PromptError, match=message):
        P.read_caption_jsonl(path)


# ------------------------------------------------------------------------------------ folders


def test_folder_reader_sorted_and_stripped():
    ps = P.load_prompt_set("200_memorized", DATA / "memorized_images")
    # sorted(glob("*.txt")) order: "10.txt" < "2.txt" < "a.txt"; the .md file is not a caption
    assert list(ps.prompts) == ["a photo of a cat", "an astronaut riding a horse", "oil painting of a city at night"]
    assert [e["file"] for e in ps.extras] == ["10.txt", "2.txt", "a.txt"]


def test_folder_errors(tmp_path):
    with pytest.raises(P.PromptError, match="empty prompt set"):
        P.read_caption_folder(tmp_path)
    with pytest.raises(P.PromptError, match="caption folder not found"):
        P.read_caption_folder(tmp_path / "missing")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(P.PromptError, match=r"b\.txt: not UTF-8 text"):
        P.read_caption_folder(tmp_path)
    (tmp_path / "b.txt").write_text("\n \n")
    with pytest.raises(P.PromptError, match=r"b\.txt: empty caption"):
        P.read_caption_folder(tmp_path)


# ------------------------------------------------------------------------------------ LAION errors


def test_laion_validation(tmp_path):
    with pytest.raises(P.PromptError, match=r"laion_bad_value\.json: key 'b\.jpg': expected a non-empty list"):
        P.read_laion_captions(DATA / "laion_bad_value.json")
    bad = tmp_path / "l.json"
    bad.write_text('{"a": ["x"],\n "b": [}')
    with pytest.raises(P.PromptError, match=r"l\.json:2: not valid JSON"):
        P.read_laion_captions(bad)
    bad.write_text("[]")
    with pytest.raises(P.PromptError, match="expected a JSON object"):
        P.read_laion_captions(bad)
    bad.write_text("{}")
    with pytest.raises(P.PromptError, match="empty prompt set"):
        P.read_laion_captions(bad)
    with pytest.raises(P.PromptError, match="not found"):
        P.read_laion_captions(tmp_path / "nope.json")


def test_unknown_experiment_and_imagenette_file():
    with pytest.raises(P.PromptError, match="unknown --exp 'coco'"):
        P.load_prompt_set("coco")
    with pytest.raises(P.PromptError, match="built-in prompts"):
        P.load_prompt_set("imagenette", DATA / "captions.jsonl")


# ------------------------------------------------------------------------------------ ranges


def test_select_range():
    fixed = P.load_prompt_set("sdv1_pretrained", DATA / "captions.jsonl")
    assert P.select_range(fixed, 0, 200) == (0, 3)  # clipped like the reference DTP loop
    assert P.select_range(fixed, 1, 2) == (1, 2)
    with pytest.raises(P.PromptError, match="--end_iter 1 < --start_iter 2"):
        P.select_range(fixed, 2, 1)
    with pytest.raises(P.PromptError, match="empty prompt set"):
        P.select_range(fixed, 3, 10)
    with pytest.raises(P.PromptError, match="empty prompt set"):
        P.select_range(fixed, 2, 2)
    drawn = P.load_prompt_set("laion10k", DATA / "laion_combined_captions.json", n_draw=4)
    with pytest.raises(P.PromptError, match="exceeds the 4 prompts"):
        P.select_range(drawn, 0, 5)


# ------------------------------------------------------------------------------------ tokenization


def _sd_clip_tokenizer_dir(root: Path) -> Path:
    """SD's CLIP tokenizer files built from open_clip's BPE merges the way CLIP builds its vocab:
    256 byte-unicode chars, their </w> forms, one token per merge, then the two special tokens."""
    from cfgbasin_jax.models.tokenizer import bytes_to_unicode

    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    bpe = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    root.mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (root / "special_tokens_map.json").write_text(json.dumps(special))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
         "add_prefix_space": False, **special}))
    return root


@pytest.fixture(scope="module")
def sd_tokenizer_dir(tmp_path_factory):
    return _sd_clip_tokenizer_dir(tmp_path_factory.mktemp("sd_tokenizer") / "tokenizer")


def test_tokenization_of_the_500_memorized_prompts(sd_tokenizer_dir):
    """Pipeline.tokenize with SD's real BPE (as the pipeline loads it) against CLIP's tokenizer rule
    restated in plain Python (tests/clip_reference.py) and CLIP's truncation rule: BOS, the first 75
    BPE tokens, EOS, padded with EOS to 77."""
    from clip_reference import clip_ids, padded, read_bpe

    from cfgbasin_jax.convert.sd_folder import load_tokenizer

    prompts = list(P.load_prompt_set("sdv1_pretrained").prompts)
    # none of the 500 exceeds 77 tokens with SD's vocabulary: add long captions made of them
    prompts += [" ".join(prompts[k:k + 6]) for k in range(0, 60, 6)]
    n = len(prompts)
    ours_tok = load_tokenizer(sd_tokenizer_dir)
    ours = Pipeline.tokenize(SimpleNamespace(tokenizer=ours_tok), prompts)
    assert ours.shape == (n, 77) and ours.dtype == np.int32

    # CLIP's well-known ids
    assert Pipeline.tokenize(SimpleNamespace(tokenizer=ours_tok), ["a photo of a cat"])[0, :8].tolist() == \
        [49406, 320, 1125, 539, 320, 2368, 49407, 49407]

    vocab, ranks = read_bpe(sd_tokenizer_dir)
    full = [clip_ids(prompt, vocab, ranks) for prompt in prompts]
    mismatched = [i for i in range(n) if ours[i].tolist() != padded(full[i], 77, 49407)]
    assert not mismatched, f"prompts {mismatched[:5]} tokenize differently, e.g. {prompts[mismatched[0]]!r}"

    counts = P.token_counts(ours_tok, prompts)
    assert counts == [len(f) for f in full]
    long = [i for i, n in enumerate(counts) if n > 77]
    assert 500 <= min(long) and len(long) >= 5
