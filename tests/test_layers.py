"""camelid's layers import downward only, and the model file knows nothing of kernels, files or servers."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "camelid"

# Each part of camelid by its layer: a module may import its own layer's and lower layers' modules only.
LAYERS = {"errors": 0, "files": 1, "model": 1, "families": 2, "tokenizer": 2, "data": 3, "formats": 3, "generate": 4, "info": 4,
          "quantize": 4, "train": 5, "chat": 6, "eval": 6, "serve": 6, "cli": 7, "__main__": 8}


def camelid_imports(path: Path) -> set[str]:
    """The camelid modules a file imports, at the top or inside functions, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "camelid":
            if node.module == "camelid":
                found.update(f"camelid.{a.name}" for a in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "camelid")
    return found


def _part(module: str) -> str:
    return module.split(".")[1]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downward(path):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    own = parts[0]
    if own == "__init__":
        return
    assert own in LAYERS, f"{own}: give it a layer in LAYERS"
    upward = {m for m in camelid_imports(path) if LAYERS[_part(m)] > LAYERS[own]}
    assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)} from a higher layer"


def test_the_model_file_imports_no_kernels_files_or_servers():
    imports = camelid_imports(PACKAGE / "model" / "transformer.py")
    # (camelid.errors: the exception type every layer raises, which config.py imports too)
    assert imports <= {"camelid.errors", "camelid.model.config", "camelid.model.dropout",
                       "camelid.model.kv_cache"}, imports
