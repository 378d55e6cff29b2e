"""TCAVScores, RelevantUnits, ClassPrototypes and EmbeddingProjector on the callback base: configuration mistakes
raise before the first training step (issue 19.1), every callback runs at the end of fit and falls back to it when
no validation epoch ends (19.3), non-finite outputs and gradients are reported and never scored (19.10), the
callbacks take configured method objects (15.1), and their cost is bounded (21.4: one forward pass for the
embedding, a cap on the prototypes optimised per run)."""

from __future__ import annotations

import copy
import csv
import glob
import warnings
from types import SimpleNamespace

import pytest
import torch
from lightning_helpers import BlobData, TinyClassifier, blob_dataset, quiet_trainer

from lightning_xai.callbacks.base import ConfigurationError
from lightning_xai.callbacks.interpretation import ClassPrototypes, EmbeddingProjector, RelevantUnits, TCAVScores
from lightning_xai.distributed import Reducer, ThreadGroup
from lightning_xai.interpretation.relevant_units import RelevantUnitAnalysis
from lightning_xai.interpretation.tcav import TCAV
from lightning_xai.interpretation.visualization import ActivationMaximization
from lightning_xai.namespace import pl


def _concepts():
    data = blob_dataset(60, 16, seed=5)
    images, labels = data.tensors[0], data.tensors[1]
    return {"left": images[labels == 0][:10], "right": images[labels == 2][:10]}, images[:40]


class _StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------- 19.1: fail early


def _concept_data():
    concepts = pytest.importorskip("lightning_xai.data.concepts")
    return concepts.ConceptDataModule(
        image_size=24, n_train=48, n_val=48, n_test=8, batch_size=16, class_rule="shape", spurious_tag=0.9
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TCAVScores("features.33", *_concepts()[:1], random_examples=_concepts()[1]),
         r"TCAVScores: layer 'features.33' not found .*'features.3'"),
        (lambda: TCAVScores("features", _concepts()[0], random_examples=_concepts()[1], classes=[7]),
         r"TCAVScores: classes \[7\] are out of range: the model has 3 classes \(valid: 0..2\)"),
        (lambda: RelevantUnits(["features.3", "featurs"]), r"RelevantUnits: layer 'featurs' not found .*'features'"),
        (lambda: EmbeddingProjector("head2"), r"EmbeddingProjector: layer 'head2' not found .*'head'"),
        (lambda: ClassPrototypes(classes=[0, 3], steps=2),
         r"ClassPrototypes: classes \[3\] are out of range: the model has 3 classes"),
    ],
)
def test_configuration_mistakes_raise_before_the_first_training_step(tmp_path, make, match):
    counter = _StepCounter()
    trainer = quiet_trainer(max_epochs=1, callbacks=[make(), counter], default_root_dir=str(tmp_path))
    with pytest.raises(ConfigurationError, match=match):
        trainer.fit(TinyClassifier(), BlobData())  # on_error="warn" (the default) does not turn this into a warning
    assert counter.steps == 0


def test_too_few_concept_examples_in_the_split_raise_at_setup(tmp_path):
    data = _concept_data()
    data.setup("fit")
    available = len(data.dataset("val").concept_indices("tag:present"))
    tcav = TCAVScores("features", ["tag:present"], num_concept_examples=available + 1, num_random_examples=20,
                      num_random=2, num_samples=12)
    counter = _StepCounter()
    trainer = quiet_trainer(max_epochs=1, callbacks=[tcav, counter], default_root_dir=str(tmp_path))
    match = (rf"TCAVScores: concept 'tag:present' has {available} examples in the val split, fewer than "
             rf"num_concept_examples={available + 1}; .*minimum 2")
    with pytest.raises(ConfigurationError, match=match):
        trainer.fit(TinyClassifier(num_classes=4), data)
    assert counter.steps == 0


def test_concepts_by_name_without_a_concept_dataset_raise_at_setup(tmp_path):
    trainer = quiet_trainer(max_epochs=1, callbacks=[TCAVScores("features", ["striped"])],
                            default_root_dir=str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"TCAVScores: concepts given by name \(\['striped'\]\) need a concept "
                                                 r"dataset .* TensorDataset"):
        trainer.fit(TinyClassifier(), BlobData())


def test_too_few_concept_tensors_raise_at_construction():
    concepts, pool = _concepts()
    with pytest.raises(ValueError, match=r"TCAVScores: concept 'one' has 1 example\(s\); a CAV needs at least 2"):
        TCAVScores("features", {"one": concepts["left"][:1]}, random_examples=pool)


# ------------------------------------------------------------------------------------------- 19.3: end of fit


def _four(**kwargs):
    concepts, pool = _concepts()
    return [
        TCAVScores("features.3", concepts, random_examples=pool, num_random=2, num_samples=12, **kwargs),
        RelevantUnits("features.3", num_samples=12, ablation=False, **kwargs),
        ClassPrototypes(steps=2, **kwargs),
        EmbeddingProjector("features", num_samples=8, **kwargs),
    ]


