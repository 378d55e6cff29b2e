"""The shared plumbing every layer uses: argument checks, collectives (simulated ranks), batch / output reading,
the Lightning namespace rule and callback target specifications."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lightning_xai.batch import BatchReader, OutputReader, outputs_as_logits, read_logits
from lightning_xai.callbacks.targets import TargetSpec
from lightning_xai.checks import check_bool, check_choice, check_float, check_int, check_optional_int, check_range
from lightning_xai.distributed import (
    RankFailed,
    Reducer,
    ThreadGroup,
    agree,
    broadcast,
    gather_rows,
    run_agreed,
    shard_bounds,
    sum_over_ranks,
)
from lightning_xai.namespace import resolve

# ------------------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: check_int("steps", 0, minimum=1, owner="IG"), r"IG: steps must be an integer >= 1, got 0"),
        (lambda: check_int("steps", True, minimum=1), r"steps must be an integer >= 1, got True"),
        (lambda: check_int("k", 7, minimum=0, maximum=5), r"k must be an integer in \[0, 5\], got 7"),
        (lambda: check_optional_int("n", -1, minimum=1, none_means="all"), r"or None \(all\), got -1"),
        (lambda: check_float("eps", float("nan"), minimum=0), r"eps must be a finite number >= 0, got nan"),
        (lambda: check_float("eps", 0.0, minimum=0, strict=True), r"eps must be a finite number > 0, got 0.0"),
        (lambda: check_bool("flag", 1, owner="X"), r"X: flag must be True or False, got 1"),
        (lambda: check_choice("mode", "cascadng", ("cascading", "independent")), r"did you mean 'cascading'"),
        (lambda: check_range("noise", (1, 0)), r"noise must be a pair \(low, high\)"),
    ],
)
def test_checks_name_the_owner_argument_value_and_valid_values(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_checks_return_the_value():
    assert check_int("n", 3, minimum=1) == 3
    assert check_optional_int("n", None) is None
    assert check_float("x", 2, minimum=0) == 2.0 and isinstance(check_float("x", 2), float)
    assert check_choice("m", "a", ("a", "b")) == "a"
    assert check_range("r", [0, 1]) == (0.0, 1.0)


# --------------------------------------------------------------------------------------------------- collectives


def test_thread_group_gathers_variable_rows_in_rank_order():
    def fn(reducer: Reducer) -> list[float]:
        rows = torch.arange(reducer.rank * 2, dtype=torch.float32).reshape(-1, 1) + 10 * reducer.rank
        return gather_rows(rows, reducer).reshape(-1).tolist()

    results = ThreadGroup(3).run(fn)
    expected = [10.0, 11.0, 20.0, 21.0, 22.0, 23.0]
    assert results == [expected] * 3


def test_thread_group_sum_broadcast_agree():
    def fn(reducer: Reducer) -> tuple[float, float, bool, bool]:
        total = float(sum_over_ranks(torch.tensor([reducer.rank + 1.0]), reducer))
        first = float(broadcast(torch.tensor([reducer.rank * 5.0]), src=1, reducer=reducer))
        return total, first, agree(True, reducer), agree(reducer.rank != 1, reducer)

    assert ThreadGroup(3).run(fn) == [(6.0, 5.0, True, False)] * 3


def test_run_agreed_raises_on_every_rank_when_one_fails():
    def fn(reducer: Reducer) -> str:
        def stage() -> str:
            if reducer.rank == 1:
                raise KeyError("rank 1 broke")
            return "ok"

        try:
            return run_agreed(stage, reducer)
        except RankFailed:
            return "other rank failed"
        except KeyError as err:
            return f"own error: {err}"

    assert ThreadGroup(2).run(fn) == ["other rank failed", "own error: 'rank 1 broke'"]


def test_mismatched_collective_is_an_error_not_a_hang():
    def fn(reducer: Reducer) -> None:
        reducer(torch.zeros(reducer.rank + 1), "sum")

    with pytest.raises(RuntimeError, match="different shapes"):
        ThreadGroup(2).run(fn, timeout=10)


def test_single_process_reducer_and_shards():
    reducer = Reducer()
    assert gather_rows(torch.ones(2, 3), reducer).shape == (2, 3)
    assert reducer(torch.ones(2), "gather").shape == (1, 2)
    assert [shard_bounds(5, 2, r) for r in range(2)] == [(0, 3, 3), (3, 5, 3)]
    assert shard_bounds(1, 3, 2) == (1, 1, 1)


# ------------------------------------------------------------------------------------------------ batch reading


@dataclass
class _Batch:
    pixel_values: torch.Tensor
    labels: torch.Tensor


class _HFOutput:
    def __init__(self, logits: torch.Tensor) -> None:
        self.loss = None
        self.logits = logits


def test_batch_reader_defaults_cover_tuples_dicts_and_objects():
    x, y, m = torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), torch.zeros(2, 1, 4, 4)
    for batch in ((x, y, m), {"image": x, "label": y, "mask": m}, {"pixel_values": x, "labels": y}):
        sample = BatchReader().read(batch)
        assert sample.inputs is x and torch.equal(sample.labels, y)
    assert BatchReader().read(_Batch(x, y)).inputs is x
    assert BatchReader().read(x).labels is None


def test_batch_reader_explicit_keys_and_clear_errors():
    x = torch.rand(2, 3)
    reader = BatchReader(input_key="feats", label_key=lambda b: b["y"] * 2, owner="ExplanationMonitor")
    sample = reader.read({"feats": x, "y": torch.tensor([1, 2])})
    assert sample.inputs is x and sample.labels.tolist() == [2, 4]
    with pytest.raises(ValueError, match=r"ExplanationMonitor: input_key='feats' is not in the batch .*\['a'\]"):
        reader.read({"a": x})
    with pytest.raises(ValueError, match=r"cannot find the input .*\['foo'\].*input_key="):
        BatchReader().read({"foo": x})
    with pytest.raises(ValueError, match="input_key must be"):
        BatchReader(input_key=1.5)  # type: ignore[arg-type]


def test_batch_reader_concepts_and_required_fields():
    x, y, c = torch.rand(2, 3), torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    reader = BatchReader(owner="ConceptBottleneckModel")
    assert torch.equal(reader.concepts((x, y, c)), c)  # tuple: the third element
    assert torch.equal(reader.concepts({"image": x, "label": y, "concepts": c}), c)
    assert reader.concepts((x, y)) is None and reader.concepts(x) is None
    assert reader.read((x, y, c)).masks is c  # concepts never change what read() gives
    custom = BatchReader(input_key="img", label_key="cls", owner="ConceptBottleneckModel", concept_key="attrs")
    assert torch.equal(custom.concepts({"img": x, "cls": y, "attrs": c.tolist()}), c)  # lists become tensors
    assert "concept_key='attrs'" in repr(custom) and "concept_key" not in repr(reader)
    with pytest.raises(ValueError, match=r"ConceptBottleneckModel: concept_key='attrs' is not in the batch "
                                         r"\(a dict with fields \['img', 'cls'\]\)"):
        custom.concepts({"img": x, "cls": y})
    with pytest.raises(ValueError, match=r"ConceptBottleneckModel: the batch has no concept labels: it is a dict "
                                         r"with fields \['image', 'label'\]; none of the default keys "
                                         r"\['concepts', .*concept_key="):
        reader.concepts({"image": x, "label": y}, required=True)
    with pytest.raises(ValueError, match=r"no concept labels: .*position 2 of the tuple: pass concept_key="):
        reader.concepts((x, y), required=True)
    with pytest.raises(ValueError, match=r"the batch has no labels: .*bare tensor.*label_key="):
        reader.labels(x, required=True)
    with pytest.raises(ValueError, match="concept_key must be"):
        BatchReader(concept_key=2.0)  # type: ignore[arg-type]


def test_batch_reader_with_inputs_keeps_the_container():
    x, y, new = torch.rand(2, 3), torch.tensor([0, 1]), torch.zeros(2, 3)
    from collections import namedtuple

    Pair = namedtuple("Pair", "image label")
    reader = BatchReader()
    out = reader.with_inputs((x, y), new)
    assert isinstance(out, tuple) and out[0] is new and out[1] is y
    assert reader.with_inputs([x, y], new)[0] is new
    pair = reader.with_inputs(Pair(x, y), new)
    assert isinstance(pair, Pair) and pair.image is new
    batch = {"pixel_values": x, "labels": y}
    replaced = reader.with_inputs(batch, new)
    assert replaced["pixel_values"] is new and batch["pixel_values"] is x  # a copy, the original untouched
    assert reader.with_inputs(x, new) is new
    obj = reader.with_inputs(_Batch(x, y), new)
    assert obj.pixel_values is new and obj.labels is y
    assert BatchReader(input_key="img").with_inputs({"img": x, "image": y}, new)["img"] is new
    assert BatchReader(input_key=1).with_inputs((y, x), new)[1] is new
    with pytest.raises(ValueError, match="is a callable: it reads the input but cannot write one back"):
        BatchReader(input_key=lambda b: b["a"]).with_inputs({"a": x}, new)
    with pytest.raises(ValueError, match=r"input_key='img' is not in the batch"):
        BatchReader(input_key="img").with_inputs({"image": x}, new)


def test_output_reader_and_outputs_as_logits():
    logits = torch.rand(2, 3)
    for output in (logits, (logits, None), {"logits": logits, "loss": None}, _HFOutput(logits)):
        assert read_logits(output) is logits
    assert OutputReader("scores")({"scores": logits, "other": logits + 1}) is logits
    with pytest.raises(ValueError, match="cannot read logits .*output_key="):
        read_logits({"a": logits, "b": logits})

    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.lin(x), "features": x}

    model = DictModel()
    with outputs_as_logits(model) as wrapped:
        assert isinstance(wrapped(torch.rand(4, 3)), torch.Tensor)
    assert isinstance(model(torch.rand(4, 3)), dict), "the hook is removed on exit"
    assert not model._forward_hooks


# --------------------------------------------------------------------------------------------------- namespace


def test_namespace_rule():
    assert resolve({"LIGHTNING_XAI_NAMESPACE": "pytorch_lightning"}, {}) == "pytorch_lightning"
    assert resolve({"LIGHTNING_XAI_NAMESPACE": "lightning"}, {}) == "lightning.pytorch"
    assert resolve({}, {"pytorch_lightning": object()}) == "pytorch_lightning"
    assert resolve({}, {"lightning": object(), "pytorch_lightning": object()}) == "lightning.pytorch"
    with pytest.raises(ImportError, match="valid values"):
        resolve({"LIGHTNING_XAI_NAMESPACE": "keras"}, {})


@pytest.mark.parametrize("first", ["pytorch_lightning", "lightning"])
def test_namespace_follows_what_the_user_imported_first(first):
    code = (
        f"import {first}\nimport sys\nimport lightning_xai.namespace as ns\n"
        "from lightning_xai.callbacks import ExplanationMonitor\n"
        "other = 'lightning' if ns.NAME == 'pytorch_lightning' else 'pytorch_lightning'\n"
        "print(ns.NAME, other in sys.modules and other != '" + first + "')"
    )
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_XAI_NAMESPACE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env=env)
    name, imported_other = out.stdout.split()
    assert name == ("pytorch_lightning" if first == "pytorch_lightning" else "lightning.pytorch")
    assert imported_other == "False", "the library must not import the other namespace"


# ------------------------------------------------------------------------------------------------------ targets


def test_target_specs_resolve_and_check():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 4.0, 3.5]])
    assert TargetSpec("prediction").resolve(logits, None).target.tolist() == [0, 1]
    assert TargetSpec(2).resolve(logits, None).target.tolist() == [2, 2]
    multi = TargetSpec("multilabel").resolve(logits, None)
    assert multi.rows.tolist() == [0, 0, 1, 1] and multi.target.tolist() == [0, 2, 1, 2]
    with pytest.raises(ValueError, match=r"X: target class 5 is out of range: the model has 3 outputs"):
        TargetSpec(5, owner="X").check(logits, None)
    with pytest.raises(ValueError, match="target must be"):
        TargetSpec("truth")
    with pytest.raises(ValueError, match="no labels"):
        TargetSpec("label").check(logits, None)
    seg = torch.zeros(1, 2, 2, 2)
    seg[0, 1, 0, 0] = 3.0
    assert TargetSpec("segmentation:1").resolve(seg, None).target(seg).tolist() == [3.0]
    reg = TargetSpec("regression")
    assert reg.resolve(torch.tensor([[1.5], [2.0]]), None).target(torch.tensor([[1.5], [2.0]])).tolist() == [1.5, 2.0]
    with pytest.raises(ValueError, match="one output per sample"):
        reg.check(logits, None)
    path = TargetSpec("lightning_xai.attribution.targets:ContrastiveTarget")
    assert path.kind == "callable"


def test_forward_stops_after_the_layer_and_hooks_are_removed():
    from lightning_xai.attribution.layers import capture_layer, forward_until_stopped, stop_after_calls

    calls = []

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            calls.append("a")
            x = self.a(x)
            try:  # a model's own broad except must not swallow the stop
                x = self.a(x)
            except Exception:
                calls.append("swallowed")
            calls.append("b")
            return self.b(x)

    net = Net()
    with capture_layer(net, "a") as capture, stop_after_calls(capture.module, 2):
        assert forward_until_stopped(net, torch.ones(1, 2)) is None
    assert calls == ["a"] and len(capture.outputs) == 2
    assert not net.a._forward_hooks
    assert forward_until_stopped(net, torch.ones(1, 2)).shape == (1, 2)
