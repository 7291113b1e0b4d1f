"""The cost model's arithmetic (docs/scaling.md section 3) on inputs whose answers are easy to check by hand."""

import json

from benchmarks.cost_model import Inputs, figures, from_ray


def test_figures_follow_the_formulas():
    x = Inputs("test", t_fit=3600.0, t_pers=3.0, t_pred=0.6, b_state=1000.0, e2=0.9, t_start=0.0)
    core_hours, workers, storage = figures(x, users=1e6, deadline_h=24.0, queries=1.0)
    assert core_hours == 1e6 * 3.6 / (3600 * 0.9)  # 1,111.1 core-hours
    assert workers == 49  # 1,111.1 core-hours in the 23 h the fit leaves
    assert storage == 1e9


def test_a_fit_longer_than_the_deadline_has_no_worker_count():
    x = Inputs("test", t_fit=30 * 3600.0, t_pers=1.0, t_pred=0.0, b_state=0.0, e2=None)
    assert figures(x, users=10.0, deadline_h=24.0, queries=1.0)[1] is None


def test_scaling_efficiency_comes_from_the_two_worker_run(tmp_path):
    metrics = {"task": "LaMP-3", "personalize_s_per_user": 2.0, "predict_s_per_query": 1.0}
    (tmp_path / "predictions.jsonl").write_text('{"a": 1}\n{"a": 22}\n')
    rows = [{"method": "rag", "workers": w, "users": 100, "users_per_s": speed, "startup_s": 5.0,
             "state_file_bytes": 300, "metrics": metrics, "run_dir": str(tmp_path)} for w, speed in ((1, 0.5), (2, 0.8))]
    path = tmp_path / "ray_scaling.json"
    path.write_text(json.dumps({"results": rows, "fit_s": {"rag": 0.0}}))
    x = from_ray(path)["rag"]
    assert abs(x.e2 - 0.8) < 1e-12 and x.t_start == 5.0 and x.b_state == 300
    assert x.b_row == 19 / 2  # two lines of 9 and 10 bytes
