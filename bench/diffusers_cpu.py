"""Times diffusers on the workloads `artguide bench` times: SD 1.5 / 2.1 / XL architecture with
random weights, one UNet step with classifier-free guidance (batch 2) and one VAE decode per
image size. Prints one JSON object per measurement, the same fields as `artguide bench --json`.

Run through bench/cpu.sh (CPU, f32) or bench/gpu.sh (`--device cuda --dtype f16`) so both
tools are measured in the same run on the same machine.
"""
import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

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
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    parts = a.parts.split(",")
    unet = vae = None
    if "unet" in parts:
        unet = UNet2DConditionModel(**UNETS[a.arch][0]).eval()
        unet = unet.to(a.device, dtype)
        if a.attention == "classic":
            from diffusers.models.attention_processor import AttnProcessor
            unet.set_attn_processor(AttnProcessor())
    if "vae" in parts:
        vae = AutoencoderKL(**VAE).eval().to(a.device, dtype)
    ctx_dim = UNETS[a.arch][1]
    for size in [int(s) for s in a.sizes.split(",")]:
        lat = size // 8
        with torch.no_grad():
            if unet is not None:
                x = torch.randn(2, 4, lat, lat).to(a.device, dtype)
                ctx = torch.randn(2, 77, ctx_dim).to(a.device, dtype)
                t = torch.tensor([500, 500]).to(a.device)
                added = None
                if a.arch == "sdxl":
                    added = {
                        "text_embeds": torch.randn(2, 1280).to(a.device, dtype),
                        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2).to(a.device, dtype),
                    }
                runs = timed(lambda: unet(x, t, ctx, added_cond_kwargs=added), a.reps)
                report("unet_step_cfg_batch2", size, runs)
            if vae is not None:
                z = torch.randn(1, 4, lat, lat).to(a.device, dtype)
                runs = timed(lambda: vae.decode(z), a.reps)
                report("vae_decode", size, runs)


def report(workload, size, runs):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = dict(tool="diffusers", workload=workload, size=size,
               seconds=statistics.median(runs), runs=runs,
               peak_rss_bytes=peak, torch_threads=torch.get_num_threads())
    if DEVICE == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
