"""The documentation's own examples: every `camelid` command in the fenced sh blocks of the README and of
docs/*.md either runs here, as written but for its placeholders (and smaller limits), or is listed below with
the reason it cannot run in a test."""

import io
import re
import shlex
import subprocess
import sys
import time

from camelid.cli import main

from conftest import REPO, shared_file

# Commands that need what a test cannot have: hours, a network, a trained model, an interactive terminal.
NOT_RUN = {
    "camelid serve": "a server that runs until stopped (tests/test_serve.py drives it)",
    "camelid pretrain": "minutes to hours of training (tests/test_pretrain.py trains small runs)",
    "camelid finetune": "minutes of training (tests/test_finetune.py, tests/test_preference.py)",
    "camelid rlhf": "minutes of sampling and training (tests/test_preference.py)",
    "camelid sweep": "20 trainings (tests cover sweeps on tiny runs)",
    "camelid self-instruct": "a model with a 4K context or a remote endpoint",
    "camelid answer": "models trained by the recipes above",
    "camelid judge": "a judge model behind an endpoint",
    "camelid data prepare ../shared/data/corpora/gutenberg": "63 MB of books: minutes (tests/test_data_prepare.py)",
    "camelid tokenizer train out/gutenberg": "the prepared Gutenberg corpus",
    "camelid data tokenize out/gutenberg": "the prepared Gutenberg corpus",
    "camelid generate out/shakespeare/run/model": "the model `camelid pretrain` writes",
    "camelid chat out/alpaca-demo/model": "the model `camelid finetune` writes",
    "camelid chat tinyllama": "a downloaded GGUF file",
    "camelid export out/my-model": "your own model",
    "camelid apply-delta ~/llama/7B": "Meta's LLaMA weights and LMSYS's delta (tests/test_meta_weights.py applies "
                                      "deltas to tiny models, against FastChat's own apply_delta)",
    "camelid apply-delta ~/llama/13B": "Meta's LLaMA weights and Berkeley's Koala diff (tests/test_koala_diff.py "
                                       "recovers a tiny LLaMA's, against EasyLM's own recovery)",
    "camelid chat out/vicuna-7b": "the model apply-delta writes",
    "camelid merge out/base": "an adapter `camelid finetune` writes (tests/test_lora.py merges them)",
    "camelid eval MODEL --suite leaderboard-v1": "ARC's files, which ../shared does not hold",
    "camelid leaderboard results/": "the results of the leaderboard suite",
}
SMALLER = [(r"--limit \d+", "--limit 4"), (r"--num 500", "--num 2")]


def readme_commands() -> list[str]:
    """The commands in page order, the README first; one that two pages show runs once."""
    commands = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```sh\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line.startswith("camelid ") and " ".join(line.split()) not in commands:
                    commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_is_run_or_says_why_not():
    commands = readme_commands()
    assert len(commands) > 20
    for command in commands:
        if not any(command.startswith(prefix) for prefix in NOT_RUN):
            assert command.split()[1] in RUNNABLE, f"a new README example: run it below or list it: {command}"


RUNNABLE = {"generate", "chat", "info", "estimate", "tokenizer", "data", "eval", "quantize", "convert"}


def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    shared_file("corpora/tinyshakespeare.txt")
    text = tmp_path / "wiki.txt"  # a slice of real text for the perplexity and calibration examples
    text.write_text(shared_file("corpora/wiki_demo.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    substitutions = {"MODEL": str(REPO / "models" / "stories260K"), "wiki.test.raw": str(text),
                     "data/*.txt": str(text)}
    ran = 0
    for command in readme_commands():
        if any(command.startswith(prefix) for prefix in NOT_RUN):
            continue
        words = [substitutions.get(w, w) for w in shlex.split(command)[1:]]
        words = [w.replace("out/", f"{tmp_path}/out/") if w.startswith("out/") else w for w in words]
        line = shlex.join(words)
        for pattern, smaller in SMALLER:
            line = re.sub(pattern, smaller, line)
        started = time.perf_counter()
        # in this process (an interpreter and torch started per command cost a minute over the page): the
        # command line's own entry point, stdin a chat's "/exit", cwd the repository
        monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
        code = main(shlex.split(line))
        err = capsys.readouterr().err
        fits = words[0] == "estimate" and code == 2  # `estimate` exits 2 for "does not fit"
        assert code == 0 or fits, f"{command}\n{err[-2000:]}"
        ran += 1
        print(f"{time.perf_counter() - started:5.1f} s  {line}")
    assert ran >= 12


def test_a_readme_command_runs_as_a_process():
    """The entry point as a shell runs it (the other commands run in the test's own process)."""
    proc = subprocess.run([sys.executable, "-m", "camelid", "generate", "models/stories260K", "Once upon a time",
                           "-n", "5", "--seed", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Once upon a time" in proc.stdout and "Traceback" not in proc.stderr
