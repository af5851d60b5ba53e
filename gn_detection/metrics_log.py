"""Reading Detectron2's ``metrics.json``: one JSON record per line, which every run in the same ``OUTPUT_DIR``
appends to (Detectron2 never truncates it)."""
import json
import logging
import numbers
import os
from typing import Dict, List

logger = logging.getLogger(__name__)


def read_metrics(metrics_json: str, start: int = 0) -> List[Dict]:
    """The records of ``metrics_json`` as the latest run left them, read from byte ``start`` on (where a fresh run
    began appending: the file's size before it, as :func:`fresh_run_start` gives it).

    A record with a metric already logged at its iteration or a later one starts a new run (a fresh one at
    iteration 0, or a ``--resume`` from an earlier checkpoint): the records it overlaps, those at its iteration
    or later, are dropped, so a fresh run's curve is its own and a resumed run's continues the one it resumed.
    (Records may go back in iterations within a run: Detectron2 writes an evaluation at iteration 249 after
    the losses of 259; they share no metric.) A line that is not JSON (cut short when a run was killed; the
    next run's first record is then glued to it) is skipped with a warning naming the file and line.
    """
    if not isinstance(start, numbers.Integral) or isinstance(start, bool) or start < 0:
        raise ValueError(f"start must be a byte offset >= 0 into {metrics_json}, got {start!r}")
    records: List[Dict] = []
    last_logged: Dict[str, int] = {}  # metric -> the latest iteration it was logged at, in the kept records
    with open(metrics_json, "rb") as f:
        f.seek(start)
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s, line %d from byte %d: not a JSON record (a run killed while writing it?); "
                               "skipped", metrics_json, number, start)
                continue
            iteration = record.get("iteration")
            if iteration is not None and any(last_logged.get(key, -1) >= iteration for key in record
                                             if key != "iteration"):
                records = [r for r in records if r.get("iteration", -1) < iteration]
                last_logged = {key: r["iteration"] for r in records for key in r if key != "iteration"}
            records.append(record)
            if iteration is not None:
                last_logged.update({key: iteration for key in record if key != "iteration"})
    return records


def fresh_run_start(metrics_json: str, start_iter: int) -> int:
    """Where a run starting at ``start_iter`` begins in ``metrics_json``: for a fresh run (iteration 0) the file's
    present size, so that an earlier run's records there (which may end before this one's first) are not taken
    for this one's; for a resumed run 0, as it continues the records before it."""
    return os.path.getsize(metrics_json) if start_iter == 0 and os.path.isfile(metrics_json) else 0
