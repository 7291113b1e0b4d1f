"""Runs: the spec that fixes a run's predictions, its folder on disk, the fit cache, the chunk of users that is the
unit of work, and scoring a finished run.

Written once for every path that runs a method over users: the local evaluation (`tailor.eval.run_eval`), Ray
(`tailor.distributed`) and the server's fit (`tailor.serve`) all use these pieces, so they batch, save, resume and
score the same way.
"""

from tailor.runs.chunks import Chunk, pending_chunks, personalize_run, personalize_with_states, process_chunk
from tailor.runs.fits import ProgressFactory, fit_folder, fit_for_spec, fit_method
from tailor.runs.folder import Appender, RunConflict, open_run, read_predictions, run_lock
from tailor.runs.record import Run, RunDirError, load_run, write_run_report
from tailor.runs.scoring import finalize
from tailor.runs.spec import EvalSpec, RunUsers, eval_users, fit_users, run_users

__all__ = ["Appender", "Chunk", "EvalSpec", "ProgressFactory", "Run", "RunConflict", "RunDirError", "RunUsers",
           "eval_users", "finalize", "fit_folder", "fit_for_spec", "fit_method", "fit_users", "load_run", "open_run",
           "pending_chunks", "personalize_run", "personalize_with_states", "process_chunk", "read_predictions",
           "run_lock", "run_users", "write_run_report"]
