"""Every metric of :mod:`lightning_xai.evaluation`, built and fed by introspection, for the contract tests.

The list comes from the package's ``__all__`` (every :class:`torchmetrics.Metric` subclass with its own
``update``), so a new metric is covered without editing the tests. Constructor arguments without a default are
filled by name (:data:`CONSTRUCTOR_ARGS`), ``update`` arguments by name from one small data set
(:func:`update_kwargs`). Imported by ``tests/test_metric_contracts.py`` and ``tests/ddp_metric_script.py``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torchmetrics import Metric

NUM_SAMPLES = 5


def gradient_maps(model: torch.nn.Module, inputs: Tensor, target: Tensor | int) -> Tensor:
    """Input x gradient of the target logit, channel-summed: a cheap attributor for MaxSensitivity."""
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        picked = out.gather(1, target.view(-1, 1)) if isinstance(target, Tensor) else out[:, target : target + 1]
        (grad,) = torch.autograd.grad(picked.sum(), x)
    return (grad * x).sum(1, keepdim=True).detach()


#: Constructor arguments without a default, by name, and small settings so that the tests stay fast.
CONSTRUCTOR_ARGS: dict[str, object] = {"attributor": gradient_maps}
SMALL_SETTINGS: dict[str, object] = {"steps": 4, "num_samples": 3, "batch_size": 8, "region_size": 4}


def metric_classes() -> list[type[Metric]]:
    """Every metric class exported by :mod:`lightning_xai.evaluation` that implements ``update``."""
    import lightning_xai.evaluation as evaluation

    classes = []
    for name in evaluation.__all__:
        obj = getattr(evaluation, name)
        if isinstance(obj, type) and issubclass(obj, Metric) and "update" in _own_methods(obj):
            classes.append(obj)
    return classes


def _own_methods(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is Metric:
            break
        names.update(vars(klass))
    return names


def build(cls: type[Metric], **extra: object) -> Metric:
    """An instance of ``cls`` with the required arguments filled and small settings where it takes them."""
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, object] = {}
    for name, p in params.items():
        if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is inspect.Parameter.empty:
            kwargs[name] = CONSTRUCTOR_ARGS[name]
        elif name in SMALL_SETTINGS:
            kwargs[name] = SMALL_SETTINGS[name]
    kwargs.update(extra)
    return cls(**kwargs)


def is_random(cls: type[Metric]) -> bool:
    """Random metrics seed their perturbations by sample identity: their ``update`` takes ``sample_ids``."""
    return "sample_ids" in inspect.signature(cls.update).parameters


def make_data() -> dict[str, Tensor]:
    """Images ``[5, 3, 8, 8]``, maps, masks (sample 3 empty), targets and dataset indices."""
    gen = torch.Generator().manual_seed(321)
    images = torch.rand(NUM_SAMPLES, 3, 8, 8, generator=gen)
    maps = torch.randn(NUM_SAMPLES, 1, 8, 8, generator=gen)
    masks = torch.zeros(NUM_SAMPLES, 1, 8, 8, dtype=torch.bool)
    for i in range(NUM_SAMPLES):
        if i != 3:
            r, c = torch.randint(0, 5, (2,), generator=gen).tolist()
            masks[i, 0, r : r + 4, c : c + 3] = True
    targets = torch.randint(0, 4, (NUM_SAMPLES,), generator=gen)
    return {"images": images, "maps": maps, "masks": masks, "targets": targets}


def update_kwargs(
    cls: type[Metric], data: dict[str, Tensor], model: torch.nn.Module, rows: list[int], *, with_ids: bool = True
) -> dict[str, object]:
    """The ``update`` arguments of ``cls`` for the samples ``rows`` of ``data``, filled by parameter name."""
    index = torch.tensor(rows, dtype=torch.long)
    values = {
        "attributions": data["maps"][index],
        "inputs": data["images"][index],
        "model": model,
        "target": data["targets"][index],
        "masks": data["masks"][index],
    }
    if with_ids:
        values["sample_ids"] = index
    params = inspect.signature(cls.update).parameters
    return {name: values[name] for name in params if name in values}


# ------------------------------------------------------------------------------ metrics of models' own quantities
def all_metric_classes() -> list[type[Metric]]:
    """Every Metric subclass with its own ``update`` defined in any module of :mod:`lightning_xai.evaluation`
    (the explanation metrics of ``__all__`` and the concept / SAE metrics the models log)."""
    import importlib
    import pkgutil

    import lightning_xai.evaluation as evaluation

    found: dict[str, type[Metric]] = {}
    for info in pkgutil.iter_modules(evaluation.__path__):
        module = importlib.import_module(f"lightning_xai.evaluation.{info.name}")
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, Metric)
                and obj.__module__.startswith("lightning_xai.evaluation")
                and "update" in _own_methods(obj)
            ):
                found[obj.__name__] = obj
    return [found[name] for name in sorted(found)]


def _pool(rows: list[int]) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(99)
    n = NUM_SAMPLES
    data = {
        "scores": torch.randn(n, 3, generator=gen),
        "binary": (torch.rand(n, 3, generator=gen) > 0.5).float(),
        "x": torch.randn(n, 4, generator=gen),
        "x_hat": torch.randn(n, 4, generator=gen),
        "latents": torch.rand(n, 6, generator=gen),
        "logits": torch.randn(3, n, 4, generator=gen),
        "labels": torch.randint(0, 4, (n,), generator=gen),
        "concept_logits": torch.randn(n, 3, 6, 6, generator=gen),
        "masks": (torch.rand(n, 3, 6, 6, generator=gen) > 0.6).float(),
    }
    index = torch.tensor(rows, dtype=torch.long)
    return {k: (v[:, index] if k == "logits" else v[index]) for k, v in data.items()}


def _set_iou_update(rows: list[int]) -> dict[str, object]:
    from lightning_xai.evaluation.concepts import set_iou_counts

    d = _pool(rows)
    return {"counts": set_iou_counts(d["concept_logits"], None, None, d["masks"])}


#: ``name -> (constructor arguments, rows -> update arguments)`` for the metrics of models' own quantities.
OTHER_CASES: dict[str, tuple[dict[str, object], object]] = {
    "ConceptAUROC": ({}, lambda rows: {"scores": _pool(rows)["scores"], "labels": _pool(rows)["binary"]}),
    "ConceptProbeMetrics": (
        {"num_concepts": 3},
        lambda rows: {"logits": _pool(rows)["scores"], "targets": _pool(rows)["binary"]},
    ),
    "SetIoU": ({"num_filters": 2, "num_concepts": 3}, _set_iou_update),
    "SAEReconstructionMetrics": (
        {"d_in": 4, "d_sae": 6},
        lambda rows: {k: _pool(rows)[k] for k in ("x", "x_hat", "latents")},
    ),
    "DownstreamScore": (
        {},
        lambda rows: dict(zip(("logits_orig", "logits_sae", "logits_zero"), _pool(rows)["logits"], strict=True))
        | {"labels": _pool(rows)["labels"]},
    ),
}
