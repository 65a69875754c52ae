"""Times diffusers on the workloads `artguide bench` times: SD 1.5 / 2.1 / XL architecture with
random weights, one UNet step with classifier-free guidance (batch 2) and one VAE decode per
image size (`--parts unet,vae`), and the CLIP-guided step (`--parts guidance`): the same UNet
call plus the gradient of a CLIP loss w.r.t. the predicted clean latents through a decoder
(full VAE, TAESD or a per-pixel linear map), random crops resized to the CLIP size, a
transformers CLIP vision tower, and the spherical distance to a text embedding, as
`artguide bench --parts guidance` does. Prints one JSON object per measurement, the same
fields as `artguide bench --json`.

Run through bench/cpu.sh (CPU, f32) or bench/gpu.sh (`--device cuda --dtype f16`) so both
tools are measured in the same run on the same machine.
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

SD15_UNET = dict(
    attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2, in_channels=4, out_channels=4, sample_size=64,
)
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True, upcast_attention=True, sample_size=96)
SDXL_UNET = dict(
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2, in_channels=4, out_channels=4, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
UNETS = {"sd15": (SD15_UNET, 768), "sd21": (SD21_UNET, 1024), "sdxl": (SDXL_UNET, 2048)}
# SDXL's VAE has SD's architecture (only scaling_factor and force_upcast differ).
VAE = dict(
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    norm_num_groups=32, in_channels=3, out_channels=3,
)
# madebyollin/taesd's config (artguide's SD_TAESD_CONFIG).
TAESD = dict(
    act_fn="relu", decoder_block_out_channels=[64] * 4, encoder_block_out_channels=[64] * 4,
    in_channels=3, out_channels=3, latent_channels=4, latent_magnitude=3, latent_shift=0.5,
    num_decoder_blocks=[3, 3, 3, 1], num_encoder_blocks=[1, 3, 3, 3], scaling_factor=1.0,
    upsampling_scaling_factor=2,
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


DEVICE = "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps):
    fn()  # warm-up
    sync()
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - t)
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15", choices=sorted(UNETS))
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parts", default="unet,vae")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "classic"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--guide-clip", default="vit-b32", choices=["vit-b32", "vit-l14"])
    ap.add_argument("--cutouts", type=int, default=4)
    ap.add_argument("--guidance-decoders", default="vae,taesd,linear")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    parts = a.parts.split(",")
    if "guidance" in parts:
        guidance(a, dtype)
    unet = vae = None
    if "unet" in parts:
        with torch.device(a.device):  # initialise the weights where they will run
            unet = UNet2DConditionModel(**UNETS[a.arch][0]).eval()
        unet = unet.to(a.device, dtype)
        if a.attention == "classic":
            from diffusers.models.attention_processor import AttnProcessor
            unet.set_attn_processor(AttnProcessor())
    if "vae" in parts:
        with torch.device(a.device):
            vae = AutoencoderKL(**VAE).eval().to(a.device, dtype)
    for size in [int(s) for s in a.sizes.split(",")]:
        with torch.no_grad():
            if unet is not None:
                x, t, ctx, added = unet_inputs(a, dtype, size)
                runs = timed(lambda: unet(x, t, ctx, added_cond_kwargs=added), a.reps)
                report("unet_step_cfg_batch2", size, runs)
            if vae is not None:
                z = torch.randn(1, 4, size // 8, size // 8).to(a.device, dtype)
                runs = timed(lambda: vae.decode(z), a.reps)
                report("vae_decode", size, runs)


def unet_inputs(a, dtype, size):
    """Random CFG-batch inputs of the UNet's shapes: latents, timesteps, context, added cond."""
    lat = size // 8
    x = torch.randn(2, 4, lat, lat).to(a.device, dtype)
    ctx = torch.randn(2, 77, UNETS[a.arch][1]).to(a.device, dtype)
    t = torch.tensor([500, 500]).to(a.device)
    added = None
    if a.arch == "sdxl":
        added = {
            "text_embeds": torch.randn(2, 1280).to(a.device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2).to(a.device, dtype),
        }
    return x, t, ctx, added


