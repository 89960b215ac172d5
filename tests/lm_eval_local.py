"""lm-evaluation-harness's own task YAMLs (ARC, HellaSwag, MMLU, TruthfulQA) pointed at local files, with
the same questions in camelid's --data-dir layout: used by the agreement test and bench/eval_speed.py."""

import json
import re
import shutil
from pathlib import Path

import lm_eval
import torch
import yaml

from camelid.eval import data

from conftest import SHARED

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"

ARC = [("Which gas do plants take in to make food?", ["oxygen", "carbon dioxide", "nitrogen", "helium"], "B"),
       ("What is the boiling point of water at sea level?", ["50 C", "75 C", "100 C", "150 C"], "C"),
       ("Which tool measures temperature?", ["ruler", "thermometer", "scale", "clock"], "B"),
       ("What makes a shadow?", ["light blocked by an object", "sound", "wind"], "A"),
       ("Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars", "Jupiter"], "3"),
       ("What do bees make?", ["milk", "honey", "silk", "wax paper"], "2"),
       ("Which is a mammal?", ["shark", "frog", "whale", "trout"], "C"),
       ("What causes day and night?", ["the Moon", "Earth's rotation", "clouds", "the seasons"], "B")]


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def arc_rows(questions):
    rows = []
    for i, (q, choices, key) in enumerate(questions):
        labels = [str(n + 1) for n in range(len(choices))] if key.isdigit() else list("ABCDE"[:len(choices)])
        rows.append({"id": f"q{i}", "question": q, "answerKey": key, "choices": {"text": choices, "label": labels}})
    return rows


def write_local_tasks(root: Path, shots: dict, n_hellaswag: int = 8, n_mmlu: int = 6):
    """The same questions in camelid's --data-dir layout (hub-style JSONL, under root/data) and as lm-eval's
    own task YAMLs pointed at those files (root/tasks, task names prefixed local_)."""
    d = root / "data"
    hs = data.llamacpp_hellaswag(SHARED / "eval" / "hellaswag" / "hellaswag_val_full.txt.bz2")
    write_jsonl(d / "hellaswag" / "validation.jsonl", hs[:n_hellaswag])
    write_jsonl(d / "hellaswag" / "train.jsonl", hs[-12:])
    write_jsonl(d / "ARC-Easy" / "test.jsonl", arc_rows(ARC[:5]))
    write_jsonl(d / "ARC-Easy" / "train.jsonl", arc_rows(ARC[5:]))
    mm = SHARED / "eval" / "mmlu"
    subject = [r for r in data.mmlu(mm, "test") if r["subject"] == "abstract_algebra"]
    write_jsonl(d / "mmlu" / "all" / "test.jsonl", subject[:n_mmlu])
    write_jsonl(d / "mmlu" / "all" / "dev.jsonl", [r for r in data.mmlu(mm, "dev") if r["subject"] == "abstract_algebra"])
    write_jsonl(d / "truthfulqa" / "multiple_choice" / "validation.jsonl", data.truthfulqa(SHARED / "eval" / "truthfulqa")[:5])

    tasks = root / "tasks"

    def task_yaml(src: Path, name: str, files: dict, extra: str = "", drop=()):
        text = src.read_text()
        text = re.sub(r"^tag:\n(  - .*\n)*", "", text, flags=re.M)
        text = re.sub(r"^(dataset_path|dataset_name|task|tag|include|num_fewshot):.*\n", "", text, flags=re.M)
        for key in drop:
            text = re.sub(rf"^{key}:.*\n", "", text, flags=re.M)
        kwargs = json.dumps({"data_files": {k: str(v) for k, v in files.items()}})
        folder = tasks / name
        folder.mkdir(parents=True)
        for helper in src.parent.glob("utils.py"):
            shutil.copy(helper, folder / "utils.py")
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs: {kwargs}\n"
                                              f"num_fewshot: {shots[name]}\n{extra}{text}")

    task_yaml(LM_EVAL_TASKS / "arc" / "arc_easy.yaml", "arc_easy",
              {"train": d / "ARC-Easy/train.jsonl", "test": d / "ARC-Easy/test.jsonl"}, drop=("validation_split",))
    task_yaml(LM_EVAL_TASKS / "hellaswag" / "hellaswag.yaml", "hellaswag",
              {"train": d / "hellaswag/train.jsonl", "validation": d / "hellaswag/validation.jsonl"})
    template = (LM_EVAL_TASKS / "mmlu" / "default" / "_default_template_yaml").read_text()
    subject = (LM_EVAL_TASKS / "mmlu" / "default" / "mmlu_abstract_algebra.yaml").read_text()
    description = "description: " + json.dumps(yaml.safe_load(subject)["description"])
    mmlu_src = tasks / "mmlu_src.yaml"
    tasks.mkdir(exist_ok=True)
    mmlu_src.write_text(template + "\n" + description + "\n")
    task_yaml(mmlu_src, "mmlu_abstract_algebra",
              {"test": d / "mmlu/all/test.jsonl", "dev": d / "mmlu/all/dev.jsonl"}, drop=("validation_split",))
    mmlu_src.unlink()
    tqa = {"validation": d / "truthfulqa/multiple_choice/validation.jsonl"}
    mc1 = (LM_EVAL_TASKS / "truthfulqa" / "truthfulqa_mc1.yaml").read_text()
    mc2 = (LM_EVAL_TASKS / "truthfulqa" / "truthfulqa_mc2.yaml").read_text()
    task_yaml(LM_EVAL_TASKS / "truthfulqa" / "truthfulqa_mc1.yaml", "truthfulqa_mc1", tqa)
    mc2_full = tasks / "mc2_src" / "utils.py"
    mc2_full.parent.mkdir()
    shutil.copy(LM_EVAL_TASKS / "truthfulqa" / "utils.py", mc2_full)
    (mc2_full.parent / "truthfulqa_mc2.yaml").write_text(
        re.sub(r"^include:.*\n", "", mc1) + "\n" + re.sub(r"^(include|task):.*\n", "", mc2, flags=re.M))
    task_yaml(mc2_full.parent / "truthfulqa_mc2.yaml", "truthfulqa_mc2", tqa)
    shutil.rmtree(mc2_full.parent)
    for path in tasks.rglob("*.yaml"):  # our task names must not collide with the built-in ones
        path.write_text(path.read_text().replace("task: ", "task: local_", 1))
    return d, tasks


def run_lm_eval(hf_folder: Path, tasks: Path, names, add_bos: bool | None = False, batch_size: int = 1):
    """add_bos None: lm-eval's default, the tokenizer's own special tokens (T5's EOS after a context)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = f"pretrained={hf_folder},dtype=float32" + ("" if add_bos is None else f",add_bos_token={add_bos}")
    out = simple_evaluate(model="hf", model_args=args, tasks=[f"local_{t}" for t in names], batch_size=batch_size,
                          device="cpu", log_samples=True, task_manager=TaskManager(include_path=str(tasks)))
    return out


def tiny_gpt2(folder: Path, n_positions: int = 128, **sizes):
    """A random GPT-2 with the real GPT-2 tokenizer: byte-level BPE, no BOS (EOS stands in for it)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(**{"n_embd": 32, "n_layer": 2, "n_head": 4, **sizes}, n_positions=n_positions, vocab_size=50257)
    model = tf.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    shutil.copy(SHARED / "tokenizers" / "gpt2_tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
