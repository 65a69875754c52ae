#!/usr/bin/env python3
"""Generate the TAESD (diffusers `AutoencoderTiny`) reference fixtures for artguide's Rust tests.

Writes (and only writes) these paths under tests/fixtures/:
  tiny-taesd/                          a tiny random AutoencoderTiny (save_pretrained layout:
                                       config.json + diffusion_pytorch_model.safetensors)
  reference/tiny-taesd.safetensors     input latents, diffusers' decode of them, and the
                                       gradient of a weighted-sum loss w.r.t. the latents
  reference/tiny-taesd.json            versions, config, shapes and notes

Everything is random (seeded) and computed on CPU; weights are stored in float32. Nothing is
downloaded. make_sd_fixtures.py deletes tests/fixtures/reference/, so run this one after it.
Run from anywhere:  /work/venv-ref/bin/python tests/reference/make_taesd_fixtures.py
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

# Keep the run quiet and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import diffusers  # noqa: E402
import safetensors  # noqa: E402
from diffusers import AutoencoderTiny  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
MODEL_DIR = FIXTURES / "tiny-taesd"
REF_DIR = FIXTURES / "reference"
REF_TENSORS = REF_DIR / "tiny-taesd.safetensors"
REF_META = REF_DIR / "tiny-taesd.json"

SEED = 3000
# Two decoder stages with upsampling factor 2: 2x in total, the VAE scale factor of
# tests/fixtures/tiny-sd-a (block_out_channels [32, 64]). Stage 0 has two blocks so the layer
# numbering of nn.Sequential (ReLU and Upsample take indices too) is exercised.
CONFIG = dict(
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    act_fn="relu",
    upsample_fn="nearest",
    latent_channels=4,
    upsampling_scaling_factor=2,
    num_encoder_blocks=(1, 1),
    num_decoder_blocks=(2, 1),
    latent_magnitude=3,
    latent_shift=0.5,
    force_upcast=False,
    scaling_factor=1.0,
    shift_factor=0.0,
)
LATENT_SHAPE = (2, 4, 8, 8)
# Large enough that the decoder's tanh(x / 3) * 3 clamp is well into its non-linear range.
LATENT_STD = 1.5

VERSIONS = {
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "diffusers": diffusers.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
}

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
diffusers.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()


def log(*a):
    print(*a, flush=True)


def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def init_weights(model: torch.nn.Module, g: torch.Generator):
    """Seeded normal init in named_modules order. Weights have std 1/sqrt(fan_in) so the
    decoded image stays O(1) (float32 rounding is then ~1e-7 absolute), and biases are drawn
    non-zero so a dropped bias would show."""
    seen = set()
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            fan_in = mod.weight[0].numel()
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / math.sqrt(fan_in))
            seen.add(id(mod.weight))
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
                seen.add(id(mod.bias))
    for name, p in model.named_parameters():
        assert id(p) in seen, f"parameter not initialised: {name}"


def pipeline_decode(vae: AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """What the SD pipelines do with diffusion-space latents: divide by the VAE's
    scaling_factor (StableDiffusionPipeline), add shift_factor (SD3 / Flux pipelines; 0 here),
    then AutoencoderTiny.decode(...).sample, an image in [-1, 1]."""
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z).sample


def main():
    t0 = time.time()
    log(f"versions: {VERSIONS}")
    g = torch.Generator().manual_seed(SEED)

    model = AutoencoderTiny(**CONFIG).eval()
    init_weights(model, g)
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    # The reference comes from the saved folder, proving diffusers itself loads it.
    vae = AutoencoderTiny.from_pretrained(MODEL_DIR).eval()
    assert vae.dtype == torch.float32

    latents = torch.randn(LATENT_SHAPE, generator=g) * LATENT_STD
    decoded = pipeline_decode(vae, latents)
    n, _, h, w = LATENT_SHAPE
    factor = CONFIG["upsampling_scaling_factor"] ** (len(CONFIG["num_decoder_blocks"]) - 1)
    assert decoded.shape == (n, CONFIG["out_channels"], h * factor, w * factor), decoded.shape
    clamped = (latents.abs() > 3.0).float().mean().item()

    # Gradient of loss = sum(decoded * loss_weights) w.r.t. the latents, in float64 so the Rust
    # side (also float64) can be compared far below float32 rounding.
    loss_weights = torch.randn(decoded.shape, generator=g)
    vae64 = AutoencoderTiny.from_pretrained(MODEL_DIR).eval().double()
    with torch.enable_grad():
        x = latents.double().requires_grad_(True)
        loss = (pipeline_decode(vae64, x) * loss_weights.double()).sum()
        (grad,) = torch.autograd.grad(loss, x)
    assert (grad != 0).all(), "some latent has exactly zero gradient"

    REF_DIR.mkdir(parents=True, exist_ok=True)
    tensors = {
        "latents": latents.contiguous(),
        "decoded": decoded.contiguous(),
        "loss_weights": loss_weights.contiguous(),
        "loss_f64": loss.detach().reshape(()).contiguous(),
        "latents_grad_f64": grad.contiguous(),
    }
    save_file(tensors, str(REF_TENSORS), metadata={"generator": "tests/reference/make_taesd_fixtures.py"})
    meta = {
        "description": (
            "TAESD (diffusers AutoencoderTiny) decoder reference. decoded = "
            "AutoencoderTiny.decode(latents / scaling_factor + shift_factor).sample in float32, an "
            "image in [-1, 1]. loss_f64 = sum(decoded * loss_weights) computed in float64 from the "
            "same float32 weights and latents; latents_grad_f64 is its torch.autograd gradient "
            "w.r.t. latents."
        ),
        "generator": "tests/reference/make_taesd_fixtures.py",
        "versions": VERSIONS,
        "seed": SEED,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIG.items()},
        "latent_std": LATENT_STD,
        "decoder_scale_factor": factor,
        "fraction_of_latents_beyond_clamp_3": clamped,
        "decoded_range": [decoded.min().item(), decoded.max().item()],
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
        "weights_dtype": "float32",
    }
    with open(REF_META, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")

    total = 0
    log("== files")
    for p in sorted(list(MODEL_DIR.rglob("*")) + [REF_TENSORS, REF_META]):
        if p.is_file():
            sz = p.stat().st_size
            total += sz
            log(f"    {sz:>10}  {sha256(p)[:16]}  {p.relative_to(REPO)}")
    log(f"latents beyond +-3: {clamped:.3f}; decoded range {meta['decoded_range']}")
    log(f"total {total / 1e3:.1f} kB, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
