"""Every bad input gives one clear line, a non-zero exit and no traceback."""

import json
import shutil
import subprocess
import sys

import pytest

from camelid.cli import main

from conftest import REPO, make_hf_model

MODEL = REPO / "models" / "stories260K"


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("camelid: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_path(capsys, tmp_path):
    assert_one_line_error(*run_cli(["generate", tmp_path / "nope", "hi"], capsys), "nope", "no such file")


def test_truncated_safetensors(capsys, tmp_path):
    shutil.copytree(MODEL, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert_one_line_error(*run_cli(["generate", tmp_path / "m", "hi"], capsys), "model.safetensors",
                          "corrupt or truncated")


def test_garbage_safetensors(capsys, tmp_path):
    shutil.copytree(MODEL, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\xff" * 64)
    assert_one_line_error(*run_cli(["generate", tmp_path / "m", "hi"], capsys), "corrupt or truncated")


def test_unknown_architecture(capsys, tmp_path):
    make_hf_model("gpt2", tmp_path)
    capsys.readouterr()  # transformers' own progress output
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(["generate", tmp_path, "hi"], capsys), "config.json", "'mamba'", "not supported")


def test_missing_config_key(capsys, tmp_path):
    make_hf_model("llama", tmp_path)
    capsys.readouterr()
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(["info", tmp_path], capsys), "config.json", "missing key 'hidden_size'")


def test_invalid_json_config(capsys, tmp_path):
    shutil.copytree(MODEL, tmp_path / "m")
    (tmp_path / "m" / "camelid.json").write_text('{"model": {,}')
    assert_one_line_error(*run_cli(["generate", tmp_path / "m", "hi"], capsys), "camelid.json:1: invalid JSON")


def test_unknown_key_in_camelid_config(capsys, tmp_path):
    shutil.copytree(MODEL, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "camelid.json").read_text())
    meta["model"]["n_layer"] = 3
    (tmp_path / "m" / "camelid.json").write_text(json.dumps(meta))
    assert_one_line_error(*run_cli(["generate", tmp_path / "m", "hi"], capsys), "unknown model config key 'n_layer'")


def test_shapes_do_not_match_config(capsys, tmp_path):
    shutil.copytree(MODEL, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "camelid.json").read_text())
    meta["model"]["dim"] = 128
    (tmp_path / "m" / "camelid.json").write_text(json.dumps(meta))
    assert_one_line_error(*run_cli(["generate", tmp_path / "m", "hi"], capsys), "has shape", "config needs")


def test_empty_prompt_without_bos(capsys):
    assert_one_line_error(*run_cli(["generate", MODEL, "--no-bos", ""], capsys), "prompt is empty")


@pytest.mark.parametrize("flag,value,needle", [("--temperature", "-1", "temperature must be >= 0"),
                                               ("--top-p", "1.5", "top_p must be in (0, 1]"),
                                               ("--top-k", "-3", "top_k")])
def test_invalid_sampling_flags(capsys, flag, value, needle):
    assert_one_line_error(*run_cli(["generate", MODEL, flag, value, "hi"], capsys), needle)


def test_prompt_longer_than_context(capsys, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("Once upon a time " * 300)
    assert_one_line_error(*run_cli(["generate", MODEL, "--file", prompt], capsys), "context is 512")
    # An explicit policy keeps the end of the prompt instead.
    assert main(["generate", str(MODEL), "--file", str(prompt), "--truncate-prompt", "left", "-n", "5"]) == 0


def test_unknown_preset_and_bad_device(capsys):
    assert_one_line_error(*run_cli(["info", "llama-8b"], capsys), "neither a model path nor a preset")
    assert_one_line_error(*run_cli(["generate", MODEL, "--device", "tpu", "hi"], capsys), "--device 'tpu'")
    assert_one_line_error(*run_cli(["generate", MODEL, "--dtype", "int3", "hi"], capsys), "--dtype 'int3'")


def test_convert_failure_leaves_nothing_behind(capsys, tmp_path):
    code, err = run_cli(["convert", MODEL, tmp_path / "out", "--template", "no-such-template"], capsys)
    assert_one_line_error(code, err, "unknown chat template")
    assert not (tmp_path / "out").exists()


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "camelid.cli", "generate", str(tmp_path / "missing"), "hi"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_serve_missing_model_and_bad_limits(capsys, tmp_path):
    assert_one_line_error(*run_cli(["serve", tmp_path / "nope"], capsys), "nope", "no such file")
    assert_one_line_error(*run_cli(["serve", MODEL, "--max-batch", "0"], capsys), "--max-batch must be >= 1")
