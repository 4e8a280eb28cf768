"""Nothing loads pickles and nothing trusts remote code — checked statically over every module."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve"}


def _is_true(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(path: Path) -> list[str]:
    """`file:line what` for each pickle import/call, torch.load without weights_only=True, and
    trust_remote_code set to anything but the constant False."""
    bad = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            bad += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            bad.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            kw = {k.arg: k.value for k in node.keywords}
            func = ast.unparse(node.func)
            if func.endswith("torch.load") and not _is_true(kw.get("weights_only", ast.Constant(None))):
                bad.append(f"{where} {func}(...) without weights_only=True")
            if "trust_remote_code" in kw:
                value = kw["trust_remote_code"]
                if not (isinstance(value, ast.Constant) and value.value is False):
                    bad.append(f"{where} trust_remote_code={ast.unparse(value)}")
            if func in ("pd.read_pickle", "pandas.read_pickle", "np.load", "numpy.load") and not (
                func.endswith("np.load")
                and isinstance(kw.get("allow_pickle"), ast.Constant)
                and kw["allow_pickle"].value is False
            ):
                bad.append(f"{where} {func}(...) can unpickle")
    return sorted(bad, key=lambda b: int(b.split(":")[1].split()[0]))


def _modules() -> list[Path]:
    return sorted(
        p
        for d in ("tagtune", "stages", "flows", "bench")
        for p in (REPO / d).rglob("*.py")
        if "__pycache__" not in p.parts
    )


def test_no_pickle_no_unsafe_torch_load_no_remote_code():
    assert [b for p in _modules() for b in unsafe_calls(p)] == []


def test_model_loading_says_trust_remote_code_false():
    """The loaders pass trust_remote_code=False explicitly (a model's config cannot switch it on)."""
    text = (REPO / "tagtune" / "models.py").read_text()
    assert text.count("trust_remote_code=False") >= 2


def test_the_static_check_catches_each_kind(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import pickle\nimport torch\nfrom joblib import load\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\ntorch.load('x', weights_only=True)\n"
        "f(trust_remote_code=True)\nf(trust_remote_code=flag)\nf(trust_remote_code=False)\n"
        "pd.read_pickle('x')\n"
    )
    assert unsafe_calls(probe) == [
        "probe.py:1 imports pickle",
        "probe.py:3 imports from joblib",
        "probe.py:4 torch.load(...) without weights_only=True",
        "probe.py:5 torch.load(...) without weights_only=True",
        "probe.py:7 trust_remote_code=True",
        "probe.py:8 trust_remote_code=flag",
        "probe.py:10 pd.read_pickle(...) can unpickle",
    ]
