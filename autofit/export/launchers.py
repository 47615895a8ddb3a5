"""Cluster launch scripts: Slurm (sbatch), LSF (bsub) and plain ``torchrun`` bash scripts.

Each script exports the tuned values as ``AUTOFIT_*`` variables (the same ``autofit_tuned``
section tuned.yaml holds), then starts one ``torchrun`` per node running
``output.train_command``: ``--standalone`` on one node, c10d rendezvous on several. Values
from the spec are shell-quoted; the train command must be one line of valid shell words.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from autofit.export.batch_plan import BatchPlan
from autofit.export.common import ExportError, comment, slugify
from autofit.export.provenance import file_header
from autofit.export.tuned import tuned_env, tuned_section
from autofit.spec import OutputSpec

RDZV_PORT = 29500
"""TCP port of the c10d rendezvous on the first node."""


def _check_world(spec_output: OutputSpec, plan: BatchPlan) -> None:
    world = spec_output.nodes * spec_output.gpus_per_node
    if plan.world_size != world:
        raise ExportError(
            f"plan is for {plan.world_size} GPUs but the output spec has {spec_output.nodes} "
            f"node(s) x {spec_output.gpus_per_node} GPU(s) = {world}")


def _train_command(spec_output: OutputSpec) -> str:
    command = spec_output.train_command.strip()
    if "\n" in command or "\r" in command:
        raise ExportError(f"output.train_command: must be one line, got {command!r}")
    try:
        shlex.split(command)
    except ValueError as exc:
        raise ExportError(f"output.train_command: {exc} in {command!r}") from None
    return command


def _spec_name(results: dict[str, Any]) -> str:
    spec = results.get("spec")
    name = spec.get("name") if isinstance(spec, dict) else None
    return name if isinstance(name, str) and name.strip() else "autofit"


def env_block(results: dict[str, Any], plan: BatchPlan) -> str:
    """``export AUTOFIT_...=...`` lines: the ``autofit_tuned`` values of tuned.yaml."""
    env = tuned_env(tuned_section(results, plan))
    lines = ["# Tuned values for the training script (read them from the environment, or",
             "# AUTOFIT_TUNED_YAML with autofit.export.tuned.load_tuned: the same values)."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    return "\n".join(lines) + "\n"


def _directive_value(value: Any) -> str:
    text = " ".join(str(value).split())
    return shlex.quote(text)


def _slurm_time(value: Any) -> tuple[str, list[str]]:
    if isinstance(value, int) and not isinstance(value, bool):
        days, rest = divmod(value, 24 * 60)
        hours, minutes = divmod(rest, 60)
        return str(value), [
            f"--time={value} is read by Slurm as minutes ({days}-{hours:02d}:{minutes:02d}:00).",
            "YAML reads an unquoted 04:00:00 as a number of seconds: quote times in the spec.",
        ]
    return _directive_value(value), []


def _torchrun_args(nnodes: str, nproc: int, endpoint: str, rdzv_id: str) -> list[str]:
    return [
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={rdzv_id}",
    ]


def _continued(command: str, args: Sequence[str], train_command: str) -> str:
    parts = [command, *(f"    {arg}" for arg in args), f"    {train_command}"]
    return " \\\n".join(parts) + "\n"


def _indent(text: str) -> str:
    return "".join(f"    {line}" if line.strip() else line for line in text.splitlines(True))


def _optional(options: dict[str, Any], flags: Sequence[tuple[str, str]]) -> list[str]:
    """``flag + quoted value`` for each option the spec sets, in ``flags`` order."""
    return [f"{flag}{_directive_value(options[key])}" for key, flag in flags
            if options.get(key) is not None]


def _slurm_directives(results: dict[str, Any], spec_output: OutputSpec) -> tuple[list[str], list[str]]:
    """``#SBATCH`` directives, and notes on how Slurm reads them."""
    slurm = spec_output.slurm
    directives = [
        f"--job-name={slugify(str(slurm.get('job_name') or _spec_name(results)))}",
        f"--nodes={spec_output.nodes}",
        "--ntasks-per-node=1",
        f"--gres=gpu:{spec_output.gpus_per_node}",
        *_optional(slurm, (("cpus_per_task", "--cpus-per-task="), ("mem", "--mem="))),
    ]
    notes: list[str] = []
    if slurm.get("time") is not None:
        time_text, notes = _slurm_time(slurm["time"])
        directives.append(f"--time={time_text}")
    directives += _optional(slurm, (("partition", "--partition="), ("account", "--account=")))
    return directives, notes


