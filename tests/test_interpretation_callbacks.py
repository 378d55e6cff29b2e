"""TCAVScores, RelevantUnits, ClassPrototypes and EmbeddingProjector inside real (short) Trainer runs: what they
log, no side effects on training, validate under inference_mode, failures, resume, W&B offline, and DDP over two
CPU processes."""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from lightning_helpers import BlobData, TinyClassifier, blob_dataset, quiet_trainer, run_processes
from PIL import Image

from lightning_xai.callbacks.interpretation import (
    ClassPrototypes,
    EmbeddingProjector,
    RelevantUnits,
    TCAVScores,
)
from lightning_xai.interpretation.embedding import project_features
from lightning_xai.interpretation.relevant_units import RelevantUnitAnalysis
from lightning_xai.interpretation.tcav import TCAV
from lightning_xai.namespace import pl
from lightning_xai.viz.render import tile_images as _tile

ModelCheckpoint = pl.callbacks.ModelCheckpoint


def _blob_concepts():
    """Concept "left square" (class-0-like images) and random pool from the blob generator."""
    data = blob_dataset(60, 16, seed=5)
    images, labels = data.tensors[0], data.tensors[1]
    return {"left": images[labels == 0][:10], "right": images[labels == 2][:10]}, images[:40]


def _callbacks():
    concepts, pool = _blob_concepts()
    return [
        TCAVScores("features.3", concepts, random_examples=pool, num_random=3, num_samples=12),
        RelevantUnits("features.3", num_samples=24, top_k=3, units_per_class=2),
        ClassPrototypes(steps=8, batch_size=2),
        EmbeddingProjector("features", num_samples=16),
    ]


def _fit(tmp_path, callbacks, epochs=2, **kwargs):
    pl.seed_everything(0)
    model = TinyClassifier()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, default_root_dir=str(tmp_path), **kwargs)
    trainer.fit(model, BlobData())
    return trainer, model


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_all_callbacks_log_files_and_metrics(tmp_path):
    tcav, units, prototypes, embedding = callbacks = _callbacks()
    trainer, _ = _fit(tmp_path, callbacks)
    for cb in callbacks:
        assert not cb.errors, cb.errors
    out = tmp_path / "xai"  # <default_root_dir>/xai/<callback> when the run has no logger

    # TCAV: one table per epoch, one row per (class, concept), and the scores as metrics
    tables = sorted(glob.glob(str(out / "tcavscores" / "xai_tcav_scores_step*.csv")))
    assert len(tables) == 2
    rows = _read_csv(tables[-1])
    assert rows[0][:3] == ["class", "concept", "tcav_score"] and len(rows) == 1 + 3 * 2
    assert [e for e, _ in tcav.history] == [0, 1]
    score = tcav.last_result.get(0, "left").score
    assert trainer.callback_metrics["xai/tcav/0/left"].item() == pytest.approx(score)
    assert 0.0 <= score <= 1.0 and "xai/tcav/num_significant" in trainer.callback_metrics

    # relevant units: unit table with crop images, ablation table, metrics, stability from the second run
    unit_rows = _read_csv(sorted(glob.glob(str(out / "relevantunits" / "xai_relevant_units_units_step*.csv")))[-1])
    assert unit_rows[0] == ["class", "rank", "layer", "unit", "weight", "average_crop", "top_crops"]
    assert len(unit_rows) > 1
    crop = np.asarray(Image.open(out / "relevantunits" / unit_rows[1][5]))
    assert crop.dtype == np.uint8 and crop.shape[2] == 3
    ablation_tables = glob.glob(str(out / "relevantunits" / "xai_relevant_units_ablation_step*.csv"))
    ablation_rows = _read_csv(sorted(ablation_tables)[-1])
    assert len(ablation_rows) == 1 + 3
    assert "xai/relevant_units/stability" in trainer.callback_metrics
    assert len(units.history) == 2 and set(units.history[-1]["units"]) == {0, 1, 2}

    # prototypes: a non-blank grid per epoch and the final logits
    grids = sorted(glob.glob(str(out / "classprototypes" / "xai_prototypes_grid_step*.png")))
    assert len(grids) == 2
    grid = np.asarray(Image.open(grids[-1]))
    assert grid.dtype == np.uint8 and grid.std() > 5
    assert prototypes.last_images.shape == (3, 3, 16, 16)
    assert len(prototypes.history[-1][1]) == 3

    # embedding: x, y, label, prediction for every probe sample
    points = _read_csv(sorted(glob.glob(str(out / "embeddingprojector" / "xai_embedding_points_step*.csv")))[-1])
    assert points[0] == ["x", "y", "label", "class", "prediction", "probe_index"] and len(points) == 1 + 16
    assert embedding.history[-1][1] is not None and 0.0 < embedding.history[-1][1] <= 1.0 + 1e-6


