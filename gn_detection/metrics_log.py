"""Reading Detectron2's ``metrics.json``: one JSON record per line, which every run in the same ``OUTPUT_DIR``
appends to (Detectron2 never truncates it)."""
import json
import logging
from typing import Dict, List

logger = logging.getLogger(__name__)


def read_metrics(metrics_json: str) -> List[Dict]:
    """The records of ``metrics_json`` as the latest run left them.

    A record whose iteration is below the one before it, or equal to it with a metric of it again, starts a
    new run (a fresh one at iteration 0, or a ``--resume`` from an earlier checkpoint): the records it
    overlaps, those at its iteration or later, are dropped, so a fresh run's curve is its own and a resumed run's continues the one it resumed. A line that
    is not JSON (cut short when a run was killed; the next run's first record is then glued to it) is skipped
    with a warning naming the file and line.
    """
    records: List[Dict] = []
    with open(metrics_json) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s, line %d: not a JSON record (a run killed while writing it?); skipped",
                               metrics_json, number)
                continue
            if records and _starts_a_run(record, records[-1]):
                records = [r for r in records if r.get("iteration", -1) < record["iteration"]]
            records.append(record)
    return records


def _starts_a_run(record: Dict, previous: Dict) -> bool:
    """Whether ``record`` goes back in iterations from ``previous``: to an earlier one, or to the same one with
    a metric ``previous`` has (evaluation results logged apart at the same iteration share none)."""
    if "iteration" not in record or "iteration" not in previous:
        return False
    shared_metrics = record.keys() & previous.keys() - {"iteration"}
    return record["iteration"] < previous["iteration"] or (record["iteration"] == previous["iteration"]
                                                          and bool(shared_metrics))
