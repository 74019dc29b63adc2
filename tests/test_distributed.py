"""Data parallelism: 2 ranks with (unequal) halves of each batch = 1 process on the batch.

Processes are real (subprocesses, gloo on loopback, file-store rendezvous), bounded in
time; float64 and tight tolerances.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import curvkit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist_problem import make_problem, run_steps  # noqa: E402

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed not available")]

WORKER = Path(__file__).with_name("_dist_worker.py")


def launch(case: dict, tmp_path: Path, world: int = 2, timeout: float = 120.0):
    store = tmp_path / "store"
    out = tmp_path / "rank0.pt"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(store),
                               json.dumps(case), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            results.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results, out


def single_process(case: dict):
    model, loss_fn, batches = make_problem(case)
    return run_steps(model, loss_fn, batches, case)


def registered(*names: tuple[str, str]) -> bool:
    comps = curvkit.components()
    return all(name in comps[kind] for kind, name in names)


CASES = {
    "sgd-momentum": ({"lr": 0.1, "estimator": "hessian", "preconditioner": "identity",
                      "solver": {"name": "direct", "momentum": 0.9, "weight_decay": 1e-3}},
                     []),
    "ggn+identity+trust_region": ({"lr": 1.0, "estimator": "ggn",
                                   "preconditioner": "identity", "solver": "trust_region"},
                                  [("estimator", "ggn"), ("solver", "trust_region")]),
    # lambda_int large enough that the tiny CNN does not blow up (a blow-up amplifies
    # rounding differences past any tolerance)
    "hessian+partition+cubic": ({"lr": 0.5, "estimator": "hessian",
                                 "preconditioner": "partition",
                                 "solver": {"name": "cubic", "lambda_int": 100.0}},
                                [("estimator", "hessian"), ("preconditioner", "partition"),
                                 ("solver", "cubic")]),
    "fisher+kronecker+direct": ({"lr": 0.5, "estimator": {"name": "fisher", "mc_samples": 2},
                                 "preconditioner": {"name": "kronecker", "damping": 1e-2},
                                 "solver": "direct"},
                                [("estimator", "fisher"), ("preconditioner", "kronecker")]),
    "fisher+kronecker(distributed inversions)+direct": (
        {"lr": 0.5, "estimator": {"name": "fisher", "mc_samples": 2},
         "preconditioner": {"name": "kronecker", "damping": 1e-2, "inverse": "eigh",
                            "damping_form": "exact", "distribute_inversions": True},
         "solver": "direct"},
        [("estimator", "fisher"), ("preconditioner", "kronecker")]),
    "ef+lie_group+direct": ({"lr": 0.1, "estimator": "ef", "preconditioner": "lie_group",
                             "solver": {"name": "direct", "momentum": 0.5}},
                            [("estimator", "ef"), ("preconditioner", "lie_group")]),
    # alpha > 0: with cross-entropy the inner problem has no unique minimizer otherwise
    "varpro": ({"lr": 0.1, "estimator": "ggn", "preconditioner": "identity",
                "solver": {"name": "varpro", "alpha": 1e-3}},
               [("estimator", "ggn"), ("solver", "varpro")]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("loss,model", [("ce", "mlp"), ("mse", "cnn")])
def test_two_ranks_equal_one_process(name, loss, model, tmp_path):
    optimizer, needs = CASES[name]
    if not registered(*needs):
        pytest.skip(f"{name}: parts not registered")
    if name == "varpro" and model == "cnn":
        model = "mlp"
    case = {"optimizer": optimizer, "steps": 5, "loss": loss, "model": model, "split": 0.25}
    ref_losses, ref_params, _ = single_process(case)
    results, out = launch(case, tmp_path)
    for rank, (rc, _, stderr) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{stderr[-3000:]}"
    got = torch.load(out, weights_only=True)
    # Reductions in another order differ in the last bits; the partition's η = H̄⁻¹ḡ-like
    # solve amplifies that by κ(H̄) (≈ 3e4 on the CNN), hence a looser — still tight — bound.
    rel = 1e-8 if "partition" in name else 1e-10
    assert got["losses"] == pytest.approx(ref_losses, rel=rel, abs=1e-12)
    for p, q in zip(got["params"], ref_params):
        torch.testing.assert_close(p, q, rtol=10 * rel, atol=10 * rel)
    assert sum(i.get("comm_bytes", 0) for i in got["infos"]) > 0


@pytest.mark.parametrize("ddp", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_step_after_backward_without_a_batch_averages_over_ranks(ddp, tmp_path):
    """``loss.backward(); opt.step()`` with a loss curvkit cannot see (a plain function):
    identity + direct steps on p.grad. Without DDP, curvkit averages it over the ranks
    (equal weights, as DDP would); under DDP, p.grad is already averaged and curvkit
    sends nothing. Equal shards: equal to one process on the whole batch."""
    optimizer = {"lr": 0.1, "preconditioner": "identity",
                 "solver": {"name": "direct", "momentum": 0.9}}
    case = {"optimizer": optimizer, "steps": 4, "loss": "ce", "model": "mlp", "split": 0.5,
            "style": "backward", "functional_loss": True, "ddp": ddp}
    ref_losses, ref_params, _ = single_process(case)
    results, out = launch(case, tmp_path)
    for rank, (rc, _, stderr) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{stderr[-3000:]}"
    got = torch.load(out, weights_only=True)
    for p, q in zip(got["params"], ref_params):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)
    sent = [i["comm_bytes"] for i in got["infos"]]
    params = sum(p.numel() for p in ref_params)
    # the float64 gradients per step; under DDP nothing (the loss is not seen either)
    assert sent == [0 if ddp else 8 * params] * 4


def test_ddp_wrapped_model_equals_one_plain_process(tmp_path):
    """A DistributedDataParallel-wrapped model is unwrapped: curvkit's count-weighted
    reductions apply (DDP's equal-weight average would be wrong for these unequal shards)."""
    if not registered(("estimator", "ggn"), ("solver", "trust_region")):
        pytest.skip("parts not registered")
    optimizer, _ = CASES["ggn+identity+trust_region"]
    case = {"optimizer": optimizer, "steps": 4, "loss": "ce", "model": "mlp", "split": 0.25,
            "ddp": True}
    ref_losses, ref_params, _ = single_process(case)
    results, out = launch(case, tmp_path)
    for rank, (rc, _, stderr) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{stderr[-3000:]}"
    got = torch.load(out, weights_only=True)
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-10, abs=1e-12)
    for p, q in zip(got["params"], ref_params):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["crash", "hang"])
