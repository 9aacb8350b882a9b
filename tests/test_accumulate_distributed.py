"""engine.accumulate across processes: two gloo processes on the CPU, shards of unequal sizes, an engine
compiled on a DistributedDataParallel model, cross-entropy with ignored targets (normalizers that are not
sample counts); every process must get the single-process result on the concatenation of the shards in
rank order."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxcurv
from fxcurv.errors import NotCombinableError

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available"),
    pytest.mark.cpu_only("gloo processes on the CPU"),
]

DT = torch.float64
QUANTITIES = ("diag_ggn", "diag_hessian", "hesscale", "kflr", "batch_grad", "batch_l2_grad", "sum_grad_squared",
              "variance", "batch_diag_ggn", "sqrt_ggn")
SHARDS = ((4, 3), (1, 2))
LOSS = nn.CrossEntropyLoss(ignore_index=2)  # rank 0: batches of 4 and 3 samples; rank 1: of 1 and 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(DT)


def _batches() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each rank's batches (both ranks draw all of them, the same)."""
    g = torch.Generator().manual_seed(1)
    return [[(torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 5, (n,), generator=g)) for n in shard]
            for shard in SHARDS]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        engine = fxcurv.compile(model, LOSS, quantities=QUANTITIES)
        result = engine.accumulate(_batches()[rank])
        torch.save(result.to_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        blocks = fxcurv.compile(model, LOSS, quantities=("block_ggn",))
        try:
            blocks.accumulate(_batches()[rank])
        except NotCombinableError as err:
            with open(os.path.join(out_dir, f"refused{rank}.txt"), "w") as fh:
                fh.write(str(err))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_concatenated_result():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2)]
        refused = [open(os.path.join(tmp, f"refused{r}.txt")).read() for r in range(2)]
    xs, ys = zip(*[b for shard in _batches() for b in shard])
    model = _model()
    expected = fxcurv.compile(model, LOSS, quantities=QUANTITIES)(torch.cat(xs), torch.cat(ys))
    expected_dict = expected.to_dict()
    for got in ranks:
        assert list(got) == list(expected_dict)
        torch.testing.assert_close(got["loss"], expected_dict["loss"], rtol=1e-10, atol=0)
        for q in ("grad",) + QUANTITIES:
            assert list(got[q]) == [name for name, _ in model.named_parameters()], q  # the wrapped module's names
            for name, value in expected_dict[q].items():
                torch.testing.assert_close(got[q][name], value, rtol=1e-10, atol=1e-14,
                                           msg=lambda m, q=q, name=name: f"{q}[{name}]: {m}")
    assert all("block_ggn cannot be accumulated across processes" in r for r in refused)
