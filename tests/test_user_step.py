"""The step users train with: Lightning's loop, Hugging Face models, dict batches, custom steps.

Each step kind is traced on fake tensors and run for real in the same code; these tests hold
the prediction to what the real framework does and to what the trial measures.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

import autofit
from autofit.candidate import Candidate
from autofit.choices import StepKind
from autofit.errors import AutofitError, BuildError
from autofit.memory import MemoryTracker, PhaseHooks
from autofit.spec import load_spec, spec_from_dict
from autofit.step import TrainingJob

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def measured_peak(spec, batch: int, steps: int = 2) -> int:
    """Peak live bytes of ``steps`` real steps of the spec's step kind, in this process."""
    cand = Candidate(batch_size=batch, input_size=spec.input_sizes[0])
    tracker = MemoryTracker()
    job = TrainingJob(spec, cand, torch.device("cpu"), hooks=PhaseHooks(tracker))
    for tensor in job.parameters_and_buffers():
        tracker.track(tensor, "params")
    with tracker:
        for _ in range(steps):
            job.run_step()
    return tracker.peak_bytes


def predicted_peak(spec, batch: int) -> int:
    return autofit.estimate(spec, batch_size=batch, max_batch=False).estimate.peak_bytes


# --------------------------------------------------------------------------- Lightning

@pytest.fixture(scope="module")
def lightning_spec():
    pytest.importorskip("lightning")
    return load_spec(CONFIGS / "lightning.yaml")


def _trainer_peak(module, batch: int, steps: int = 2) -> int:
    """Two steps of a real ``lightning.Trainer.fit`` under the same tracker the trials use."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    class Samples(Dataset):
        """Fresh samples, as decoded from disk: no dataset tensor is counted as device memory."""

        def __len__(self) -> int:
            return batch * (steps + 2)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.randn(3, 32, 32), torch.randint(0, 10, ())

    loader = DataLoader(Samples(), batch_size=batch, num_workers=0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    tracker = MemoryTracker()
    for tensor in list(module.parameters()) + list(module.buffers()):
        tracker.track(tensor, "params")
    with tracker:
        trainer.fit(module, loader)
    assert trainer.global_step == steps
    return tracker.peak_bytes


def test_lightning_trainer_trial_and_estimate_agree_within_1_percent(lightning_spec, one_thread):
    from lit_classifier import LitClassifier  # configs/ is on the path once the spec is built

    batch = 24
    predicted = predicted_peak(lightning_spec, batch)
    torch.manual_seed(0)
    trainer = _trainer_peak(LitClassifier(**lightning_spec.model.kwargs), batch)
    result = autofit.trial(lightning_spec, batch_size=batch, steps=1)
    assert result.fits, result.message
    assert result.step_kind == StepKind.LIGHTNING
    trial = result.memory.peak_bytes
    assert abs(trial - trainer) / trainer < 0.01, (trial, trainer)
    assert abs(predicted - trainer) / trainer < 0.01, (predicted, trainer)


def test_a_fork_server_started_before_lightning_imports_it_once_for_every_trial(lightning_spec,
                                                                              one_thread):
    """A fork server started before the spec's model loaded Lightning (started early, as the
    tuner's prestart or an earlier tune does) is asked to import it before its next fork:
    every trial forked from it starts with Lightning loaded instead of importing it while it
    builds the model, and measures what the same steps measure in this process."""
    from autofit.trials import forkserver, runner

    if not forkserver.fork_enabled():
        pytest.skip("trials do not fork here")
    assert "lightning.pytorch" in sys.modules  # the spec's model imported it
    runner.shutdown()
    runner._SERVER = forkserver.ForkServer(())  # nothing preloaded at its start
    try:
        cand = Candidate(batch_size=8, input_size=32)
        trials = [runner.run_trial(lightning_spec, cand, steps=1) for _ in range(2)]
        asked = set(runner._SERVER.preloaded)
    finally:
        runner.shutdown()
    expected = measured_peak(lightning_spec, 8, steps=3)  # 2 warm-up + 1 timed
    for result in trials:
        assert result.fits, result.message
        assert "lightning.pytorch" in result.extra["frameworks_preloaded"]
        assert result.step_kind == StepKind.LIGHTNING
        assert result.memory.peak_bytes == expected
    assert asked == {name for name in forkserver.FRAMEWORKS if name in sys.modules}


def test_lightning_loop_keeps_last_grads_through_forward(lightning_spec, one_thread):
    """Lightning zeroes grads inside the closure, after training_step: the previous step's
    gradients are alive during the forward, which autofit's own step frees first."""
    as_autofit = spec_from_dict({**lightning_spec.raw, "step": "autofit", "loss": "cross_entropy"},
                                lightning_spec.source_path)
    seen = {}
    for spec in (lightning_spec, as_autofit):
        job = TrainingJob(spec, Candidate(batch_size=4, input_size=32), torch.device("cpu"))
        grads_in_forward: list[bool] = []

        def record(module, args, seen_now=grads_in_forward):
            seen_now.append(any(p.grad is not None for p in module.parameters()))

        job.model.register_forward_pre_hook(record)
        job.run_step()
        job.run_step()
        seen[job.step_kind] = grads_in_forward
    assert seen[StepKind.LIGHTNING] == [False, True]
    assert seen[StepKind.AUTOFIT] == [False, False]


