#!/usr/bin/env python3
"""Generate the CLIP (text + vision) reference fixtures for artguide's Rust parity tests.

Writes (and only writes) tests/fixtures/clip/:
  tiny-clip-a/, tiny-clip-b/          tiny random CLIPModel folders in the Hugging Face layout
                                      (config.json, model.safetensors [float16],
                                      preprocessor_config.json, tokenizer files)
  images/                             5 small deterministic test images (PNG RGB / L / RGBA, JPEG)
  reference-tiny-clip-a.safetensors   tensors computed by transformers (see the JSON)
  reference-tiny-clip-a.json          settings, prompts, templates, labels, shapes, notes
  reference-tiny-clip-b.safetensors
  reference-tiny-clip-b.json

Everything is seeded and computed on the CPU in float32 from the float16 weights as stored.
Nothing is downloaded. Deterministic: a rerun gives byte-identical files (same machine and
library versions, tests/reference/requirements.txt).

Run from the repository root:  /work/venv-ref/bin/python tests/reference/make_clip_fixtures.py
"""

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Keep the run quiet, offline and light on CPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import open_clip  # noqa: E402
import PIL  # noqa: E402
import safetensors  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
)
from transformers.image_utils import SizeDict  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
OUT = FIXTURES / "clip"
IMG_DIR = OUT / "images"
TOKENIZER_SRC = FIXTURES / "tiny-sd-a" / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
MAX_LEN = 77

PROMPTS = [
    "a painting in the style of Impressionism",
    "an artwork of the Cubism movement",
    "a photo of a cat",
    "a painting with distorted hands",
    "a painting with well-drawn hands",
    "Baroque",
]
TEMPLATES = ["a painting in the style of {}", "an artwork of the {} movement"]
LABELS = ["Impressionism", "Cubism", "Baroque"]

VERSIONS = {
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "transformers": transformers.__version__,
    "open_clip_torch": open_clip.__version__,
    "pillow": PIL.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
    "tokenizers": __import__("tokenizers").__version__,
    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
}

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def log(*a):
    print(*a, flush=True)


def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

MODELS = {
    "tiny-clip-a": dict(
        seed=2000,
        projection_dim=24,
        # ln(100), the value trained CLIP checkpoints end at; stored as f16 -> 4.60546875.
        logit_scale=math.log(100.0),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"),
        vision=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=30,
            patch_size=6,
            hidden_act="quick_gelu",
        ),
    ),
    "tiny-clip-b": dict(
        seed=3000,
        projection_dim=12,
        # transformers' default logit_scale_init_value (ln(1/0.07)); stored as f16 -> 2.66015625.
        logit_scale=2.6592,
        text=dict(hidden_size=16, intermediate_size=23, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"),
        vision=dict(
            hidden_size=24,
            intermediate_size=29,
            num_hidden_layers=3,
            num_attention_heads=3,
            image_size=28,
            patch_size=7,
            hidden_act="gelu",
        ),
    ),
}


