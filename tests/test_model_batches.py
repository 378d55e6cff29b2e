"""Batches of any layout for the concept bottleneck and adversarial training (issue 15): both read through the one
BatchReader, so dict batches with default or custom keys train exactly as tuple batches of the same data, and a
batch without what a step needs is a clear error naming the model, the missing key and the keys present."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_xai.models.adversarial import AdversarialClassifier, PGDAttack
from lightning_xai.models.concept_bottleneck import CBMConfig, ConceptBottleneckModel
from lightning_xai.namespace import pl

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*self.trainer. reference is not registered.*")
K, C, N = 5, 3, 16  # concepts, classes, images

CUSTOM = {"input_key": "img", "label_key": "target"}


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.rand(N, 3, 12, 12, generator=g), torch.randint(0, C, (N,), generator=g), \
        torch.randint(0, 2, (N, K), generator=g).float()


class Items(Dataset):
    """The same images, labels and concepts as tuples, default-key dicts or custom-key dicts."""

    def __init__(self, layout: str, concepts: bool = True) -> None:
        self.x, self.y, self.c = data()
        self.layout, self.concepts = layout, concepts

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        x, y, c = self.x[i], self.y[i], self.c[i]
        if self.layout == "tuple":
            return (x, y, c) if self.concepts else (x, y)
        keys = ("image", "label", "concepts") if self.layout == "dict" else ("img", "target", "attrs")
        return dict(zip(keys, (x, y, c))) if self.concepts else dict(zip(keys[:2], (x, y)))


def loader(layout: str, concepts: bool = True) -> DataLoader:
    return DataLoader(Items(layout, concepts), batch_size=8, shuffle=False)


def batch(layout: str, concepts: bool = True):
    return next(iter(loader(layout, concepts)))


def net(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, outputs))


def fit(model: pl.LightningModule, train: DataLoader, steps: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         max_steps=steps, limit_val_batches=0)
    trainer.fit(model, train)
    return trainer


def cbm(layout: str, **kwargs) -> ConceptBottleneckModel:
    keys = {**CUSTOM, "concept_key": "attrs"} if layout == "custom" else {}
    torch.manual_seed(1)  # the head
    return ConceptBottleneckModel(backbone=net(K), num_concepts=K, num_classes=C, **keys, **kwargs)


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------------------ concept bottleneck
@pytest.mark.parametrize("layout", ["dict", "custom"])
@pytest.mark.parametrize("stage", ["joint", "concepts", "task"])
def test_cbm_loss_of_a_dict_batch_equals_the_tuple_batch_and_the_hand_computation(layout, stage):
    reference, model = cbm("tuple", mode="independent", concept_epochs=1), cbm(layout, mode="independent",
                                                                                   concept_epochs=1)
    expected = reference.compute_losses(batch("tuple"), stage)
    got = model.compute_losses(batch(layout), stage)
    assert torch.equal(got.loss, expected.loss)
    x, y, c = (t[:8] for t in data())
    model.train()
    logits = model.backbone(x)
    by_hand = {
        "joint": F.cross_entropy(model.head(torch.sigmoid(logits)), y) + F.binary_cross_entropy_with_logits(logits, c),
        "concepts": F.binary_cross_entropy_with_logits(logits, c),
        "task": F.cross_entropy(model.head(c), y),  # independent: the head on the true concepts
    }[stage]
    torch.testing.assert_close(got.loss, by_hand)


@pytest.mark.parametrize("layout", ["dict", "custom"])
def test_cbm_fits_on_dict_batches_exactly_as_on_tuple_batches(layout):
    reference, model = cbm("tuple"), cbm(layout)
    assert_same_parameters(reference, model)
    fit(reference, loader("tuple"))
    trainer = fit(model, loader(layout))
    assert trainer.global_step == 2
    assert_same_parameters(reference, model)  # the same two optimiser steps
    assert not torch.equal(model.head.weight, cbm("tuple").head.weight)  # ... which did move the model
    preds = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(model, loader(layout))
    torch.testing.assert_close(torch.cat(preds), model.eval()(data()[0]))


def test_cbm_keys_are_saved_and_standard_mode_needs_no_concepts():
    model = cbm("custom")
    assert model.hparams["concept_key"] == "attrs" and model.hparams["input_key"] == "img"
    assert model.to_config() == CBMConfig(num_concepts=K, num_classes=C, input_key="img", label_key="target",
                                          concept_key="attrs")
    for layout in ("dict", "tuple"):
        out = cbm(layout, mode="standard").compute_losses(batch(layout, concepts=False))
        assert out.concept_loss is None and torch.isfinite(out.loss)
    standard = ConceptBottleneckModel(backbone=net(K), num_concepts=K, num_classes=C, mode="standard", **CUSTOM)
    assert standard.compute_losses(batch("custom", concepts=False)).concept_loss is None
    with pytest.raises(ValueError, match="concept_key='attrs' is not in the batch"):  # an explicit key must be there
        cbm("custom", mode="standard").compute_losses(batch("custom", concepts=False))


def test_cbm_batch_errors_name_the_model_the_missing_key_and_the_fields():
    x, y, c = (t[:8] for t in data())
    with pytest.raises(ValueError, match=r"ConceptBottleneckModel: concept_key='attrs' is not in the batch "
                                         r"\(a dict with fields \['img', 'target'\]\)"):
        cbm("custom").compute_losses({"img": x, "target": y})
    with pytest.raises(ValueError, match=r"ConceptBottleneckModel: label_key='target' is not in the batch "
                                         r"\(a dict with fields \['img', 'attrs'\]\)"):
        cbm("custom").compute_losses({"img": x, "attrs": c})
    with pytest.raises(ValueError, match=r"ConceptBottleneckModel: the batch has no concept labels: it is a dict "
                                         r"with fields \['image', 'label'\]; none of the default keys "
                                         r"\['concepts', 'concept_labels', 'concept'\] is there: pass concept_key="):
        cbm("dict").compute_losses({"image": x, "label": y})
    with pytest.raises(ValueError, match=r"ConceptBottleneckModel: the batch has no labels: .*pass label_key="):
        cbm("dict").compute_losses({"image": x, "concepts": c})
    with pytest.raises(ValueError, match=r"no concept labels: .*position 2 of the tuple: pass concept_key="):
        cbm("tuple").compute_losses((x, y))


# ------------------------------------------------------------------------------------------ adversarial training
def adversarial(layout: str, robust_eval: bool = False) -> AdversarialClassifier:
    keys = CUSTOM if layout == "custom" else {}
    return AdversarialClassifier(backbone=net(C), num_classes=C, eps=0.1, steps=2, random_start=False,
                                 robust_eval=robust_eval, **keys)


@pytest.mark.parametrize("layout", ["dict", "custom"])
def test_adversarial_step_on_a_dict_batch_attacks_its_images_and_equals_the_tuple_step(layout):
    reference, model, by_hand = adversarial("tuple"), adversarial(layout), adversarial("tuple")
    x, y, _ = (t[:8] for t in data())
    x_adv = PGDAttack(0.1, steps=2, random_start=False)(by_hand, x, y)
    with torch.no_grad():
        adversarial_loss = F.cross_entropy(by_hand(x_adv), y)
        clean_loss = F.cross_entropy(adversarial("tuple")(x), y)
    expected = reference.training_step(batch("tuple", concepts=False), 0)
    got = model.training_step(batch(layout, concepts=False), 0)
    assert torch.equal(got, expected)
    torch.testing.assert_close(got, adversarial_loss)  # the loss of the PGD examples of the batch's images ...
    assert float(got) > float(clean_loss) + 0.01  # ... which is higher than the clean loss


@pytest.mark.parametrize("layout", ["dict", "custom"])
def test_adversarial_classifier_fits_on_dict_batches_exactly_as_on_tuple_batches(layout):
    reference, model = adversarial("tuple", robust_eval=True), adversarial(layout, robust_eval=True)
    fit(reference, loader("tuple", concepts=False))
    fit(model, loader(layout, concepts=False))
    assert_same_parameters(reference, model)
    assert not torch.equal(model.backbone[-1].weight, net(C)[-1].weight)
    validate = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (expected,) = pl.Trainer(**validate).validate(reference, loader("tuple", concepts=False), verbose=False)
    (got,) = pl.Trainer(**validate).validate(model, loader(layout, concepts=False), verbose=False)
    assert got == expected and {"val_clean_acc", "val_robust_acc"} <= set(got)


def test_adversarial_batch_errors_name_the_model_the_missing_key_and_the_fields():
    x = data()[0][:8]
    with pytest.raises(ValueError, match=r"AdversarialClassifier: label_key='target' is not in the batch "
                                         r"\(a dict with fields \['img'\]\)"):
        adversarial("custom").training_step({"img": x}, 0)
    with pytest.raises(ValueError, match=r"AdversarialClassifier: the batch has no labels: it is a dict with fields "
                                         r"\['image'\]; none of the default keys \['label', .*pass label_key="):
        adversarial("dict").training_step({"image": x}, 0)
    with pytest.raises(ValueError, match=r"AdversarialClassifier: input_key='img' is not in the batch"):
        adversarial("custom").training_step({"image": x, "target": torch.zeros(8, dtype=torch.long)}, 0)


# ------------------------------------------------------------------------------------------ concept whitening
def test_pooled_activations_read_dict_batches_like_tuples():
    from lightning_xai.batch import BatchReader
    from lightning_xai.models.whitening import pooled_activations

    model = net(C)
    expected = pooled_activations(model, "2", loader("tuple"))
    for layout, reader in (("dict", None), ("custom", BatchReader("img", concept_key="attrs"))):
        got = pooled_activations(model, "2", loader(layout), reader=reader)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(expected[1], data()[2])
    with pytest.raises(ValueError, match=r"pooled_activations: the batch has no concept labels: it is a dict with "
                                         r"fields \['image', 'label'\]"):
        pooled_activations(model, "2", loader("dict", concepts=False))


def test_concept_whitening_scores_purity_on_dict_batches_like_tuples():
    from lightning_xai.data.concepts import ConceptScenes
    from lightning_xai.models.concept_whitening import ConceptWhiteningClassifier

    scenes = ConceptScenes(16, image_size=24, seed=3)
    x = torch.stack([scenes[i][0] for i in range(16)])
    y = torch.stack([torch.as_tensor(scenes[i][1]) for i in range(16)])
    c = torch.stack([torch.as_tensor(scenes[i][2]) for i in range(16)]).float()
    results = []
    for batch, keys in (((x, y, c), {}), ({"img": x, "target": y, "attrs": c}, {**CUSTOM, "concept_key": "attrs"})):
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(6, 8))
        model = ConceptWhiteningClassifier(["shape:circle", "colour:red"], backbone=backbone, layer="1", **keys)
        model.set_concept_dataset(scenes)
        model.eval()
        with torch.no_grad():
            loss = model.compute_losses(batch, "val").loss
        results.append((loss, model.metrics_of("val", "purity")["concept_purity"].compute()))
    (tuple_loss, tuple_purity), (dict_loss, dict_purity) = results
    assert torch.equal(tuple_loss, dict_loss)
    assert tuple_purity.shape == (2,) and torch.isfinite(tuple_purity).all()
    assert torch.equal(tuple_purity, dict_purity)  # the dict's concepts were scored (they used to be skipped)


# ------------------------------------------------------------------------------------------ ProtoPNet push
def test_protopnet_push_reads_dict_items_with_the_models_keys():
    from test_protopnet import tiny_model

    class Dicts(Dataset):
        def __init__(self, tuples: Items) -> None:
            self.tuples = tuples

        def __len__(self) -> int:
            return len(self.tuples)

        def __getitem__(self, i: int):
            x, y, _ = self.tuples[i]
            return {"img": x, "target": y}

    tuples = Items("tuple")
    tuples.x = F.interpolate(tuples.x, size=16)  # TinyTrunk's 16x16 inputs
    reference, model = tiny_model(), tiny_model(**CUSTOM)
    reference.push(tuples, batch_size=5)
    model.push(Dicts(tuples), batch_size=5)
    assert torch.equal(model.prototypes, reference.prototypes) and int(model.push_count) == 1
    assert torch.equal(model.push_index, reference.push_index)
    with pytest.raises(ValueError, match=r"ProtoPNet: label_key='target' is not in the batch"):
        tiny_model(label_key="target").push(tuples)
