"""A small fork server: imports torch once, forks one fresh process per trial.

Each trial still runs in its own process (own allocator, own optimizer state, own crash),
but skips the ~2 s torch import. Unlike ``multiprocessing``'s forkserver it never re-imports
the caller's ``__main__``, so ``autofit.tune()`` works from any script or notebook.

Protocol, one JSON object per line. In: ``{"request", "result", "env", "sys_path"}``.
Out: ``{"pid": N}`` once forked, then ``{"pid": N, "exit": code}`` (negative = signal).
"""

from __future__ import annotations

import json
import os
import sys


def _serve() -> None:
    import torch  # noqa: F401  - the point of the server: pay the import once
    import torch._dynamo  # noqa: F401  - optimizers import it on construction (~2.5 s)
    import torch.utils.checkpoint  # noqa: F401

    import autofit.step  # noqa: F401
    import autofit.worker  # noqa: F401
    import autofit.zoo  # noqa: F401

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the trial process
            code = 1
            try:
                os.environ.update(job.get("env", {}))
                for entry in reversed(job.get("sys_path", [])):
                    if entry not in sys.path:
                        sys.path.insert(0, entry)
                sys.stdin.close()
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                # the trial's own output goes to its log; stdout here is the protocol
                log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                from autofit.worker import child_main

                child_main(job["request"], job["result"])
                code = 0
            finally:
                os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.write(json.dumps({"pid": pid, "exit": code}) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve()
