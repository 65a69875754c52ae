#!/usr/bin/env python3
"""Generate the tiny SDXL reference fixture for artguide's Rust tests.

Writes (and only writes) these paths under tests/fixtures/:
  tiny-sdxl/                        a tiny random SDXL pipeline in the diffusers folder layout
                                    (two text encoders, two tokenizers, text_time UNet)
  reference/tiny-sdxl.safetensors   tensors computed by diffusers/transformers
  reference/tiny-sdxl.json          scalar inputs + per-run metadata

Same pinned versions as make_sd_fixtures.py (requirements.txt); it reuses that script's
vocabulary, tokenizer and weight-initialisation helpers. Everything is random (seeded) and
computed on CPU in float32. Nothing is downloaded.
Run from anywhere:  python tests/reference/make_sdxl_fixtures.py [--reference-only]
(--reference-only recomputes reference/tiny-sdxl.* from the existing tiny-sdxl/ folder.)
"""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_sd_fixtures as base  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as xl_i2i_mod  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

NAME = "tiny-sdxl"
OUT = base.FIXTURES / NAME
SEED = 3000
PROMPT = base.PROMPT
NEGATIVE_PROMPT = base.NEGATIVE_PROMPT
HEIGHT, WIDTH = base.HEIGHT, base.WIDTH
NUM_STEPS = base.NUM_STEPS
CFG = base.CFG
UNET_T = base.UNET_T
TIME_EMBED = 8
PROJ2 = 16