def _runs(cb) -> int:
    return len(cb.history)


def test_every_callback_runs_once_at_fit_end(tmp_path):
    callbacks = _four(every_n_epochs=None, on_error="raise")
    pl.seed_everything(0)
    quiet_trainer(max_epochs=2, callbacks=callbacks, default_root_dir=str(tmp_path)).fit(TinyClassifier(), BlobData())
    for cb in callbacks:
        last = cb.history[-1]
        assert _runs(cb) == 1 and (last["epoch"] if isinstance(last, dict) else last[0]) == 2, cb.name
        assert not cb.errors


def test_every_callback_falls_back_to_fit_end_when_no_validation_ends(tmp_path):
    callbacks = _four(on_error="raise")
    pl.seed_everything(0)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, default_root_dir=str(tmp_path))
    _, messages = _warnings_of(lambda: trainer.fit(TinyClassifier(), BlobData()))
    for cb in callbacks:
        assert _runs(cb) == 1, cb.name
        said = [m for m in messages if m.startswith(f"{cb.name}:") and "no validation epoch ended" in m]
        assert len(said) == 1 and "limit_val_batches=0" in said[0], (cb.name, messages)


# ------------------------------------------------------------------------------------------- 19.10: non-finite


MARK = 0.77  # pixel [0, 0, 0] of the inputs a test model treats as broken


class _NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradient for the marked rows."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.masked_fill(rows.reshape(-1, *[1] * (grad.ndim - 1)), float("nan")), None


class NaNGradientClassifier(TinyClassifier):
    """Finite logits everywhere, but a NaN gradient with respect to "features" for the marked inputs."""

    def forward(self, x):
        marked = x[:, 0, 0, 0] == MARK
        return self.head(_NaNGradient.apply(self.features(x), marked).mean(dim=(2, 3)))


class NaNLogitClassifier(TinyClassifier):
    """NaN logits for the marked inputs (and for class ``nan_class`` everywhere, if given); finite gradients."""

    def __init__(self, nan_class: int | None = None) -> None:
        super().__init__()
        self.nan_class = nan_class

    def forward(self, x):
        out = super().forward(x)
        bad = (x[:, 0, 0, 0] == MARK)[:, None].expand_as(out)
        if self.nan_class is not None:
            bad = bad | (torch.arange(out.shape[1], device=out.device) == self.nan_class)[None]
        return torch.where(bad, torch.full_like(out, float("nan")), out)


def _marked_probe(cls: int = 1, n: int = 30):
    data = blob_dataset(n, 16, seed=3)
    x, y = data.tensors[0].clone(), data.tensors[1]
    x[y == cls, 0, 0, 0] = MARK
    return x, y


def _validate(tmp_path, model, callbacks):
    trainer = quiet_trainer(callbacks=callbacks, default_root_dir=str(tmp_path))
    _, messages = _warnings_of(lambda: trainer.validate(model, datamodule=BlobData(), verbose=False))
    return trainer, messages


def test_tcav_reports_nan_gradients_and_scores_no_such_class(tmp_path):
    concepts, pool = _concepts()
    tcav = TCAVScores("features", concepts, random_examples=pool, num_random=2, num_samples=30,
                      probe_batch=_marked_probe(1), on_error="raise")
    trainer, messages = _validate(tmp_path, NaNGradientClassifier(), [tcav])
    assert {e.target for e in tcav.last_result.entries} == {0, 2}, "class 1 has no score (not 0.0, not p = 1)"
    assert tcav.records[-1]["nonfinite_classes"] == [1]
    assert all(row[0] != 1 for row in tcav.history[-1][1])
    assert not any(key.startswith("xai/tcav/1/") for key in trainer.callback_metrics)
    assert "xai/tcav/0/left" in trainer.callback_metrics
    assert any(m.startswith("TCAVScores:") and "classes [1]" in m and "NaN" in m for m in messages), messages


def test_tcav_reports_nan_logits(tmp_path):
    concepts, pool = _concepts()
    tcav = TCAVScores("features", concepts, random_examples=pool, num_random=2, num_samples=30,
                      probe_batch=_marked_probe(2), on_error="raise")
    _validate(tmp_path, NaNLogitClassifier(), [tcav])
    assert {e.target for e in tcav.last_result.entries} == {0, 1}
    assert tcav.records[-1]["nonfinite_classes"] == [2]


