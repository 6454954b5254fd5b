"""With TUNELAB_NATIVE_KERNELS=0 the same model runs on PyTorch's ops alone and agrees with the kernels."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.kernels import build

pytestmark = pytest.mark.skipif("avx512_vnni" not in build.cpu_flags(), reason="needs the kernels to compare with")

SCRIPT = """
import sys, torch
sys.path[:0] = [{here!r}, {tests!r}]
from test_decode_attention import decode_run, tiny_checkpoint
from tunelab.kernels import int8_linear
from pathlib import Path
logits, _ = decode_run(tiny_checkpoint("qwen3", Path({checkpoint!r})))
torch.save({{"logits": logits, "int8_rows": int8_linear.max_rows()}}, {out!r})
"""


def run(tmp_path: Path, name: str, native: bool) -> dict:
    out, checkpoint = tmp_path / f"{name}.pt", tmp_path / name
    env = dict(os.environ, TUNELAB_NATIVE_KERNELS="1" if native else "0")
    script = SCRIPT.format(here=str(Path(__file__).parent), tests=str(Path(__file__).parents[1]),
                           checkpoint=str(checkpoint), out=str(out))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    return torch.load(out)


def test_pytorch_ops_alone_give_the_same_model(tmp_path):
    native, fallback = run(tmp_path, "native", True), run(tmp_path, "fallback", False)
    assert fallback["int8_rows"] == 0 and native["int8_rows"] != 0
    # bfloat16 residual stream and other int8 paths: equal to bfloat16 precision, same greedy tokens
    scale = fallback["logits"].abs().max().item()
    torch.testing.assert_close(native["logits"], fallback["logits"], atol=0.03 * scale, rtol=0)
    assert torch.equal(native["logits"].argmax(-1), fallback["logits"].argmax(-1))
