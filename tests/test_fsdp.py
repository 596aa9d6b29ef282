"""FSDP2 in the pretrain loop, on 2 CPU processes over gloo (torch.multiprocessing, no Ray).

One spawn runs, in each of the 2 processes: the pretrain under fsdp, under ddp, ddp resumed from
fsdp's step-4 checkpoint and fsdp resumed from ddp's. The curves agree within float tolerance
(the same data, μP groups, accumulation and clipping; only the order of float reductions
differs), and the checkpoints are one format: each strategy continues the other's exactly.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_pretrain import Recorder, spec

from trainables import checkpoint as ckpt
from trainables.pretrain import Runtime, train_pretrain
from trainables.tokens import TokenStore

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cfg, store_root: str, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    store = TokenStore.open(store_root)

    def run(name: str, strategy: str, resume: Path | None = None) -> dict[int, float]:
        wrap = torch.nn.parallel.DistributedDataParallel if strategy == "ddp" else (lambda m: m)
        rec = Recorder(out / f"{name}-rank{rank}")
        rt = Runtime(WORLD, rank, wrap=wrap, strategy=strategy, report=rec, resume_from=resume)
        train_pretrain(cfg, store, rt, report_every=1)
        dist.barrier()  # rank 0's checkpoint copies are complete before anyone resumes from them
        return rec.losses()

    curves = {"fsdp": run("fsdp", "fsdp"), "ddp": run("ddp", "ddp")}
    curves["ddp_from_fsdp"] = run("ddp-from-fsdp", "ddp", out / "fsdp-rank0" / "step_4")
    curves["fsdp_from_ddp"] = run("fsdp-from-ddp", "fsdp", out / "ddp-rank0" / "step_4")
    if rank == 0:
        (out / "curves.json").write_text(json.dumps(curves))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def curves(small_store, tmp_path_factory) -> tuple[dict, Path]:
    cfg = spec(small_store, steps=10)  # pretrain = steps 0..8, checkpoints at 4 and 8
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(_free_port(), cfg, small_store.root, out), nprocs=WORLD)
    loaded = json.loads((out / "curves.json").read_text())
    return {k: {int(s): v for s, v in c.items()} for k, c in loaded.items()}, out


def test_fsdp_and_ddp_give_the_same_curve(curves):
    c, _ = curves
    assert sorted(c["fsdp"]) == sorted(c["ddp"]) == list(range(1, 9))
    for step in range(1, 9):
        assert c["fsdp"][step] == pytest.approx(c["ddp"][step], rel=1e-5), step
    assert c["fsdp"][8] < c["fsdp"][1] - 1.0  # it trains


def test_each_strategy_resumes_the_others_checkpoint(curves):
    c, out = curves
    assert sorted(c["ddp_from_fsdp"]) == sorted(c["fsdp_from_ddp"]) == list(range(5, 9))
    for step in range(5, 9):
        assert c["ddp_from_fsdp"][step] == pytest.approx(c["ddp"][step], rel=1e-5), step
        assert c["fsdp_from_ddp"][step] == pytest.approx(c["fsdp"][step], rel=1e-5), step
    # one format: the same files and tensor names, weights equal within float tolerance
    fsdp, ddp = out / "fsdp-rank0" / "step_8" / "state", out / "ddp-rank0" / "step_8" / "state"
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in ddp.iterdir())
    ckpt.verify_checkpoint(fsdp)
    a, b = load_file(fsdp / ckpt.MODEL_FILE), load_file(ddp / ckpt.MODEL_FILE)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    opt_a = torch.load(fsdp / ckpt.OPTIMIZER_FILE, weights_only=True)
    opt_b = torch.load(ddp / ckpt.OPTIMIZER_FILE, weights_only=True)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    assert [g["name"] for g in opt_a["param_groups"]] == ["hidden", "embedding", "norm"]
    assert [g["params"] for g in opt_a["param_groups"]] == [
        g["params"] for g in opt_b["param_groups"]
    ]
