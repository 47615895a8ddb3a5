"""Tests for autofit.spec: loading, validation messages (path, value, line) and spec forms."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from autofit.build import build_model, input_shape
from autofit.candidate import Candidate
from autofit.errors import BuildError, SpecError
from autofit.spec import ExperimentSpec, load_spec, spec_from_dict

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.y*ml"))

VALID = """\
name: ok
model:
  _target_: autofit.zoo.mlp
  in_features: 16
  hidden: 32
  out_features: 4
data:
  kind: tensor
  shape: [16]
  num_classes: 4
device: cpu
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.problems


def base(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "t",
        "model": {"_target_": "autofit.zoo.mlp", "in_features": 16, "hidden": 32,
                  "out_features": 4},
        "data": {"kind": "tensor", "shape": [16], "num_classes": 4},
        "device": "cpu",
    }
    raw.update(overrides)
    return raw


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.skipif(not CONFIGS, reason="no shipped configs under configs/ yet")
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, ExperimentSpec)
    assert spec.model.target
    assert spec.source_path == str(path.resolve())


def test_valid_spec_loads(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    assert spec.name == "ok"
    assert spec.model.target == "autofit.zoo.mlp"
    assert spec.model.kwargs == {"in_features": 16, "hidden": 32, "out_features": 4}
    assert spec.data.kind == "tensor" and spec.data.shape == (16,)
    assert spec.device == "cpu"
    assert spec.memory.budget_bytes is None and spec.memory.margin == 0.10
    assert spec.search.precisions == ("fp32",)
    assert spec.source_path == str((tmp_path / "exp.yaml").resolve())


# --------------------------------------------------------------------------- problem reports


FIVE_MISTAKES = """\
name: five
model:
  _target_: autofit.zoo.mlp
  hidden: 32
data:
  kind: tensor
  shape: [16]
  num_classes: 4
optimiser:
  _target_: torch.optim.SGD
device: gpu
memory:
  budget: 12 parsecs
search:
  batch_size:
    min: 0
  precision: [fp8]
"""


def test_five_mistakes_are_all_reported_with_path_value_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, FIVE_MISTAKES)
    problems = problems_of(path)
    assert len(problems) == 5, problems
    # (YAML path, bad value, 1-based line in FIVE_MISTAKES)
    expected = [
        ("optimiser", "optimiser", 9),
        ("device", "'gpu'", 11),
        ("memory.budget", "12 parsecs", 13),
        ("search.batch_size.min", "0", 16),
        ("search.precision[0]", "'fp8'", 17),
    ]
    for yaml_path, value, line in expected:
        matches = [p for p in problems if p.startswith(f"{path}:{line}: {yaml_path}: ")]
        assert len(matches) == 1, (yaml_path, problems)
        # the bad value after the path (for the unknown key, the key is the bad value)
        assert value in matches[0].split(f":{line}: ", 1)[1]
    by_path = {p.split(": ")[1]: p for p in problems}
    assert "did you mean 'optimizer'" in by_path["optimiser"]
    assert "must be >= 1, got 0" in by_path["search.batch_size.min"]
    assert "parsecs" in by_path["memory.budget"]


def test_problems_are_one_line_each_and_in_the_message(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, FIVE_MISTAKES))
    text = str(info.value)
    assert text.count("\n") == 4
    assert all("\n" not in p for p in info.value.problems)


def test_invalid_yaml_is_one_problem_with_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nmodel:\n  _target_: a.b\n  k: [1, 2\ndata: {kind: image}\n")
    problems = problems_of(path)
    assert len(problems) == 1
    match = re.match(rf"^{re.escape(str(path))}:(\d+): invalid YAML: ", problems[0])
    assert match, problems
    assert 4 <= int(match.group(1)) <= 5


def test_bad_indentation_is_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nmodel:\n  _target_: a.b\n   bad: 1\n")
    problems = problems_of(path)
    assert problems == [f"{path}:4: invalid YAML: mapping values are not allowed here"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert problems_of(path) == [f"{path}: file not found"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    problems = problems_of(tmp_path)
    assert len(problems) == 1 and "is a directory" in problems[0]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert problems_of(path) == [f"{path}: the file is empty"]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "- a\n- b\n"))
    assert len(problems) == 1 and "must be a YAML mapping, got list" in problems[0]


def test_missing_model_and_data(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "name: x\ndevice: cpu\n"))
    assert any(p.split(": ")[1] == "model" and "missing" in p for p in problems), problems
    assert any(p.split(": ")[1] == "data" and "missing" in p for p in problems), problems