def test_results_equal_direct_calls_of_the_interpretation_layer(tmp_path):
    """What the callbacks compute is what the notebook-level API computes on the same probe samples."""
    tcav, units, prototypes, embedding = callbacks = _callbacks()
    _, model = _fit(tmp_path, callbacks, epochs=1)
    model.eval()  # the callbacks run in eval mode (BatchNorm running statistics)
    val = BlobData().val_set
    train = BlobData().train_set

    x = torch.stack([val[i][0] for i in tcav.probe.indices])
    y = torch.stack([val[i][1] for i in tcav.probe.indices])
    concepts, pool = _blob_concepts()
    direct = TCAV("features.3", num_random=3)(model, x, y, concepts, pool, classes=[0, 1, 2])
    assert direct.rows() == tcav.last_result.rows()

    xs = torch.stack([train[i][0] for i in units.probe.indices])
    ys = torch.stack([train[i][1] for i in units.probe.indices])
    result = RelevantUnitAnalysis("features.3").fit(model, (xs, ys), num_classes=3)
    assert torch.allclose(result.weights, units.last_result.weights, atol=1e-6)

    xe = torch.stack([val[i][0] for i in embedding.probe.indices])
    with torch.no_grad():
        feats = model.features(xe.clone()).mean(dim=(2, 3))
    coords, _ = project_features(feats, "pca")
    assert torch.allclose(coords, embedding.last_coordinates, atol=1e-4)

    with torch.no_grad():
        logits = model(prototypes.last_images)
    assert torch.allclose(logits.diagonal(), torch.tensor(prototypes.history[-1][1]), atol=1e-4)


