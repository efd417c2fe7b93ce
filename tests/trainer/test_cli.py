"""`python -m trainer.train`: bad input gives one message, exit code 2, no traceback, nothing written."""
from __future__ import annotations

import pytest

from tests.conftest import run_cli

GOOD = "model: tiny\nmethod: lora\nmax_steps: 2\n"
CASES = [
    ("missing config", None, [], "file not found"),
    ("empty config", "", [], "file is empty"),
    ("yaml syntax", "model: tiny\nmethod: [lora\n", [], "YAML syntax error"),
    ("unknown key", GOOD + "learning_rat: 0.1\n", [], "learning_rat: unknown key"),
    ("unknown method", "model: tiny\nmethod: qlora\n", [], "unknown method 'qlora'"),
    ("lr <= 0", GOOD + "learning_rate: 0\n", [], "learning_rate: Input should be greater than 0"),
    ("batch < 1", GOOD + "batch_size: 0\n", [], "batch_size: Input should be greater than or equal to 1"),
    ("wrong type", GOOD + "epochs: three\n", [], "epochs: Input should be a valid number"),
    ("bad override", GOOD, ["batch_size=-3"], "batch_size"),
    ("missing data", GOOD + "train_data: /nonexistent/x.jsonl\n", [], "/nonexistent/x.jsonl: data file not found"),
    ("unknown model", "model: no-such-model\nmethod: lora\n", [], "unknown model 'no-such-model'"),
    ("4-bit full", "model: tiny\nmethod: full\nquantization: 4bit\n", [],
     "method: method full trains the base weights, which cannot be 4bit (quantization); use method lora (QLoRA)"),
]


@pytest.mark.parametrize("name,text,overrides,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_message(tmp_path, name, text, overrides, message):
    config = tmp_path / "run.yaml"
    if text is not None:
        config.write_text(text and text + f"output_dir: {tmp_path / 'out'}\n")
    proc = run_cli(["-m", "trainer.train", str(config), *overrides, "--no-progress"])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_good_config_runs_and_prints_the_summary(tmp_path, tiny_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(GOOD + f"output_dir: {tmp_path / 'out'}\n")
    proc = run_cli(["-m", "trainer.train", str(config), "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert "eval loss:" in proc.stdout and (tmp_path / "out" / "model" / "adapter_config.json").is_file()