def test_failing_rank_ends_the_run_with_a_clear_error_everywhere(mode, tmp_path):
    case = {"optimizer": {"lr": 0.1, "estimator": "hessian", "solver": "direct"}, "steps": 4,
            "loss": "ce",
            "fail_rank_at_step": 2, "fail_mode": mode, "hang_seconds": 8, "timeout": 4}
    results, _ = launch(case, tmp_path, timeout=90)
    (rc0, _, err0), (rc1, _, err1) = results
    assert rc1 != 0 and rc0 != 0
    if mode == "crash":
        assert "injected failure on rank 1" in err1
    assert "DistributedError" in err0 and "another rank" in err0


def test_torchrun_curvkit_train_writes_once_and_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m curvkit train` works, rank 0 alone writes the results,
    and the run equals the single-process run of the same config (float64)."""
    from curvkit.experiments.store import RESULTS, read_records

    if not registered(("estimator", "ggn"), ("solver", "trust_region"), ("dataset", "teacher")):
        pytest.skip("parts not registered")
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        '[task]\ndataset = { name = "teacher", n_train = 48, n_val = 8, n_test = 16, '
        'in_dim = 3 }\nmodel = { name = "mlp", width = 5, depth = 1 }\nbatch_size = 24\n'
        '[train]\nsteps = 4\nseeds = [0]\neval_every = 2\ndtype = "float64"\n'
        '[optimizer]\nlr = 1.0\nestimator = "ggn"\nsolver = "trust_region"\n')
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               CURVKIT_CACHE_DIR=str(tmp_path / "cache"))
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["train", str(cfg), "--no-progress"]
    subprocess.run([sys.executable, "-m", "curvkit", *common, "--out", str(one)], env=env,
                   check=True, capture_output=True, timeout=120)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "curvkit", *common, "--out", str(two)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def records(d):
        recs = list(read_records(d / RESULTS))
        return ([r for r in recs if r["type"] == "start"],
                [x for r in recs if r["type"] == "steps" for x in r["loss"]],
                [r for r in recs if r["type"] == "steps"])

    starts1, losses1, _ = records(one)
    starts2, losses2, steps2 = records(two)
    assert len(starts2) == 1 and len(losses2) == 4  # written once, no duplicates
    assert losses2 == pytest.approx(losses1, rel=1e-10)
    assert all(b > 0 for s in steps2 for b in s["info"]["comm_bytes"])  # bytes per step
