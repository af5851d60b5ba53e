"""Reading Detectron2's metrics.json when several runs appended to it, or one was killed mid-line."""
import json
import logging

import numpy as np
import pytest

from gn_detection.metrics_log import fresh_run_start, read_metrics
from gn_detection.report import final_metrics
from gn_detection.visualize import plot_loss_curve


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def losses(iteration, total):
    return json.dumps({"iteration": iteration, "total_loss": total, "loss_cls": total / 2})


def evaluation(iteration, ap):
    return json.dumps({"iteration": iteration, "bbox/AP": ap, "segm/AP": ap - 1})


def test_a_fresh_run_replaces_the_records_of_an_earlier_one(tmp_path):
    path = write_lines(tmp_path / "metrics.json", losses(19, 3.0), losses(39, 2.0), evaluation(39, 50.0),
                       losses(19, 2.9), losses(39, 1.5), evaluation(39, 60.0))
    records = read_metrics(path)
    assert [r.get("total_loss") for r in records] == [2.9, 1.5, None]
    assert final_metrics(path) == {"segm/AP": 59.0, "bbox/AP": 60.0}


def test_a_resumed_run_continues_the_records_it_resumed(tmp_path):
    # logged at 19, 39, 59, checkpointed at 49, killed, resumed: logs 59 again, then 79
    path = write_lines(tmp_path / "metrics.json", losses(19, 3.0), losses(39, 2.0), losses(59, 1.0),
                       losses(59, 1.1), losses(79, 0.9))
    assert [(r["iteration"], r["total_loss"]) for r in read_metrics(path)] == [(19, 3.0), (39, 2.0), (59, 1.1),
                                                                                (79, 0.9)]


def test_a_line_cut_short_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    # a run killed mid-write; the next run's first record is appended to the cut line
    path = write_lines(tmp_path / "metrics.json", losses(19, 3.0), losses(39, 2.0)[:20] + losses(19, 2.5),
                       losses(39, 1.5), evaluation(39, 60.0))
    with caplog.at_level(logging.WARNING):
        records = read_metrics(path)
    assert [r.get("total_loss") for r in records] == [3.0, 1.5, None]
    assert f"{path}, line 2 from byte 0: not a JSON record" in caplog.text
    assert final_metrics(path) == {"segm/AP": 59.0, "bbox/AP": 60.0}
    out = plot_loss_curve(path, str(tmp_path / "loss_curve.png"))
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000 and out.endswith("loss_curve.png")


def test_an_evaluation_written_after_later_losses_is_kept_with_them(tmp_path):
    # TEST.EVAL_PERIOD 50, writes every 20: Detectron2 writes the evaluation at 49 after the losses of 59
    path = write_lines(tmp_path / "metrics.json", losses(19, 3.0), losses(39, 2.0), losses(59, 1.5),
                       evaluation(49, 40.0), losses(79, 1.2), losses(99, 1.0), evaluation(99, 50.0))
    assert [r["iteration"] for r in read_metrics(path)] == [19, 39, 59, 49, 79, 99, 99]
    assert final_metrics(path) == {"segm/AP": 49.0, "bbox/AP": 50.0}


def test_a_fresh_run_after_a_final_evaluation_is_its_own(tmp_path):
    path = write_lines(tmp_path / "metrics.json", losses(19, 3.0), losses(39, 2.0), evaluation(39, 50.0),
                       losses(19, 2.5), evaluation(19, 30.0))
    assert [(r["iteration"], r.get("total_loss")) for r in read_metrics(path)] == [(19, 2.5), (19, None)]
    assert final_metrics(path) == {"segm/AP": 29.0, "bbox/AP": 30.0}


def test_a_fresh_run_after_a_shorter_one_is_read_from_where_it_began(tmp_path):
    # an earlier run of 2 iterations logged at 1; this fresh one logs first at 19, which looks like going on
    path = write_lines(tmp_path / "metrics.json", losses(1, 5.0))
    start = fresh_run_start(path, start_iter=0)
    assert start == len(losses(1, 5.0)) + 1 and fresh_run_start(path, start_iter=50) == 0  # resumed: continues
    with open(path, "a") as f:
        f.write(losses(19, 3.0) + "\n" + losses(39, 2.0) + "\n")
    assert [r["iteration"] for r in read_metrics(path)] == [1, 19, 39]  # the file alone cannot tell
    assert [r["iteration"] for r in read_metrics(path, start)] == [19, 39]
    assert fresh_run_start(str(tmp_path / "none.json"), start_iter=0) == 0


def test_a_start_that_is_no_byte_offset_is_named(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 0, "total_loss": 1.0}\n')
    for start in (-5, 1.5):
        with pytest.raises(ValueError, match=f"start must be a byte offset >= 0 into {path}, got {start}"):
            read_metrics(str(path), start)
    assert read_metrics(str(path), np.int64(0)) == [{"iteration": 0, "total_loss": 1.0}]  # numpy's, as os gives it
