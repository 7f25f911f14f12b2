import numpy as np
import pytest
import torch

from splitkd.errors import InvalidArgument
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from splitkd.signature import DatasetSignature

SIGNATURES = [
    DatasetSignature((1, 8, 8), 10),
    DatasetSignature((3, 32, 32), 10),
    DatasetSignature((1, 28, 28), 10),
    DatasetSignature((20,), 3),
    DatasetSignature((64,), 10),
    DatasetSignature((784,), 10),
    DatasetSignature((2000,), 5),
    DatasetSignature((3, 128), 6),
    DatasetSignature((1, 16), 2),
]


@pytest.mark.parametrize("signature", SIGNATURES, ids=lambda s: s.describe())
def test_default_teacher_is_at_least_50x_the_student(signature: DatasetSignature) -> None:
    student = zoo.default_student(signature)
    teacher = zoo.default_teacher(signature, student)
    assert zoo.parameter_count(teacher) >= 50 * zoo.parameter_count(student)
    x = torch.zeros((3, *signature.input_shape))
    assert zoo.build(student)(x).shape == (3, signature.num_classes)
    assert zoo.build(teacher)(x).shape == (3, signature.num_classes)


def test_family_follows_input_rank() -> None:
    assert zoo.default_student(DatasetSignature((5,), 2)).family == "mlp"
    assert zoo.default_student(DatasetSignature((2, 9), 2)).family == "cnn1d"
    assert zoo.default_student(DatasetSignature((1, 4, 4), 2)).family == "cnn2d"


def test_every_cut_runs_and_composes_to_the_whole_model() -> None:
    spec = zoo.default_teacher(DatasetSignature((1, 8, 8), 10))
    model = zoo.build(spec, seed=3)
    x = torch.randn(4, 1, 8, 8)
    whole = model(x)
    for cut in range(1, spec.num_stages):
        middle = model.run(x, 0, cut)
        assert tuple(middle.shape[1:]) == zoo.activation_shape(spec, cut)
        torch.testing.assert_close(model.run(middle, cut, spec.num_stages), whole)


def test_cut_that_would_send_raw_inputs_is_refused() -> None:
    spec = zoo.default_student(DatasetSignature((64,), 10))
    with pytest.raises(InvalidArgument, match="raw inputs"):
        spec.check_cut(0)
    with pytest.raises(InvalidArgument, match="leaves no stage"):
        spec.check_cut(spec.num_stages)
    spec.check_cut(1)


def test_build_is_deterministic_per_seed() -> None:
    spec = zoo.default_student(DatasetSignature((1, 8, 8), 10))
    a, b, c = zoo.build(spec, 1), zoo.build(spec, 1), zoo.build(spec, 2)
    for (name, pa), pb_, _pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb_), name
    assert any(
        not torch.equal(pa, pc)
        for pa, pc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )


def test_load_part_accepts_exactly_the_head() -> None:
    spec = zoo.default_student(DatasetSignature((1, 8, 8), 10))
    source, target = zoo.build(spec, 1), zoo.build(spec, 2)
    head = source.part_state(0, 1)
    target.load_part(0, 1, head)
    for name, value in head.items():
        np.testing.assert_array_equal(target.state_dict()[name].numpy(), value)
    with pytest.raises(InvalidArgument, match="must name"):
        target.load_part(0, 1, {**head, "stages.1.0.weight": np.zeros(1, np.float32)})
    wrong = {k: np.zeros((1,), np.float32) for k in head}
    with pytest.raises(InvalidArgument, match="has shape"):
        target.load_part(0, 1, wrong)


@pytest.mark.parametrize(
    "family,shape,widths",
    [
        ("mlp", (4, 4), (8,)),
        ("nope", (4,), (8,)),
        ("mlp", (4,), ()),
        ("mlp", (4,), (0,)),
        ("mlp", (4,), (10**6,)),
    ],
)
def test_invalid_specs_are_refused(
    family: str, shape: tuple[int, ...], widths: tuple[int, ...]
) -> None:
    with pytest.raises(InvalidArgument):
        ModelSpec(family, shape, 3, widths)


def test_spec_json_round_trip_and_garbage() -> None:
    spec = ModelSpec("cnn1d", (3, 50), 4, (8, 16), (32,))
    assert ModelSpec.from_json("cnn1d", spec.to_json()) == spec
    for text in ["[]", "{}", "not json", '{"input_shape": [3], "num_classes": "x", "widths": [1]}']:
        with pytest.raises(InvalidArgument):
            ModelSpec.from_json("mlp", text)


def test_a_family_is_registered_by_its_decorator_alone() -> None:
    from torch import nn

    from splitkd.models import zoo

    @zoo.register_family("test-linear", input_rank=1)
    def _linear(spec: ModelSpec) -> list[nn.Module]:
        # Each stage is a Sequential, as the built-in families make them.
        first = nn.Sequential(nn.Linear(spec.input_shape[0], spec.widths[0]), nn.ReLU())
        return [first, nn.Sequential(nn.Linear(spec.widths[0], spec.num_classes))]

    try:
        spec = ModelSpec("test-linear", (5,), 3, widths=(4,))
        assert zoo.build(spec, 0).run(torch.zeros(2, 5), 0, 2).shape == (2, 3)
        with pytest.raises(InvalidArgument, match="rank 1"):
            ModelSpec("test-linear", (1, 5), 3, widths=(4,))
    finally:
        zoo._FAMILIES.pop("test-linear")
        zoo._INPUT_RANKS.pop("test-linear")
    with pytest.raises(InvalidArgument, match="unknown model family"):
        ModelSpec("test-linear", (5,), 3, widths=(4,))
