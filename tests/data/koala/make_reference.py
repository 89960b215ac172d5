"""Writes koala_diff.easylm and recovered.easylm for tests/test_koala_diff.py with EasyLM's own scripts, the way
Berkeley published Koala and tells users to recover it (EasyLM's docs/koala.md): a tiny LLaMA in Meta's layout
and a tuned copy of it are converted to EasyLM's streaming format (models/llama/convert_torch_to_easylm.py),
their difference taken (scripts/diff_checkpoint.py, stored as bf16), and the base plus that diff recovered again
(--recover_diff). EasyLM is not part of camelid (it needs JAX and flax): with its repository at EASYLM (and
convert_torch_to_easylm.py from its history, before it became convert_hf_to_easylm.py), run

    PYTHONPATH=EASYLM:... python tests/data/koala/make_reference.py"""

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from test_koala_diff import meta_folder  # noqa: E402


def easylm(module: str, **flags):
    args = [f"--{k}={v}" for k, v in flags.items()]
    subprocess.run([sys.executable, "-m", module, *args], check=True)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, tuned = meta_folder(tmp / "llama"), meta_folder(tmp / "koala", tuned=True)
        for folder in (base, tuned):
            easylm("EasyLM.models.llama.convert_torch_to_easylm", checkpoint_dir=folder,
                   output_file=tmp / f"{folder.name}.easylm", streaming=True)
        easylm("EasyLM.scripts.diff_checkpoint", recover_diff=False, load_base_checkpoint=f"params::{tmp}/llama.easylm",
               load_target_checkpoint=f"params::{tmp}/koala.easylm", output_file=HERE / "koala_diff.easylm",
               streaming=True)
        easylm("EasyLM.scripts.diff_checkpoint", recover_diff=True, load_base_checkpoint=f"params::{tmp}/llama.easylm",
               load_target_checkpoint=f"params::{HERE}/koala_diff.easylm", output_file=HERE / "recovered.easylm",
               streaming=True)


if __name__ == "__main__":
    main()
