#!/usr/bin/env python3
"""Generate the Stable Diffusion reference fixtures for artguide's Rust tests.

Writes (and only writes) these paths under tests/fixtures/:
  tiny-sd-a/, tiny-sd-b/            tiny random SD pipelines in the diffusers folder layout
  reference/tiny-sd-a.safetensors   reference tensors computed by diffusers/transformers
  reference/tiny-sd-a.json          scalar inputs + per-run metadata for those tensors
  reference/tiny-sd-b.safetensors
  reference/tiny-sd-b.json
  reference/schedulers.json         scheduler step-by-step references
  reference/clip_tokenizer_cases.json  CLIP tokenizer references (transformers + open_clip)

Everything is random (seeded) and computed on CPU in float32. Nothing is downloaded.
Run from anywhere:  python tests/reference/make_sd_fixtures.py
"""

import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

# Keep the run quiet and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import diffusers  # noqa: E402
import open_clip  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_mod  # noqa: E402
from diffusers.schedulers import scheduling_ddim as ddim_mod  # noqa: E402
from diffusers.schedulers import scheduling_dpmsolver_multistep as dpm_mod  # noqa: E402
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_mod  # noqa: E402
from diffusers.schedulers import scheduling_euler_discrete as euler_mod  # noqa: E402
from open_clip.tokenizer import bytes_to_unicode  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
REF_DIR = FIXTURES / "reference"

PROMPT = "a painting of a lighthouse at dusk"
NEGATIVE_PROMPT = "blurry, low quality"
HEIGHT, WIDTH = 32, 48
NUM_STEPS = 4
CFG = 7.5
IMG2IMG_STRENGTH = 0.5
UNET_T = 501
MAX_LEN = 77

VERSIONS = {
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "diffusers": diffusers.__version__,
    "transformers": transformers.__version__,
    "open_clip_torch": open_clip.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
    "tokenizers": __import__("tokenizers").__version__,
    "ftfy": __import__("ftfy").__version__,
}

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------------------
# CLIP BPE vocabulary
# --------------------------------------------------------------------------------------


def build_clip_vocab():
    """Build the 49,408-token CLIP vocab + merges exactly as OpenAI / HF CLIP do."""
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    merge_pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in merge_pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == 49408 == len(vocab), len(encoder)
    assert len(merges) == 48894
    return encoder, merges