def _lightning_module_file(tmp_path: Path, body: str) -> str:
    name = f"litmod_{abs(hash(body)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    sys.path.insert(0, str(tmp_path))
    return name


def test_lightning_module_without_training_step_is_one_line(tmp_path: Path):
    pytest.importorskip("lightning")
    name = _lightning_module_file(tmp_path, """
        import torch
        from lightning.pytorch import LightningModule

        class NoStep(LightningModule):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(4, 2)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)
    """)
    spec = spec_from_dict({"model": {"class_path": f"{name}.NoStep"},
                           "data": {"kind": "tensor", "shape": [4], "num_classes": 2},
                           "device": "cpu", "memory": {"budget": "64MiB"}})
    with pytest.raises(BuildError, match="does not define training_step") as info:
        autofit.estimate(spec, batch_size=2, max_batch=False)
    assert "\n" not in str(info.value)


def test_lightning_manual_optimization_runs_its_own_step(tmp_path: Path, one_thread):
    pytest.importorskip("lightning")
    name = _lightning_module_file(tmp_path, """
        import torch
        from lightning.pytorch import LightningModule

        class Gan(LightningModule):
            def __init__(self):
                super().__init__()
                self.automatic_optimization = False
                self.gen = torch.nn.Linear(8, 8)
                self.disc = torch.nn.Linear(8, 1)

            def training_step(self, batch, batch_idx):
                x, _ = batch
                opt_g, opt_d = self.optimizers()
                loss_d = self.disc(x).mean() - self.disc(self.gen(x).detach()).mean()
                opt_d.zero_grad()
                self.manual_backward(loss_d)
                opt_d.step()
                loss_g = -self.disc(self.gen(x)).mean()
                opt_g.zero_grad()
                self.manual_backward(loss_g)
                opt_g.step()
                self.log("loss_g", loss_g)
                return loss_g

            def configure_optimizers(self):
                return [torch.optim.Adam(self.gen.parameters()), torch.optim.Adam(self.disc.parameters())]
    """)
    spec = spec_from_dict({"model": {"class_path": f"{name}.Gan"},
                           "data": {"kind": "tensor", "shape": [8], "num_classes": 2},
                           "device": "cpu", "memory": {"budget": "64MiB"}})
    cand = Candidate(batch_size=16, input_size=0)
    job = TrainingJob(spec, cand, torch.device("cpu"))
    assert job.step_kind == StepKind.LIGHTNING_MANUAL
    job.run_step()
    job.run_step()
    assert all(job.optimizers[i].state for i in range(2))  # both optimizers stepped
    assert measured_peak(spec, 16) == predicted_peak(spec, 16)


# --------------------------------------------------------------------------- Hugging Face

HF_GPT2 = """
model:
  _target_: transformers.GPT2LMHeadModel
  config: {_target_: transformers.GPT2Config, n_layer: 2, n_embd: 128, n_head: 4, vocab_size: 1000, n_positions: 256}
data:
  kind: tokens
  vocab_size: 1000
  seq_len: 128
  batch: {input_ids: tokens, attention_mask: ones, labels: tokens}   # model(**batch); HF computes the loss
loss: model
"""

