"""Memorization and quality metrics: SSCD (Flax vs TorchScript), CLIP score (Flax vs PyTorch
CLIPModel), Wen et al. detection score + ROC-AUC, chunked nearest neighbours, scripts/evaluate.py.

Oracles: torch modules written here with torchvision's / Classy Vision's parameter names (torchvision
itself is not installed), scripted or traced like the released SSCD files; transformers' PyTorch
CLIPModel and CLIPImageProcessor; brute-force numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cfgbasin_jax.convert import sscd as convert_sscd
from cfgbasin_jax.apps.evaluate import main as evaluate_main
from cfgbasin_jax.metrics import clip_score as C
from cfgbasin_jax.metrics import images as I
from cfgbasin_jax.metrics.detection import detection_score, roc_auc, tpr_at_fpr
from cfgbasin_jax.metrics.neighbors import nearest_neighbors
from cfgbasin_jax.models.sscd import SSCDConfig, load_sscd, sscd_descriptors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


# ============================================================================ torch SSCD oracles


class GeM(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.pooling_param = p

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.reshape(n, c, h * w).clamp(min=1e-6).pow(self.pooling_param).mean(dim=2)
        return x.pow(1.0 / self.pooling_param)


class L2Norm(nn.Module):
    def forward(self, x):
        return F.normalize(x)


class TVBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (stride on the 3x3 conv)."""

    def __init__(self, cin: int, width: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TVResNet(nn.Module):
    """torchvision ResNet-50 layout with SSCD's changes: avgpool = GeM, fc = projection."""

    def __init__(self, blocks=(3, 4, 6, 3), base=64, dims=512, p=3.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = base
        for s, n in enumerate(blocks):
            width, cout = base * 2**s, base * 2**s * 4
            layers = []
            for b in range(n):
                layers.append(TVBottleneck(cin, width, cout, 2 if (s > 0 and b == 0) else 1, 1))
                cin = cout
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.avgpool = GeM(p)
        self.fc = nn.Linear(cin, dims)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SSCDTorchvision(nn.Module):
    """sscd.models.model.Model with a TV_RESNET50 backbone: backbone (GeM + fc inside), L2Norm."""

    def __init__(self, **kw):
        super().__init__()
        self.backbone = TVResNet(**kw)
        self.embeddings = L2Norm()

    def forward(self, x):
        return self.embeddings(self.backbone(x))


class Wrapped(nn.Module):
    """Classy Vision's attachable-block wrapper (adds a `_module.` level to the names)."""

    def __init__(self, module):
        super().__init__()
        self._module = module

    def forward(self, x):
        return self._module(x)


class ClassyLayer(nn.Module):
    """Classy Vision ResNeXt BottleneckLayer: convolutional_block (0 conv,1 bn,3 conv,4 bn,6 conv), bn."""

    def __init__(self, cin, mid, cout, stride, groups):
        super().__init__()
        self.convolutional_block = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False),
        )  # fmt: skip
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn(self.convolutional_block(x)) + residual)