def test_relevant_units_leave_nan_samples_out_instead_of_zero_drops(tmp_path):
    units = RelevantUnits("features.3", num_samples=30, probe_batch=_marked_probe(1), on_error="raise")
    _, messages = _validate(tmp_path, NaNLogitClassifier(), [units])
    report = units.last_ablation
    assert report.totals.tolist() == [10, 0, 10], "the NaN samples of class 1 are not counted"
    record = units.history[-1]
    assert record["relevant_drop"][1] is None and record["random_drop"][1] is None
    assert record["relevant_drop"][0] is not None and record["nonfinite"] == 10
    assert any(m.startswith("RelevantUnits:") and "NaN" in m and "1, 4, 7" in m for m in messages), messages
    assert torch.isfinite(units.last_result.weights).all()


def test_class_prototypes_keep_no_nan_logit_in_history(tmp_path):
    prototypes = ClassPrototypes(steps=3, on_error="raise")
    trainer, messages = _validate(tmp_path, NaNLogitClassifier(nan_class=1), [prototypes])
    final = prototypes.history[-1][1]
    assert final[1] is None and final[0] is not None and final[2] is not None
    assert prototypes.records[-1]["initial"][1] is None
    assert trainer.callback_metrics["xai/prototypes/mean_logit"].item() == pytest.approx((final[0] + final[2]) / 2)
    assert any(m.startswith("ClassPrototypes:") and "classes [1]" in m for m in messages), messages


def test_embedding_leaves_nan_samples_out_of_the_map(tmp_path):
    embedding = EmbeddingProjector("features", num_samples=30, probe_batch=_marked_probe(1), on_error="raise")
    _, messages = _validate(tmp_path, NaNLogitClassifier(), [embedding])
    assert embedding.last_coordinates.shape == (20, 2)
    (table,) = glob.glob(str(tmp_path / "xai" / "embeddingprojector" / "*.csv"))
    with open(table, newline="") as f:
        points = list(csv.DictReader(f))
    assert [int(p["probe_index"]) for p in points] == [i for i in range(30) if i % 3 != 1], "positions in the batch"
    assert any(m.startswith("EmbeddingProjector:") and "NaN" in m for m in messages), messages


# ------------------------------------------------------------------------------------------- 15.1: method objects


def test_callbacks_take_configured_method_objects(tmp_path):
    concepts, pool = _concepts()
    old = [
        TCAVScores("features.3", concepts, random_examples=pool, num_random=3, num_samples=12, alpha=0.1),
        RelevantUnits("features.3", mu=1.5, num_samples=12, ablation=False),
        ClassPrototypes(steps=4, lr=0.1, blur_every=2, batch_size=2, image_shape=(3, 16, 16)),
    ]
    new = [
        TCAVScores(TCAV("features.3", num_random=3, alpha=0.1), concepts, random_examples=pool, num_samples=12),
        RelevantUnits(RelevantUnitAnalysis("features.3", mu=1.5), num_samples=12, ablation=False),
        ClassPrototypes(maximizer=ActivationMaximization(steps=4, lr=0.1, blur_every=2, batch_size=2),
                        image_shape=(3, 16, 16)),
    ]
    assert new[0].tcav.alpha == 0.1 and new[1].analysis.mu == 1.5 and new[2].maximizer.steps == 4
    model = TinyClassifier()
    _validate(tmp_path / "old", model, old)
    _validate(tmp_path / "new", model, new)
    assert old[0].last_result.rows() == new[0].last_result.rows()
    assert torch.equal(old[1].last_result.weights, new[1].last_result.weights)
    assert torch.equal(old[2].last_images, new[2].last_images)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TCAVScores(TCAV("features"), *_concepts()[:1], random_examples=_concepts()[1], num_random=3),
         r"TCAVScores: configure the given TCAV object.*num_random"),
        (lambda: RelevantUnits(RelevantUnitAnalysis("features"), mu=1.0),
         r"RelevantUnits: configure the given RelevantUnitAnalysis.*mu"),
        (lambda: ClassPrototypes(maximizer=ActivationMaximization(), steps=3),
         r"ClassPrototypes: configure the given ActivationMaximization.*steps"),
        (lambda: ClassPrototypes(maximizer="am"), r"ClassPrototypes: maximizer must be an ActivationMaximization"),
        (lambda: ClassPrototypes(classes_per_run=0), r"ClassPrototypes.*classes_per_run"),
    ],
)
def test_method_object_and_its_keywords_do_not_mix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------- 21.4: cost