HF_BERT = """
model:
  _target_: transformers.BertForSequenceClassification
  config: {_target_: transformers.BertConfig, num_hidden_layers: 2, hidden_size: 128, num_attention_heads: 4, intermediate_size: 256, vocab_size: 1000, num_labels: 3}
data:
  kind: tokens
  vocab_size: 1000
  seq_len: 128
  batch: {input_ids: tokens, attention_mask: ones, labels: {classes: 3, per: sample}}
loss: model
"""


def _written(tmp_path: Path, text: str, extra: str = "") -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text + "device: cpu\nmemory: {budget: 256MiB}\n" + extra)
    return path


@pytest.mark.parametrize("text", [HF_GPT2, HF_BERT], ids=["gpt2", "bert"])
def test_hf_specs_as_written_validate_and_predict_the_real_step(tmp_path: Path, text: str, one_thread):
    pytest.importorskip("transformers")
    spec = load_spec(_written(tmp_path, text))
    batch = spec.data.batch
    assert spec.data.batch_form == "dict" and [f.name for f in batch] == ["input_ids", "attention_mask", "labels"]
    predicted = predicted_peak(spec, 4)
    measured = measured_peak(spec, 4)
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)


def test_hf_trainer_step_frees_the_logits_before_backward(tmp_path: Path, one_thread):
    pytest.importorskip("transformers")
    held = load_spec(_written(tmp_path, HF_GPT2))
    freed = load_spec(_written(tmp_path, HF_GPT2, "step: hf_trainer\n"))
    from autofit.loops import step_kind
    assert step_kind(held) == StepKind.HF and step_kind(freed) == StepKind.HF_TRAINER
    # (B, T, V) fp32 logits and their fp32 upcast: the Trainer's step does not hold them
    logits = 8 * 128 * 1000 * 4
    assert predicted_peak(held, 8) - predicted_peak(freed, 8) >= logits


def test_dict_batch_field_the_model_does_not_take(tmp_path: Path):
    pytest.importorskip("transformers")
    text = HF_GPT2.replace("labels: tokens}", "labels: tokens, pixel_mask: ones}")
    spec = load_spec(_written(tmp_path, text))
    with pytest.raises(BuildError) as info:
        autofit.estimate(spec, batch_size=2, max_batch=False)
    message = str(info.value)
    assert "GPT2LMHeadModel.forward() takes no argument 'pixel_mask'" in message
    assert "exp.yaml:" in message and "\n" not in message


def test_hf_model_without_labels_under_loss_model(tmp_path: Path):
    pytest.importorskip("transformers")
    text = HF_GPT2.replace(", labels: tokens}", "}")
    spec = load_spec(_written(tmp_path, text))
    with pytest.raises(BuildError, match="loss is None.*labels field") as info:
        autofit.estimate(spec, batch_size=2, max_batch=False)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- custom steps

CUSTOM_STEPS = '''
import torch


def no_loss(model, optimizer, batch):
    x, y = batch
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
'''


EXAMPLES = str(REPO / "examples")  # examples/custom_step.py: the README's full step


@pytest.fixture
def custom_module(tmp_path: Path):
    (tmp_path / "custom_steps.py").write_text(CUSTOM_STEPS)
    sys.path[:0] = [str(tmp_path), EXAMPLES]
    yield "custom_steps"
    sys.path.remove(str(tmp_path))
    sys.path.remove(EXAMPLES)
    sys.modules.pop("custom_steps", None)


