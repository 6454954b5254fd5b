"""Time the CPU weight-only linear kernels tunelab can use, per layer shape and batch size.

Usage: python bench/linear_kernels.py [--model qwen|smollm2] [--threads 2] [--repeats 20]
Prints microseconds per call (median of `repeats`) for float32, bfloat16, int8
(`_weight_int8pack_mm`, tunelab's two-level activations through `torch._int_mm`, and the same
arithmetic in tunelab's C kernel, "int8 native": VNNI for 1..7 rows, AMX beyond where the CPU has it)
int4 (`_weight_int4pack_mm_for_cpu`, and tunelab's grouped C kernel, "int4 native", on the same groups)
and the grouped kernel's 5- and 8-bit codes ("int5 native", "int8g native": Q5_0 and Q8_0 held exactly)
at M = 1, 4, 16, 200.
Compare ratios within one run; the machine is shared and absolute numbers drift.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tunelab.kernels import grouped_linear as native_grouped
from tunelab.kernels import int8_linear as native_int8
from tunelab.weights.quantized import int8_gemm_two_level, quantize_groups

SHAPES = {  # name -> (out_features, in_features)
    "qwen": {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864), "lm_head": (151936, 896)},
    "smollm2": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)},
}


def median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def kernels(n: int, k: int, group_size: int):
    w = torch.randn(n, k) * 0.02
    w_bf16, w_fp16 = w.bfloat16(), w.half()
    scales = w.abs().amax(1) / 127
    w_int8 = (w / scales[:, None]).round().to(torch.int8)
    groups = w.view(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    s4 = ((hi - lo) / 15).clamp(min=1e-6)
    q4 = ((groups - lo[..., None]) / s4[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 2)
    scale_zero = torch.stack([s4, lo + 8 * s4], -1).transpose(0, 1).contiguous().bfloat16()  # [K/g, N, 2]
    native = {}
    if native_grouped.available() and group_size == native_grouped.GROUP_SIZE:
        native = {bits: native_grouped.pack(*quantize_groups(w, bits), bits) for bits in native_grouped.BITS}
    return {
        "fp32": lambda x: F.linear(x, w),
        "bf16": lambda x: F.linear(x.bfloat16(), w_bf16),
        "int8(bf16 x)": lambda x: torch._weight_int8pack_mm(x.bfloat16(), w_int8, scales.bfloat16()),
        "int8(fp32 x)": lambda x: torch._weight_int8pack_mm(x, w_int8, scales),
        "int8 two-level": lambda x: int8_gemm_two_level(x.bfloat16(), w_int8, scales),
        "int8 native": lambda x: native_int8.int8_linear(x.bfloat16(), w_int8, scales.bfloat16()),
        "int4(bf16 x)": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed4, group_size, scale_zero),
        "int4(fp16 x)": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.half(), packed4, group_size, scale_zero.half()),
        "int4 native": lambda x: native_grouped.grouped_linear(x.bfloat16(), native[4]),
        "int5 native": lambda x: native_grouped.grouped_linear(x.bfloat16(), native[5]),
        "int8g native": lambda x: native_grouped.grouped_linear(x.bfloat16(), native[8]),
        "fp16": lambda x: F.linear(x.half(), w_fp16),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen", choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--batch", default="1,4,16,200")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grouped_runs = native_grouped.available() and args.group_size == native_grouped.GROUP_SIZE
    for name, (n, k) in SHAPES[args.model].items():
        fns = kernels(n, k, args.group_size)
        for m in map(int, args.batch.split(",")):
            x = torch.randn(m, k)
            row = {label: median_us(lambda: fn(x), args.repeats if n < 100_000 else 5) for label, fn in fns.items()
                   if (label != "int8 native" or native_int8.takes(m)) and ("native" not in label or label == "int8 native" or grouped_runs)}
            print(f"{name:8s} {n:6d}x{k:<5d} M={m:<4d} " + "  ".join(f"{label} {us:8.0f}" for label, us in row.items()), flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
