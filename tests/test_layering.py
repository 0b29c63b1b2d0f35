"""The import layering of DESIGN.md §11: scripts/ and eval_llm.py -> trainer/ -> dataset/, model/ -> util/.

    python -m pytest tests/test_layering.py -q

model/ imports nothing of ours above it (so model_lora.py does not drag the training spine in), util/ imports
nothing of ours at all. Checked twice: statically over every import statement, and by importing model/'s modules in a
clean interpreter and listing which of our packages got loaded.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"util", "model", "dataset", "trainer", "scripts", "eval_llm", "tests"}
# package -> the packages of ours it may import
ALLOWED = {"util": {"util"}, "model": {"model", "util"}, "dataset": {"dataset", "model", "util"},
           "trainer": {"trainer", "dataset", "model", "util"}}


def imported_packages(path: Path, own: str) -> set[tuple[int, str]]:
    """(line, top-level package of ours) for every import in a file of package `own`; relative imports count as
    `own`. Imports inside functions count too (ast.walk)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [own] if node.level else [node.module or ""]
        else:
            continue
        found |= {(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in OURS}
    return found


def test_every_package_imports_only_what_lies_below_it():
    wrong = []
    for package, allowed in ALLOWED.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, package
        for f in files:
            wrong += [f"{f.relative_to(ROOT)}:{line} imports {pkg}" for line, pkg in imported_packages(f, package)
                      if pkg not in allowed]
    assert not wrong, "\n".join(wrong)


def test_static_check_sees_an_upward_import(tmp_path):
    # the checker itself: an upward import in a model/ file is reported with its line
    f = tmp_path / "probe.py"
    f.write_text("import torch\n\nfrom trainer.trainer_utils import UserError\nfrom .model_lora import LoRA\n\n"
                 "def late():\n    import dataset.lm_dataset\n")
    assert imported_packages(f, "model") == {(3, "trainer"), (4, "model"), (7, "dataset")}


def test_importing_model_loads_nothing_of_ours_above_it():
    code = ("import json, sys\n"
            "import model.model_lora, model.model_minimind, model.fast_generate, model.chat_format\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1])) & OURS
    assert loaded == {"model", "util"}, loaded
