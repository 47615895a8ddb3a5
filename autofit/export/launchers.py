"""Cluster launch scripts: Slurm (sbatch), LSF (bsub) and plain ``torchrun`` bash scripts.

Each script exports the tuned values as ``AUTOFIT_*`` variables (the same ``autofit_tuned``
section tuned.yaml holds), then starts one ``torchrun`` per node running
``output.train_command``: ``--standalone`` on one node, c10d rendezvous on several. Values
from the spec are shell-quoted; the train command must be one line of valid shell words.

Without ``output.train_command`` in the spec the scripts run a placeholder
(``YOUR_TRAIN_SCRIPT.py``) under a comment saying what to put there. The rendezvous port is
``MASTER_PORT`` from the environment, else derived from the job id, so two jobs on one node
do not collide. Slurm asks for ``--cpus-per-task`` (the spec's, else
``DEFAULT_CPUS_PER_GPU`` per rank). A result tuned on a CPU says in each script's header that
it is a dry run for a GPU job.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from autofit.export.batch_plan import BatchPlan
from autofit.export.common import ExportError, comment, slugify
from autofit.export.provenance import Provenance, file_header
from autofit.export.tuned import PARALLEL_ENV_VAR, parallel_of, tuned_env, tuned_section
from autofit.spec import OutputSpec

RDZV_PORT = 29500
"""Base TCP port of the c10d rendezvous on the first node (torchrun's default)."""

RDZV_PORT_SPAN = 3000
"""Job-derived ports are ``RDZV_PORT + job id % RDZV_PORT_SPAN``: 29500-32499, below Linux's
ephemeral range (32768+)."""

DEFAULT_CPUS_PER_GPU = 8
"""Slurm ``--cpus-per-task`` per GPU rank when the spec sets none (without it Slurm gives the
one task that runs torchrun a single CPU, shared by all its ranks)."""

PLACEHOLDER_TRAIN_COMMAND = "YOUR_TRAIN_SCRIPT.py --config tuned.yaml"
"""What the scripts run when the spec has no ``output.train_command``."""


def _port_lines(job_id_var: str) -> str:
    """``MASTER_PORT``: the environment's, else derived from the job id."""
    return (
        "# Rendezvous port: MASTER_PORT from the environment, else derived from the job id, so\n"
        "# two jobs on one node do not collide.\n"
        f'MASTER_PORT="${{MASTER_PORT:-$(( {RDZV_PORT} + {job_id_var} % {RDZV_PORT_SPAN} ))}}"\n'
        "export MASTER_PORT\n"
    )


def train_command_given(results: dict[str, Any], spec_output: OutputSpec) -> bool:
    """Did the user name a train command (in the spec, or an output spec that differs from
    the default)?"""
    spec = results.get("spec")
    output = spec.get("output") if isinstance(spec, dict) else None
    if isinstance(output, dict) and output.get("train_command"):
        return True
    return spec_output.train_command.strip() != OutputSpec().train_command


def cpu_dry_run_note(results: dict[str, Any]) -> str | None:
    """The warning for GPU scripts made from a result tuned on a CPU, else None."""
    if Provenance.from_results(results).device_kind != "cpu":
        return None
    return ("this result was tuned on a CPU against its memory budget: the GPU scripts are a dry "
            "run for a GPU job; tune on the target GPU before relying on the batch size")


def _dry_run(results: dict[str, Any]) -> str:
    note = cpu_dry_run_note(results)
    return comment([f"DRY RUN: {note}."]) if note else ""


def launch_layout(results: dict[str, Any], output: OutputSpec) -> tuple[int, int, str]:
    """``(nodes, gpus_per_node, why)``: the layout the launch scripts run, and why it is not
    ``output``'s as written ("" when it is).

    A ddp/fsdp result whose spec sets ``parallel.world_size`` N was tuned per rank at N ranks
    (fsdp's per-rank memory depends on N), so the scripts launch N ranks. When
    ``output.nodes x output.gpus_per_node`` is not N, the layout is derived from N, keeping
    what the spec's ``output`` sets:

    1. ``gpus_per_node`` set and dividing N: N / gpus_per_node nodes of that many GPUs;
    2. ``gpus_per_node`` set above N: one node, N of its GPUs;
    3. ``nodes`` set and dividing N: that many nodes of N / nodes GPUs;
    4. neither set: one node of N GPUs;
    5. otherwise N cannot be laid out in whole nodes: ``output`` as written, and the header
       warns that the per-rank memory is for N.
    """
    parallel = parallel_of(results)
    if parallel.strategy == "none" or not parallel.world_size:
        return output.nodes, output.gpus_per_node, ""
    spec = results.get("spec")
    written = spec.get("output") if isinstance(spec, dict) else None
    return layout_for(parallel.world_size, output, written if isinstance(written, dict) else {})


def layout_for(world: int, output: OutputSpec, written: dict[str, Any]) -> tuple[int, int, str]:
    """``launch_layout`` for ``world`` ranks; ``written``: the spec's ``output`` as written
    (which of nodes / gpus_per_node it sets)."""
    nodes, gpus = output.nodes, output.gpus_per_node
    if world == nodes * gpus:
        return nodes, gpus, ""
    has_gpus, has_nodes = "gpus_per_node" in written, "nodes" in written
    asked = (f"output.nodes x output.gpus_per_node is {nodes} x {gpus} = {nodes * gpus}; "
             f"parallel.world_size {world} is launched")
    if has_gpus and world % gpus == 0:
        return world // gpus, gpus, f"{asked}, on {world // gpus} node(s) of {gpus} GPU(s) " \
                                    f"(output.gpus_per_node kept, nodes derived)"
    if has_gpus and world < gpus:
        return 1, world, f"{asked}, on 1 node using {world} of its {gpus} GPUs"
    if has_nodes and world % nodes == 0:
        return nodes, world // nodes, f"{asked}, on {nodes} node(s) of {world // nodes} " \
                                      f"GPU(s) (output.nodes kept, GPUs per node derived)"
    if not has_gpus and not has_nodes:
        return 1, world, f"{asked}, on 1 node of {world} GPUs (output sets neither)"
    return nodes, gpus, ""


def launch_output(results: dict[str, Any], output: OutputSpec) -> OutputSpec:
    """``output`` with the nodes and GPUs per node the launch scripts run (``launch_layout``):
    the batch plan, tuned.yaml's world size and the scripts all use it."""
    nodes, gpus, _ = launch_layout(results, output)
    if (nodes, gpus) == (output.nodes, output.gpus_per_node):
        return output
    return replace(output, nodes=nodes, gpus_per_node=gpus)


def _written_output(results: dict[str, Any]) -> OutputSpec | None:
    from autofit.errors import SpecError
    from autofit.spec import spec_from_dict

    try:
        return spec_from_dict(results.get("spec"), source="results.json:spec").output
    except SpecError:
        return None


def _parallel_note(results: dict[str, Any], plan: BatchPlan) -> str:
    """The header lines naming the tuned strategy and world size ("" for strategy none), and
    how the layout was derived from ``parallel.world_size`` (``launch_layout``)."""
    parallel = parallel_of(results)
    if parallel.strategy == "none":
        return ""
    tuned_world = parallel.world_size or plan.world_size
    lines = [f"Parallel: {parallel.strategy} over {plan.world_size} ranks (memory tuned per rank);",
             f"{PARALLEL_ENV_VAR} below tells the training script to wrap its model."]
    written = _written_output(results)
    why = launch_layout(results, written)[2] if written is not None else ""
    if why and tuned_world == plan.world_size:
        lines.append(f"Layout: {why}.")
    if tuned_world != plan.world_size:
        lines.append(f"WARNING: parallel.world_size {tuned_world} differs from the "
                     f"{plan.world_size} ranks launched here: the per-rank memory is for "
                     f"{tuned_world}; set output.nodes x output.gpus_per_node to lay "
                     f"{tuned_world} ranks out in whole nodes.")
    return comment(lines)


def _check_world(spec_output: OutputSpec, plan: BatchPlan) -> None:
    world = spec_output.nodes * spec_output.gpus_per_node
    if plan.world_size != world:
        raise ExportError(
            f"plan is for {plan.world_size} GPUs but the output spec has {spec_output.nodes} "
            f"node(s) x {spec_output.gpus_per_node} GPU(s) = {world}")


def _train_command(spec_output: OutputSpec, results: dict[str, Any] | None = None) -> str:
    if results is not None and not train_command_given(results, spec_output):
        return PLACEHOLDER_TRAIN_COMMAND
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
             "# AUTOFIT_TUNED_YAML with autofit.load_tuned: the same values)."]
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
    head = ""
    if train_command == PLACEHOLDER_TRAIN_COMMAND:
        head = comment(["No output.train_command in the spec: replace YOUR_TRAIN_SCRIPT.py below",
                        "with your training script and its arguments (it reads tuned.yaml or the",
                        "AUTOFIT_* variables), or set output.train_command and run autofit export."])
    return head + " \\\n".join(parts) + "\n"