def test_callbacks_do_not_change_training(tmp_path):
    """Same seed with and without the callbacks: bit-identical weights (no RNG, mode, BatchNorm or gradient side
    effects)."""
    _, with_callbacks = _fit(tmp_path / "a", _callbacks())
    _, plain = _fit(tmp_path / "b", [])
    for (name, p), q in zip(with_callbacks.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs when the callbacks are attached"


def test_validate_under_inference_mode(tmp_path):
    pl.seed_everything(0)
    model = TinyClassifier().eval()
    callbacks = _callbacks()
    trainer = quiet_trainer(callbacks=callbacks, inference_mode=True, default_root_dir=str(tmp_path))
    trainer.validate(model, datamodule=BlobData(), verbose=False)
    for cb in callbacks:
        assert not cb.errors, cb.errors
    assert callbacks[0].last_result is not None and callbacks[2].last_images is not None


def test_at_fit_end_only(tmp_path):
    prototypes = ClassPrototypes(steps=4, every_n_epochs=None, image_shape=(3, 16, 16))
    embedding = EmbeddingProjector("features", num_samples=8, every_n_epochs=None)
    _fit(tmp_path, [prototypes, embedding], epochs=3)
    assert [e for e, _ in prototypes.history] == [3], "one run, at the end of training"
    assert len(embedding.history) == 1


def test_every_n_epochs(tmp_path):
    embedding = EmbeddingProjector("features", num_samples=8, every_n_epochs=2)
    _fit(tmp_path, [embedding], epochs=4)
    assert [e for e, _ in embedding.history] == [1, 3]


def test_concept_dataset_by_name(tmp_path):
    """TCAV concepts named after ConceptScenes concepts; examples come from the validation dataset itself."""
    concepts = pytest.importorskip("lightning_xai.data.concepts")
    data = concepts.ConceptDataModule(
        image_size=24, n_train=48, n_val=48, n_test=8, batch_size=16, class_rule="shape", spurious_tag=0.9
    )
    tcav = TCAVScores(
        "features",
        ["tag:present", "colour:red"],
        num_concept_examples=6,
        num_random_examples=20,
        num_random=2,
        num_samples=12,
        on_error="raise",
    )
    pl.seed_everything(0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[tcav], default_root_dir=str(tmp_path))
    trainer.fit(TinyClassifier(num_classes=4), data)
    assert {e.concept for e in tcav.last_result.entries} == {"tag:present", "colour:red"}
    assert all(0.0 <= e.cav_accuracy <= 1.0 for e in tcav.last_result.entries)


def test_failures_warn_and_training_goes_on(tmp_path, monkeypatch):
    """A runtime fault (injected into each method) is recorded and warned at every run; training goes on. (A wrong
    layer name is a configuration mistake and raises at setup: see test_interpretation_setup.py.)"""
    concepts, pool = _blob_concepts()
    broken = [
        TCAVScores("features.3", concepts, random_examples=pool, num_random=2, num_samples=4),
        RelevantUnits("features.3", num_samples=8),
        EmbeddingProjector("features", num_samples=8),
    ]

    def nope(*args, **kwargs):
        raise RuntimeError("nope: injected fault")

    monkeypatch.setattr(broken[0].tcav, "fit_cavs", nope)
    monkeypatch.setattr(broken[1].analysis, "features", nope)
    monkeypatch.setattr("lightning_xai.callbacks.embedding.layer_features", nope)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit(tmp_path, broken, epochs=2)
    assert trainer.current_epoch == 2
    for cb in broken:
        assert len(cb.errors) == 2 and "nope" in cb.errors[0].message
    assert any("skipped at epoch" in str(w.message) for w in caught)


def test_on_error_raise(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        _fit(tmp_path, [EmbeddingProjector("nope", num_samples=8, on_error="raise")], epochs=1)


def test_resume_continues_histories(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = [EmbeddingProjector("features", num_samples=8), RelevantUnits("features.3", num_samples=12, ablation=False)]
    _fit(tmp_path, [*first, ckpt], epochs=2, enable_checkpointing=True)
    resumed = [
        EmbeddingProjector("features", num_samples=8),
        RelevantUnits("features.3", num_samples=12, ablation=False),
    ]
    pl.seed_everything(0)
    trainer = quiet_trainer(max_epochs=3, callbacks=resumed, default_root_dir=str(tmp_path))
    trainer.fit(TinyClassifier(), BlobData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [e for e, _ in resumed[0].history] == [0, 1, 2]
    assert resumed[0].history[:2] == first[0].history
    assert resumed[0].probe.indices == first[0].probe.indices
    assert [h["epoch"] for h in resumed[1].history] == [0, 1, 2]


def test_state_dict_round_trip():
    concepts, pool = _blob_concepts()
    cases = [
        (lambda: TCAVScores("features", concepts, random_examples=pool), [(0, [[0, "c", 0.5, 0.1]])]),
        (lambda: ClassPrototypes(), [(0, [1.0, 2.0])]),
        (lambda: RelevantUnits("features"), [{"epoch": 0, "units": {"0": [["features", 1, 0.5]]}}]),
        (lambda: EmbeddingProjector("features"), [(0, 0.5), (1, None)]),
    ]
    for make, history in cases:
        a, b = make(), make()
        a.history = history
        if hasattr(a, "probe"):
            a.probe.indices = [3, 1, 2]
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # also: the state is plain JSON-able data
        assert b.state_dict() == a.state_dict()
        assert b.history == a.history
    assert (
        TCAVScores("a", concepts, random_examples=pool).state_key
        != TCAVScores("b", concepts, random_examples=pool).state_key
    )


def test_wandb_offline_gets_tables_scatter_and_images(tmp_path):
    wandb = pytest.importorskip("wandb")
    WandbLogger = pl.loggers.WandbLogger

    logger = WandbLogger(project="xai-test", save_dir=str(tmp_path), offline=True)
    embedding = EmbeddingProjector("features", num_samples=12)
    prototypes = ClassPrototypes(steps=4, image_shape=(3, 16, 16))
    _fit(tmp_path, [embedding, prototypes], epochs=1, logger=logger)
    run_dir = logger.experiment.dir
    wandb.finish()
    assert "wandb:xai/embedding/points_scatter" in embedding.last_outputs
    assert "wandb:xai/prototypes/grid" in prototypes.last_outputs
    images = glob.glob(os.path.join(run_dir, "media", "images", "**", "*.png"), recursive=True)
    grids = [p for p in images if "prototypes" in p and "grid" in os.path.basename(p)]
    assert grids and np.asarray(Image.open(grids[0]).convert("RGB")).std() > 5
    tables = glob.glob(os.path.join(run_dir, "media", "table", "**", "*.json"), recursive=True)
    assert any("points" in os.path.basename(t) for t in tables), tables


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TCAVScores("features", {"c": torch.zeros(3, 3, 4, 4)}), "random_examples"),
        (lambda: TCAVScores("features", []), "concepts"),
        (lambda: TCAVScores("features", ["a"], num_random=1), "num_random"),
        (lambda: RelevantUnits([]), "layers"),
        (lambda: RelevantUnits("features", mu=-1.0), "mu"),
        (lambda: RelevantUnits("features", split="test"), "split"),
        (lambda: ClassPrototypes(steps=0), "steps"),
        (lambda: ClassPrototypes(image_shape=(16, 16)), "image_shape"),
        (lambda: EmbeddingProjector("features", method="umap"), "method"),
        (lambda: EmbeddingProjector("features", every_n_epochs=0), "every_n_epochs"),
        (lambda: EmbeddingProjector("features", on_error="ignore"), "on_error"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_tile_layout():
    images = np.stack([np.full((2, 3, 3), i * 40, dtype=np.uint8) for i in range(5)])
    grid = _tile(images, columns=2, pad=1)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 3)
    assert (grid[1:3, 1:4] == 0).all() and (grid[4:6, 5:8] == 120).all() and (grid[7:9, 5:8] == 255).all()


# ------------------------------------------------------------------------------------------------------------ DDP


def _ddp_callbacks() -> list:
    data = blob_dataset(60, 16, seed=5)
    images, labels = data.tensors[0], data.tensors[1]
    return [
        TCAVScores(
            "features.3",
            {"left": images[labels == 0][:10]},
            random_examples=images[:40],
            num_random=3,
            num_samples=11,  # not divisible by 2: exercises the padding of the last shard
            on_error="raise",
        ),
        RelevantUnits("features.3", num_samples=13, split="val", on_error="raise"),
        ClassPrototypes(steps=5, on_error="raise"),
        EmbeddingProjector("features", num_samples=9, on_error="raise"),
    ]


def _ddp_result(callbacks: list) -> dict:
    tcav, units, prototypes, embedding = callbacks[:4]
    return {
        "tcav": tcav.last_result.rows(),
        "weights": units.last_result.weights.tolist(),
        "ablation": units.last_ablation.rows(),
        "prototypes": prototypes.last_images.flatten().tolist(),
        "embedding": None if embedding.last_coordinates is None else embedding.last_coordinates.tolist(),
    }


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    from lightning_xai.namespace import pl
    from lightning_helpers import BlobData, TinyClassifier
    from test_interpretation_callbacks import _ddp_callbacks, _ddp_result

    out = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    callbacks = _ddp_callbacks()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=out)
    trainer.validate(TinyClassifier(), datamodule=BlobData(), verbose=False)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(_ddp_result(callbacks), f)
    """
)


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    """Two CPU processes (gloo) give every rank the single-process result (the embedding: rank zero only)."""
    pl.seed_everything(0)
    callbacks = _ddp_callbacks()
    trainer = quiet_trainer(callbacks=callbacks, default_root_dir=str(tmp_path / "single"))
    trainer.validate(TinyClassifier(), datamodule=BlobData(), verbose=False)
    single = json.loads(json.dumps(_ddp_result(callbacks)))

    script = tmp_path / "ddp_interpretation.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    proc = run_processes([sys.executable, str(script), str(out), os.path.dirname(__file__)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        got = json.loads((out / f"rank{rank}.json").read_text())
        assert got["tcav"] == single["tcav"], "TCAV counts summed over ranks equal the single-process ones"
        assert np.allclose(got["weights"], single["weights"], atol=1e-6)
        assert got["ablation"] == single["ablation"]
        assert np.allclose(got["prototypes"], single["prototypes"], atol=1e-5)
        if rank == 0:
            assert np.allclose(got["embedding"], single["embedding"], atol=1e-4)
        else:
            assert got["embedding"] is None, "the projection runs on rank zero only"
