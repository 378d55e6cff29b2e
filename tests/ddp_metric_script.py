"""Compute metrics over a dataset sharded across 2 CPU processes (gloo) and print the synchronised result.

Run by ``tests/test_metrics.py::test_ddp_two_processes_match_single_process``, which compares the printed
``RESULT {json}`` line with :func:`compute_metrics` over the whole dataset in one process. The shards are uneven
(3 and 2 samples) and one mask is empty, so the sum / count / exclusion states and the ``"cat"`` states (per-sample
values, curves) are all exercised.

With the argument ``contracts`` it runs every metric of the evaluation package (:mod:`metric_cases`) under the
:data:`SHARDINGS` instead - strided and contiguous shards with ``sample_ids``, strided shards without them (the
rank-mixed default seeds equal the dataset indices there), and every sample on rank 0 with rank 1 empty - and
prints one ``CONTRACT <sharding> {json}`` line each, compared by ``tests/test_metric_contracts.py`` with
:func:`compute_all` in one process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NUM_SAMPLES = 5
WORLD_SIZE = 2


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``[5, 3, 8, 8]``, maps ``[5, 1, 8, 8]``, masks ``[5, 1, 8, 8]`` (sample 3 empty), targets ``[5]``."""
    gen = torch.Generator().manual_seed(123)
    images = torch.rand(NUM_SAMPLES, 3, 8, 8, generator=gen)
    maps = torch.randn(NUM_SAMPLES, 1, 8, 8, generator=gen)
    masks = torch.zeros(NUM_SAMPLES, 1, 8, 8, dtype=torch.bool)
    for i in range(NUM_SAMPLES):
        if i != 3:
            r, c = torch.randint(0, 5, (2,), generator=gen).tolist()
            masks[i, 0, r : r + 4, c : c + 3] = True
    targets = torch.randint(0, 4, (NUM_SAMPLES,), generator=gen)
    return images, maps, masks, targets


def compute_metrics(indices: Iterable[int]) -> dict:
    """The metrics over the samples ``indices``, updated one sample at a time (synchronised when a process group
    is initialised)."""
    # Imported here, not at the top: the launching process only spawns (importing torchmetrics is slow).
    from helpers import GapCNN

    from lightning_xai.evaluation import DeletionAUC, MaskIoU, PointingGame

    images, maps, masks, targets = make_data()
    model = GapCNN(seed=0).eval()
    iou, pointing, per_sample = MaskIoU(), PointingGame(tolerance=1), MaskIoU(return_per_sample=True)
    deletion = DeletionAUC(steps=8, batch_size=4)
    for i in indices:
        sl = slice(i, i + 1)
        iou.update(maps[sl], masks[sl])
        pointing.update(maps[sl], masks[sl])
        per_sample.update(maps[sl], masks[sl])
        deletion.update(maps[sl], images[sl], model, targets[sl])
    with iou.sync_context():
        excluded = iou.num_excluded
    _, curve = deletion.curve()
    return {
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "mask_iou": iou.compute().item(),
        "pointing_game": pointing.compute().item(),
        "per_sample_iou": [v if v == v else -1.0 for v in per_sample.compute().tolist()],  # NaN -> -1 for JSON
        "deletion_auc": deletion.compute().item(),
        "deletion_curve": curve.tolist(),
        "excluded": excluded,
    }


#: Which dataset indices each of the two ranks updates with, and whether it passes them as ``sample_ids``.
SHARDINGS: dict[str, tuple[list[list[int]], bool]] = {
    "strided": ([[0, 2, 4], [1, 3]], True),
    "contiguous": ([[0, 1, 2], [3, 4]], True),
    "strided_without_ids": ([[0, 2, 4], [1, 3]], False),
    "empty_rank": ([[0, 1, 2, 3, 4], []], True),
}


def _plain(value: torch.Tensor) -> list | float | None:
    values = value.reshape(-1).tolist()
    out = [None if v != v else v for v in values]  # NaN -> None for JSON
    return out if value.ndim else out[0]


def compute_all(indices: Iterable[int], with_ids: bool = True) -> dict:
    """Every metric of the evaluation package over the samples ``indices`` (one update per sample): its
    ``compute()`` and, for curve metrics, ``curve()`` (synchronised when a process group is initialised)."""
    import warnings

    import metric_cases
    from helpers import GapCNN

    data = metric_cases.make_data()
    model = GapCNN(seed=0).eval()
    out = {}
    for cls in metric_cases.metric_classes():
        metric = metric_cases.build(cls)
        for i in indices:
            metric.update(**metric_cases.update_kwargs(cls, data, model, [i], with_ids=with_ids))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty rank warns about compute before update
            entry = {"value": _plain(metric.compute())}
        if hasattr(metric, "curve"):
            entry["curve"] = _plain(metric.curve()[1])
        out[cls.__name__] = entry
    return out


def _worker(rank: int, world_size: int, port: int, mode: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        if mode == "contracts":
            for name, (shards, with_ids) in SHARDINGS.items():
                result = compute_all(shards[rank], with_ids)
                if rank == 0:
                    print(f"CONTRACT {name} " + json.dumps(result), flush=True)
        else:
            result = compute_metrics(range(rank, NUM_SAMPLES, world_size))
            if rank == 0:
                print("RESULT " + json.dumps(result), flush=True)
    finally:
        torch.distributed.destroy_process_group()
    # Results are written: leave without C++ destructors, since a gloo thread can abort the interpreter's exit
    # ("terminate called without an active exception", seen under load), failing a run that succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "metrics"
    torch.multiprocessing.spawn(_worker, args=(WORLD_SIZE, _free_port(), mode), nprocs=WORLD_SIZE, join=True)
