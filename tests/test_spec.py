"""Tests for autofit.spec: loading, validation messages (path, value, line) and spec forms."""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from autofit.build import build_model, build_optimizer, input_shape
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


# --------------------------------------------------------------------------- import paths


def module_name() -> str:
    """A fresh module name: modules stay cached in sys.modules between tests."""
    return f"user_model_{uuid.uuid4().hex[:10]}"


KEYS_AND_IMPORTS = """\
name: imports
model:
  _target_: autofit.zoo.resnett
  depth: 18
  num_classes: 10
data: {kind: image, size: 32, num_classes: 10}
optimizer:
  _target_: torch.optim.SGDD
  lr: 0.1
search:
  steps_per_trail: 3
devise: cpu
"""


def test_key_mistakes_and_import_paths_are_reported_in_one_run(tmp_path: Path) -> None:
    path = write(tmp_path, KEYS_AND_IMPORTS)
    assert problems_of(path) == [  # one SpecError, in file-line order
        f"{path}:3: model._target_: cannot import 'autofit.zoo.resnett': module 'autofit.zoo' "
        "has no attribute 'resnett'; did you mean 'autofit.zoo.resnet'?",
        f"{path}:8: optimizer._target_: cannot import 'torch.optim.SGDD': module 'torch.optim' "
        "has no attribute 'SGDD'; did you mean 'torch.optim.SGD'?",
        f"{path}:11: search.steps_per_trail: unknown key; did you mean 'steps_per_trial'?",
        f"{path}:12: devise: unknown key; did you mean 'device'?",
    ]