def _indent(text: str) -> str:
    return "".join(f"    {line}" if line.strip() else line for line in text.splitlines(True))


def _optional(options: dict[str, Any], flags: Sequence[tuple[str, str]]) -> list[str]:
    """``flag + quoted value`` for each option the spec sets, in ``flags`` order."""
    return [f"{flag}{_directive_value(options[key])}" for key, flag in flags
            if options.get(key) is not None]


def _cpus_per_task(spec_output: OutputSpec) -> Any:
    cpus = spec_output.slurm.get("cpus_per_task")
    return cpus if cpus is not None else DEFAULT_CPUS_PER_GPU * spec_output.gpus_per_node


def _slurm_directives(results: dict[str, Any], spec_output: OutputSpec) -> tuple[list[str], list[str]]:
    """``#SBATCH`` directives, and notes on how Slurm reads them."""
    slurm = spec_output.slurm
    directives = [
        f"--job-name={slugify(str(slurm.get('job_name') or _spec_name(results)))}",
        f"--nodes={spec_output.nodes}",
        "--ntasks-per-node=1",
        f"--gres=gpu:{spec_output.gpus_per_node}",
        f"--cpus-per-task={_directive_value(_cpus_per_task(spec_output))}",
        *_optional(slurm, (("mem", "--mem="),)),
    ]
    notes: list[str] = []
    if slurm.get("cpus_per_task") is None:
        notes.append(f"--cpus-per-task: {DEFAULT_CPUS_PER_GPU} per GPU rank (no "
                     f"output.slurm.cpus_per_task in the spec; set it to the node's CPUs).")
    if slurm.get("time") is not None:
        time_text, time_notes = _slurm_time(slurm["time"])
        notes += time_notes
        directives.append(f"--time={time_text}")
    directives += _optional(slurm, (("partition", "--partition="), ("account", "--account=")))
    return directives, notes


