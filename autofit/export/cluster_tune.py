"""Array jobs that measure each target GPU type on that GPU: ``slurm-tune`` and ``lsf-tune``.

Task 0 works on the spec's own study (``autofit worker SPEC``: it finishes at once when that
study is already tuned); task ``i`` (1..N) runs ``autofit worker SPEC --target NAME`` for the
spec's i-th target on a GPU of that type, in the target's own study, under the target's
memory. Every task uses the shared study storage from ``AUTOFIT_STORAGE``. Afterwards
``autofit results SPEC --storage "$AUTOFIT_STORAGE"`` writes targets.yaml with those rows
measured (and the name of the GPU that measured each) instead of predicted.

An array job has one partition (queue), so a target's ``partition`` is applied by the script
itself: run with ``bash`` (outside a job) it submits each task on its own partition; submitted
with ``sbatch`` / ``bsub <`` as a whole, every task runs on the default one. A password in the
storage URL is never written into the script: the URL is written without it and the nodes
take it from ``PGPASSWORD`` or ``~/.pgpass`` (libpq reads both).
"""

from __future__ import annotations

import shlex
from typing import Any

from autofit.export.common import ExportError, comment, slugify
from autofit.export.launchers import DEFAULT_CPUS_PER_GPU, layout_for
from autofit.export.provenance import Provenance
from autofit.spec import OutputSpec, SpecError, TargetSpec, spec_from_dict

TUNE_FILE_NAMES: dict[str, str] = {"slurm-tune": "tune_slurm.sh", "lsf-tune": "tune_lsf.sh"}
"""Format -> file name of the measuring array jobs (written only when asked for)."""

STORAGE_ENV = "AUTOFIT_STORAGE"
"""The environment variable the workers read the study storage from."""


def storage_without_password(url: str) -> tuple[str, bool]:
    """``(url without its password, whether it had one)``; a journal path is unchanged."""
    if "://" not in url:
        return url, False
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's ArgumentError and friends
        raise ExportError(f"--storage: not a database URL: {' '.join(str(exc).split())}") from None
    if parsed.password is None:
        return url, False
    return parsed._replace(password=None).render_as_string(hide_password=False), True


def task_gpus(results: dict[str, Any]) -> tuple[int, str]:
    """GPUs each task asks for, and the header line saying why ("" for one GPU).

    A ddp/fsdp spec's trials run one process per rank on one machine, one rank per GPU: a
    task asks for the job's world size, at most the GPUs of one node as the launch scripts
    lay the job out (``launchers.layout_for``); a world size above that is verified on the
    task's GPUs and predicted-only beyond them (the worker says so)."""
    try:
        spec = spec_from_dict(results.get("spec"), source="results.json:spec")
    except SpecError:
        return 1, ""
    strategies = [s for s in spec.parallel.strategies if s != "none"]
    if not strategies or spec.world_size <= 1:
        return 1, ""
    world = spec.world_size
    written = (results.get("spec") or {}).get("output")
    _, per_node, _ = layout_for(world, spec.output, written if isinstance(written, dict) else {})
    gpus = min(world, per_node)
    line = (f"Each task asks for {gpus} GPU(s): {'/'.join(strategies)} trials run one rank "
            f"per GPU on one node")
    if gpus < world:
        line += (f"; world size {world} spans nodes, so it is verified on {gpus} ranks and "
                 f"predicted-only at {world}")
    return gpus, line + "."


def _targets(results: dict[str, Any]) -> tuple[TargetSpec, ...]:
    try:
        targets = spec_from_dict(results.get("spec"), source="results.json:spec").targets
    except SpecError as exc:
        raise ExportError(f"results.json:spec does not validate: {str(exc).splitlines()[0]}") from None
    if not targets:
        raise ExportError("the spec has no targets: slurm-tune / lsf-tune run one worker per "
                          "target GPU type (add targets: [{name, memory, partition}] to the spec)")
    return targets


def _array(values: list[str]) -> str:
    return "(" + " ".join(shlex.quote(v) if v else "''" for v in values) + ")"