def test_every_import_path_of_the_spec_is_checked(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        name: all-paths
        model:
          class_path: autofit.zoo.mlpp
          init_args:
            in_features: 16
            norm: {_target_: torch.nn.LayerNormm, normalized_shape: 16}
        data: {kind: tensor, shape: [16], num_classes: 4}
        loss: torch.nn.functionl.mse_loss
        step: autofit.zoo.mlp.no_such_attr
    """)
    problems = problems_of(path)
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"{path}:3: model.class_path: cannot import 'autofit.zoo.mlpp'")
    assert "did you mean 'autofit.zoo.mlp'?" in problems[0]
    assert problems[1].startswith(
        f"{path}:6: model.init_args.norm._target_: cannot import 'torch.nn.LayerNormm'")
    assert "did you mean 'torch.nn.LayerNorm'?" in problems[1]
    assert problems[2] == (
        f"{path}:8: loss: cannot import 'torch.nn.functionl.mse_loss': no module named "
        "'torch.nn.functionl'; did you mean 'torch.nn.functional.mse_loss'?")
    assert problems[3] == (
        f"{path}:9: step: cannot import 'autofit.zoo.mlp.no_such_attr': "
        "'autofit.zoo.mlp' has no attribute 'no_such_attr'")


def test_missing_top_level_module_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("autofit.zoo.mlp", "nosuchpkg.Model"))
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        f"{path}:3: model._target_: cannot import 'nosuchpkg.Model': no module named 'nosuchpkg'")


@pytest.mark.parametrize(("body", "expected"), [
    ("raise RuntimeError('boom at import')\n", "raised RuntimeError: boom at import"),
    ("import no_such_dependency_xyz\n", "raised ModuleNotFoundError: No module named 'no_such_dependency_xyz'"),
    ("import sys\nsys.exit(3)\n", "raised SystemExit: 3"),
    ("def broken(:\n", "raised SyntaxError"),
], ids=["raise", "missing-dependency", "sys-exit", "syntax-error"])
def test_model_module_that_raises_at_import_is_a_problem(tmp_path: Path, body: str,
                                                         expected: str) -> None:
    name = module_name()
    (tmp_path / f"{name}.py").write_text(body)
    path = write(tmp_path, VALID.replace("autofit.zoo.mlp", f"{name}.Model"))
    path_before = list(sys.path)
    problems = problems_of(path)
    assert sys.path == path_before  # the spec folder is on sys.path only during the check
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        f"{path}:3: model._target_: cannot import '{name}.Model': importing '{name}' {expected}")
    assert "\n" not in problems[0] and "Traceback" not in problems[0]


def test_module_next_to_the_spec_is_importable_with_a_hint(tmp_path: Path) -> None:
    name = module_name()
    (tmp_path / f"{name}.py").write_text("from torch import nn\n\n\nclass Net(nn.Linear):\n"
                                         "    def __init__(self):\n"
                                         "        super().__init__(16, 4)\n")
    ok = write(tmp_path, VALID.replace("autofit.zoo.mlp", f"{name}.Net"), "ok.yaml")
    assert load_spec(ok).model.target == f"{name}.Net"
    typo = write(tmp_path, VALID.replace("autofit.zoo.mlp", f"{name}.Nett"), "typo.yaml")
    assert problems_of(typo) == [
        f"{typo}:3: model._target_: cannot import '{name}.Nett': module '{name}' has no "
        f"attribute 'Nett'; did you mean '{name}.Net'?"]


def test_import_check_is_opt_in_for_spec_from_dict(tmp_path: Path) -> None:
    raw = base(model={"_target_": "nosuchpkg.Model"}, optimizer={"_target_": "torch.optim.SGDD"},
               loss="nosuchpkg.loss", step="nosuchpkg.step")
    spec = spec_from_dict(raw, "results.json:spec")  # stored specs of other machines still load
    assert spec.model.target == "nosuchpkg.Model"
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw, "inline", check_imports=True)
    assert len(info.value.problems) == 4
    assert all(": cannot import 'nosuchpkg." in p or "'torch.optim.SGDD'" in p
               for p in info.value.problems)
    path = write(tmp_path, VALID.replace("autofit.zoo.mlp", "nosuchpkg.Model"))
    assert load_spec(path, check_imports=False).model.target == "nosuchpkg.Model"


# --------------------------------------------------------------------------- build errors' lines


def test_spec_keeps_its_line_map_outside_equality_and_hash(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    spec = load_spec(path)
    assert spec.lines[("model",)] == 2 and spec.lines[("data", "shape")] == 9
    assert spec.where(("model",)) == f"{path.resolve()}:2: model: "
    assert spec.where(("optimizer",)) == f"{path.resolve()}: optimizer: "
    assert spec.where(("data", "shape", 0)) == f"{path.resolve()}:9: data.shape[0]: "
    inline = spec_from_dict(base())
    assert inline.lines == {} and inline.where(("model",)) == "model: "
    assert dataclasses.replace(spec, lines={}) == spec
    assert spec.spec_hash() == spec_from_dict(spec.raw).spec_hash()
    assert "lines" not in repr(spec)


def test_constructor_error_names_the_model_line(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("  hidden: 32\n", "  hidden: 32\n  widht: 3\n"))
    with pytest.raises(BuildError) as info:
        build_model(load_spec(path), 0)
    message = str(info.value)
    assert message.startswith(f"{path.resolve()}:2: model: autofit.zoo.mlp(**")
    assert "widht" in message and "\n" not in message


def test_constructor_that_raises_names_the_model_line(tmp_path: Path) -> None:
    name = module_name()
    (tmp_path / f"{name}.py").write_text(
        "class Model:\n    def __init__(self, width=1):\n"
        "        raise ValueError(f'bad width {width}\\nsecond line')\n")
    path = write(tmp_path, f"""\
        name: raises
        device: cpu
        model:
          _target_: {name}.Model
          width: 3
        data: {{kind: tensor, shape: [16], num_classes: 4}}
    """)
    with pytest.raises(BuildError) as info:
        build_model(load_spec(path), 0)
    assert str(info.value) == (
        f"{path.resolve()}:3: model: {name}.Model(...) raised ValueError: bad width 3 second line")


def test_build_time_import_error_names_the_line_with_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, KEYS_AND_IMPORTS.replace("  steps_per_trail: 3\n", "")
                 .replace("devise", "device"))
    spec = load_spec(path, check_imports=False)
    with pytest.raises(BuildError) as info:
        build_model(spec, 32)
    assert str(info.value) == (
        f"{path.resolve()}:3: model._target_: cannot import 'autofit.zoo.resnett': module "
        "'autofit.zoo' has no attribute 'resnett'; did you mean 'autofit.zoo.resnet'?")
    fixed = write(tmp_path, VALID + "optimizer: {_target_: torch.optim.SGDD}\n", "fixed.yaml")
    spec = load_spec(fixed, check_imports=False)
    with pytest.raises(BuildError) as info:
        build_optimizer(spec, build_model(spec, 0), "cpu")
    assert str(info.value).startswith(
        f"{fixed.resolve()}:12: optimizer._target_: cannot import 'torch.optim.SGDD': ")


def test_nested_target_constructor_error_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace(
        "  out_features: 4\n", "  out_features: 4\n  activation: {_target_: torch.nn.ReLU, bad: 1}\n"))
    with pytest.raises(BuildError) as info:
        build_model(load_spec(path), 0)
    assert str(info.value).startswith(
        f"{path.resolve()}:7: model.activation._target_: torch.nn.ReLU(...) raised TypeError")


def test_optimizer_error_names_the_optimizer_line(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "optimizer:\n  _target_: torch.optim.SGD\n  lr: fast\n")
    spec = load_spec(path)
    with pytest.raises(BuildError) as info:
        build_optimizer(spec, build_model(spec, 0), "cpu")
    assert str(info.value).startswith(f"{path.resolve()}:12: optimizer: torch.optim.SGD(**")


def test_self_referencing_yaml_alias_is_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        name: cycle
        model: &m
          _target_: autofit.zoo.mlpp
          again: *m
          more: &l [1, *l]
        data: {kind: tensor, shape: [16], num_classes: 4}
    """)
    reason = ("cannot import 'autofit.zoo.mlpp': module 'autofit.zoo' has no attribute 'mlpp'; "
              "did you mean 'autofit.zoo.mlp'?")
    assert problems_of(path) == [f"{path}:3: model._target_: {reason}",
                                 f"{path}:4: model.again._target_: {reason}"]
