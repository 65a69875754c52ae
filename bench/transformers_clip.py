"""Times transformers' CLIP image embedding (get_image_features) on random weights for the
architectures `artguide bench --parts clip` times; prints JSON lines like `artguide bench --json`.
Run through bench/clip_cpu.sh so both are measured in the same run."""
import argparse, json, resource, statistics, time

import torch
from transformers import CLIPConfig, CLIPModel

ARCH = {
    "vit-b32": dict(projection_dim=512,
                    text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
                    vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, image_size=224, patch_size=32)),
    "vit-l14": dict(projection_dim=768,
                    text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
                    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=224, patch_size=14)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit-b32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    a = ap.parse_args()
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    with torch.device(a.device):  # initialise the weights where they will run
        model = CLIPModel(CLIPConfig(**ARCH[a.arch])).eval().to(a.device, dtype)
    x = torch.randn(a.batch, 3, 224, 224).to(a.device, dtype)
    with torch.no_grad():
        model.get_image_features(pixel_values=x)
        sync()
        runs = []
        for _ in range(a.reps):
            t = time.perf_counter()
            model.get_image_features(pixel_values=x)
            sync()
            runs.append(time.perf_counter() - t)
    row = dict(tool="transformers", workload=f"clip_{a.arch}_images_per_s_batch{a.batch}", size=224,
               seconds=a.batch / statistics.median(runs), runs=runs,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               torch_threads=torch.get_num_threads())
    if a.device == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