def test_unknown_nested_key_has_hint_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "search:\n  steps_per_trail: 3\n")
    problems = problems_of(path)
    assert problems == [
        f"{path}:13: search.steps_per_trail: unknown key; did you mean 'steps_per_trial'?"
    ]


def test_spec_from_dict_without_lines_names_source() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(base(device="tpu"), source="inline")
    assert info.value.problems == ["inline: device: must be auto, cpu, cuda or cuda:N, got 'tpu'"]


# --------------------------------------------------------------------------- accepted forms


def test_lightning_class_path_init_args(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        name: lightning
        model:
          class_path: autofit.zoo.mlp
          init_args:
            in_features: 16
            hidden: 8
            out_features: 4
        optimizer:
          class_path: torch.optim.SGD
          init_args: {lr: 0.1}
        data: {kind: tensor, shape: [16], num_classes: 4}
        device: cpu
    """)
    spec = load_spec(path)
    assert spec.model.target == "autofit.zoo.mlp"
    assert spec.model.kwargs == {"in_features": 16, "hidden": 8, "out_features": 4}
    assert spec.optimizer.target == "torch.optim.SGD"
    assert spec.optimizer.kwargs == {"lr": 0.1}
    model = build_model(spec, 0)
    assert model[1].out_features == 8


def test_lightning_form_rejects_extra_keys() -> None:
    raw = base(model={"class_path": "autofit.zoo.mlp", "init_args": {}, "hiden": 3})
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw)
    assert len(info.value.problems) == 1
    assert "model.hiden: unknown key" in info.value.problems[0]


def test_input_size_placeholder_is_substituted() -> None:
    raw = base(
        model={"_target_": "autofit.zoo.vit", "image_size": "${input_size}", "patch_size": 4,
               "dim": 16, "depth": 1, "heads": 2, "num_classes": 4},
        data={"kind": "image", "size": 16, "num_classes": 4},
    )
    spec = spec_from_dict(raw)
    assert spec.model.kwargs["image_size"] == "${input_size}"
    assert build_model(spec, 16).grid_size == 4
    assert build_model(spec, 32).grid_size == 8


def test_input_size_range() -> None:
    raw = base(data={"kind": "image", "size": 16, "num_classes": 4},
               search={"input_size": {"min": 16, "max": 64, "step": 16}})
    spec = spec_from_dict(raw)
    assert spec.search.input_sizes == (16, 32, 48, 64)
    assert spec.input_sizes == (16, 32, 48, 64)


def test_input_size_list_is_sorted_and_deduplicated() -> None:
    raw = base(data={"kind": "tokens", "vocab_size": 64, "seq_len": 32},
               search={"input_size": [128, 32, 64, 32]})
    assert spec_from_dict(raw).input_sizes == (32, 64, 128)


def test_input_size_range_max_below_min() -> None:
    raw = base(data={"kind": "image", "size": 16, "num_classes": 4},
               search={"input_size": {"min": 64, "max": 16}})
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw)
    assert len(info.value.problems) == 1
    assert "max must be >= min, got min=64, max=16" in info.value.problems[0]


def test_input_size_not_allowed_for_tensor_data() -> None:
    with pytest.raises(SpecError, match="not supported for data.kind: tensor"):
        spec_from_dict(base(search={"input_size": [8, 16]}))


def test_image_size_height_width() -> None:
    spec = spec_from_dict(base(data={"kind": "image", "size": [24, 40], "num_classes": 4}))
    assert spec.data.size == (24, 40)
    assert spec.default_input_size == 24
    assert input_shape(spec, Candidate(batch_size=2, input_size=24)) == (2, 3, 24, 40)
    # searching the resolution keeps the aspect ratio of data.size
    assert input_shape(spec, Candidate(batch_size=2, input_size=48)) == (2, 3, 48, 80)


def test_image_size_square_from_int() -> None:
    assert spec_from_dict(base(data={"kind": "image", "size": 20, "num_classes": 4})).data.size \
        == (20, 20)


def test_image_size_wrong_length() -> None:
    with pytest.raises(SpecError, match=r"data.size: must be an int or \[height, width\]"):
        spec_from_dict(base(data={"kind": "image", "size": [1, 2, 3], "num_classes": 4}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GB", 24 * 10**9),
        ("16GiB", 16 * 2**30),
        ("80 GB", 80 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5TB", 1_500 * 10**9),
        (12 * 2**30, 12 * 2**30),
    ],
)
def test_budget_decimal_and_binary(text: Any, expected: int) -> None:
    spec = spec_from_dict(base(memory={"budget": text}))
    assert spec.memory.budget_bytes == expected
    assert spec.memory.budget_text == str(text)


def test_budget_auto_and_decimal_differs_from_binary() -> None:
    assert spec_from_dict(base(memory={"budget": "auto"})).memory.budget_bytes is None
    gb = spec_from_dict(base(memory={"budget": "24GB"})).memory.budget_bytes
    gib = spec_from_dict(base(memory={"budget": "24GiB"})).memory.budget_bytes
    assert gb == 24_000_000_000 and gib == 25_769_803_776


@pytest.mark.parametrize("budget", ["1kB", "2048TiB"])
def test_budget_out_of_range(budget: str) -> None:
    with pytest.raises(SpecError, match=r"memory.budget: must be at (least|most)"):
        spec_from_dict(base(memory={"budget": budget}))


@pytest.mark.parametrize("margin", [-0.1, 0.95, 1.0, "ten percent", True])
def test_margin_out_of_range(margin: Any) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(base(memory={"margin": margin}))
    assert len(info.value.problems) == 1
    assert "memory.margin: must be" in info.value.problems[0]
    assert repr(margin) in info.value.problems[0] or str(margin) in info.value.problems[0]


@pytest.mark.parametrize("margin", [0.0, 0.25, 0.9])
def test_margin_in_range(margin: float) -> None:
    assert spec_from_dict(base(memory={"margin": margin})).memory.margin == margin


def test_cpu_limit_choice() -> None:
    assert spec_from_dict(base(memory={"cpu_limit": "rlimit"})).memory.cpu_limit == "rlimit"
    with pytest.raises(SpecError, match="did you mean 'rlimit'"):
        spec_from_dict(base(memory={"cpu_limit": "rlimt"}))


def test_checkpoint_segments_and_precisions() -> None:
    spec = spec_from_dict(base(search={"checkpoint_segments": [2, 0, 2],
                                       "precision": ["bf16", "fp16", "bf16"]}))
    assert spec.search.checkpoint_segments == (0, 2)
    assert spec.search.precisions == ("bf16", "fp16")


def test_batch_size_multiple_of_without_a_multiple_in_range() -> None:
    with pytest.raises(SpecError, match="no multiple of 64 lies in"):
        spec_from_dict(base(search={"batch_size": {"min": 1, "max": 32, "multiple_of": 64}}))


def test_step_escape_hatch_needs_no_data() -> None:
    spec = spec_from_dict({"name": "s", "model": {"_target_": "faults.Tiny"}, "step": "faults.step"})
    assert spec.step == "faults.step"


# --------------------------------------------------------------------------- build errors


def test_unknown_model_import_path_is_build_error() -> None:
    spec = spec_from_dict(base(model={"_target_": "nosuch.module.Model"}))
    with pytest.raises(BuildError) as info:
        build_model(spec, 32)
    assert "nosuch.module.Model" in str(info.value)


def test_missing_attribute_in_existing_module_is_build_error() -> None:
    spec = spec_from_dict(base(model={"_target_": "autofit.zoo.no_such_model"}))
    with pytest.raises(BuildError, match="has no attribute 'no_such_model'"):
        build_model(spec, 32)


def test_bad_model_kwargs_is_build_error() -> None:
    spec = spec_from_dict(base(model={"_target_": "autofit.zoo.mlp", "widht": 3}))
    with pytest.raises(BuildError, match="widht"):
        build_model(spec, 32)


def test_malformed_import_path_is_spec_error() -> None:
    with pytest.raises(SpecError, match="must be an import path"):
        spec_from_dict(base(model={"_target_": "not an import path"}))