def _custom_spec(step: str, precision: str = "fp32"):
    return spec_from_dict({
        "model": {"_target_": "autofit.zoo.mlp", "in_features": 64, "hidden": 256, "depth": 3,
                  "out_features": 10},
        "data": {"kind": "tensor", "shape": [64], "num_classes": 10},
        "step": step, "device": "cpu", "memory": {"budget": "64MiB"},
        "search": {"precision": [precision]},
    })


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_full_custom_step_prediction_equals_the_real_step(custom_module, precision, one_thread):
    spec = _custom_spec("custom_step.clip_ema_accum", precision)
    job = TrainingJob(spec, Candidate(batch_size=8, input_size=0, precision=precision),
                      torch.device("cpu"))
    assert job.step_kind == StepKind.CUSTOM
    job.run_step()
    assert len(job.user_state["ema"]) == len(list(job.model.parameters()))
    predicted, measured = predicted_peak(spec, 32), measured_peak(spec, 32)
    if precision == "fp32":
        assert predicted == measured
    else:  # CPU autocast's weight cache differs slightly between fake and real kernels
        assert abs(predicted - measured) / measured < 0.03, (predicted, measured)


def test_custom_step_that_returns_no_loss(custom_module):
    spec = _custom_spec(f"{custom_module}.no_loss")
    with pytest.raises(BuildError, match=r"step custom_steps.no_loss returned NoneType, not a"):
        autofit.estimate(spec, batch_size=2, max_batch=False)


# --------------------------------------------------------------------------- data.batch grammar


def test_batch_grammar_errors_are_one_line_each():
    from autofit.errors import SpecError
    with pytest.raises(SpecError) as info:
        spec_from_dict({
            "model": {"_target_": "autofit.zoo.mlp"},
            "data": {"kind": "tokens", "vocab_size": 10, "seq_len": 8,
                     "batch": {"ids": "token", "y": {"classes": 0}, "z": {"kind": "normal"},
                               "m": {"kind": "ones", "shape": ["seqlen"]}}},
        })
    text = str(info.value)
    assert "data.batch.ids.kind: must be one of" in text and "did you mean 'tokens'" in text
    assert "data.batch.y.classes: must be >= 1" in text
    assert "data.batch.z.shape: missing" in text
    assert "data.batch.m.shape[0]" in text


def test_unknown_data_kind_reports_only_the_kind():
    from autofit.errors import SpecError
    with pytest.raises(SpecError) as info:
        spec_from_dict({"model": {"_target_": "autofit.zoo.mlp"},
                        "data": {"kind": "token", "vocab_size": 10, "seq_len": 8}})
    lines = [line for line in str(info.value).splitlines() if "data" in line]
    assert len(lines) == 1 and "did you mean 'tokens'" in lines[0]


def test_field_shapes_follow_the_input_size():
    from autofit.batch import make_batch
    spec = spec_from_dict({
        "model": {"_target_": "autofit.zoo.mlp"},
        "data": {"kind": "tokens", "vocab_size": 50, "seq_len": 16,
                 "batch": {"input_ids": "tokens", "mask": {"kind": "ones", "dtype": "bool"},
                           "label": {"classes": 3}, "pos": {"kind": "normal", "shape": ["input_size", 4]}}},
        "loss": "model", "search": {"input_size": [16, 32]},
    })
    batch = make_batch(spec, Candidate(batch_size=2, input_size=32), torch.device("cpu")).value
    assert batch["input_ids"].shape == (2, 32) and int(batch["input_ids"].max()) < 50
    assert batch["mask"].dtype == torch.bool and bool(batch["mask"].all())
    assert batch["label"].shape == (2,) and int(batch["label"].max()) < 3
    assert batch["pos"].shape == (2, 32, 4) and batch["pos"].dtype == torch.float32


def test_lightning_precision_names_are_accepted():
    spec = spec_from_dict({"model": {"_target_": "autofit.zoo.mlp"},
                           "data": {"kind": "tensor", "shape": [4], "num_classes": 2},
                           "search": {"precision": ["32-true", "bf16-mixed", "16-mixed"]}})
    assert sorted(p.value for p in spec.search.precisions) == ["bf16", "fp16", "fp32"]


def test_no_lightning_installed_gives_a_clear_error(monkeypatch, tmp_path: Path):
    """Without Lightning, a Lightning spec's import fails with one line naming the module."""
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    sys.modules.pop("lit_classifier", None)
    with pytest.raises(AutofitError) as info:
        load_spec(CONFIGS / "lightning.yaml")
    assert "lit_classifier" in str(info.value)
    sys.modules.pop("lit_classifier", None)