def spherical_distance(a, b):
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    return (a - b).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def guidance(a, dtype):
    """Unguided step, then per decoder the same step plus the CLIP-guidance gradient."""
    from transformers import CLIPConfig, CLIPModel
    from transformers_clip import ARCH

    with torch.device(a.device):  # initialise the weights where they will run
        unet = UNet2DConditionModel(**UNETS[a.arch][0]).eval().to(a.device, dtype)
        clip = CLIPModel(CLIPConfig(**ARCH[a.guide_clip])).eval().to(a.device, dtype)
    unet.requires_grad_(False)
    clip.requires_grad_(False)
    side = clip.config.vision_config.image_size
    mean = torch.tensor(CLIP_MEAN, device=a.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=a.device).view(1, 3, 1, 1)
    text = F.normalize(torch.randn(1, clip.config.projection_dim, device=a.device), dim=-1)
    decoders = {}
    for kind in a.guidance_decoders.split(","):
        if kind == "vae":
            with torch.device(a.device):
                vae = AutoencoderKL(**VAE).eval().to(a.device, dtype).requires_grad_(False)
            decoders[kind] = lambda z, vae=vae: vae.decode(z.to(dtype) / 0.18215).sample
        elif kind == "taesd":
            with torch.device(a.device):
                tiny = AutoencoderTiny(**TAESD).eval().to(a.device, dtype).requires_grad_(False)
            decoders[kind] = lambda z, tiny=tiny: tiny.decode(z.to(dtype)).sample
        elif kind == "linear":
            w = torch.randn(3, 4, device=a.device) * 0.2
            decoders[kind] = lambda z, w=w: F.interpolate(
                torch.einsum("rc,nchw->nrhw", w, z), scale_factor=8, mode="nearest") * 2 - 1
        else:
            raise SystemExit(f"--guidance-decoders: `{kind}`: expected vae, taesd, linear")
    gen = torch.Generator().manual_seed(0)

    def views(img):
        h, w = img.shape[-2:]
        lo, hi = min(h, w, side), min(h, w)
        out = []
        for _ in range(a.cutouts):
            s = int(torch.randint(lo, hi + 1, (), generator=gen))
            top = int(torch.randint(0, h - s + 1, (), generator=gen))
            left = int(torch.randint(0, w - s + 1, (), generator=gen))
            crop = img[:, :, top:top + s, left:left + s]
            out.append(F.interpolate(crop, size=(side, side), mode="bilinear",
                                     antialias=True, align_corners=False))
        return torch.cat(out)

    def image_features(px):
        f = clip.get_image_features(pixel_values=px)
        return f if torch.is_tensor(f) else f.pooler_output

    for size in [int(s) for s in a.sizes.split(",")]:
        x, t, ctx, added = unet_inputs(a, dtype, size)
        x0 = torch.randn(1, 4, size // 8, size // 8, device=a.device)

        def step():
            with torch.no_grad():
                unet(x, t, ctx, added_cond_kwargs=added)

        runs = timed(step, a.reps)
        unguided = statistics.median(runs)
        report("step_unguided", size, runs)
        for kind, decode in decoders.items():
            def gradient():
                z = x0.detach().requires_grad_(True)
                img = decode(z).float() * 0.5 + 0.5
                px = ((views(img) - mean) / std).to(dtype)
                e = image_features(px).float()
                loss = spherical_distance(e, text).mean() * 1000.0
                loss.backward()
                # artguide reads the loss and the gradient's size back for its NaN check.
                float(loss.detach()), float(z.grad.abs().sum())

            def guided():
                step()
                gradient()

            name = f"{kind}_{a.guide_clip}_cutouts{a.cutouts}"
            runs = timed(guided, a.reps)
            report(f"step_guided_{name}", size, runs,
                   ratio_to_unguided=statistics.median(runs) / unguided)
            # The guidance alone, without the UNet call whose time dominates the step.
            report(f"guidance_only_{name}", size, timed(gradient, a.reps))


def report(workload, size, runs, **extra):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = dict(tool="diffusers", workload=workload, size=size,
               seconds=statistics.median(runs), runs=runs,
               peak_rss_bytes=peak, torch_threads=torch.get_num_threads(), **extra)
    if DEVICE == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