class SSCDClassy(nn.Module):
    """sscd Model with a Classy Vision ResNeXt (CV_RESNEXT101 layout, tiny): embeddings = GeM, Linear, L2Norm."""

    def __init__(self, blocks=(1, 2, 1, 1), init_planes=8, base_width=2, cardinality=4, dims=24, p=3.0, wrap=True):
        super().__init__()
        stem = nn.Sequential(
            nn.Conv2d(3, init_planes, 7, 2, 3, bias=False), nn.BatchNorm2d(init_planes), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        backbone = nn.Module()
        backbone.initial_block = Wrapped(stem) if wrap else stem
        cin, stages = init_planes, []
        for s, n in enumerate(blocks):
            cout, mid = init_planes * 2**s * 4, base_width * 2**s * cardinality
            layers = []
            for b in range(n):
                layer = ClassyLayer(cin, mid, cout, 2 if (s > 0 and b == 0) else 1, cardinality)
                layers.append(Wrapped(layer) if wrap else layer)
                cin = cout
            stages.append(nn.Sequential(*layers))
        backbone.blocks = nn.Sequential(*stages)
        self.backbone = backbone
        self.embeddings = nn.Sequential(GeM(p), nn.Linear(cin, dims), L2Norm())

    def forward(self, x):
        return self.embeddings(self.backbone.blocks(self.backbone.initial_block(x)))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """He-scaled random convs and non-trivial eval BatchNorm statistics, so folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def center_projection(model: SSCDClassy, seed: int = 0) -> SSCDClassy:
    """Data-dependent bias: subtract the projected mean GeM feature of smooth random images, so that
    a random-weight descriptor varies with the image instead of pointing the same way for all."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(16, 3, 3, 3, generator=g), size=(96, 96), mode="bicubic", align_corners=False)
    with torch.no_grad():
        feats = model.embeddings[0](model.backbone.blocks(model.backbone.initial_block(x)))
        proj = model.embeddings[1]
        proj.bias.copy_(-proj.weight @ feats.mean(0))
    return model


def torch_descriptors(model, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def random_pixels(seed: int, size: int = 64, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


# ============================================================================ fixtures


@pytest.fixture(scope="session")
def resnet50_sscd(tmp_path_factory):
    """Full-size torchvision-layout SSCD ResNet-50 (512-d), torch.jit.script-ed, converted by main()."""
    root = tmp_path_factory.mktemp("sscd_r50")
    model = randomize(SSCDTorchvision(), seed=0)
    path = str(root / "sscd_disc_mixup.torchscript.pt")
    torch.jit.script(model).save(path)
    dst = str(root / "flax")
    assert convert_sscd.main([path, dst]) == 0
    return model, path, dst


@pytest.fixture(scope="session")
def tiny_sscd(tmp_path_factory):
    """Tiny Classy-layout ResNeXt SSCD (groups 4, 24-d), torch.jit.trace-d and converted."""
    root = tmp_path_factory.mktemp("sscd_tiny")
    model = center_projection(randomize(SSCDClassy(), seed=1))
    path = str(root / "tiny.torchscript.pt")
    torch.jit.trace(model, torch.zeros(1, 3, 64, 64)).save(path)
    dst = str(root / "flax")
    assert convert_sscd.main([path, dst]) == 0
    return model, path, dst


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """Tiny random PyTorch CLIPModel folder (+ tokenizer, 30px processor) and its Flax conversion."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from cfgbasin_jax.models.tiny import tiny_vocab_size, write_tiny_tokenizer

    root = tmp_path_factory.mktemp("clip")
    pt_dir, flax_dir = str(root / "pt"), str(root / "flax")
    vocab = tiny_vocab_size()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=30, patch_size=6,
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(pt_dir)
    write_tiny_tokenizer(pt_dir)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(pt_dir)
    assert C.main([pt_dir, flax_dir]) == 0
    return model, CLIPTokenizer.from_pretrained(pt_dir), CLIPImageProcessor.from_pretrained(pt_dir), pt_dir, flax_dir


def save_image(path, array_or_image, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    if mode:
        img = img.convert(mode)
    img.save(path)
    return path


def blob_image(rng, h: int, w: int) -> Image.Image:
    """A smooth random colour layout (a 3x3 grid upsampled): unlike i.i.d. noise, two of these get
    clearly different globally pooled descriptors."""
    return Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)


def odd_images(seed: int) -> list[Image.Image]:
    """Non-RGB modes and odd sizes: L, RGBA, P (with transparency), LA, I;16, CMYK, 1x1."""
    rng = np.random.default_rng(seed)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    p = rgb(23, 41).convert("P")
    p.info["transparency"] = 0
    i16 = Image.fromarray(rng.integers(0, 65535, (19, 33), dtype=np.uint16))
    return [rgb(17, 31).convert("L"), rgb(45, 20).convert("RGBA"), p, rgb(33, 33).convert("LA"), i16,
            rgb(29, 37).convert("CMYK"), rgb(1, 1)]  # fmt: skip


PROMPTS = ["a photo of a cat", "an oil painting of a dog", "a red car at night"]


@pytest.fixture(scope="session")
def eval_folders(tmp_path_factory):
    """A generation folder (metadata.jsonl + Images/{i}_{t}.png, one exact copy of a training image,
    RGBA/P/L images) and a nested training folder (png + jpg, grey and odd sizes)."""
    root = tmp_path_factory.mktemp("eval")
    gen, train = str(root / "gen"), str(root / "train")
    rng = np.random.default_rng(7)
    train_files = []
    for k in range(4):
        arr = blob_image(rng, 64 + 8 * k, 64)
        train_files.append(save_image(os.path.join(train, "sub" if k % 2 else "", f"t{k}.png"), arr))
    save_image(os.path.join(train, "grey.jpg"), blob_image(rng, 50, 70), "L")
    copy_of = Image.open(train_files[2]).convert("RGB")
    gens = [
        copy_of,  # 0_0: exact copy of train/t2.png
        blob_image(rng, 64, 64).convert("RGBA"),
        blob_image(rng, 64, 64).convert("P"),
        blob_image(rng, 64, 64).convert("L"),
    ]
    names = [(0, 0), (0, 1), (1, 0), (2, 0)]
    os.makedirs(gen, exist_ok=True)
    with open(os.path.join(gen, "metadata.jsonl"), "w") as f:
        for (i, t), img in zip(names, gens):
            rel = f"Images/{i}_{t}.png"
            save_image(os.path.join(gen, rel), img)
            f.write(json.dumps({"index": i, "prompt": PROMPTS[i], "file": rel, "seed": 3}) + "\n")
    return gen, train


# ============================================================================ SSCD


def test_sscd_resnet50_parity_with_scripted_torch(resnet50_sscd):
    model, path, dst = resnet50_sscd
    config, params = load_sscd(dst)
    assert config == SSCDConfig(stage_blocks=(3, 4, 6, 3), groups=1, dims=512, gem_p=3.0)
    x = random_pixels(seed=11)
    got = sscd_descriptors(config, params, x)
    ref = torch_descriptors(torch.jit.load(path), x)
    assert got.shape == (2, 512)
    err = np.max(np.abs(got - ref))
    assert err < TOL, err
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(ref - torch_descriptors(model, x))) < 1e-6  # the scripted file is the model


@pytest.mark.parametrize("wrap", [True, False], ids=["classy_module_wrapper", "plain"])
def test_sscd_classy_resnext_parity_with_traced_torch(tmp_path, wrap):
    model = randomize(SSCDClassy(wrap=wrap), seed=2)
    path = str(tmp_path / "cv.pt")
    torch.jit.trace(model, torch.zeros(1, 3, 64, 64)).save(path)
    assert convert_sscd.main([path, str(tmp_path / "flax")]) == 0
    config, params = load_sscd(str(tmp_path / "flax"))
    assert (config.stage_blocks, config.groups, config.stage_widths, config.dims) == ((1, 2, 1, 1), 4, (8, 16, 32, 64), 24)
    x = random_pixels(seed=12)
    err = np.max(np.abs(sscd_descriptors(config, params, x) - torch_descriptors(model, x)))
    assert err < TOL, err


def test_sscd_plain_state_dict_and_module_cli(tmp_path):
    """A .pt state dict (no TorchScript) converts too, via `python -m cfgbasin_jax.convert.sscd`."""
    model = randomize(SSCDTorchvision(blocks=(1, 1, 1, 1), base=8, dims=16), seed=3)
    path = str(tmp_path / "weights.pt")
    torch.save(model.state_dict(), path)
    proc = subprocess.run(
        [sys.executable, "-m", "cfgbasin_jax.convert.sscd", path, str(tmp_path / "flax")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config, params = load_sscd(str(tmp_path / "flax"))
    x = random_pixels(seed=13)
    assert np.max(np.abs(sscd_descriptors(config, params, x) - torch_descriptors(model, x))) < TOL


def test_sscd_converter_refuses_bad_input(tmp_path, capsys):
    model = randomize(SSCDTorchvision(blocks=(1, 1, 1, 1), base=8, dims=16, p=4.0), seed=4)
    # a traced module does not keep GeM's p: the default 3.0 disagrees, the check catches it
    traced = str(tmp_path / "p4.pt")
    torch.jit.trace(model, torch.zeros(1, 3, 64, 64)).save(traced)
    assert convert_sscd.main([traced, str(tmp_path / "bad")]) == 2
    assert "disagrees" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad" / "sscd_params.safetensors")
    assert convert_sscd.main([traced, str(tmp_path / "good"), "--gem-p", "4"]) == 0
    # tensors outside the architecture are refused, not dropped
    state = dict(model.state_dict(), **{"whitening.weight": torch.zeros(16, 16)})
    extra = str(tmp_path / "extra.pt")
    torch.save(state, extra)
    assert convert_sscd.main([extra, str(tmp_path / "x")]) == 2
    assert "whitening.weight" in capsys.readouterr().err
    assert convert_sscd.main([str(tmp_path / "missing.pt"), str(tmp_path / "y")]) == 2
    assert "not found" in capsys.readouterr().err


def test_sscd_loading_needs_no_torch(tiny_sscd):
    _, _, dst = tiny_sscd
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from cfgbasin_jax.models.sscd import load_sscd, sscd_descriptors\n"
        f"c, p = load_sscd({dst!r})\n"
        "print(sscd_descriptors(c, p, np.zeros((1, 64, 64, 3), np.float32)).shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("(1, 24)")


def test_sscd_exact_copy_scores_one(tiny_sscd, tmp_path):
    _, _, dst = tiny_sscd
    config, params = load_sscd(dst)
    rng = np.random.default_rng(5)
    original = blob_image(rng, 64, 80)
    copy_path = save_image(str(tmp_path / "copy.png"), original)
    other = blob_image(rng, 64, 80)
    x = np.stack([I.sscd_pixels(im, "sscd") for im in (original, I.load_rgb(copy_path), other)])
    d = sscd_descriptors(config, params, x)
    assert d[0] @ d[1] > 1 - 1e-5
    assert d[0] @ d[2] < d[0] @ d[1] - 1e-3


def test_sscd_preprocess_shapes():
    img = Image.fromarray(np.zeros((200, 301, 3), np.uint8))
    assert I.sscd_pixels(img, "sscd").shape == (288, 433, 3)  # short edge 288, long int(288*301/200)
    assert I.sscd_pixels(img, "square320").shape == (320, 320, 3)
    dcr = I.sscd_pixels(img, "dcr224")
    assert dcr.shape == (224, 224, 3) and np.allclose(dcr, -1.0)  # black -> (0 - 0.5) / 0.5
    np.testing.assert_allclose(I.sscd_pixels(img, "sscd")[0, 0], -np.array(I.IMAGENET_MEAN) / I.IMAGENET_STD, rtol=1e-6)
    with pytest.raises(ValueError, match="preset"):
        I.sscd_pixels(img, "nope")


# ============================================================================ images


def test_non_rgb_and_odd_sized_images_are_converted(tmp_path, tiny_clip):
    recipe = I.ClipPreprocess(30, 30)
    for k, img in enumerate(odd_images(seed=9)):
        path = str(tmp_path / f"odd{k}.{'tif' if img.mode == 'CMYK' else 'png'}")
        img.save(path)
        rgb = I.load_rgb(path)
        assert rgb.mode == "RGB" and rgb.size == img.size
        assert np.isfinite(I.sscd_pixels(rgb, "sscd")).all()
        assert I.clip_pixels(rgb, recipe).shape == (30, 30, 3)
    i16 = odd_images(seed=9)[4]
    grey = np.asarray(I.to_rgb(i16))[..., 0].astype(int)
    np.testing.assert_array_less(np.abs(grey - np.asarray(i16, dtype=float) / 65535 * 255), 0.51)
    with pytest.raises(I.ImageInputError, match="broken.png"):
        (tmp_path / "broken.png").write_bytes(b"not a png")
        I.load_rgb(str(tmp_path / "broken.png"))


def test_clip_preprocessing_matches_clip_image_processor(tiny_clip):
    _, _, processor, _, _ = tiny_clip
    recipe = C.read_recipe(tiny_clip[3], 30)
    assert recipe == I.ClipPreprocess(30, 30)
    # 16-bit grey is left out: Image.convert("RGB") (which the processor uses) saturates it to white,
    # load_rgb rescales it instead (checked in test_non_rgb_and_odd_sized_images_are_converted)
    for img in [im for im in odd_images(seed=10) if im.mode != "I;16"]:
        ref = processor(images=img, return_tensors="np", input_data_format="channels_last")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(I.clip_pixels(img, recipe), ref, atol=1e-5)


# ============================================================================ CLIP


def _features(out) -> torch.Tensor:
    """get_*_features' result: a tensor (transformers 4.x) or an output whose pooler_output holds it (5.x)."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.no_grad()
def torch_clip_features(model, tokenizer, processor, images, prompts) -> tuple:
    """PyTorch CLIPModel's projected (not normalised) image and text features, float32 numpy."""
    px = processor(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    tok = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    image = _features(model.get_image_features(pixel_values=px))
    text = _features(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
    return image.numpy(), text.numpy()


def torch_clip_cos(model, tokenizer, processor, images, prompts) -> np.ndarray:
    features = torch_clip_features(model, tokenizer, processor, images, prompts)
    a, b = (F.normalize(torch.from_numpy(f), dim=-1) for f in features)
    return (a * b).sum(-1).numpy()


def test_clip_model_matches_pytorch(tiny_clip):
    """Our CLIPModel's projected features against PyTorch CLIPModel.get_image/text_features.
    Measured (max abs err / max |PyTorch|, float32, transformers 5.24): image 3.0e-7, text 3.3e-7. Bound 1e-4."""
    import jax.numpy as jnp

    from cfgbasin_jax.models.clip import CLIPModel

    model, tokenizer, processor, pt_dir, _ = tiny_clip
    rng = np.random.default_rng(4)
    images = [blob_image(rng, 40 + 7 * k, 50) for k in range(3)]
    ref_image, ref_text = torch_clip_features(model, tokenizer, processor, images, PROMPTS)
    scorer = C.load_clip(pt_dir)
    pixels = np.stack([I.clip_pixels(im, scorer.recipe) for im in images])
    ids, mask = C.tokenize(scorer, PROMPTS)
    variables = {"params": scorer.params}
    image = scorer.model.apply(variables, jnp.asarray(pixels), method=CLIPModel.image_features)
    text = scorer.model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method=CLIPModel.text_features)
    errors = {name: float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))
              for name, ours, ref in (("image", image, ref_image), ("text", text, ref_text))}
    assert max(errors.values()) <= 1e-4, errors
    logits, _, _ = scorer.model.apply(variables, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
    with torch.no_grad():
        px = processor(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        tok = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ref = model(input_ids=tok["input_ids"], pixel_values=px, attention_mask=tok["attention_mask"])
    np.testing.assert_allclose(np.asarray(logits), ref.logits_per_image.numpy(), rtol=1e-4, atol=1e-4)


def test_clip_param_tree_is_transformers_flax_layout(tiny_clip):
    """FlaxCLIPModel's tree, restated: its flax_model.msgpack files load unchanged."""
    cfg = tiny_clip[0].config
    t, v, p = cfg.text_config, cfg.vision_config, cfg.projection_dim

    def tower(width, inner, layers):
        dense = lambda n_in, n_out: {"kernel": (n_in, n_out), "bias": (n_out,)}  # noqa: E731
        norm = {"scale": (width,), "bias": (width,)}
        layer = {"self_attn": {name: dense(width, width) for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
                 "layer_norm1": norm, "mlp": {"fc1": dense(width, inner), "fc2": dense(inner, width)},
                 "layer_norm2": norm}
        return {"layers": {str(i): layer for i in range(layers)}}, norm

    text_encoder, text_norm = tower(t.hidden_size, t.intermediate_size, t.num_hidden_layers)
    vision_encoder, vision_norm = tower(v.hidden_size, v.intermediate_size, v.num_hidden_layers)
    patches = (v.image_size // v.patch_size) ** 2
    expected = {
        "text_model": {
            "embeddings": {"token_embedding": {"embedding": (t.vocab_size, t.hidden_size)},
                           "position_embedding": {"embedding": (t.max_position_embeddings, t.hidden_size)}},
            "encoder": text_encoder, "final_layer_norm": text_norm},
        "vision_model": {
            "embeddings": {"class_embedding": (v.hidden_size,),
                           "patch_embedding": {"kernel": (v.patch_size, v.patch_size, 3, v.hidden_size)},
                           "position_embedding": {"embedding": (patches + 1, v.hidden_size)}},
            "pre_layrnorm": vision_norm, "encoder": vision_encoder, "post_layernorm": vision_norm},
        "visual_projection": {"kernel": (v.hidden_size, p)},
        "text_projection": {"kernel": (t.hidden_size, p)},
        "logit_scale": (),
    }
    model, params = C.read_model(tiny_clip[4])  # the converted Flax folder
    shapes = lambda tree: {k: shapes(x) if isinstance(x, dict) else tuple(x.shape) for k, x in tree.items()}  # noqa: E731
    assert shapes(params) == shapes(C.param_shapes(model)) == expected


def test_clip_config_reads_what_transformers_reads():
    """Legacy text_config_dict / vision_config_dict and missing keys resolve as in transformers."""
    from transformers import CLIPConfig

    from cfgbasin_jax.models.clip import clip_config

    raw = {
        "projection_dim": 16,
        "text_config": CLIPConfig().text_config.to_dict() | {"hidden_size": 48, "eos_token_id": 2},
        "text_config_dict": {"hidden_size": 32, "num_attention_heads": 4},
        "vision_config": {"hidden_size": 24, "num_attention_heads": 4, "image_size": 30, "patch_size": 6},
        "vision_config_dict": {"hidden_act": "gelu"},
    }
    ours, ref = clip_config(raw), CLIPConfig.from_dict(raw)
    for tower, ref_tower in ((ours.text, ref.text_config), (ours.vision, ref.vision_config)):
        for field in type(tower).__dataclass_fields__:
            assert getattr(tower, field) == getattr(ref_tower, field), field
    assert ours.projection_dim == ref.projection_dim and ours.logit_scale_init_value == ref.logit_scale_init_value


def test_bad_clip_config_names_the_key(tiny_clip, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_clip[4], folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "swiglu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(C.ClipWeightsError, match="vision_config config key 'hidden_act' = 'swiglu'"):
        C.load_clip(str(folder))


def test_clip_score_parity_with_pytorch(tiny_clip, tmp_path):
    model, tokenizer, processor, pt_dir, flax_dir = tiny_clip
    rng = np.random.default_rng(3)
    images = [blob_image(rng, 40 + 7 * k, 50) for k in range(3)]
    ref = torch_clip_cos(model, tokenizer, processor, images, PROMPTS)
    scorer = C.load_clip(flax_dir)
    pixels = np.stack([I.clip_pixels(im, scorer.recipe) for im in images])
    cos = C.cosine(C.image_embeddings(scorer, pixels, batch_size=2), C.text_embeddings(scorer, PROMPTS, batch_size=2))
    assert np.max(np.abs(cos - ref)) < 1e-5, (cos, ref)
    assert np.abs(ref).max() > 1e-3  # not trivially zero
    np.testing.assert_allclose(C.clip_score(np.array([-0.2, 0.31])), [0.0, 31.0])
    # the PyTorch folder also loads directly (converted in memory), from safetensors or a pickled .bin
    direct = C.load_clip(pt_dir)
    np.testing.assert_allclose(C.text_embeddings(direct, PROMPTS), C.text_embeddings(scorer, PROMPTS), atol=1e-6)
    from cfgbasin_jax.models.tiny import write_tiny_tokenizer

    model.config.save_pretrained(str(tmp_path / "bin"))  # transformers 5 writes only safetensors: pickle by hand
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    write_tiny_tokenizer(tmp_path / "bin")
    assert os.path.isfile(tmp_path / "bin" / "pytorch_model.bin")
    from_bin = C.load_clip(str(tmp_path / "bin"))
    np.testing.assert_allclose(C.text_embeddings(from_bin, PROMPTS), C.text_embeddings(scorer, PROMPTS), atol=1e-6)
    with pytest.raises(C.ClipWeightsError, match="tokenizer"):
        os.remove(tmp_path / "bin" / "merges.txt")
        C.load_clip(str(tmp_path / "bin"))


# ============================================================================ detection + ROC


def brute_auc(pos, neg) -> float:
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def test_roc_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for n_pos, n_neg, levels in [(40, 30, 5), (7, 11, 2), (1, 1, 1), (25, 60, 1000)]:
        pos = rng.integers(0, levels, n_pos).astype(float) + 0.3
        neg = rng.integers(0, levels, n_neg).astype(float)
        neg[: min(3, n_neg)] += 0.3  # guaranteed cross-set ties
        assert roc_auc(pos, neg) == pytest.approx(brute_auc(pos, neg), abs=1e-12)
    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1, 2], [3, 4]) == 0.0 and roc_auc([1, 1], [1]) == 0.5
    with pytest.raises(ValueError, match="non-finite"):
        roc_auc([1.0, np.nan], [0.0])


def test_tpr_at_fpr_matches_brute_force():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, 50).round(1), rng.normal(0, 1, 80).round(1)
    for fpr in (0.0, 0.01, 0.1, 0.5, 1.0):
        best = 0.0
        for thr in np.r_[-np.inf, np.unique(np.r_[pos, neg])]:
            if np.mean(neg > thr) <= fpr:
                best = max(best, np.mean(pos > thr))
        assert tpr_at_fpr(pos, neg, fpr) == pytest.approx(best)


def test_detection_score_averages_first_steps_skipping_nan():
    d = np.array([[2.0, 4.0, 100.0], [np.nan, 3.0, 100.0], [np.nan, np.nan, 1.0]])  # [B, steps]
    np.testing.assert_allclose(detection_score(d, first_steps=2), [3.0, 3.0, np.nan])
    np.testing.assert_allclose(detection_score(d, first_steps=1), [2.0, np.nan, np.nan])
    np.testing.assert_allclose(detection_score(d.T, first_steps=3, step_axis=0), [106 / 3, 51.5, 1.0])
    with pytest.raises(ValueError, match="first_steps"):
        detection_score(d, first_steps=4)
    # a memorized set with larger ||eps_c - eps_u|| separates perfectly
    mem, non = detection_score(d[:2] + 10, 2), detection_score(d[:2], 2)
    assert roc_auc(mem, non) == 1.0


# ============================================================================ nearest neighbours


@pytest.mark.parametrize("n,m,qc,kc", [(37, 53, 8, 16), (5, 3, 64, 64), (100, 1000, 33, 129), (1, 7, 1, 2)])
def test_nearest_neighbors_matches_brute_force(n, m, qc, kc):
    rng = np.random.default_rng(n * 1000 + m)
    q = rng.standard_normal((n, 12)).astype(np.float32)
    k = rng.standard_normal((m, 12)).astype(np.float32)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    q[0] = k[m - 1]  # an exact copy of the last key (tests the masked, padded last block)
    sim, idx = nearest_neighbors(q, k, query_chunk=qc, key_chunk=kc)
    brute = q.astype(np.float64) @ k.T.astype(np.float64)
    np.testing.assert_allclose(sim, brute.max(axis=1), atol=1e-5)
    np.testing.assert_array_equal(idx, brute.argmax(axis=1))
    assert idx.dtype == np.int32 and sim[0] == pytest.approx(np.dot(k[m - 1], k[m - 1]), abs=1e-5)


def test_nearest_neighbors_ties_pick_lowest_index_and_bad_shapes():
    k = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    sim, idx = nearest_neighbors(np.array([[1.0, 0.0]], np.float32), k, query_chunk=1, key_chunk=1)
    assert idx[0] == 0 and sim[0] == 1.0
    with pytest.raises(ValueError, match="equal D"):
        nearest_neighbors(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="at least one"):
        nearest_neighbors(np.zeros((0, 3)), np.zeros((2, 3)))


# ============================================================================ evaluate.py


def direct_sscd_max(dst, gen_paths, train_paths, preset="sscd"):
    """Per-image SSCD computation, one image at a time, brute-force max."""
    config, params = load_sscd(dst)
    emb = lambda p: sscd_descriptors(config, params, I.sscd_pixels(I.load_rgb(p), preset)[None])[0]  # noqa: E731
    g = np.stack([emb(p) for p in gen_paths]).astype(np.float64)
    t = np.stack([emb(p) for p in train_paths]).astype(np.float64)
    s = g @ t.T
    return s.max(axis=1), s.argmax(axis=1)


def test_evaluate_writes_the_paper_row(eval_folders, tiny_sscd, tiny_clip, capsys):
    gen, train = eval_folders
    model, tokenizer, processor, _, flax_clip = tiny_clip
    rc = evaluate_main(["--gen", gen, "--train", train, "--sscd", tiny_sscd[2], "--clip", flax_clip, "--batch-size", "3"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    with open(os.path.join(gen, "eval.json")) as f:
        report = json.load(f)
    for key in ("sscd_p95", "sscd_mean", "sscd_frac_above", "sscd_threshold", "clip_cos_mean", "clip_score_mean",
                "fid", "fid_note", "n_generated", "n_train", "per_image"):  # fmt: skip
        assert key in report, key
    assert report["n_generated"] == 4 and report["n_train"] == 5 and report["fid"] is None
    rows = report["per_image"]
    assert [r["file"] for r in rows] == ["Images/0_0.png", "Images/0_1.png", "Images/1_0.png", "Images/2_0.png"]
    train_paths = I.list_images(train)
    gen_paths = [os.path.join(gen, r["file"]) for r in rows]
    smax, sidx = direct_sscd_max(tiny_sscd[2], gen_paths, train_paths)
    np.testing.assert_allclose([r["sscd_max"] for r in rows], smax, atol=1e-5)
    assert [r["sscd_match"] for r in rows] == list(sidx)
    assert rows[0]["sscd_max"] > 1 - 1e-5 and rows[0]["sscd_match_file"] == "t2.png"  # the exact copy
    assert report["sscd_p95"] == pytest.approx(np.percentile(smax, 95), abs=1e-5)
    assert report["sscd_mean"] == pytest.approx(smax.mean(), abs=1e-5)
    assert report["sscd_frac_above"] == pytest.approx(np.mean(smax > 0.5))
    ref_cos = torch_clip_cos(model, tokenizer, processor, [I.load_rgb(p) for p in gen_paths],
                             [PROMPTS[r["index"]] for r in rows])  # fmt: skip
    np.testing.assert_allclose([r["clip_cos"] for r in rows], ref_cos, atol=1e-5)
    assert report["clip_cos_mean"] == pytest.approx(ref_cos.mean(), abs=1e-5)
    assert report["clip_score_mean"] == pytest.approx(np.mean(100 * np.maximum(ref_cos, 0)), abs=1e-3)
    assert "| SSCD p95 |" in out.out and f"{report['sscd_p95']:.3f}" in out.out


def test_evaluate_without_metadata_uses_images_folder_and_captions(tmp_path, tiny_sscd, tiny_clip, capsys):
    gen, train = str(tmp_path / "gen"), str(tmp_path / "train")
    rng = np.random.default_rng(11)
    for name in ("10.png", "2_1.png", "2_0.png"):
        save_image(os.path.join(gen, "Images", name), blob_image(rng, 33, 47))
    save_image(os.path.join(train, "a.png"), blob_image(rng, 40, 40))
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"caption {i}" for i in range(11)) + "\n")
    args = ["--gen", gen, "--train", train, "--sscd", tiny_sscd[2], "--sscd-preprocess", "dcr224"]
    assert evaluate_main(args + ["--clip", tiny_clip[4], "--captions", str(captions), "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(r["index"], r["sample"], r["prompt"]) for r in report["per_image"]] == [
        (2, 0, "caption 2"), (2, 1, "caption 2"), (10, 0, "caption 10")]  # fmt: skip
    smax, _ = direct_sscd_max(tiny_sscd[2], [os.path.join(gen, r["file"]) for r in report["per_image"]],
                              [os.path.join(train, "a.png")], "dcr224")  # fmt: skip
    np.testing.assert_allclose([r["sscd_max"] for r in report["per_image"]], smax, atol=1e-5)
    # the CLIP score needs prompts: without metadata and --captions it is refused, naming the flag
    capsys.readouterr()
    assert evaluate_main(["--gen", gen, "--clip", tiny_clip[4]]) == 2
    assert "--captions" in capsys.readouterr().err
    captions.write_text("only one\n")
    assert evaluate_main(args + ["--captions", str(captions)]) == 2
    assert "prompt index 10" in capsys.readouterr().err


def test_evaluate_bad_input_names_the_flag(tmp_path, eval_folders, tiny_sscd, capsys):
    gen, train = eval_folders
    cases = [
        (["--gen", gen, "--train", train], "--sscd"),
        (["--gen", gen, "--sscd", tiny_sscd[2]], "--train"),
        (["--gen", gen, "--train", train, "--sscd", str(tmp_path / "nowhere")], "--sscd"),
        (["--gen", gen, "--clip", str(tmp_path / "nowhere")], "--clip"),
        (["--gen", gen], "nothing to evaluate"),
        (["--gen", gen, "--metrics", "clip"], "--clip"),
        (["--gen", str(tmp_path / "nogen"), "--train", train, "--sscd", tiny_sscd[2]], "--gen"),
    ]
    (tmp_path / "empty_train").mkdir()
    cases.append((["--gen", gen, "--train", str(tmp_path / "empty_train"), "--sscd", tiny_sscd[2]], "no images"))
    (tmp_path / "empty_gen" / "Images").mkdir(parents=True)
    cases.append((["--gen", str(tmp_path / "empty_gen"), "--train", train, "--sscd", tiny_sscd[2]], "no images"))
    bad_meta = tmp_path / "bad_meta"
    bad_meta.mkdir()
    (bad_meta / "metadata.jsonl").write_text(json.dumps({"index": 0, "prompt": "x", "file": "Images/0.png"}) + "\n")
    cases.append((["--gen", str(bad_meta), "--train", train, "--sscd", tiny_sscd[2]], "Images/0.png"))
    for argv, needle in cases:
        assert evaluate_main(argv) == 2, argv
        assert needle in capsys.readouterr().err, (argv, needle)


def test_evaluate_script_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--gen", str(tmp_path), "--train", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "--sscd" in proc.stderr


def test_evaluate_refuses_bad_flags_before_computing_and_writes_atomically(tmp_path, eval_folders, tiny_sscd, capsys,
                                                                         monkeypatch):
    """Issue 15: `--threshold nan` reported 0.0% copies; an unwritable --out failed only after every
    metric was computed (no row printed); eval.json was written in place, not atomically."""
    from cfgbasin_jax.runs import evaluation as E

    gen, train = eval_folders
    args = ["--gen", gen, "--train", train, "--sscd", tiny_sscd[2]]
    real = E.sscd_similarity
    monkeypatch.setattr(E, "sscd_similarity", lambda *a, **k: pytest.fail("computed a metric"))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cases = [
        (["--threshold", "nan"], "--threshold must be a number in [-1, 1]"),
        (["--threshold", "2"], "--threshold must be a number in [-1, 1]"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--out", str(not_a_dir / "eval.json")], f"--out {not_a_dir / 'eval.json'}: {not_a_dir} exists and is not"),
        (["--out", str(tmp_path)], "is a directory"),
    ]
    for extra, message in cases:
        assert evaluate_main(args + extra) == 2, extra
        out = capsys.readouterr()
        assert out.out == "" and out.err.strip().splitlines() == [f"error: {out.err.strip()[7:]}"] and message in out.err
    monkeypatch.setattr(E, "sscd_similarity", real)

    report = tmp_path / "eval.json"
    report.write_text("old")
    inode = report.stat().st_ino
    assert evaluate_main(args + ["--out", str(report)]) == 0
    assert json.loads(report.read_text())["n_generated"] == 4
    assert report.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["eval.json", "file"]  # no temporary file left
