"""Where metrics go: wandb (or a no-op stand-in) and a JSONL file beside the resume checkpoint.

Both use the optimizer step (`global_step` in a row) as their step. After a resume from step N the JSONL keeps only
the rows up to N and wandb rewinds the same run to N (`resume_from="{run_id}?_step=N"`), so both show one curve:
steps never go backwards, and no row logged after the resume is dropped.
"""
from __future__ import annotations

import json
import os

from trainer.spine.common import Logger, is_main_process


class NoOpWandb:
    """Stands in for wandb on ranks != 0 and without --use_wandb, so call sites need no `if wandb:`."""
    id = None

    def log(self, *a, **k):
        pass

    def finish(self, *a, **k):
        pass


def init_wandb(args, run_name: str, resume_id: str | None = None, resume_step: int | None = None):
    """A wandb run on rank 0 with --use_wandb. Resuming (resume_id given) rewinds that run to resume_step: W&B drops
    the rows logged after it (by the run that was interrupted) and the resumed rows continue from resume_step + 1.
    Rewind is a W&B server feature; where it is refused the run is continued instead (resume='allow'), and W&B then
    ignores rows whose step it has already seen (the JSONL metrics file still has them all)."""
    if not getattr(args, "use_wandb", False) or not is_main_process():
        return NoOpWandb()
    import wandb
    kw = dict(project=args.wandb_project, name=run_name, config=vars(args))
    if resume_id and resume_step is not None:
        try:
            return wandb.init(**kw, resume_from=f"{resume_id}?_step={resume_step}")
        except Exception as e:  # noqa: BLE001 - any refusal of the beta rewind API falls back to a plain resume
            Logger(f"wandb: rewinding run {resume_id} to step {resume_step} failed ({str(e)[:200]}); continuing the "
                   "run instead (rows it already has after that step are kept, the resumed ones for them ignored)")
    return wandb.init(**kw, id=resume_id, resume="allow" if resume_id else None)


class MetricsFile:
    """Appends every logged metrics row to a JSONL file next to the resume checkpoint (rank 0 only)."""

    def __init__(self, path: str | None):
        self.path = path if is_main_process() else None
        self._keep = None  # the truncation asked for, done by the first write
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Keep the rows up to optimizer step `step` (0: start a new file): a resumed run re-logs what followed.
        Done when the first row is written, so a run that fails before its first logged step leaves the previous
        run's file as it was."""
        self._keep = step

    def _truncate(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("global_step", 0) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if self.path:
            if self._keep is not None:
                self._truncate(self._keep)
                self._keep = None
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