def write_vocab_files(dirpath: Path, encoder, merges):
    # Same format as HF CLIP's slow-tokenizer save_vocabulary (compact JSON to save space).
    with open(dirpath / "vocab.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(encoder, ensure_ascii=False, separators=(",", ":")) + "\n")
    with open(dirpath / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in merges:
            f.write(m + "\n")


def make_tokenizer(encoder, merges, pad_token):
    return CLIPTokenizer(
        vocab=dict(encoder),
        merges=[tuple(m.split()) for m in merges],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=MAX_LEN,
    )


# --------------------------------------------------------------------------------------
# Weight initialisation
# --------------------------------------------------------------------------------------


def init_weights(model: torch.nn.Module, seed: int, emb_std: float = 0.2, last_scale=None):
    """Seeded normal init, modest std, deterministic order (named_modules order)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()

    def normal_(p, mean, std):
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean)
        seen.add(id(p))

    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if mod.weight is not None:
                normal_(mod.weight, 1.0, 0.1)
            if mod.bias is not None:
                normal_(mod.bias, 0.0, 0.1)
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            std = min(0.2, max(0.02, 1.0 / math.sqrt(fan_in)))
            if last_scale and name in last_scale:
                std *= last_scale[name]
            normal_(mod.weight, 0.0, std)
            if mod.bias is not None:
                normal_(mod.bias, 0.0, 0.05)
        elif isinstance(mod, torch.nn.Embedding):
            normal_(mod.weight, 0.0, emb_std)
    for name, p in model.named_parameters():
        assert id(p) in seen, f"parameter not initialised: {name}"


# --------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

MODELS = {
    "tiny-sd-a": dict(
        seed=1000,
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=32,
            use_linear_projection=False,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
            scaling_factor=0.18215,
        ),
        text=dict(hidden_act="quick_gelu", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=37),
        pad_token="<|endoftext|>",
        tokenizer_json=True,
        scheduler=dict(
            **SD_BETAS,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="leading",
            prediction_type="epsilon",
        ),
    ),
    "tiny-sd-b": dict(
        seed=2000,
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            attention_head_dim=(2, 4),
            cross_attention_dim=16,
            norm_num_groups=32,
            use_linear_projection=True,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
            scaling_factor=0.13025,
        ),
        text=dict(hidden_act="gelu", num_hidden_layers=3, hidden_size=16, num_attention_heads=2, intermediate_size=23),
        pad_token="!",
        tokenizer_json=False,
        scheduler=dict(
            **SD_BETAS,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=0,
            timestep_spacing="trailing",
            prediction_type="v_prediction",
        ),
    ),
}


def build_and_save_pipeline(name, spec, encoder, merges):
    out = FIXTURES / name
    seed = spec["seed"]

    assert spec["unet"]["cross_attention_dim"] == spec["text"]["hidden_size"]
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    init_weights(unet, seed + 1)
    vae = AutoencoderKL(**spec["vae"]).eval()
    # Scale the decoder's last conv so decoded pixel values are spread inside (-1, 1).
    init_weights(vae, seed + 2, last_scale={"decoder.conv_out": 0.5})
    # Round the UNet and VAE to f16 as well: stored as f16, computed in f32 from identical values.
    unet = unet.to(torch.float16)
    vae = vae.to(torch.float16)
    text_cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=spec["text"]["hidden_size"],
        intermediate_size=spec["text"]["intermediate_size"],
        num_hidden_layers=spec["text"]["num_hidden_layers"],
        num_attention_heads=spec["text"]["num_attention_heads"],
        max_position_embeddings=77,
        hidden_act=spec["text"]["hidden_act"],
        projection_dim=32,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(text_cfg).eval()
    init_weights(text_encoder, seed + 3, emb_std=0.2)
    # Round the text encoder to f16: stored as f16, computed in f32 from identical values.
    text_encoder = text_encoder.to(torch.float16)

    tokenizer = make_tokenizer(encoder, merges, spec["pad_token"])
    scheduler = DDIMScheduler(**spec["scheduler"])

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)

    tok_dir = out / "tokenizer"
    written_by_save = sorted(os.listdir(tok_dir))
    # transformers 5 only writes tokenizer.json + tokenizer_config.json; add the classic files.
    write_vocab_files(tok_dir, encoder, merges)
    with open(tok_dir / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": spec["pad_token"],
                "unk_token": "<|endoftext|>",
            },
            f,
            indent=2,
        )
        f.write("\n")
    if spec["tokenizer_json"]:
        # Rewrite tokenizer.json as compact JSON (same content, no indentation) to save space.
        with open(tok_dir / "tokenizer.json", encoding="utf-8") as f:
            tj = json.load(f)
        with open(tok_dir / "tokenizer.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(tj, ensure_ascii=False, separators=(",", ":")) + "\n")
    else:
        (tok_dir / "tokenizer.json").unlink()

    # StableDiffusionPipeline.__init__ forces steps_offset=1 into the scheduler config (deprecation path);
    # write the scheduler config as specified (for tiny-sd-b: steps_offset 0).
    fresh = DDIMScheduler(**spec["scheduler"])
    os.remove(out / "scheduler" / "scheduler_config.json")
    fresh.save_config(out / "scheduler")

    # transformers 5.x saves CLIPTextModel weights without the "text_model." prefix; real SD checkpoints
    # (and transformers 4.x, and candle's stable_diffusion::clip loader) use "text_model.*". Re-save with it.
    te_file = out / "text_encoder" / "model.safetensors"
    sd = load_file(str(te_file))
    assert not any(k.startswith("text_model.") for k in sd), "unexpected key layout"
    sd = {"text_model." + k: v.contiguous() for k, v in sd.items()}
    assert all(v.dtype == torch.float16 for v in sd.values())
    save_file(sd, str(te_file), metadata={"format": "pt"})
    for fname in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        stored = load_file(str(out / fname))
        assert all(v.dtype == torch.float16 for v in stored.values()), fname
    return written_by_save


# --------------------------------------------------------------------------------------
# Helpers for recording
# --------------------------------------------------------------------------------------


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return repr(x)
        return x
    return x


def fl(x):
    """Flatten a tensor to a list of python floats (f32 values widened exactly to f64)."""
    return [float(v) for v in x.detach().to(torch.float32).reshape(-1).tolist()]


def sched_config(s):
    return jsonable(dict(s.config))


class StepRecorder:
    """Wraps scheduler.step on an instance to record inputs/outputs of every step."""

    def __init__(self, sched):
        self.ts, self.model_outputs, self.samples_out = [], [], []
        orig = sched.step

        def step(model_output, timestep, sample, *args, **kwargs):
            res = orig(model_output, timestep, sample, *args, **kwargs)
            prev = res[0] if isinstance(res, tuple) else res.prev_sample
            self.ts.append(float(timestep))
            self.model_outputs.append(model_output.detach().clone())
            self.samples_out.append(prev.detach().clone())
            return res

        sched.step = step


def image_stats(img):
    a = np.asarray(img, dtype=np.float64)
    return dict(
        min=float(a.min()),
        max=float(a.max()),
        mean=float(a.mean()),
        std=float(a.std()),
        frac_clipped=float(np.mean((a <= 0.0) | (a >= 1.0))),
    )


def check_image(label, img):
    st = image_stats(img)
    log(f"    {label}: {st}")
    assert st["std"] > 1e-3, f"{label} is (nearly) constant: {st}"
    assert st["frac_clipped"] < 0.05, f"{label} too many clipped pixels: {st}"
    return st


# --------------------------------------------------------------------------------------
# Pipeline references
# --------------------------------------------------------------------------------------


def make_pipeline_reference(name, spec):
    log(f"== reference runs for {name}")
    path = FIXTURES / name
    pipe = StableDiffusionPipeline.from_pretrained(
        path, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.dtype == torch.float32
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    # The loaded weights must be exactly the stored ones (nothing silently re-initialised).
    for comp, fname, prefix in [
        (pipe.unet, "unet/diffusion_pytorch_model.safetensors", ""),
        (pipe.vae, "vae/diffusion_pytorch_model.safetensors", ""),
        (pipe.text_encoder, "text_encoder/model.safetensors", "text_model."),
    ]:
        stored = load_file(str(path / fname))
        assert all(v.dtype == torch.float16 for v in stored.values()), fname
        live = {prefix + k: v for k, v in comp.state_dict().items()}
        live = {k: v for k, v in live.items() if not k.endswith("position_ids")}
        assert set(stored) == set(live), (fname, set(stored) ^ set(live))
        for k, v in stored.items():
            assert live[k].dtype == torch.float32, (fname, k, live[k].dtype)
            assert torch.equal(v.to(torch.float32), live[k]), (fname, k)
    with open(path / "scheduler" / "scheduler_config.json") as f:
        file_sched_cfg = json.load(f)
    assert pipe.vae_scale_factor == 2, pipe.vae_scale_factor
    tok = pipe.tokenizer
    assert tok.model_max_length == MAX_LEN
    assert tok.pad_token == spec["pad_token"], tok.pad_token
    sf = float(pipe.vae.config.scaling_factor)

    seed = spec["seed"]
    T = {}
    meta = {
        "model": name,
        "model_dir": f"tests/fixtures/{name}",
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "height": HEIGHT,
        "width": WIDTH,
        "latent_shape": [1, 4, HEIGHT // 2, WIDTH // 2],
        "vae_scale_factor": pipe.vae_scale_factor,
        "scaling_factor": sf,
        "pad_token": spec["pad_token"],
        "pad_token_id": tok.pad_token_id,
        "max_length": MAX_LEN,
        "unet_timestep": UNET_T,
        "num_inference_steps": NUM_STEPS,
        "guidance_scale_cfg": CFG,
        "guidance_scale_nocfg": 1.0,
        "img2img_strength": IMG2IMG_STRENGTH,
        "versions": VERSIONS,
        "scheduler_config_file": jsonable(file_sched_cfg),
        "notes": [
            "All weights (text encoder, UNet, VAE) are stored as float16; all references were computed in float32 "
            "from those f16 values. Text encoder keys are 'text_model.*' (transformers 5 itself would save them "
            "without that prefix).",
            "UNet attention_head_dim is, as in diffusers/candle, the NUMBER of heads per block "
            "(head size = channels / attention_head_dim); the mid block uses the last entry.",
            "Per-run 'scheduler_config' is the config diffusers held in memory. StableDiffusionPipeline forces "
            "steps_offset=1 in memory when the file says otherwise; with timestep_spacing 'trailing' "
            "steps_offset is unused, and the script asserts the file config gives identical timesteps.",
            "<run>_step_noise_pred[i] is the (guided) model output passed to scheduler.step at timesteps[i]; "
            "<run>_step_latents[i] is that step's prev_sample; <run>_latents == <run>_step_latents[-1] (the "
            "latents that are divided by scaling_factor and decoded); <run>_image = "
            "clamp(decode/2+0.5, 0, 1) as H x W x 3.",
            "Text2img runs start from latents_init * init_noise_sigma (the pipeline's prepare_latents).",
        ],
        "runs": {},
    }

    # ---- tokenizer + text encoder
    def ids_of(text):
        return tok(text, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids

    cond_ids, uncond_ids = ids_of(PROMPT), ids_of(NEGATIVE_PROMPT)
    T["cond_ids"] = cond_ids.to(torch.int64)
    T["uncond_ids"] = uncond_ids.to(torch.int64)
    T["cond_emb"] = pipe.text_encoder(cond_ids)[0]
    T["uncond_emb"] = pipe.text_encoder(uncond_ids)[0]
    pe, ne = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE_PROMPT)
    assert torch.equal(pe, T["cond_emb"]) and torch.equal(ne, T["uncond_emb"])

    # ---- latents
    g = torch.Generator().manual_seed(seed + 10)
    T["latents_init"] = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=g)

    # ---- UNet single call
    g = torch.Generator().manual_seed(seed + 11)
    T["unet_in"] = torch.randn(2, 4, HEIGHT // 2, WIDTH // 2, generator=g)
    T["unet_t"] = torch.tensor(float(UNET_T), dtype=torch.float32)
    T["unet_ctx"] = torch.cat([T["uncond_emb"], T["cond_emb"]], dim=0)
    T["unet_out"] = pipe.unet(T["unet_in"], UNET_T, encoder_hidden_states=T["unet_ctx"]).sample

    # ---- VAE decoder single call
    g = torch.Generator().manual_seed(seed + 12)
    T["vae_dec_in"] = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=g) / sf
    T["vae_dec_out"] = pipe.vae.decode(T["vae_dec_in"]).sample
    check_image("vae_dec_out/2+0.5", (T["vae_dec_out"] / 2 + 0.5).clamp(0, 1))

    # ---- img2img init image and VAE encoder single call
    g = torch.Generator().manual_seed(seed + 13)
    T["img2img_init"] = torch.rand(1, 3, HEIGHT, WIDTH, generator=g) * 2 - 1
    dist = pipe.vae.encode(T["img2img_init"]).latent_dist
    T["vae_enc_mean"] = dist.mean
    T["vae_enc_logvar"] = dist.logvar

    # ---- full text2img runs
    base_cfg = pipe.scheduler.config
    dpm_kw = dict(algorithm_type="dpmsolver++", solver_order=2)
    runs = [
        ("ddim_cfg", lambda c: DDIMScheduler.from_config(c), CFG),
        ("ddim_nocfg", lambda c: DDIMScheduler.from_config(c), 1.0),
        ("euler_cfg", lambda c: EulerDiscreteScheduler.from_config(c), CFG),
        ("dpmpp2m_cfg", lambda c: DPMSolverMultistepScheduler.from_config(c, **dpm_kw), CFG),
    ]
    for run_name, mk_cfg, gs in runs:
        mk = lambda: mk_cfg(base_cfg)  # noqa: E731
        sched = mk()
        # diffusers may have rewritten steps_offset in memory; the file's config must give the same schedule.
        s_file, s_mem = mk_cfg(file_sched_cfg), mk_cfg(base_cfg)
        s_file.set_timesteps(NUM_STEPS)
        s_mem.set_timesteps(NUM_STEPS)
        assert torch.equal(s_file.timesteps, s_mem.timesteps), run_name
        pipe.scheduler = sched
        rec = StepRecorder(sched)
        out = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=NUM_STEPS,
            guidance_scale=gs,
            latents=T["latents_init"].clone(),
            output_type="np",
        ).images
        assert out.shape == (1, HEIGHT, WIDTH, 3) and out.dtype == np.float32, (out.shape, out.dtype)
        T[f"{run_name}_image"] = torch.from_numpy(out[0].copy())
        T[f"{run_name}_latents"] = rec.samples_out[-1]
        T[f"{run_name}_step_noise_pred"] = torch.cat(rec.model_outputs, dim=0)
        T[f"{run_name}_step_latents"] = torch.cat(rec.samples_out, dim=0)
        st = check_image(f"{run_name}_image", out)
        rm = {
            "scheduler_class": type(sched).__name__,
            "scheduler_config": sched_config(sched),
            "num_inference_steps": NUM_STEPS,
            "guidance_scale": gs,
            "do_classifier_free_guidance": gs > 1.0,
            "negative_prompt": NEGATIVE_PROMPT,
            "timesteps": rec.ts,
            "init_noise_sigma": float(sched.init_noise_sigma),
            "sigmas": fl(sched.sigmas) if hasattr(sched, "sigmas") else None,
            "image_stats": st,
        }
        meta["runs"][run_name] = rm
        if run_name == "ddim_cfg":
            # Sanity: output_type="latent" gives the same final latents.
            pipe.scheduler = mk()
            lat = pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE_PROMPT,
                height=HEIGHT,
                width=WIDTH,
                num_inference_steps=NUM_STEPS,
                guidance_scale=gs,
                latents=T["latents_init"].clone(),
                output_type="latent",
            ).images
            assert torch.equal(lat, T["ddim_cfg_latents"])

    # ---- img2img
    pipe.scheduler = DDIMScheduler.from_config(base_cfg)
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 14)
    T["img2img_noise"] = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=g)

    orig_retrieve = img2img_mod.retrieve_latents
    orig_randn = img2img_mod.randn_tensor
    captured = {}

    def retrieve_argmax(encoder_output, generator=None, sample_mode="sample"):
        return orig_retrieve(encoder_output, generator=generator, sample_mode="argmax")

    def fixed_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(T["img2img_noise"].shape), shape
        captured["randn_calls"] = captured.get("randn_calls", 0) + 1
        return T["img2img_noise"].clone()

    orig_prepare = i2i.prepare_latents

    def prepare_latents(image, timestep, *a, **k):
        captured["image_to_vae"] = image.detach().clone()
        captured["latent_timestep"] = timestep.detach().clone()
        lat = orig_prepare(image, timestep, *a, **k)
        captured["start_latents"] = lat.detach().clone()
        return lat

    i2i.prepare_latents = prepare_latents
    rec = StepRecorder(i2i.scheduler)
    img2img_mod.retrieve_latents = retrieve_argmax
    img2img_mod.randn_tensor = fixed_randn
    try:
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            out = i2i(
                prompt=PROMPT,
                negative_prompt=NEGATIVE_PROMPT,
                image=T["img2img_init"].clone(),
                strength=IMG2IMG_STRENGTH,
                num_inference_steps=NUM_STEPS,
                guidance_scale=CFG,
                output_type="np",
            ).images
    finally:
        img2img_mod.retrieve_latents = orig_retrieve
        img2img_mod.randn_tensor = orig_randn
    i2i_warnings = sorted({str(w.message).split(".")[0] for w in wlist})
    assert captured.get("randn_calls") == 1
    assert torch.equal(captured["image_to_vae"], T["img2img_init"]), "pipeline altered the init image"
    T["img2img_init_latents"] = T["vae_enc_mean"] * sf
    T["img2img_start_latents"] = captured["start_latents"]
    T["img2img_image"] = torch.from_numpy(out[0].copy())
    T["img2img_latents"] = rec.samples_out[-1]
    T["img2img_step_noise_pred"] = torch.cat(rec.model_outputs, dim=0)
    T["img2img_step_latents"] = torch.cat(rec.samples_out, dim=0)
    expect_start = i2i.scheduler.add_noise(
        T["img2img_init_latents"], T["img2img_noise"], captured["latent_timestep"]
    )
    assert torch.allclose(expect_start, T["img2img_start_latents"], atol=1e-6)
    st = check_image("img2img_image", out)
    init_timestep = min(int(NUM_STEPS * IMG2IMG_STRENGTH), NUM_STEPS)
    t_start = max(NUM_STEPS - init_timestep, 0)
    meta["runs"]["img2img"] = {
        "scheduler_class": type(i2i.scheduler).__name__,
        "scheduler_config": sched_config(i2i.scheduler),
        "num_inference_steps": NUM_STEPS,
        "guidance_scale": CFG,
        "do_classifier_free_guidance": True,
        "negative_prompt": NEGATIVE_PROMPT,
        "strength": IMG2IMG_STRENGTH,
        "t_start": t_start,
        "full_timesteps": fl(i2i.scheduler.timesteps),
        "timesteps": rec.ts,
        "latent_timestep": float(captured["latent_timestep"].reshape(-1)[0]),
        "init_noise_sigma": float(i2i.scheduler.init_noise_sigma),
        "sigmas": None,
        "vae_encode": "latent_dist.mode() (= mean), then * scaling_factor",
        "image_input_range": "[-1, 1] tensor passed directly (diffusers skips normalisation)",
        "warnings": i2i_warnings,
        "image_stats": st,
    }

    # ---- write
    for k, v in T.items():
        T[k] = v.detach().contiguous()
        if k not in ("cond_ids", "uncond_ids"):
            T[k] = T[k].to(torch.float32)
    meta["tensors"] = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in T.items()}
    save_file(T, str(REF_DIR / f"{name}.safetensors"), metadata={"generator": "tests/reference/make_sd_fixtures.py"})
    with open(REF_DIR / f"{name}.json", "w") as f:
        json.dump(jsonable(meta), f, indent=1)
        f.write("\n")
    return cond_ids, tok


# --------------------------------------------------------------------------------------
# Scheduler references
# --------------------------------------------------------------------------------------

SCHED_CLASSES = {
    "ddim": (DDIMScheduler, ddim_mod),
    "euler": (EulerDiscreteScheduler, euler_mod),
    "euler-a": (EulerAncestralDiscreteScheduler, euler_a_mod),
    "dpmpp-2m": (DPMSolverMultistepScheduler, dpm_mod),
}
SHAPE = (1, 2, 2, 2)


def model_fn(scaled_model_input, t):
    # A stand-in "UNet": a function of what a real UNet sees (the scaled model input) and t. Close to
    # the true epsilon/v for pure noise, so the trajectories stay well-conditioned.
    return 0.9 * scaled_model_input + 0.1 * math.cos(float(t) / 100.0)


def run_scheduler_case(idx, kind, cfg, steps, eta=None, img2img_strength=None):
    cls, mod = SCHED_CLASSES[kind]
    extra = {}
    if kind == "dpmpp-2m":
        extra = dict(algorithm_type="dpmsolver++", solver_order=2)
    s = cls(**cfg, **extra)
    s.set_timesteps(steps)
    case = {
        "name": None,
        "scheduler": kind,
        "config": sched_config(s),
        "num_inference_steps": steps,
        "eta": eta if kind == "ddim" else None,
        "timesteps": fl(s.timesteps),
        "sigmas": fl(s.sigmas) if kind != "ddim" else None,
        "init_noise_sigma": float(s.init_noise_sigma),
        "alphas_cumprod_first": float(s.alphas_cumprod[0]),
        "alphas_cumprod_last": float(s.alphas_cumprod[-1]),
        "shape": list(SHAPE),
    }
    if kind == "ddim":
        case["final_alpha_cumprod"] = float(s.final_alpha_cumprod)
    gen = torch.Generator().manual_seed(10_000 + idx)
    timesteps = s.timesteps
    if img2img_strength is not None:
        # StableDiffusionImg2ImgPipeline.get_timesteps
        init_timestep = min(int(steps * img2img_strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = s.timesteps[t_start * s.order :]
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(t_start * s.order)
        clean = torch.randn(SHAPE, generator=gen)
        noise = torch.randn(SHAPE, generator=gen)
        latent_timestep = timesteps[:1]
        sample = s.add_noise(clean, noise, latent_timestep)
        case["img2img"] = {
            "strength": img2img_strength,
            "t_start": t_start,
            "timesteps": fl(timesteps),
            "latent_timestep": float(latent_timestep[0]),
            "clean_sample": fl(clean),
            "noise": fl(noise),
            "noised_sample": fl(sample),
        }
    else:
        sample = torch.randn(SHAPE, generator=gen) * s.init_noise_sigma

    noise_log = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        n = torch.randn(tuple(shape), generator=gen).to(dtype or torch.float32)
        noise_log.append(n.clone())
        return n

    orig = mod.randn_tensor
    mod.randn_tensor = fake_randn
    steps_out = []
    try:
        for t in timesteps:
            noise_log.clear()
            x_in = s.scale_model_input(sample, t)
            mo = model_fn(x_in, t)
            kw = {}
            if kind == "ddim":
                kw["eta"] = eta
            prev = s.step(mo, t, sample, **kw).prev_sample
            assert len(noise_log) <= 1
            steps_out.append(
                {
                    "t": float(t),
                    "sample_in": fl(sample),
                    "scaled_model_input": fl(x_in),
                    "model_output": fl(mo),
                    "noise": fl(noise_log[0]) if noise_log else None,
                    "sample_out": fl(prev),
                }
            )
            sample = prev
    finally:
        mod.randn_tensor = orig
    case["steps"] = steps_out
    c = case["config"]
    nm = f"{idx:03d}-{kind}-{c['beta_schedule']}-{c['timestep_spacing']}-off{c['steps_offset']}-{c['prediction_type']}-n{steps}"
    if kind == "ddim":
        nm += f"-eta{eta}-a1{int(bool(c['set_alpha_to_one']))}"
    if img2img_strength is not None:
        nm += f"-img2img{img2img_strength}"
    case["name"] = nm
    return case


def make_scheduler_references():
    log("== scheduler references")
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    cases = []
    idx = 0
    betas = ["scaled_linear", "linear", "squaredcos_cap_v2"]
    spacings = ["leading", "linspace", "trailing"]
    nsteps = [4, 7, 25]
    for kind in SCHED_CLASSES:
        combos = []
        k = 0
        for bi, b in enumerate(betas):
            for si, sp in enumerate(spacings):
                offsets = [0, 1] if sp == "leading" else [0]
                for off in offsets:
                    combos.append((b, sp, off, nsteps[k % 3], ["epsilon", "v_prediction"][k % 2]))
                    k += 1
        for ci, (b, sp, off, n, pred) in enumerate(combos):
            cfg = dict(base, beta_schedule=b, timestep_spacing=sp, steps_offset=off, prediction_type=pred)
            if b == "linear":
                cfg.update(beta_start=0.0001, beta_end=0.02)
            eta = None
            if kind == "ddim":
                cfg.update(clip_sample=False, set_alpha_to_one=bool(ci % 2))
                eta = [0.0, 0.5][(ci // 2) % 2]
            cases.append(run_scheduler_case(idx, kind, cfg, n, eta=eta))
            idx += 1
        # img2img-style truncation, SD 1.5 style config
        cfg = dict(
            base, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1, prediction_type="epsilon"
        )
        eta = None
        if kind == "ddim":
            cfg.update(clip_sample=False, set_alpha_to_one=False)
            eta = 0.0
        cases.append(run_scheduler_case(idx, kind, cfg, 25, eta=eta, img2img_strength=0.6))
        idx += 1

    # coverage check
    for kind in SCHED_CLASSES:
        cs = [c for c in cases if c["scheduler"] == kind]
        for key, vals in [
            ("beta_schedule", betas),
            ("timestep_spacing", spacings),
            ("steps_offset", [0, 1]),
            ("prediction_type", ["epsilon", "v_prediction"]),
        ]:
            have = {c["config"][key] for c in cs}
            assert set(vals) <= have, (kind, key, have)
        assert {4, 7, 25} <= {c["num_inference_steps"] for c in cs}
        if kind == "ddim":
            assert {0.0, 0.5} <= {c["eta"] for c in cs}
            assert {True, False} <= {c["config"]["set_alpha_to_one"] for c in cs}
    doc = {
        "description": (
            "Scheduler step references. For each case: construct the scheduler from `config` "
            "(dpmpp-2m = DPMSolverMultistepScheduler algorithm_type dpmsolver++, solver_order 2), call "
            "set_timesteps(num_inference_steps), then for each t: scaled_model_input = scale_model_input(sample_in, t); "
            "model_output = 0.9*scaled_model_input + 0.1*cos(t/100) (float32); sample_out = step(model_output, t, sample_in"
            "[, eta]).prev_sample, with the step's random draw (if any) replaced by `noise`. "
            "Lists are flattened row-major tensors of `shape`. Initial sample = seeded randn * init_noise_sigma, "
            "or for img2img cases img2img.noised_sample = add_noise(clean_sample, noise, timesteps[t_start]) "
            "and the loop runs over img2img.timesteps (set_begin_index(t_start))."
        ),
        "model_output": "0.9*scaled_model_input + 0.1*cos(t/100)",
        "versions": VERSIONS,
        "cases": cases,
    }
    with open(REF_DIR / "schedulers.json", "w") as f:
        json.dump(jsonable(doc), f, separators=(",", ":"))
        f.write("\n")
    log(f"    {len(cases)} scheduler cases")


# --------------------------------------------------------------------------------------
# Tokenizer references
# --------------------------------------------------------------------------------------

TOKENIZER_SENTENCES = [
    "a painting of a lighthouse at dusk",
    "blurry, low quality",
    "A Portrait of Vincent van Gogh, oil on canvas (1889).",
    "café au lait, naïve art, Albrecht Dürer's engraving",
    "pi is roughly 3.14, e is 2.71828 and 1,000,000 is a million",
    "MiXeD CaSe TeXt WITH SHOUTING!!!",
    "  extra    whitespace\tand\nnewlines   ",
    "sunset 🌅 over the sea 🌊, highly detailed ✨ 👩‍🎨",
    "",
    "isn't it the artist's best work? they'll say it's what we'd've done, I'm sure",
    "trending on artstation, 4k, 8k, unreal engine, octane render, by greg rutkowski",
    "hyper-realistic, ultra_detailed; photo/film grain #35mm @night ~ 50% off",
    "((masterpiece)), [best quality], {dramatic lighting}:1.2",
    "日本の風景画, 葛飾北斎",
    "Ελληνικά και русский текст",
    "rock &amp; roll poster",
    "\u201csmart quotes\u201d and \u2018apostrophes\u2019 \u2014 em dash",
    "<|startoftext|>literal special tokens<|endoftext|>",
    "\ufb01ne ligatures and \uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48",
    "no\u00a0break and thin\u2009space",
    "cafe\u0301 decomposed accent",
    "Mojibake: caf\u00c3\u00a9 cr\u00c3\u00a8me",
    (
        "a highly detailed matte painting of an ancient lighthouse on a rocky cliff at dusk, dramatic clouds, "
        "crashing waves, warm golden light from the lantern, cool blue shadows, seagulls in the distance, "
        "volumetric fog, cinematic composition, by caspar david friedrich and j. m. w. turner and ivan "
        "aivazovsky, oil on canvas, 19th century romanticism, museum quality, intricate brushwork, "
        "trending on artstation, 8k resolution"
    ),
]


def make_tokenizer_references(tok_eot, tok_excl):
    log("== tokenizer references")
    assert tok_eot.pad_token == "<|endoftext|>" and tok_excl.pad_token == "!"
    oc = open_clip.tokenizer.SimpleTokenizer(context_length=MAX_LEN)
    # The raw tokenizers library (same Rust code as the `tokenizers` crate) on tiny-sd-a's tokenizer.json.
    import tokenizers

    raw = tokenizers.Tokenizer.from_file(str(FIXTURES / "tiny-sd-a" / "tokenizer" / "tokenizer.json"))
    cases = []
    diffs = []
    pad_diffs = []
    for i, text in enumerate(TOKENIZER_SENTENCES):
        kw = dict(padding="max_length", max_length=MAX_LEN, truncation=True)
        a = tok_eot(text, **kw).input_ids
        b = tok_excl(text, **kw).input_ids
        full = tok_eot(text).input_ids  # no padding / truncation
        full_b = tok_excl(text).input_ids
        assert raw.encode(text).ids == full, ("tokenizer.json via tokenizers differs", text)
        oc_ids = [int(x) for x in open_clip.tokenize([text], context_length=MAX_LEN)[0].tolist()]
        oc_ids2 = [int(x) for x in oc([text])[0].tolist()]
        assert oc_ids == oc_ids2
        assert len(a) == len(b) == len(oc_ids) == MAX_LEN
        n, nb = min(len(full), MAX_LEN), min(len(full_b), MAX_LEN)
        assert all(x == 49407 for x in a[n:]) and all(x == 0 for x in b[nb:])
        pad_changes = a[:n] != b[:nb]
        if pad_changes:
            pad_diffs.append(i)
        match = b == oc_ids
        match_eot = a[:n] == oc_ids[:n] and all(x == 0 for x in oc_ids[n:])
        if not match:
            diffs.append(i)
        oc_clean = open_clip.tokenizer._clean_lower(text)
        cases.append(
            {
                "index": i,
                "text": text,
                "num_tokens_untruncated": len(full),
                "truncated": len(full) > MAX_LEN,
                "tokens": tok_eot.convert_ids_to_tokens(full),
                "hf_ids_pad_endoftext": a,
                "hf_ids_pad_exclamation": b,
                "open_clip_ids": oc_ids,
                "hf_matches_open_clip": match,
                "hf_pad_endoftext_matches_open_clip_before_padding": match_eot,
                "hf_pad_choice_changes_ids": pad_changes,
                "open_clip_cleaned_text": oc_clean,
            }
        )
    doc = {
        "description": (
            "CLIP BPE tokenizer references. hf_ids_* come from transformers' CLIPTokenizer "
            "(tokenizers backend) with padding='max_length', max_length=77, truncation=True; "
            "_pad_endoftext pads with <|endoftext|> (49407, SD 1.5 style: tests/fixtures/tiny-sd-a/tokenizer), "
            "_pad_exclamation pads with '!' (id 0, SD 2.x style: tests/fixtures/tiny-sd-b/tokenizer). "
            "open_clip_ids come from open_clip.tokenize (SimpleTokenizer: ftfy.fix_text + html.unescape + "
            "whitespace clean + lower; pads with 0; on truncation keeps the first 76 and sets the last to 49407). "
            "'tokens' are the HF token strings without padding/truncation. hf_matches_open_clip compares "
            "hf_ids_pad_exclamation with open_clip_ids. NOTE: with pad_token '!' transformers registers '!' as a "
            "special added token, so every literal '!' in the text is split out as id 0 before BPE (e.g. '!!!' -> "
            "[0,0,0] instead of [995]); hf_pad_choice_changes_ids flags those sentences. Literal "
            "'<|startoftext|>'/'<|endoftext|>' in the text become 49406/49407 in transformers but are BPE'd as "
            "plain text by open_clip."
        ),
        "bos_id": 49406,
        "eos_id": 49407,
        "vocab_size": 49408,
        "max_length": MAX_LEN,
        "differing_cases": diffs,
        "pad_choice_changes_ids_cases": pad_diffs,
        "versions": VERSIONS,
        "cases": cases,
    }
    with open(REF_DIR / "clip_tokenizer_cases.json", "w") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    log(f"    {len(cases)} sentences, open_clip differs on: {[TOKENIZER_SENTENCES[i][:40] for i in diffs]}")
    log(f"    pad '!' changes ids on: {[TOKENIZER_SENTENCES[i][:40] for i in pad_diffs]}")


def verify_vocab(encoder, merges):
    """transformers' CLIPTokenizer built from the files must match open_clip on plain text."""
    tok = make_tokenizer(encoder, merges, "!")
    for text in [PROMPT, NEGATIVE_PROMPT, "A Portrait of Vincent van Gogh, oil on canvas (1889).", "café naïve Dürer"]:
        a = tok(text, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
        b = open_clip.tokenize([text])[0].tolist()
        assert a == b, (text, a, b)
    oc = open_clip.tokenizer._tokenizer
    for tok_str, i in encoder.items():
        if tok_str.startswith("<|"):
            continue
        assert oc.encoder[tok_str] == i


# --------------------------------------------------------------------------------------


def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def main():
    t0 = time.time()
    torch.manual_seed(0)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    # reference/ is shared with the TAESD and SDXL scripts: replace only this script's files.
    REF_DIR.mkdir(parents=True, exist_ok=True)
    for stem in list(MODELS) + ["schedulers", "clip_tokenizer_cases"]:
        for p in REF_DIR.glob(f"{stem}.*"):
            p.unlink()
    log(f"versions: {VERSIONS}")

    encoder, merges = build_clip_vocab()
    verify_vocab(encoder, merges)

    toks = {}
    for name, spec in MODELS.items():
        log(f"== building {name}")
        written = build_and_save_pipeline(name, spec, encoder, merges)
        log(f"    tokenizer files written by save_pretrained: {written}")
    for name, spec in MODELS.items():
        _, tok = make_pipeline_reference(name, spec)
        toks[name] = tok
    make_tokenizer_references(toks["tiny-sd-a"], toks["tiny-sd-b"])
    make_scheduler_references()

    total = 0
    log("== files")
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file() and (p.relative_to(FIXTURES).parts[0] in ("tiny-sd-a", "tiny-sd-b", "reference")):
            sz = p.stat().st_size
            total += sz
            log(f"    {sz:>10}  {sha256(p)[:16]}  {p.relative_to(REPO)}")
    log(f"total {total / 1e6:.2f} MB, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