def _common(results: dict[str, Any], storage: str | None, targets: tuple[TargetSpec, ...],
            default_partition: str | None) -> tuple[str, str]:
    """(header comment, the variables block) shared by both schedulers."""
    spec_path = results.get("spec_path")
    url, had_password = storage_without_password(storage) if storage else (None, False)
    rows = [f"  task 0: the spec's own study (its device and budget; finishes at once when it "
            f"is tuned already), partition {default_partition or '(default)'}"]
    rows += [f"  task {i}: target {t.name} ({t.memory_text}), partition "
             f"{t.partition or default_partition or '(default)'}"
             for i, t in enumerate(targets, start=1)]
    lines = [
        *Provenance.from_results(results).lines(),
        "Measures each target GPU type on that GPU: one array task per target, each running",
        "`autofit worker --target NAME` in the target's own study under the target's memory.",
        *rows,
        f"Storage: {STORAGE_ENV} (the shared study database, e.g. PostgreSQL)"
        + (f"; default {url}" if url else "") + ".",
    ]
    if had_password:
        lines.append("The password of --storage is not written here: export PGPASSWORD (or use "
                     "~/.pgpass) where the tasks run.")
    if url and "://" not in url:
        lines.append("A journal file needs a file system shared by every node, with working "
                     "locks; PostgreSQL is the safer choice.")
    storage_line = (f': "${{{STORAGE_ENV}:={_shell_default(url)}}}"\n' if url else
                    f': "${{{STORAGE_ENV}:?export {STORAGE_ENV}=postgresql+psycopg://USER@HOST:'
                    f'5432/DB (the shared study; password from PGPASSWORD or ~/.pgpass)}}"\n')
    spec_line = (f'SPEC="${{AUTOFIT_SPEC:-{_shell_default(spec_path)}}}"\n' if spec_path else
                 'SPEC="${AUTOFIT_SPEC:?export AUTOFIT_SPEC=path/to/exp.yaml (the spec that '
                 'was tuned: same file, same hash)}"\n')
    block = (
        "set -euo pipefail\n\n"
        + spec_line
        + storage_line
        + f"export {STORAGE_ENV}\n"
        + "# per task: the target it measures ('' = the spec's own study), its partition\n"
        + f"TARGETS={_array([''] + [t.name for t in targets])}\n"
        + f"PARTITIONS={_array([default_partition or ''] + [t.partition or '' for t in targets])}\n"
    )
    return comment(lines), block


def _shell_default(value: str) -> str:
    """A value inside ``"${VAR:-...}"``: characters special there are backslash-escaped."""
    return "".join(f"\\{c}" if c in '"$`\\}' else c for c in value)


def _worker_lines(index_expr: str, id_expr: str) -> str:
    return (
        f"i={index_expr}\n"
        f'WORKER_ID={id_expr}\n'
        'if [ -z "${TARGETS[$i]}" ]; then\n'
        '    exec autofit worker "$SPEC" --storage "$AUTOFIT_STORAGE" --id "$WORKER_ID"\n'
        "fi\n"
        'exec autofit worker "$SPEC" --storage "$AUTOFIT_STORAGE" --device cuda \\\n'
        '    --target "${TARGETS[$i]}" --id "$WORKER_ID"\n'
    )


def _usage(submit_all: str, submit_each: str, more: str, spec_note: str) -> str:
    return comment([
        "Usage (where the scheduler runs; the spec file and the storage reachable from the nodes):",
        f"  {submit_each:<34} each task on its target's partition",
        f"  {submit_all:<34} every task on the default partition",
        f"  {more:<34} one more worker for task I (it joins that study)",
        "Then: autofit results SPEC --storage \"$AUTOFIT_STORAGE\" writes targets.yaml",
        "with these targets measured (status measured, measured_on: the GPU).",
        spec_note,
    ])