# The two encoders differ in width, depth, activation and pad token, as SDXL's do
# (CLIP ViT-L: quick_gelu, pad <|endoftext|>; OpenCLIP bigG: gelu, pad "!", projection).
TEXT1 = dict(hidden_act="quick_gelu", num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=37)
TEXT2 = dict(hidden_act="gelu", num_hidden_layers=3, hidden_size=24, num_attention_heads=3, intermediate_size=53)
UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=TEXT1["hidden_size"] + TEXT2["hidden_size"],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJ2,
    norm_num_groups=32,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.13025,
    force_upcast=True,
)
# SDXL base's scheduler_config.json (EulerDiscreteScheduler, leading spacing, offset 1); the
# real file also carries DDIM's keys, which matter when another scheduler is built from it.
DDIM_ONLY = ("clip_sample", "set_alpha_to_one")
SCHEDULER = dict(
    **base.SD_BETAS,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def text_config(spec, projection_dim):
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        max_position_embeddings=77,
        hidden_act=spec["hidden_act"],
        projection_dim=projection_dim,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def resave_with_text_model_prefix(path):
    """transformers 5 saves the tower without `text_model.`; real checkpoints have it."""
    sd = load_file(str(path))
    out = {}
    for k, v in sd.items():
        if k.startswith("text_model.") or k == "text_projection.weight":
            out[k] = v.contiguous()
        else:
            out["text_model." + k] = v.contiguous()
    assert all(v.dtype == torch.float16 for v in out.values())
    save_file(out, str(path), metadata={"format": "pt"})


def build(encoder, merges):
    unet = UNet2DConditionModel(**UNET).eval()
    base.init_weights(unet, SEED + 1)
    vae = AutoencoderKL(**VAE).eval()
    base.init_weights(vae, SEED + 2, last_scale={"decoder.conv_out": 0.5})
    te1 = CLIPTextModel(text_config(TEXT1, 32)).eval()
    base.init_weights(te1, SEED + 3, emb_std=0.2)
    te2 = CLIPTextModelWithProjection(text_config(TEXT2, PROJ2)).eval()
    base.init_weights(te2, SEED + 4, emb_std=0.2)
    # Stored as f16, computed in f32 from identical values.
    unet, vae, te1, te2 = (m.to(torch.float16) for m in (unet, vae, te1, te2))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=base.make_tokenizer(encoder, merges, "<|endoftext|>"),
        tokenizer_2=base.make_tokenizer(encoder, merges, "!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k not in DDIM_ONLY}),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    if OUT.exists():
        shutil.rmtree(OUT)
    pipe.save_pretrained(OUT, safe_serialization=True)
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        d = OUT / sub
        base.write_vocab_files(d, encoder, merges)
        with open(d / "special_tokens_map.json", "w", encoding="utf-8") as f:
            json.dump(
                {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad,
                 "unk_token": "<|endoftext|>"},
                f,
                indent=2,
            )
            f.write("\n")
        # vocab.json + merges.txt are enough (and identical in both folders, so git stores them once).
        (d / "tokenizer.json").unlink(missing_ok=True)
    cfg_path = OUT / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({k: SCHEDULER[k] for k in DDIM_ONLY})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for sub in ("text_encoder", "text_encoder_2"):
        resave_with_text_model_prefix(OUT / sub / "model.safetensors")
    keys2 = load_file(str(OUT / "text_encoder_2" / "model.safetensors")).keys()
    assert "text_projection.weight" in keys2, sorted(keys2)[:5]


def reference():
    pipe = StableDiffusionXLPipeline.from_pretrained(OUT, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    # The loaded weights must be exactly the stored ones.
    for comp, fname in [
        (pipe.unet, "unet/diffusion_pytorch_model.safetensors"),
        (pipe.vae, "vae/diffusion_pytorch_model.safetensors"),
        (pipe.text_encoder, "text_encoder/model.safetensors"),
        (pipe.text_encoder_2, "text_encoder_2/model.safetensors"),
    ]:
        stored = load_file(str(OUT / fname))
        live = {k: v for k, v in comp.state_dict().items() if not k.endswith("position_ids")}
        if not any(k.startswith("text_model.") for k in live) and "text_encoder" in fname:
            live = {(k if k == "text_projection.weight" else "text_model." + k): v for k, v in live.items()}
        assert set(stored) == set(live), (fname, set(stored) ^ set(live))
        for k, v in stored.items():
            assert torch.equal(v.to(torch.float32), live[k]), (fname, k)

    T = {}
    pe, ne, pp, npool = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE_PROMPT)
    T["cond_emb"], T["uncond_emb"], T["cond_pooled"], T["uncond_pooled"] = pe, ne, pp, npool
    # No negative prompt: force_zeros_for_empty_prompt gives zeros.
    _, nz, _, nzp = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=None)
    assert torch.count_nonzero(nz) == 0 and torch.count_nonzero(nzp) == 0
    T["cond_ids"] = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids.to(torch.int64)
    T["cond_ids_2"] = pipe.tokenizer_2(PROMPT, padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt").input_ids.to(torch.int64)
    time_ids = torch.tensor([[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]], dtype=torch.float32)
    T["time_ids"] = time_ids

    g = torch.Generator().manual_seed(SEED + 10)
    T["latents_init"] = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=g)
    g = torch.Generator().manual_seed(SEED + 11)
    T["unet_in"] = torch.randn(2, 4, HEIGHT // 2, WIDTH // 2, generator=g)
    T["unet_ctx"] = torch.cat([ne, pe])
    T["unet_text_embeds"] = torch.cat([npool, pp])
    T["unet_out"] = pipe.unet(
        T["unet_in"], UNET_T, encoder_hidden_states=T["unet_ctx"],
        added_cond_kwargs={"text_embeds": T["unet_text_embeds"], "time_ids": time_ids.repeat(2, 1)},
    ).sample

    meta = {
        "model": NAME,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "height": HEIGHT,
        "width": WIDTH,
        "unet_timestep": UNET_T,
        "num_inference_steps": NUM_STEPS,
        "versions": base.VERSIONS,
        "notes": [
            "All weights stored as float16; references computed in float32 from those values.",
            "cond_emb = cat(text_encoder hidden_states[-2], text_encoder_2 hidden_states[-2]); cond_pooled = "
            "text_encoder_2 text_embeds; time_ids = (h, w, 0, 0, h, w).",
            "Runs named *_zero_negative pass negative_prompt=None, so force_zeros_for_empty_prompt gives zero "
            "negative embeddings.",
        ],
        "runs": {},
    }
    runs = [
        ("euler_cfg", EulerDiscreteScheduler, CFG, NEGATIVE_PROMPT),
        ("ddim_cfg_zero_negative", DDIMScheduler, CFG, None),
        ("ddim_nocfg", DDIMScheduler, 1.0, None),
    ]
    file_cfg = json.loads((OUT / "scheduler" / "scheduler_config.json").read_text())
    for run_name, cls, gs, neg in runs:
        pipe.scheduler = cls.from_config(file_cfg)
        out = pipe(
            prompt=PROMPT,
            negative_prompt=neg,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=NUM_STEPS,
            guidance_scale=gs,
            latents=T["latents_init"].clone(),
            output_type="np",
        ).images
        T[f"{run_name}_image"] = torch.from_numpy(out[0].copy())
        st = base.check_image(f"{run_name}_image", out)
        meta["runs"][run_name] = {
            "scheduler_class": cls.__name__,
            "guidance_scale": gs,
            "negative_prompt": neg,
            "timesteps": base.fl(pipe.scheduler.timesteps),
            "image_stats": st,
        }

    # ---- img2img (DDIM, CFG): the encoder's mean (argmax), fixed noise, as make_sd_fixtures.py
    g = torch.Generator().manual_seed(SEED + 13)
    T["img2img_init"] = torch.rand(1, 3, HEIGHT, WIDTH, generator=g) * 2 - 1
    g = torch.Generator().manual_seed(SEED + 14)
    T["img2img_noise"] = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=g)
    i2i = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    i2i.scheduler = DDIMScheduler.from_config(file_cfg)
    orig_retrieve, orig_randn = xl_i2i_mod.retrieve_latents, xl_i2i_mod.randn_tensor
    calls = {"randn": 0}

    def retrieve_argmax(encoder_output, generator=None, sample_mode="sample"):
        return orig_retrieve(encoder_output, generator=generator, sample_mode="argmax")

    def fixed_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(T["img2img_noise"].shape), shape
        calls["randn"] += 1
        return T["img2img_noise"].clone()

    xl_i2i_mod.retrieve_latents, xl_i2i_mod.randn_tensor = retrieve_argmax, fixed_randn
    try:
        out = i2i(
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            image=T["img2img_init"].clone(),
            strength=base.IMG2IMG_STRENGTH,
            num_inference_steps=NUM_STEPS,
            guidance_scale=CFG,
            output_type="np",
        ).images
    finally:
        xl_i2i_mod.retrieve_latents, xl_i2i_mod.randn_tensor = orig_retrieve, orig_randn
    assert calls["randn"] == 1
    T["img2img_image"] = torch.from_numpy(out[0].copy())
    meta["img2img_strength"] = base.IMG2IMG_STRENGTH
    meta["runs"]["img2img"] = {
        "scheduler_class": "DDIMScheduler",
        "guidance_scale": CFG,
        "negative_prompt": NEGATIVE_PROMPT,
        "strength": base.IMG2IMG_STRENGTH,
        "timesteps": base.fl(i2i.scheduler.timesteps),
        "image_stats": base.check_image("img2img_image", out),
    }

    for k, v in T.items():
        T[k] = v.detach().contiguous()
        if not k.startswith("cond_ids"):
            T[k] = T[k].to(torch.float32)
    meta["tensors"] = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in T.items()}
    save_file(T, str(base.REF_DIR / f"{NAME}.safetensors"), metadata={"generator": "tests/reference/make_sdxl_fixtures.py"})
    with open(base.REF_DIR / f"{NAME}.json", "w") as f:
        json.dump(base.jsonable(meta), f, indent=1)
        f.write("\n")


def main():
    t0 = time.time()
    torch.manual_seed(0)
    base.REF_DIR.mkdir(parents=True, exist_ok=True)
    if "--reference-only" not in sys.argv[1:]:
        encoder, merges = base.build_clip_vocab()
        build(encoder, merges)
    reference()
    total = 0
    for p in sorted(OUT.rglob("*")) + sorted(base.REF_DIR.glob(f"{NAME}.*")):
        if p.is_file():
            total += p.stat().st_size
            base.log(f"    {p.stat().st_size:>10}  {base.sha256(p)[:16]}  {p.relative_to(base.REPO)}")
    base.log(f"total {total / 1e6:.2f} MB, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    np.random.seed(0)
    main()
