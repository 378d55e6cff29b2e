"""Network dissection on 1 or N CPU processes (torch.distributed, gloo); each rank writes what it computed.

    python tests/ddp_dissection_script.py WORLD_SIZE OUT_DIR

Every rank builds the same concept dataset and model from seeds, dissects its contiguous shard of the probe set
(unequal shard sizes on purpose) with the core API and with the ``DissectionScores`` callback (driven by a stub
trainer, so that no Lightning launcher is needed), and writes ``rank<r>.json``. A last run feeds rank 1 broken
masks: every rank must raise instead of waiting forever in a collective. Used by ``test_dissection.py``, which
also imports :func:`run` to get the single-process result in its own process.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lightning_helpers import TinyClassifier

from lightning_xai.callbacks.dissection import DissectionScores
from lightning_xai.data.concepts import ConceptScenes
from lightning_xai.interpretation.dissection import NetworkDissection

NUM_IMAGES = 23
LAYER = "features.3"  # a conv output: signed activations


def _batches(ds: ConceptScenes, indices: list[int], size: int, drop_concept: bool = False) -> list:
    out = []
    for start in range(0, len(indices), size):
        idx = torch.tensor(indices[start : start + size])
        masks = ds.concept_masks_for(idx)
        out.append((ds.images[idx], masks[:, 1:] if drop_concept else masks, idx))
    return out


def run(rank: int, world: int, out: str) -> dict:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        ds = ConceptScenes(NUM_IMAGES, image_size=32, seed=3)
        torch.manual_seed(0)
        model = TinyClassifier(num_classes=4).eval()
        per_rank = -(-NUM_IMAGES // world)
        shard = list(range(NUM_IMAGES))[rank * per_rank : (rank + 1) * per_rank]

        dissection = NetworkDissection(LAYER, top_k=3)
        result = dissection(model, _batches(ds, shard, 5), ds.concept_names, ds.categories)
        explanations = dissection.explain_compositional(model, _batches(ds, shard, 5), result, [0, 5])

        callback = DissectionScores(
            LAYER,
            num_samples=15,
            probe_dataset=ds,
            batch_size=4,
            num_rendered_units=2,
            compositional_units=1,
            output_dir=os.path.join(out, "tables"),
            on_error="raise",
        )
        trainer = SimpleNamespace(
            world_size=world,
            global_rank=rank,
            is_global_zero=rank == 0,
            current_epoch=0,
            global_step=0,
            default_root_dir=out,
            loggers=[],
            state=SimpleNamespace(fn="fit"),
        )
        cb_result = callback.dissect(trainer, model)

        failure = None
        try:
            NetworkDissection(LAYER)(model, _batches(ds, shard, 5, drop_concept=rank == 1), ds.concept_names)
        except Exception as err:
            failure = f"{type(err).__name__}: {err}"

        return {
            "rank": rank,
            "thresholds": result.thresholds.tolist(),
            "rank_error": result.threshold_rank_error.tolist(),
            "intersection": result.intersection.tolist(),
            "unit_area": result.unit_area.tolist(),
            "concept_area": result.concept_area.tolist(),
            "num_images": result.num_images,
            "top_indices": result.top_indices.tolist(),
            "top_scores": result.top_scores.tolist(),
            "formulas": [[e.unit, e.label, e.iou] for e in explanations],
            "callback_rows": cb_result.rows(),
            "callback_history": callback.history,
            "callback_formulas": [[e.unit, e.label, e.iou] for e in callback.last_explanations],
            "callback_outputs": callback.last_outputs,
            "failure": failure,
        }
    finally:
        if world > 1:
            dist.destroy_process_group()


def _worker(rank: int, world: int, out: str) -> None:
    result = run(rank, world, out)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:  # results are written: leave without C++ destructors (a gloo thread can abort the exit)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main() -> None:
    world, out = int(sys.argv[1]), sys.argv[2]
    os.makedirs(out, exist_ok=True)
    if world == 1:
        _worker(0, 1, out)
    else:
        # fork: the workers inherit the imports (a spawned interpreter would re-import torch and Lightning)
        torch.multiprocessing.start_processes(_worker, args=(world, out), nprocs=world, join=True, start_method="fork")


if __name__ == "__main__":
    main()