def render_slurm(results: dict[str, Any], spec_output: OutputSpec, plan: BatchPlan) -> str:
    """An sbatch script: one task per node, each running ``torchrun`` with c10d rendezvous."""
    _check_world(spec_output, plan)
    directives, notes = _slurm_directives(results, spec_output)
    cpus = spec_output.slurm.get("cpus_per_task")
    srun_env = "" if cpus is None else (
        "# Slurm 22.05+ srun does not inherit --cpus-per-task from sbatch.\n"
        f"export SRUN_CPUS_PER_TASK={shlex.quote(str(cpus))}\n"
    )
    run = _continued(
        "srun torchrun",
        _torchrun_args('"$SLURM_NNODES"', spec_output.gpus_per_node,
                       f'"$MASTER_ADDR:{RDZV_PORT}"', '"$SLURM_JOB_ID"'),
        _train_command(spec_output),
    )
    return (
        "#!/bin/bash\n"
        + "".join(f"#SBATCH {d}\n" for d in directives)
        + file_header(results, plan, "Slurm batch script", "slurm")
        + (comment(notes) if notes else "")
        + "set -euo pipefail\n\n"
        + env_block(results, plan)
        + "\n"
        + "MASTER_ADDR=\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | awk 'NR == 1')\"\n"
        + "export MASTER_ADDR\n"
        + f"export MASTER_PORT={RDZV_PORT}\n"
        + srun_env
        + "\n"
        + run
    )


def _lsf_launch(spec_output: OutputSpec) -> str:
    """The torchrun line(s) of a bsub script: standalone, or one per host via blaunch."""
    gpus = spec_output.gpus_per_node
    train = _train_command(spec_output)
    if spec_output.nodes == 1:
        return _continued("torchrun", ["--standalone", f"--nproc_per_node={gpus}"], train)
    return (
        "# LSB_HOSTS names each host once per slot; keep the first occurrence of each.\n"
        "mapfile -t HOSTS < <(tr ' ' '\\n' <<< \"$LSB_HOSTS\" | awk 'NF && !seen[$0]++')\n"
        'MASTER_ADDR="${HOSTS[0]}"\n'
        "export MASTER_ADDR\n"
        f"export MASTER_PORT={RDZV_PORT}\n\n"
        + _continued(
            'blaunch -z "${HOSTS[*]}" torchrun',
            _torchrun_args('"${#HOSTS[@]}"', gpus, f'"$MASTER_ADDR:{RDZV_PORT}"', '"$LSB_JOBID"'),
            train,
        )
    )


def render_lsf(results: dict[str, Any], spec_output: OutputSpec, plan: BatchPlan) -> str:
    """A bsub script: one slot per GPU; multi-node jobs start one ``torchrun`` per host via blaunch."""
    _check_world(spec_output, plan)
    lsf = spec_output.lsf
    job_name = slugify(str(lsf.get("job_name") or _spec_name(results)))
    gpus = spec_output.gpus_per_node
    directives = [
        f"-J {job_name}",
        *_optional(lsf, (("queue", "-q "), ("walltime", "-W "), ("project", "-P "))),
        f"-n {plan.world_size}",
        f'-gpu "num={gpus}:mode=exclusive_process"',
        f'-R "span[ptile={gpus}]"',
        f"-o {job_name}.%J.out",
        f"-e {job_name}.%J.err",
    ]
    return (
        "#!/bin/bash\n"
        + "".join(f"#BSUB {d}\n" for d in directives)
        + file_header(results, plan, "LSF job script", "lsf")
        + "set -euo pipefail\n\n"
        + env_block(results, plan)
        + "\n"
        + _lsf_launch(spec_output)
    )


def render_torchrun(results: dict[str, Any], spec_output: OutputSpec, plan: BatchPlan) -> str:
    """A plain bash script: ``torchrun --standalone`` on one node, c10d rendezvous on several."""
    _check_world(spec_output, plan)
    gpus = spec_output.gpus_per_node
    train = _train_command(spec_output)
    usage = [
        "Usage: single node:  bash torchrun.sh",
        f"       multi-node:   NNODES={max(spec_output.nodes, 2)} MASTER_ADDR=<first node> "
        "bash torchrun.sh   (on every node)",
    ]
    return (
        "#!/bin/bash\n"
        + file_header(results, plan, "torchrun launcher", "torchrun")
        + comment(usage)
        + "set -euo pipefail\n\n"
        + env_block(results, plan)
        + "\n"
        + f'NNODES="${{NNODES:-{spec_output.nodes}}}"\n'
        + 'MASTER_ADDR="${MASTER_ADDR:-localhost}"\n'
        + f'MASTER_PORT="${{MASTER_PORT:-{RDZV_PORT}}}"\n'
        + 'RDZV_ID="${RDZV_ID:-autofit}"\n\n'
        + 'if [ "$NNODES" -eq 1 ]; then\n'
        + _indent(_continued("torchrun", ["--standalone", f"--nproc_per_node={gpus}"], train))
        + "else\n"
        + _indent(_continued(
            "torchrun",
            _torchrun_args('"$NNODES"', gpus, '"$MASTER_ADDR:$MASTER_PORT"', '"$RDZV_ID"'),
            train,
        ))
        + "fi\n"
    )
