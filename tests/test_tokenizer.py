"""The CLIP tokenizer path (cfgbasin_jax.models.tokenizer): loading, writing, saving, ids.

Oracle: CLIP's tokenizer rule restated in plain Python (tests/clip_reference.py). The pinned ids were
measured identical with transformers 4.57 (CLIPTokenizerFast) and 5.24 (CLIPTokenizer, the same
tokenizers pipeline). transformers 4.x's pure-Python CLIPTokenizer (not used) differs on CJK text only:
without ftfy it splits CJK characters into separate words, so for '東京' it gives 365 where the
others give 109.
"""

import json
import shutil

import numpy as np

import pytest
from clip_reference import clip_ids, read_bpe

import cfgbasin_jax
from cfgbasin_jax.models import tiny
from cfgbasin_jax.toy import data as toy
from cfgbasin_jax.models import tokenizer as T
from cfgbasin_jax.convert import ConversionError
from cfgbasin_jax.convert.sd_folder import load_tokenizer as load_sd_tokenizer

TOY_DIR = cfgbasin_jax.TOY_MODEL / "tokenizer"
TRICKY = ["A photo of a CAT", "zebra", "café  crème", "東京", "don't stop!!", "  tabs\tand\nnew lines  ",
          "Ünïcode", "e\u0301 vs \u00e9", "emoji 🐱 x2", "<|startoftext|> inside <|endoftext|>", "", "123 4.5"]
PINNED = {
    "tiny": {
        "A photo of a CAT": [673, 320, 648, 639, 320, 578, 674],
        "zebra": [673, 89, 68, 65, 81, 320, 674],
        "café  crème": [673, 520, 69, 127, 358, 66, 81, 127, 101, 76, 324, 674],
        "東京": [673, 162, 251, 109, 160, 118, 361, 674],
        "don't stop!!": [673, 67, 522, 6, 339, 517, 78, 335, 0, 256, 674],
    },
    "toy": {
        "a red circle at the top left and a blue square at the bottom":
            [577, 320, 568, 544, 522, 572, 574, 564, 525, 320, 532, 571, 522, 572, 535, 578],
        "a green cross at the center": [577, 320, 559, 547, 522, 572, 542, 578],
        "Ünïcode": [577, 127, 120, 77, 127, 107, 66, 78, 67, 324, 578],
    },
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    tiny.write_tiny_tokenizer(root / "tiny")
    return {"tiny": root / "tiny", "toy": TOY_DIR}


def test_bytes_to_unicode_is_clips_table():
    table = T.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    assert list(table)[: len(printable)] == printable  # printable first: ids 0..187
    assert all(table[b] == chr(b) for b in printable)
    others = [b for b in range(256) if b not in printable]
    assert [table[b] for b in others] == [chr(256 + n) for n in range(len(others))]
    assert table[ord(" ")] == "Ġ"  # the familiar GPT-2 / CLIP space character


@pytest.mark.parametrize("name", ["tiny", "toy"])
def test_ids_follow_clips_rule_and_are_pinned(name, folders):
    tok = T.load_tokenizer(folders[name])
    vocab, ranks = read_bpe(folders[name])
    texts = TRICKY + list(PINNED[name])
    assert [tok(text).input_ids for text in texts] == [clip_ids(text, vocab, ranks) for text in texts]
    for text, ids in PINNED[name].items():
        assert tok(text).input_ids == ids, text


def test_shipped_toy_tokenizer_is_what_the_writer_writes(tmp_path):
    written = toy.write_toy_tokenizer(tmp_path / "toy")
    for name in ("vocab.json", "merges.txt"):
        shipped, fresh = (folder / name for folder in (TOY_DIR, written))
        if name == "vocab.json":
            assert json.loads(shipped.read_text("utf-8")) == json.loads(fresh.read_text("utf-8"))
        else:
            assert shipped.read_text("utf-8") == fresh.read_text("utf-8")
    assert T.load_tokenizer(TOY_DIR).model_max_length == toy.MODEL_MAX_LENGTH == 20


def test_save_tokenizer_writes_files_every_stack_reads(folders, tmp_path):
    """save_tokenizer keeps vocab.json + merges.txt (transformers 5 alone writes only tokenizer.json,
    which transformers 4's Python CLIPTokenizer cannot read) and the tokenizer reloads unchanged."""
    tok = T.load_tokenizer(folders["tiny"])
    saved = T.save_tokenizer(tok, tmp_path / "saved")
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in saved.iterdir()}
    assert read_bpe(saved) == read_bpe(folders["tiny"])
    again = T.load_tokenizer(saved)
    assert again.model_max_length == 77
    assert [again(t).input_ids for t in TRICKY] == [tok(t).input_ids for t in TRICKY]
    (saved / "tokenizer.json").unlink()  # vocab.json + merges.txt alone suffice
    assert [T.load_tokenizer(saved)(t).input_ids for t in TRICKY] == [tok(t).input_ids for t in TRICKY]


