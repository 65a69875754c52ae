"""The markdown tables of bench/gpu.sh from its gpu.jsonl (JSON lines of `artguide bench --json`
and the PyTorch peers, each with `variant` and `peak_gpu_smi_mib` added by gpu.sh).

Usage: python3 bench/gpu_table.py gpu.jsonl [more.jsonl ...]
"""
import json
import sys

PEERS = ("diffusers", "transformers")
STEPS = 30


def main():
    rows = [json.loads(l) for p in sys.argv[1:] for l in open(p) if l.strip()]
    by = {}
    for r in rows:
        by.setdefault((r["workload"], r["size"]), {})[r["variant"]] = r
    print("| workload | size | artguide | PyTorch | ratio | artguide GPU peak | PyTorch GPU peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (w, s), d in sorted(by.items()):
        a = d.get("artguide")
        p = next((d[k] for k in PEERS if k in d), None)
        if a is None and p is None:
            continue
        cell = lambda r: "-" if r is None else f'{r["seconds"]:.4f}'
        mem = lambda r: "-" if r is None else f'{r["peak_gpu_smi_mib"] / 1024:.2f} GiB'
        # Always artguide's cost over PyTorch's; > 1 means artguide is slower.
        ratio = "-" if a is None else cost(w, a, p)
        print(f"| {w} | {s} | {cell(a)} | {cell(p)} | {ratio} | {mem(a)} | {mem(p)} |")
    print()
    print("Seconds are per call (median); `images_per_s` rows are images per second. Ratio: "
          "artguide's cost over PyTorch's (> 1: artguide slower).")
    print()
    for tool in ("artguide", "diffusers"):
        d = {w: r for (w, s), v in by.items() for k, r in v.items() if k == tool and s == 512}
        step, dec = d.get("unet_step_cfg_batch2"), d.get("vae_decode")
        if step and dec:
            print(f"- {tool}: one 512x512 image, {STEPS} steps + decode: "
                  f'{STEPS * step["seconds"] + dec["seconds"]:.2f} s ({step["seconds"]:.4f} s/step)')
        for w, r in sorted(d.items()):
            if r.get("ratio_to_unguided") is not None:
                print(f'- {tool}: {w}: {r["ratio_to_unguided"]:.2f}x its unguided step')
    others = [(k, w, s, r) for (w, s), v in by.items() for k, r in v.items()
              if k not in ("artguide",) + PEERS]
    if others:
        print()
        print("| variant | workload | size | seconds | ratio to PyTorch | ratio to artguide | "
              "guided / unguided | GPU peak |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for k, w, s, r in sorted(others):
            p = next((by[(w, s)][q] for q in PEERS if q in by[(w, s)]), None)
            a = by[(w, s)].get("artguide")
            g = r.get("ratio_to_unguided")
            print(f'| {k} | {w} | {s} | {r["seconds"]:.4f} | {cost(w, r, p)} | {cost(w, r, a)} | '
                  f'{"-" if g is None else f"{g:.2f}"} | {r["peak_gpu_smi_mib"] / 1024:.2f} GiB |')


def cost(w, r, other):
    """`r`'s cost over `other`'s (> 1: `r` slower); throughput rows hold images/s."""
    if other is None:
        return "-"
    return f'{other["seconds"] / r["seconds"] if "images_per_s" in w else r["seconds"] / other["seconds"]:.2f}'

if __name__ == "__main__":
    main()