def init_weights(model: torch.nn.Module, seed: int, emb_std: float = 0.2):
    """Seeded normal init with modest std, in a fixed order (named_modules, then the loose parameters)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()

    def normal_(p, mean, std):
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean)
        seen.add(id(p))

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            normal_(mod.weight, 1.0, 0.1)
            normal_(mod.bias, 0.0, 0.1)
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            std = min(0.2, max(0.02, 1.0 / math.sqrt(fan_in)))
            normal_(mod.weight, 0.0, std)
            if mod.bias is not None:
                normal_(mod.bias, 0.0, 0.05)
        elif isinstance(mod, torch.nn.Embedding):
            normal_(mod.weight, 0.0, emb_std)
    normal_(model.vision_model.embeddings.class_embedding, 0.0, emb_std)
    for name, p in model.named_parameters():
        if name == "logit_scale":
            continue
        assert id(p) in seen, f"parameter not initialised: {name}"


def build_model(name, spec):
    out = OUT / name
    text_cfg = dict(
        vocab_size=49408,
        max_position_embeddings=MAX_LEN,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        projection_dim=spec["projection_dim"],
        **spec["text"],
    )
    vision_cfg = dict(num_channels=3, layer_norm_eps=1e-5, projection_dim=spec["projection_dim"], **spec["vision"])
    cfg = CLIPConfig(
        text_config=text_cfg,
        vision_config=vision_cfg,
        projection_dim=spec["projection_dim"],
        logit_scale_init_value=spec["logit_scale"],
    )
    model = CLIPModel(cfg).eval()
    init_weights(model, spec["seed"])
    model.logit_scale.fill_(spec["logit_scale"])
    # Stored as f16; every reference below is computed in f32 from these identical f16 values.
    model = model.to(torch.float16)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"], os.listdir(out)
    stored = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in stored.values())
    expected = {k for k in model.state_dict()}
    assert set(stored) == expected, set(stored) ^ expected
    # Canonical HF CLIPModel key layout (as openai/clip-vit-* on the Hub).
    for k in (
        "logit_scale",
        "text_model.embeddings.token_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_projection.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.pre_layrnorm.weight",
        "vision_model.post_layernorm.weight",
        "visual_projection.weight",
    ):
        assert k in stored, k

    v = spec["vision"]
    proc = CLIPImageProcessor(
        size={"shortest_edge": v["image_size"]},
        crop_size={"height": v["image_size"], "width": v["image_size"]},
        resample=3,
        do_convert_rgb=True,
    )
    proc.save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SRC / f, out / f)
    return out


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def _grad(h, w, ax, ay, c0):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return c0 + ax * xx / max(w - 1, 1) + ay * yy / max(h - 1, 1)


def make_images():
    rng = np.random.default_rng(4242)
    IMG_DIR.mkdir(parents=True)
    specs = []

    def u8(a):
        return np.clip(np.round(a), 0, 255).astype(np.uint8)

    # 0: 37x23 RGB PNG: colour gradients + noise + a hard-edged block.
    h, w = 23, 37
    a = np.stack([_grad(h, w, 220, 0, 20), _grad(h, w, 0, 200, 30), _grad(h, w, -120, 120, 128)], -1)
    a += rng.normal(0, 25, size=a.shape)
    a[5:12, 20:30] = [250, 10, 40]
    specs.append(("img0_37x23_rgb.png", Image.fromarray(u8(a), "RGB"), dict(format="PNG")))

    # 1: 19x41 grayscale "L" PNG: diagonal gradient, noise, checker stripe.
    h, w = 41, 19
    a = _grad(h, w, 90, 150, 10) + rng.normal(0, 30, size=(h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    a[(yy // 3 + xx // 3) % 2 == 0] += 60
    specs.append(("img1_19x41_l.png", Image.fromarray(u8(a), "L"), dict(format="PNG")))

    # 2: 33x33 RGBA PNG: colours + noise, alpha radial (0 in the corners, 255 in the centre), a fully
    #    transparent block with saturated colour (must come out white) and an opaque stripe.
    h, w = 33, 33
    rgb = np.stack([_grad(h, w, 0, 255, 0), _grad(h, w, 255, 0, 0), _grad(h, w, 80, 80, 40)], -1)
    rgb += rng.normal(0, 40, size=rgb.shape)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.sqrt((yy - 16) ** 2 + (xx - 16) ** 2) / (16 * math.sqrt(2))
    alpha = 255 * (1 - r) ** 0.7 + rng.normal(0, 20, size=(h, w))
    alpha[2:8, 24:31] = 0
    rgb[2:8, 24:31] = [200, 0, 255]
    alpha[:, 3] = 255
    a = np.concatenate([u8(rgb), u8(alpha)[..., None]], -1)
    specs.append(("img2_33x33_rgba.png", Image.fromarray(a, "RGBA"), dict(format="PNG")))

    # 3: 50x29 RGB JPEG quality 90 (Pillow's default 4:2:0 chroma subsampling at that quality).
    h, w = 29, 50
    a = np.stack([_grad(h, w, 150, 50, 60), _grad(h, w, -100, 100, 140), _grad(h, w, 60, -160, 200)], -1)
    xx = np.mgrid[0:h, 0:w][1].astype(np.float64)
    a += 40 * np.sin(xx / 2.5)[..., None] + rng.normal(0, 15, size=a.shape)
    specs.append(("img3_50x29_rgb_q90.jpg", Image.fromarray(u8(a), "RGB"), dict(format="JPEG", quality=90)))

    # 4: 71x52 RGB PNG, high-frequency content: exercises the antialiased *down*scale (both axes).
    h, w = 52, 71
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack(
        [
            128 + 100 * np.sin(xx / 1.7) * np.cos(yy / 2.3),
            _grad(h, w, 255, 0, 0),
            128 + 90 * np.sign(np.sin((xx + 2 * yy) / 3.1)),
        ],
        -1,
    )
    a += rng.normal(0, 20, size=a.shape)
    specs.append(("img4_71x52_rgb.png", Image.fromarray(u8(a), "RGB"), dict(format="PNG")))

    files = []
    for fname, im, kw in specs:
        p = IMG_DIR / fname
        im.save(p, **kw)
        files.append(p)
    return files


# --------------------------------------------------------------------------------------
# Executable spec of the preprocessing (checked bit-for-bit against transformers below)
# --------------------------------------------------------------------------------------


def composite_on_white_u8(c, a):
    """PIL.Image.alpha_composite(white, rgba).convert('RGB') per channel, in closed form
    (checked exhaustively for all 256x256 (c, a) pairs in check_alpha_formula)."""
    t = c.astype(np.int64) * a + 255 * (255 - a.astype(np.int64))
    return ((t + 127) // 255).astype(np.uint8)


def check_alpha_formula():
    c, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([c, c, c, a], -1).astype(np.uint8)
    im = Image.fromarray(rgba, "RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    pil = np.asarray(Image.alpha_composite(bg, im).convert("RGB"))
    mine = composite_on_white_u8(c, a)
    assert np.array_equal(pil[..., 0], mine) and np.array_equal(pil[..., 2], mine)
    # Same thing as transformers' convert_to_rgb output for an RGBA PIL image.
    tf = transformers.image_transforms.convert_to_rgb(im, return_numpy=True)
    assert np.array_equal(tf[..., 1], mine)


def _cubic_aa(x):
    # torch UpSampleKernel.cpp aa_filter for bicubic (Keys, a = -0.5, as PIL's BICUBIC).
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((a * x) - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


def axis_int16_weights(in_size, out_size):
    """torch's uint8 antialiased bicubic taps for one axis: [(xmin, int16 weights)], precision.
    HelperInterpBase::_compute_index_ranges_weights(aa) + _compute_index_ranges_int16_weights."""
    scale = in_size / out_size  # area_pixel_compute_scale, align_corners=False, no scale_factor
    support = 2.0 * scale if scale >= 1.0 else 2.0  # (interp_size 4 * 0.5) * max(scale, 1)
    kmax = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps, wt_max = [], 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)  # C++ static_cast<int64_t>: truncation toward 0
        xsize = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), kmax)
        w = [_cubic_aa(((j + xmin) - center + 0.5) * invscale) for j in range(xsize)]
        total = 0.0
        for v in w:
            total += v
        if total != 0.0:
            w = [v / total for v in w]
            wt_max = max([wt_max] + w)
        taps.append((xmin, w))
    prec = 0
    while prec < 22 and int(0.5 + wt_max * (1 << (prec + 1))) < (1 << 15):
        prec += 1
    out = []
    for xmin, w in taps:
        wi = []
        for v in w:
            s = v * (1 << prec)
            wi.append(int(-0.5 + s) if s < 0 else int(0.5 + s))
        out.append((xmin, np.array(wi, dtype=np.int64)))
    return out, prec


def _pass_1d(img, out_size, axis):
    in_size = img.shape[axis]
    if in_size == out_size:
        return img
    taps, prec = axis_int16_weights(in_size, out_size)
    x = np.moveaxis(img, axis, -1)
    res = np.empty(x.shape[:-1] + (out_size,), dtype=np.int64)
    for i, (xmin, w) in enumerate(taps):
        acc = (1 << (prec - 1)) + (x[..., xmin : xmin + len(w)] * w).sum(-1)
        res[..., i] = np.clip(acc >> prec, 0, 255)  # arithmetic shift = floor, then saturate
    return np.moveaxis(res, -1, axis)


def torch_u8_bicubic_aa_resize(chw_u8, out_h, out_w):
    """Horizontal (width) pass first, result saturated to uint8, then the vertical pass."""
    x = _pass_1d(chw_u8.astype(np.int64), out_w, 2)
    x = _pass_1d(x, out_h, 1)
    return x.astype(np.uint8)


def shortest_edge_size(h, w, size):
    """transformers.image_transforms.get_resize_output_image_size(default_to_square=False)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def check_resize_spec(n_cases=150):
    """Random sizes (up- and downscale per axis) against torchvision's resize on uint8."""
    from torchvision.transforms.v2 import functional as tvF

    rng = np.random.default_rng(7)
    for _ in range(n_cases):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 80, size=4))
        a = rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)
        t = tvF.resize(torch.from_numpy(a)[None], [oh, ow], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        assert np.array_equal(t[0].numpy(), torch_u8_bicubic_aa_resize(a, oh, ow)), (h, w, oh, ow)
    return n_cases


def reference_preprocess(rgb_hwc_u8, size, crop, mean, std):
    """numpy restatement of CLIPImageProcessor (torchvision backend) for an already-RGB uint8 image."""
    h, w = rgb_hwc_u8.shape[:2]
    oh, ow = shortest_edge_size(h, w, size)
    resized = torch_u8_bicubic_aa_resize(np.ascontiguousarray(rgb_hwc_u8.transpose(2, 0, 1)), oh, ow)
    top, left = int((oh - crop) / 2.0), int((ow - crop) / 2.0)
    assert oh >= crop and ow >= crop
    cropped = resized[:, top : top + crop, left : left + crop]
    # Fused rescale + normalize as the torchvision backend does it, all in float32:
    # mean' = f32(mean) * (1 / rescale_factor), std' likewise; out = (x - mean') / std'.
    m = (np.asarray(mean, dtype=np.float32) * np.float32(1.0 / (1.0 / 255.0))).astype(np.float32)
    s = (np.asarray(std, dtype=np.float32) * np.float32(1.0 / (1.0 / 255.0))).astype(np.float32)
    pv = (cropped.astype(np.float32) - m[:, None, None]) / s[:, None, None]
    return resized, (oh, ow), (top, left), pv.astype(np.float32)


# --------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------


def l2n(x):
    # transformers' _get_vector_norm: sum(x**2) ** 0.5
    return x / (torch.sum(x**2, dim=-1, keepdim=True) ** 0.5)


def make_reference(name, spec, image_files):
    folder = OUT / name
    log(f"== reference {name}")
    model = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    model_eager = CLIPModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    stored = load_file(str(folder / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, stored[k].to(torch.float32)), k
    proc = AutoImageProcessor.from_pretrained(folder)
    assert type(proc) is CLIPImageProcessor and proc.backend == "torchvision", type(proc)
    proc_pil = CLIPImageProcessorPil.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    clip_proc = CLIPProcessor.from_pretrained(folder)
    with open(folder / "preprocessor_config.json") as f:
        proc_file = json.load(f)

    S = spec["vision"]["image_size"]
    mean, std = list(proc.image_mean), list(proc.image_std)
    T = {}
    images_meta = []
    pil_stats = dict(differing_u8_values_after_resize=0, total_u8_values=0, max_abs_u8_diff=0, max_abs_pixel_value_diff=0.0)
    pv_all = []
    for i, p in enumerate(image_files):
        img = Image.open(p)
        img.load()
        mode = img.mode
        # What enters the resize: transformers' process_image (PIL -> convert_to_rgb -> CHW uint8).
        chw = proc.process_image(img, do_convert_rgb=True)
        assert chw.dtype == torch.uint8 and chw.shape[0] == 3
        rgb = chw.permute(1, 2, 0).contiguous()
        if mode == "RGBA":
            raw = np.asarray(img)
            assert np.array_equal(rgb.numpy(), composite_on_white_u8(raw[..., :3], raw[..., 3:4]))
        elif mode == "L":
            raw = np.asarray(img)
            assert np.array_equal(rgb.numpy(), np.repeat(raw[..., None], 3, -1))
        else:
            assert mode == "RGB" and np.array_equal(rgb.numpy(), np.asarray(img))
        resized_t = proc.resize(chw[None], SizeDict(shortest_edge=S), resample=proc.resample)[0]

        pv = proc(images=img, return_tensors="pt")["pixel_values"]
        assert pv.dtype == torch.float32 and tuple(pv.shape) == (1, 3, S, S)
        pv_proc2 = clip_proc(images=img, return_tensors="pt")["pixel_values"]
        assert torch.equal(pv, pv_proc2)
        pv_all.append(pv)

        resized, (oh, ow), (top, left), pv_np = reference_preprocess(rgb.numpy(), S, S, mean, std)
        assert np.array_equal(resized, resized_t.numpy()), f"resize spec differs on {p.name}"
        spec_diff = float(np.abs(pv_np - pv[0].numpy()).max())
        assert spec_diff <= 1e-6, spec_diff
        alt = ((resized[:, top : top + S, left : left + S].astype(np.float64) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None])
        alt_diff = float(np.abs(alt - pv[0].numpy()).max())

        # The PIL backend, for comparison only (not the default, not the reference).
        pv_pil = torch.as_tensor(np.asarray(proc_pil(images=img, return_tensors="np")["pixel_values"]))
        d = (pv_pil - pv).abs()
        pil_stats["max_abs_pixel_value_diff"] = max(pil_stats["max_abs_pixel_value_diff"], float(d.max()))
        pil_rs = proc_pil.resize(proc_pil.process_image(img, do_convert_rgb=True), SizeDict(shortest_edge=S), resample=3)
        du8 = np.abs(pil_rs.astype(np.int64) - resized.astype(np.int64))
        pil_stats["differing_u8_values_after_resize"] += int((du8 > 0).sum())
        pil_stats["total_u8_values"] += int(du8.size)
        pil_stats["max_abs_u8_diff"] = max(pil_stats["max_abs_u8_diff"], int(du8.max()))

        emb = model.get_image_features(pixel_values=pv).pooler_output
        emb_eager = model_eager.get_image_features(pixel_values=pv).pooler_output
        assert torch.allclose(emb, emb_eager, atol=1e-5, rtol=0), (emb - emb_eager).abs().max()

        T[f"rgb_u8_{i}"] = rgb
        T[f"resized_u8_{i}"] = resized_t.contiguous()
        T[f"pixel_values_{i}"] = pv.contiguous()
        T[f"image_embeds_{i}"] = emb.contiguous()
        extra = {}
        if img.format == "JPEG":
            from PIL import JpegImagePlugin

            extra["jpeg_subsampling"] = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}[JpegImagePlugin.get_sampling(img)]
            extra["jpeg_note"] = JPEG_NOTE
        images_meta.append(
            dict(
                index=i,
                file=f"images/{p.name}",
                sha256=sha256(p),
                pil_mode=mode,
                format=img.format,
                width=img.width,
                height=img.height,
                resized_hw=[oh, ow],
                crop_top_left=[top, left],
                crop_hw=[S, S],
                spec_vs_transformers_max_abs_diff=spec_diff,
                f64_rescale_normalize_vs_transformers_max_abs_diff=alt_diff,
                **extra,
            )
        )
    # Batched call: images of different sizes in one call give the same pixel values.
    pv_batch = proc(images=[Image.open(p) for p in image_files], return_tensors="pt")["pixel_values"]
    assert torch.equal(pv_batch, torch.cat(pv_all)), "batched preprocessing differs"

    # ---- text
    enc = tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    ids = enc["input_ids"]
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (len(PROMPTS), MAX_LEN)
    assert tok.pad_token_id == 49407
    text_embeds = model.get_text_features(input_ids=ids).pooler_output
    te_mask = model.get_text_features(input_ids=ids, attention_mask=enc["attention_mask"]).pooler_output
    te_eager = model_eager.get_text_features(input_ids=ids).pooler_output
    mask_diff = float((text_embeds - te_mask).abs().max())
    assert mask_diff <= 1e-5, mask_diff
    assert torch.allclose(text_embeds, te_eager, atol=1e-5, rtol=0)
    eos_pos = [int((row == 49407).nonzero()[0]) for row in ids]
    T["text_ids"] = ids.contiguous()
    T["text_embeds"] = text_embeds.contiguous()

    logit_scale = model.logit_scale.detach().clone()
    T["logit_scale"] = logit_scale.contiguous()

    # ---- zero-shot
    image_embeds = torch.cat([T[f"image_embeds_{i}"] for i in range(len(image_files))])
    img_n = l2n(image_embeds)
    zs_prompts = [t.format(lab) for t in TEMPLATES for lab in LABELS]  # template-major
    zs_ids = tok(zs_prompts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")["input_ids"]
    zs_embeds = model.get_text_features(input_ids=zs_ids).pooler_output
    per = l2n(zs_embeds).reshape(len(TEMPLATES), len(LABELS), -1)
    cls_single = per[0]
    cls_ens = l2n(per.mean(dim=0))
    scale = logit_scale.exp()
    logits_single = scale * img_n @ cls_single.T
    logits_ens = scale * img_n @ cls_ens.T
    probs_single = logits_single.softmax(dim=-1)
    probs_ens = logits_ens.softmax(dim=-1)
    # Cross-check the single-template logits with CLIPModel.forward.
    fwd = model(input_ids=zs_ids[: len(LABELS)], pixel_values=torch.cat(pv_all))
    assert torch.allclose(fwd.logits_per_image, logits_single, atol=1e-4, rtol=1e-6), (fwd.logits_per_image - logits_single).abs().max()
    T["zs_text_ids"] = zs_ids.contiguous()
    T["zs_text_embeds"] = zs_embeds.contiguous()
    T["zs_classifier_single"] = cls_single.contiguous()
    T["zs_classifier_ensemble"] = cls_ens.contiguous()
    T["logits_single"] = logits_single.contiguous()
    T["logits_ensemble"] = logits_ens.contiguous()
    T["probs_single"] = probs_single.contiguous()
    T["probs_ensemble"] = probs_ens.contiguous()

    for k, v in T.items():
        assert v.dtype in (torch.float32, torch.int64, torch.uint8), (k, v.dtype)
        assert torch.isfinite(v.to(torch.float64)).all(), k
    save_file(T, str(OUT / f"reference-{name}.safetensors"), metadata={"generator": "tests/reference/make_clip_fixtures.py"})

    v, t = spec["vision"], spec["text"]
    meta = dict(
        description=(
            f"Reference outputs of transformers' CLIPModel / CLIPImageProcessor / CLIPTokenizer for the random "
            f"model tests/fixtures/clip/{name} (weights float16 on disk; everything computed in float32 from those "
            f"f16 values, on the CPU, with the default SDPA attention; eager attention agrees within 1e-5). "
            f"Tensors are in reference-{name}.safetensors."
        ),
        generator="tests/reference/make_clip_fixtures.py",
        versions=VERSIONS,
        model=dict(
            folder=f"tests/fixtures/clip/{name}",
            seed=spec["seed"],
            projection_dim=spec["projection_dim"],
            text=dict(vocab_size=49408, max_position_embeddings=MAX_LEN, layer_norm_eps=1e-5, **t),
            vision=dict(num_channels=3, layer_norm_eps=1e-5, grid=v["image_size"] // v["patch_size"], **v),
            logit_scale=float(logit_scale),
            logit_scale_exp=float(scale),
        ),
        image_processor=dict(
            class_loaded_by_AutoImageProcessor=f"{type(proc).__module__}.{type(proc).__name__}",
            backend=proc.backend,
            preprocessor_config_json=proc_file,
            effective_settings=dict(
                do_convert_rgb=proc.do_convert_rgb,
                do_resize=proc.do_resize,
                size=dict(shortest_edge=S),
                resample=int(proc.resample),
                resample_name="BICUBIC (PIL code 3) -> torchvision InterpolationMode.BICUBIC, antialias=True",
                do_center_crop=proc.do_center_crop,
                crop_size=dict(height=S, width=S),
                do_rescale=proc.do_rescale,
                rescale_factor=proc.rescale_factor,
                do_normalize=proc.do_normalize,
                image_mean=mean,
                image_std=std,
            ),
        ),
        preprocessing=PREPROCESSING_NOTES,
        convert_rgb=CONVERT_RGB_NOTES,
        pil_backend_comparison=dict(
            note=(
                "CLIPImageProcessorPil (transformers' PIL/numpy backend, NOT what AutoImageProcessor / "
                "CLIPImageProcessor load) resizes with PIL.Image.resize(BICUBIC). Pillow uses 22-bit integer "
                "coefficients and picks the order of its two 1-D passes itself, so its uint8 output differs from "
                "torch's. Not used for any reference; numbers for these images:"
            ),
            **pil_stats,
        ),
        images=images_meta,
        text=dict(
            prompts=PROMPTS,
            tokenizer="AutoTokenizer.from_pretrained(folder) -> CLIPTokenizer (tokenizers backend); "
            "tok(prompts, padding='max_length', max_length=77, truncation=True); pad = <|endoftext|> (49407)",
            eos_positions=eos_pos,
            pooling=(
                "get_text_features(input_ids) with no attention_mask (causal mask only): final_layer_norm output at "
                "the FIRST position whose id == eos_token_id 49407 (config eos_token_id != 2), then text_projection "
                "(no bias). Passing the tokenizer's attention_mask changes nothing at that position "
                f"(max abs diff {mask_diff:.3g})."
            ),
        ),
        image_features=(
            "get_image_features(pixel_values): patch conv (no bias) + class token + position embeddings, "
            "pre_layrnorm, encoder, post_layernorm of the class token, visual_projection (no bias). Unnormalised."
        ),
        zero_shot=dict(
            templates=TEMPLATES,
            labels=LABELS,
            zs_prompts_template_major=zs_prompts,
            method=(
                "norm(x) = x / sum(x**2)**0.5 over the last dim. Per label: e_t = norm(text_embeds(template_t.format(label))). "
                "single: classifier = e_0 (first template only). ensemble: classifier = norm(mean_t e_t). "
                "logits[i, l] = exp(logit_scale) * norm(image_embeds_i) . classifier_l; probs = softmax over labels. "
                "All float32."
            ),
            zs_text_ids_layout="row = t * len(labels) + l (template-major); rows 0..len(labels) are the single-template prompts",
        ),
        tensors={k: dict(dtype=str(v.dtype).replace("torch.", ""), shape=list(v.shape)) for k, v in T.items()},
        tensor_notes=dict(
            rgb_u8_i="[H, W, 3] uint8: the image after transformers' convert_to_rgb (decoded by Pillow), the input of the resize",
            resized_u8_i="[3, h, w] uint8: after the antialiased bicubic resize (shortest edge), before the crop",
            pixel_values_i="[1, 3, S, S] float32: CLIPImageProcessor output",
            image_embeds_i="[1, projection_dim] float32: get_image_features(pixel_values_i), unnormalised",
            text_ids="[n_prompts, 77] int64, padded with 49407",
            text_embeds="[n_prompts, projection_dim] float32: get_text_features(text_ids), unnormalised",
            logit_scale="[] float32 scalar (the log of the scale, as stored in the model); exp() is applied",
            zs_text_ids="[n_templates * n_labels, 77] int64, template-major",
            zs_text_embeds="[n_templates * n_labels, projection_dim] float32, unnormalised",
            zs_classifier_single="[n_labels, projection_dim] float32, unit rows",
            zs_classifier_ensemble="[n_labels, projection_dim] float32, unit rows",
            logits_single="[n_images, n_labels] float32",
            logits_ensemble="[n_images, n_labels] float32",
            probs_single="[n_images, n_labels] float32",
            probs_ensemble="[n_images, n_labels] float32",
        ),
    )
    with open(OUT / f"reference-{name}.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log(f"    probs_single:\n{probs_single}\n    probs_ensemble:\n{probs_ens}")


JPEG_NOTE = (
    "Decoded by Pillow's libjpeg-turbo (islow IDCT, fancy chroma upsampling, its YCbCr->RGB tables). Other "
    "decoders (e.g. zune-jpeg behind the Rust image crate) may differ by a unit or so in some bytes, which "
    "shifts pixel_values by ~0.015 per unit: compare the decode with rgb_u8_i and test the preprocessing from "
    "rgb_u8_i to isolate the two."
)

PREPROCESSING_NOTES = dict(
    summary=(
        "transformers 5.x CLIPImageProcessor is the torchvision backend (AutoImageProcessor loads it). For a PIL "
        "image: convert_to_rgb (Pillow), uint8 CHW tensor, torchvision resize(BICUBIC, antialias=True) on the "
        "uint8 tensor (torch's native integer kernel), center crop, fused rescale+normalize in float32."
    ),
    steps=[
        "1. Decode with Pillow (Image.open; no EXIF transpose for a PIL image passed in). convert_to_rgb, see "
        "`convert_rgb`. -> uint8 [H, W, 3] (tensor rgb_u8_i), permuted to [3, H, W].",
        "2. Output size (get_resize_output_image_size, default_to_square=False): short = min(H, W) (W counts as "
        "short when W == H), long = the other; new_short = S; new_long = int(S * long / short) (Python float "
        "division then truncation, == floor(S*long/short) in integers). (h, w) = (new_long, new_short) if W <= H "
        "else (new_short, new_long).",
        "3. Resize with torch's uint8 antialiased bicubic (torchvision v2 keeps uint8 on the CPU for BICUBIC; "
        "UpSampleKernel.cpp `_compute_index_ranges_int16_weights` + separable uint8 loops), per axis in double: "
        "scale = in/out; support = 2*scale if scale >= 1 else 2; kmax = ceil(support)*2 + 1; "
        "invscale = 1/scale if scale >= 1 else 1; for output i: center = scale*(i + 0.5); "
        "xmin = max(trunc(center - support + 0.5), 0); xsize = clamp(min(trunc(center + support + 0.5), in) - xmin, 0, kmax); "
        "w_j = cubic(((j + xmin) - center + 0.5) * invscale) for j < xsize, with Keys cubic a = -0.5 "
        "(|x|<1: ((a+2)|x| - (a+3))x^2 + 1; 1<=|x|<2: ((a|x| - 5a)|x| + 8a)|x| - 4a; else 0); "
        "w_j /= sum_j w_j (sequential sum; skipped if the sum is 0). "
        "wt_max = max normalised weight over the whole axis; precision p = the first p in 0..22 with "
        "int(0.5 + wt_max * 2^(p+1)) >= 32768 (else 22); int16 weight = trunc(w*2^p + 0.5) if w*2^p >= 0 else "
        "trunc(w*2^p - 0.5). Pixel: acc = 2^(p-1) + sum_j in[xmin + j] * wi_j (integers); out = clamp(acc >> p, 0, 255) "
        "(arithmetic shift). Horizontal (width) pass first, saturated to uint8, then the vertical pass on that; an "
        "axis whose size does not change is skipped (it would be the identity anyway). -> tensor resized_u8_i.",
        "4. Center crop to S x S: top = int((h - S) / 2.0), left = int((w - S) / 2.0) (floor for h, w >= S; "
        "an odd margin leaves the extra row/column at the bottom/right). (Never pads here: the short side == S.)",
        "5. Rescale + normalise fused, float32: mean' = float32(mean) * 255.0, std' = float32(std) * 255.0 "
        "(computed as f32 tensors times 1/rescale_factor = 255.00000000000003, i.e. 255 in f32), "
        "pixel = (float32(u8) - mean') / std' (tvF.normalize: sub then div). "
        "Computing (u8/255 - mean)/std in float64 instead differs by < 1e-6 (see images[*]).",
        "6. pixel_values [1, 3, S, S] float32, channel order R, G, B.",
    ],
    verified=(
        "The script reimplements steps 2-5 in numpy (reference_preprocess) and asserts: the uint8 resize equals "
        "transformers' bit for bit on every image and on 150 random size pairs, and the pixel values agree within 1e-6 "
        "(they are bit-identical here: images[*].spec_vs_transformers_max_abs_diff)."
    ),
    precision_note=(
        "pixel_values within 1e-5 needs the exact uint8 resize: one uint8 step is 1/(255*std) ~ 0.015 after "
        "normalisation. PIL's own resize (and the PIL backend, CLIPImageProcessorPil) does NOT give the same "
        "bytes (see pil_backend_comparison)."
    ),
)

CONVERT_RGB_NOTES = dict(
    source="transformers.image_transforms.convert_to_rgb (PIL path), used by CLIPImageProcessor.process_image for PIL inputs",
    rule=(
        "has_alpha = 'A' in image.getbands() or image.info.get('transparency') is not None. If has_alpha: "
        "image.convert('RGBA'), then PIL.Image.alpha_composite(opaque white RGBA, image).convert('RGB'), i.e. "
        "alpha is COMPOSITED ONTO WHITE, not dropped. Otherwise image.convert('RGB') (L -> R=G=B=L; P -> palette "
        "lookup; CMYK/YCbCr by Pillow's conversions)."
    ),
    rgba_formula=(
        "for uint8 colour c and alpha a (both 0..255): out = round((c*a + 255*(255 - a)) / 255) = "
        "(c*a + 255*(255 - a) + 127) // 255 in integers (never a tie). Checked exhaustively against Pillow for all "
        "65536 (c, a) pairs. a = 0 gives 255 (white) whatever c is; a = 255 gives c."
    ),
    other_cases=(
        "LA and P/PA images with transparency, and L/RGB images with a tRNS transparency entry "
        "(info['transparency']), are composited the same way after Pillow's convert('RGBA'). Numpy/tensor inputs "
        "take other paths (float blend; tvF.to_dtype) that are not used here."
    ),
)


def main():
    t0 = time.time()
    log(f"versions: {VERSIONS}")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    check_alpha_formula()
    n = check_resize_spec()
    log(f"resize spec matches torchvision on {n} random size pairs")
    image_files = make_images()
    for name, spec in MODELS.items():
        build_model(name, spec)
    for name, spec in MODELS.items():
        make_reference(name, spec, image_files)

    total = 0
    log("== files")
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            sz = p.stat().st_size
            total += sz
            log(f"    {sz:>10}  {sha256(p)[:16]}  {p.relative_to(REPO)}")
    log(f"total {total / 1e6:.2f} MB, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