def test_bad_tokenizer_folders_name_the_folder(tmp_path):
    with pytest.raises(T.TokenizerError, match="missing tokenizer folder .*nowhere"):
        T.load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.TokenizerError, match="empty: no CLIP tokenizer files"):
        T.load_tokenizer(tmp_path / "empty")
    broken = tiny.write_tiny_tokenizer(tmp_path / "broken") or tmp_path / "broken"
    (broken / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConversionError, match="broken: cannot load a CLIP tokenizer"):
        load_sd_tokenizer(broken)


# ---- transformers' CLIPTokenizer as the oracle, on a vocabulary trained on the memorized prompts

EDGE = ["", " ", "\t \n ", "   leading and trailing   ", "東京タワー at night", "naïve café, crème brûlée",
        "emoji 🐱🐶 x2", "e\u0301 vs \u00e9", "ÀÉÎÕÜ ß ﬁ", "<|startoftext|> inside <|endoftext|>",
        "a photo of " + "a very long prompt " * 40, "don't   STOP!! it's 4.5 x 10^3"]


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A CLIP-layout vocabulary (byte characters and their </w> forms, BPE merges learned by the
    `tokenizers` trainer on the 500 memorized prompts, BOS and EOS last) with SD's tokenizer config."""
    from tokenizers import Tokenizer, models, trainers

    from cfgbasin_jax.runs import prompts as P

    captions = list(P.load_prompt_set("sdv1_pretrained").prompts)
    assert len(captions) == 500
    probe = T.clip_backend({T.BOS_TOKEN: 0, T.EOS_TOKEN: 1}, [])
    trainer_tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    trainer_tok.normalizer, trainer_tok.pre_tokenizer = probe.normalizer, probe.pre_tokenizer
    chars = list(T.bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(vocab_size=4000, initial_alphabet=chars, end_of_word_suffix="</w>", show_progress=False)
    trainer_tok.train_from_iterator(captions, trainer)
    folder = tmp_path_factory.mktemp("trained") / "tokenizer"
    folder.mkdir()
    trainer_tok.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text("utf-8"))
    for token in chars + [c + "</w>" for c in chars] + [T.BOS_TOKEN, T.EOS_TOKEN]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    special = {"bos_token": T.BOS_TOKEN, "eos_token": T.EOS_TOKEN, "unk_token": T.EOS_TOKEN, "pad_token": T.EOS_TOKEN}
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, **special}), "utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special), "utf-8")
    return folder, captions


def test_ids_match_transformers_clip_tokenizer(trained_folder):
    """The 500 memorized prompts and edge cases (empty, whitespace-only, long, Unicode), one by one
    and as SD's padded, truncated batch, against transformers' CLIP tokenizer (the oracle):
    `CLIPTokenizer` on transformers 5.x, `CLIPTokenizerFast` on 4.x (the class this library returned
    there before; 4.x's pure-Python `CLIPTokenizer` differs on CJK text, see the module docstring, and
    is compared on the rest below)."""
    import transformers

    folder, captions = trained_folder
    oracle_class = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)
    ours, oracle = T.load_tokenizer(folder), oracle_class.from_pretrained(str(folder), local_files_only=True)
    texts = captions + EDGE
    assert [ours(t).input_ids for t in texts] == [oracle(t).input_ids for t in texts]
    assert max(len(ours(t).input_ids) for t in texts) > 77  # the long ones are long
    kwargs = dict(padding="max_length", max_length=77, truncation=True, return_tensors="np")
    got, want = ours(texts, **kwargs), oracle(texts, **kwargs)
    assert np.array_equal(got.input_ids, want.input_ids) and np.array_equal(got["attention_mask"], want["attention_mask"])
    assert got.input_ids.shape == (len(texts), 77)
    assert ours.all_special_ids == sorted(oracle.all_special_ids) and len(ours) == len(oracle)
    ids = [int(i) for i in got.input_ids[3][:6]]
    assert ours.decode(ids) == oracle.decode(ids)
    if transformers.CLIPTokenizer is not oracle_class:  # 4.x's pure-Python tokenizer, off CJK text
        slow = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        plain = [t for t in texts if not any("\u3000" <= ch <= "\u9fff" for ch in t)]
        assert [ours(t).input_ids for t in plain] == [slow(t).input_ids for t in plain]
    vocab, ranks = read_bpe(folder)  # and the plain-Python restatement of CLIP's rule
    assert [ours(t).input_ids for t in texts[:50] + EDGE] == [clip_ids(t, vocab, ranks) for t in texts[:50] + EDGE]


def test_sd2_padding_token_is_read_from_the_folder(trained_folder, tmp_path):
    """SD 2.x pads with "!" (id 0 in CLIP's vocabulary), as its special_tokens_map.json says."""
    folder, _ = trained_folder
    sd2 = tmp_path / "sd2"
    shutil.copytree(folder, sd2)
    (sd2 / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}), "utf-8")
    tok = T.load_tokenizer(sd2)
    ids = tok(["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert tok.pad_token_id == json.loads((folder / "vocab.json").read_text("utf-8"))["!"]
    assert ids[0, -1] == tok.pad_token_id and ids[0, 3] == tok.eos_token_id