def render_slurm(results: dict[str, Any], spec_output: OutputSpec, plan: BatchPlan) -> str:
    """An sbatch script: one task per node, each running ``torchrun`` with c10d rendezvous."""
    _check_world(spec_output, plan)
    directives, notes = _slurm_directives(results, spec_output)
    srun_env = (
        "# Slurm 22.05+ srun does not inherit --cpus-per-task from sbatch.\n"
        f"export SRUN_CPUS_PER_TASK={_directive_value(_cpus_per_task(spec_output))}\n"
    )
    run = _continued(
        "srun torchrun",
        _torchrun_args('"$SLURM_NNODES"', spec_output.gpus_per_node,
                       '"$MASTER_ADDR:$MASTER_PORT"', '"$SLURM_JOB_ID"'),
        _train_command(spec_output, results),
    )
    return (
        "#!/bin/bash\n"
        + "".join(f"#SBATCH {d}\n" for d in directives)
        + file_header(results, plan, "Slurm batch script", "slurm")
        + _dry_run(results)
        + _parallel_note(results, plan)
        + (comment(notes) if notes else "")
        + "set -euo pipefail\n\n"
        + env_block(results, plan)
        + "\n"
        + "MASTER_ADDR=\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | awk 'NR == 1')\"\n"
        + "export MASTER_ADDR\n"
        + _port_lines("SLURM_JOB_ID")
        + srun_env
        + "\n"
        + run
    )


def _lsf_launch(spec_output: OutputSpec, results: dict[str, Any]) -> str:
    """The torchrun line(s) of a bsub script: standalone, or one per host via blaunch."""
    gpus = spec_output.gpus_per_node
    train = _train_command(spec_output, results)
    if spec_output.nodes == 1:
        return _continued("torchrun", ["--standalone", f"--nproc_per_node={gpus}"], train)
    return (
        "# LSB_HOSTS names each host once per slot; keep the first occurrence of each.\n"
        "mapfile -t HOSTS < <(tr ' ' '\\n' <<< \"$LSB_HOSTS\" | awk 'NF && !seen[$0]++')\n"
        'MASTER_ADDR="${HOSTS[0]}"\n'
        "export MASTER_ADDR\n"
        + _port_lines("LSB_JOBID") + "\n"
        + _continued(
            'blaunch -z "${HOSTS[*]}" torchrun',
            _torchrun_args('"${#HOSTS[@]}"', gpus, '"$MASTER_ADDR:$MASTER_PORT"', '"$LSB_JOBID"'),
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
        + _dry_run(results)
        + _parallel_note(results, plan)
        + "set -euo pipefail\n\n"
        + env_block(results, plan)
        + "\n"
        + _lsf_launch(spec_output, results)
    )


def render_torchrun(results: dict[str, Any], spec_output: OutputSpec, plan: BatchPlan) -> str:
    """A plain bash script: ``torchrun --standalone`` on one node, c10d rendezvous on several."""
    _check_world(spec_output, plan)
    gpus = spec_output.gpus_per_node
    train = _train_command(spec_output, results)
    usage = [
        "Usage: single node:  bash torchrun.sh",
        f"       multi-node:   NNODES={max(spec_output.nodes, 2)} MASTER_ADDR=<first node> "
        "bash torchrun.sh   (on every node)",
    ]
    return (
        "#!/bin/bash\n"
        + file_header(results, plan, "torchrun launcher", "torchrun")
        + _dry_run(results)
        + _parallel_note(results, plan)
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