def render_slurm_tune(results: dict[str, Any], spec_output: OutputSpec,
                      storage: str | None = None) -> str:
    """An sbatch array: task 0 the spec's own study, task i the spec's i-th target."""
    targets = _targets(results)
    slurm = spec_output.slurm
    name = slugify(str(slurm.get("job_name") or (results.get("spec") or {}).get("name")
                       or "autofit")) + "-tune"
    header, block = _common(results, storage, targets, slurm.get("partition"))
    gpus, why = task_gpus(results)
    cpus = slurm.get("cpus_per_task") or DEFAULT_CPUS_PER_GPU * gpus
    directives = [f"--job-name={name}", f"--array=0-{len(targets)}", "--nodes=1", "--ntasks=1",
                  f"--gres=gpu:{gpus}", f"--cpus-per-task={shlex.quote(str(cpus))}",
                  f"--output={name}.%A_%a.out"]
    directives += [f"--{key}={shlex.quote(' '.join(str(slurm[key]).split()))}"
                   for key in ("time", "account", "partition") if slurm.get(key) is not None]
    return (
        "#!/bin/bash\n"
        + "".join(f"#SBATCH {d}\n" for d in directives)
        + comment(["Slurm array that measures each target GPU type, generated by `autofit "
                   "export results.json --format slurm-tune`."])
        + header
        + (comment([why]) if why else "")
        + _usage("sbatch tune_slurm.sh", "bash tune_slurm.sh", "sbatch --array=I tune_slurm.sh",
                 "AUTOFIT_SPEC: the spec file (default: the one results.json was tuned from).")
        + block
        + "\n"
        + 'if [ -z "${SLURM_JOB_ID:-}" ]; then\n'
        + "    # not inside a job: submit each task to its own partition\n"
        + '    for i in "${!TARGETS[@]}"; do\n'
        + '        sbatch --array="$i" ${PARTITIONS[$i]:+"--partition=${PARTITIONS[$i]}"} "$0"\n'
        + "    done\n"
        + "    exit 0\n"
        + "fi\n"
        + _worker_lines('"${SLURM_ARRAY_TASK_ID:?submit it as an array job: sbatch tune_slurm.sh}"',
                        '"${SLURM_ARRAY_JOB_ID}_${i}@$(hostname)"')
    )


def render_lsf_tune(results: dict[str, Any], spec_output: OutputSpec,
                    storage: str | None = None) -> str:
    """A bsub job array: element 1 the spec's own study, element i + 1 the i-th target."""
    targets = _targets(results)
    lsf = spec_output.lsf
    name = slugify(str(lsf.get("job_name") or (results.get("spec") or {}).get("name")
                       or "autofit")) + "-tune"
    header, block = _common(results, storage, targets, lsf.get("queue"))
    gpus, why = task_gpus(results)
    directives = [f'-J "{name}[1-{len(targets) + 1}]"', f"-n {gpus}",
                  f'-gpu "num={gpus}:mode=exclusive_process"']
    if gpus > 1:
        directives.append(f'-R "span[ptile={gpus}]"')
    directives += [f"{flag} {shlex.quote(' '.join(str(lsf[key]).split()))}"
                   for key, flag in (("queue", "-q"), ("walltime", "-W"), ("project", "-P"))
                   if lsf.get(key) is not None]
    directives += [f"-o {name}.%J.%I.out", f"-e {name}.%J.%I.err"]
    return (
        "#!/bin/bash\n"
        + "".join(f"#BSUB {d}\n" for d in directives)
        + comment(["LSF job array that measures each target GPU type, generated by `autofit "
                   "export results.json --format lsf-tune`. Array element I runs task I - 1."])
        + header
        + (comment([why]) if why else "")
        + _usage("bsub < tune_lsf.sh", "bash tune_lsf.sh",
                 f'bsub -J "{name}[I+1]" < tune_lsf.sh',
                 "AUTOFIT_SPEC: the spec file (default: the one results.json was tuned from).")
        + block
        + "\n"
        + 'if [ -z "${LSB_JOBID:-}" ]; then\n'
        + "    # not inside a job: submit each task to its own queue\n"
        + '    for i in "${!TARGETS[@]}"; do\n'
        + f'        bsub -J "{name}[$((i + 1))]" ${{PARTITIONS[$i]:+-q "${{PARTITIONS[$i]}}"}} < "$0"\n'
        + "    done\n"
        + "    exit 0\n"
        + "fi\n"
        + 'if [ "${LSB_JOBINDEX:-0}" -lt 1 ]; then\n'
        + '    echo "submit it as a job array: bsub < tune_lsf.sh (or bash tune_lsf.sh)" >&2\n'
        + "    exit 2\n"
        + "fi\n"
        + _worker_lines('$((LSB_JOBINDEX - 1))', '"${LSB_JOBID}_${LSB_JOBINDEX}@$(hostname)"')
    )