class _Calls:
    """Counts forward calls (and the samples they carried) of a module while attached."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls, self.samples = 0, 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        self.calls += 1
        self.samples += int(inputs[0].shape[0])


def _trained(tmp_path, callbacks):
    model = TinyClassifier()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=callbacks,
                            default_root_dir=str(tmp_path))
    trainer.fit(model, BlobData())
    return trainer, model


def test_embedding_takes_features_and_predictions_from_one_forward_pass(tmp_path):
    embedding = EmbeddingProjector("features", num_samples=16, batch_size=8, every_n_epochs=None)
    trainer, model = _trained(tmp_path, [embedding])
    model_calls, layer_calls = _Calls(model), _Calls(model.features)
    embedding.compute(trainer, model)
    assert (model_calls.calls, model_calls.samples) == (2, 16), "16 samples in batches of 8, each seen once"
    assert (layer_calls.calls, layer_calls.samples) == (2, 16)
    assert embedding.records[-1]["explained_variance"] is not None


def test_class_prototypes_optimise_at_most_classes_per_run_rotating_over_runs(tmp_path):
    steps = 3
    capped = ClassPrototypes(steps=steps, classes_per_run=2, every_n_epochs=None, seed=4)
    full = ClassPrototypes(steps=steps, classes_per_run=None, every_n_epochs=None, seed=4, log_key="xai/all")
    trainer, model = _trained(tmp_path, [capped, full])
    capped.records.clear()
    seen = []
    for _ in range(3):
        calls = _Calls(model)
        capped.compute(trainer, model)
        calls.handle.remove()
        # one 1-sample pass to count the classes, then the ascent of 2 images: start score, steps, final score
        assert calls.samples == 1 + 2 * (steps + 2)
        seen.append(capped.records[-1]["classes"])
    assert all(len(c) == 2 for c in seen)
    assert set(seen[0]) | set(seen[1]) == {0, 1, 2}, "the window moves on: every class is visited"
    assert seen == [capped.positions(3, run) for run in range(3)]
    # each class's image is the one the uncapped run makes for it (seeded by the class, not by the run)
    full_images = {c: img for c, img in zip(full.records[-1]["classes"], full.last_images)}
    for c, img in zip(capped.records[-1]["classes"], capped.last_images):
        assert torch.allclose(img, full_images[c], atol=1e-6)
    assert [ClassPrototypes(classes_per_run=2, seed=4).positions(3, r) for r in range(3)] == seen, "seeded"


# ------------------------------------------------------------------------------------------- ranks (threads)


def _fake_trainer(rank: int, world: int, root: str) -> SimpleNamespace:
    """What the callbacks read from a Trainer, for a simulated rank (no loggers: files go to ``root``)."""
    return SimpleNamespace(world_size=world, global_rank=rank, is_global_zero=rank == 0, current_epoch=0,
                           global_step=0, state=SimpleNamespace(fn="validate"), loggers=[], default_root_dir=root,
                           strategy=SimpleNamespace(launcher=None), sanity_checking=False)


def _small_four(dataset):
    concepts, pool = _concepts()
    return [
        TCAVScores("features.3", concepts, random_examples=pool, num_random=2, num_samples=4, dataset=dataset,
                   on_error="raise"),
        RelevantUnits("features.3", num_samples=4, split="val", dataset=dataset, on_error="raise"),
        ClassPrototypes(steps=2, dataset=dataset, on_error="raise"),
        EmbeddingProjector("features", num_samples=4, dataset=dataset, on_error="raise"),
    ]


def _outcome(callbacks) -> dict:
    tcav, units, prototypes, embedding = callbacks
    return {
        "tcav": tcav.last_result.rows(),
        "weights": units.last_result.weights,
        "ablation": units.last_ablation.rows(),
        "prototypes": prototypes.last_images,
        "explained": embedding.history[-1][1],
        "metrics": {k: v for cb in callbacks for k, v in cb.last_metrics.items() if not k.endswith("/seconds")},
    }


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_simulated_with_threads_agree_with_one_process(tmp_path, world):
    """Sharding, padding (with 3 ranks one rank holds no real sample of the 4-sample probe sets), gathering, sums
    and broadcasts: every rank gets the single-process result."""
    pl.seed_everything(0)
    model = TinyClassifier().eval()
    dataset = BlobData().val_set

    def run_all(reducer, rank: int, size: int) -> dict:
        replica = copy.deepcopy(model)  # each rank has its own replica (hooks are per model)
        callbacks = _small_four(dataset)
        trainer = _fake_trainer(rank, size, str(tmp_path / f"rank{rank}"))
        for cb in callbacks:
            cb._reducer = reducer
            assert cb.run(trainer, replica), cb.errors
        return _outcome(callbacks)

    single = run_all(Reducer(), 0, 1)
    results = ThreadGroup(world).run(lambda reducer: run_all(reducer, reducer.rank, world))
    for rank, got in enumerate(results):
        assert got["tcav"] == single["tcav"]
        assert torch.allclose(got["weights"], single["weights"], atol=1e-6)
        assert got["ablation"] == single["ablation"]
        assert torch.allclose(got["prototypes"], single["prototypes"], atol=1e-5)
        assert got["explained"] == pytest.approx(single["explained"], abs=1e-5), "broadcast from rank zero"
        assert got["metrics"].keys() == single["metrics"].keys()
        for key, value in single["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, abs=1e-5), (rank, key)
