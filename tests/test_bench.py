"""The benchmark runs end to end in its reduced mode, so it cannot rot (its figures are not asserted)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_quick_benchmark_writes_every_figure(prepared_data_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out),
                           "--data_dir", str(prepared_data_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    naive, harness = [v for k, v in report["training"].items() if k.startswith("cpu: ") and "peak" not in k][:2]
    assert naive["speedup_vs_naive"] == 1.0 and harness["ms_per_iter"] > 0 and 0 < harness["mfu"]
    sampling = report["sampling"]["cpu block 64"]
    assert sampling["kv_cache_tok_s"] > 0 and sampling["cache_free_tok_s"] > 0
    assert 0 < report["shares"]["eval_share"] < 1 and 0 <= report["shares"]["agent_share"] < 1
    groups = report["lr_groups"]
    assert [r["groups"] for r in groups.values()] == [1, 6, 6]  # the cpu profile: 4 blocks, embeddings, ln_f
    assert all(r["ms_per_iter"] > 0 for r in groups.values())
    assert "ms/iter" in proc.stdout and "KV cache" in proc.stdout


def test_quick_ddp_benchmark_compares_one_process_with_two(prepared_data_dir, tmp_path):
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ddp.py"), "--quick", "--json", str(out),
                           "--data_dir", str(prepared_data_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arms = json.loads(out.read_text())["arms"]
    assert len(arms) == 3 and all(a["tokens_per_s"] > 0 for a in arms.values())
    one, _, two = arms.values()
    # the same global batch either way: 2 micro-batches in one process, one on each of two
    assert one["runs"][0]["global_batch_tokens"] == two["runs"][0]["global_batch_tokens"]
    assert (one["runs"][0]["micro_steps_per_rank"], two["runs"][0]["micro_steps_per_rank"]) == (2, 1)


def test_quick_episodes_per_hour_compares_one_env_with_several(prepared_data_dir, tmp_path):
    out = tmp_path / "eph.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "episodes_per_hour.py"), "--quick", "--json", str(out),
                           "--data_dir", str(prepared_data_dir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arms = json.loads(out.read_text())["arms"]
    assert len(arms) == 2 and all(a["episodes_per_hour"] > 0 for a in arms.values())
    assert list(arms.values())[0]["ratio_to_first"] == 1.0
