"""`tunelab bench` through the real CLI: tunelab and transformers on one real model, in their own processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tunelab.registry.store import Store


def test_bench_compares_tunelab_with_transformers_and_shares_the_prompt(tmp_path, smollm2_path):
    home = tmp_path / "home"
    Store(home).register_gguf("smollm2:135m", Store(home).add_blob_from_file(smollm2_path, link=True))
    out = tmp_path / "bench.json"
    env = dict(os.environ, TUNELAB_HOME=str(home))
    done = subprocess.run(
        [sys.executable, "-m", "tunelab", "bench", "smollm2:135m", "--compare", "transformers", "--runs", "2",
         "--prompt-tokens", "24", "--gen-tokens", "6", "--shared-samples", "4", "--shared-prompt-tokens", "48",
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "medians" in done.stdout  # the ratio row of the single-stream table
    results = json.loads(out.read_text())
    assert set(results) == {"tunelab", "transformers"}
    for result in results.values():
        assert len(result["tokens"]) == 6 and len(result["decode_tps"]) == 2 and result["peak_rss_mib"] > 0
    assert set(results["tunelab"]["aggregate_decode_tps"]) == {"1", "4", "16"}
    shared = results["tunelab"]["shared_prefix"]
    # The 4 samples' common 48-token prompt is computed once; each later sample finds all three 16-token
    # blocks cached and recomputes only the last one, which holds the token its logits come from.
    assert shared["unshared_prefill_tokens"] == 4 * 48 and shared["prefill_tokens_computed"] == 48 + 3 * 16
