"""Bad input to the offline evaluation and training commands is one clear error naming the
file (and line), never a traceback from deep inside, and leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from safeserve.models.evaluation import cosa_eval as ce
from safeserve.models.evaluation import replay as rp


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "want a JSON object per line"),
    ("not json", "not JSON"),
    ('{"prompt": "hi", "allow": "violence", "expect": "answer"}', "'allow' must be a list"),
    ('{"prompt": "hi", "allow": [{"x": 1}], "expect": "answer"}', "'allow' must be a list"),
    ('{"prompt": 5, "allow": [], "expect": "answer"}', "want {prompt"),
])
def test_eval_cosa_jsonl_rows_are_checked(tmp_path, line, message):
    path = _write(tmp_path / "items.jsonl", '{"prompt": "ok", "allow": [], "expect": "answer"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        ce.load_cosa_jsonl(path)
    assert f"{path}:2" in str(err.value)


def test_eval_cosa_tsv_situation_must_be_a_number(tmp_path):
    path = _write(tmp_path / "t.tsv", "assignment\ttest spec\tprompt\tsituation\n"
                                      "a\tviolence\tHow do I win a fight?\tone\n")
    with pytest.raises(ValueError, match=r"row 1: want a 'situation' column holding 1, 2 or 3"):
        ce.load_cosa_tsv(path)


def test_eval_cosa_seen_configs_must_be_a_list(tmp_path):
    import typer
    from typer.testing import CliRunner

    from safeserve.models.evaluation.cosa_cli import register

    app = typer.Typer()
    register(app)
    data = _write(tmp_path / "items.jsonl", '{"prompt": "ok", "allow": [], "expect": "answer"}\n')
    seen = _write(tmp_path / "seen.json", "5")
    result = CliRunner().invoke(app, ["--base-url", "http://127.0.0.1:9/v1",
                                      "--model", "m", "--data", str(data), "--out",
                                      str(tmp_path / "o"), "--seen-configs", str(seen)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "want a JSON list of config names" in result.output
    assert not (tmp_path / "o").exists()


def test_judge_check_wants_the_human_labels(tmp_path):
    from safeserve.models.evaluation.judge_check import check_dir

    folder = tmp_path / "jc"
    folder.mkdir()
    _write(folder / "xstest_v2_completions_x.csv", "prompt,completion\nhi,hello\n")
    with pytest.raises(ValueError, match="no final_label column"):
        check_dir(folder)
    _write(folder / "xstest_v2_completions_x.csv", "prompt,completion,final_label\nhi,hello,\n")
    with pytest.raises(ValueError, match="no human-labelled completions"):
        check_dir(folder)


def test_compare_says_when_a_folder_is_not_a_safety_run(tmp_path):
    from safeserve.models.evaluation.report import compare_runs

    run = tmp_path / "cosa_run"
    run.mkdir()
    _write(run / "summary.json", json.dumps({"overall": {"cosa_score": 0.1}}))
    with pytest.raises(ValueError, match="is not an `eval safety` run"):
        compare_runs([run, run])


def test_replay_names_a_row_that_is_not_an_object(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write(run / "results.jsonl", "[1]\n")
    with pytest.raises(ValueError, match=r"results.jsonl:1: want a JSON object"):
        rp.load_safety_run(run, ("violence", "unsafe"))
    with pytest.raises(ValueError, match=r"results.jsonl:1: want a JSON object"):
        rp.run_requests(run)


def test_cosalign_prompt_categories_must_be_ids(tmp_path):
    from safeserve.models.cosalign.prompts import load_prompts

    path = _write(tmp_path / "p.jsonl", '{"prompt": "hi", "categories": [{"x": 1}]}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: want \{prompt: str, categories: \[ids\]\}"):
        load_prompts(path)


def test_a_folder_without_a_model_is_refused_before_anything_is_composed(tmp_path):
    from safeserve.models.head_check import served_model_for
    from safeserve.models.model_store import DEFAULT_HEAD_DIR

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model"):
        served_model_for(DEFAULT_HEAD_DIR, tmp_path / "empty")
