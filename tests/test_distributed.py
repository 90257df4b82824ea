import json
import math
import os
import subprocess

from processes import launcher, requires_launcher

HERE = os.path.dirname(__file__)


@requires_launcher("accelerate")
def test_two_processes_on_cpu(tmp_path):
    result = tmp_path / "result.json"
    cmd = [
        launcher("accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        os.path.join(HERE, "distributed_run.py"),
        str(result),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    if proc.returncode != 0:
        (tmp_path / "stderr.log").write_text(proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if "Warning" not in line and "warnings.warn" not in line]
        raise AssertionError("\n".join(lines[-60:]))
    data = json.loads(result.read_text())
    assert data["world_size"] == 2
    assert data["global_step"] == 3
    assert data["eq4_max_diff"] < 1e-6
    # (The optimized and the straightforward step end at the same weights on 2 processes: tests/test_distributed_matrix.)
    assert data["edge_max_diff"] < 1e-5 and data["edge_nontrivial"]  # EDGE-GRPO's group mean across the two ranks
    rank0, rank1 = data["per_rank"]
    # The one group of 4 is split across ranks: by global index, rank 0 holds the normal rollouts, rank 1 the HE ones.
    assert rank0["modes"] == [["normal", "normal"]] * 3
    assert rank1["modes"] == [["high_entropy", "high_entropy"]] * 3
    assert rank0["rows"] == rank1["rows"] == [4, 4, 4]  # 2 rollouts x 2 contexts per rank
    assert rank0["weights_changed"] and rank1["weights_changed"]
    assert rank0["invariant_ok"] and rank1["invariant_ok"]
    # NaN loss on rank 1 only: both ranks stop at step 2, before the update, with finite weights.
    assert rank0["nan_stop"] == rank1["nan_stop"] == "Training stopped at optimizer step 2"
    assert rank0["nan_weights_finite"] and rank1["nan_weights_finite"]
    for log in data["logs"]:
        assert math.isfinite(log["policy_split/kl_high_entropy_normal"])
        assert math.isfinite(log["policy_split/entropy/high_entropy_context"])
