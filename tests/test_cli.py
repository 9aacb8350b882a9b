"""``python -m fxcurv inspect`` on a model of the user's own (``FILE.py:ATTR``, ``package.module:ATTR``):
loading, the input and target it derives, ``--json`` output checked against autograd, and one-line
errors with nonzero exit codes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fxcurv.__main__ import EXIT_UNSUPPORTED, EXIT_UNUSABLE, build_problem, main, make_parser
from fxcurv.errors import UnsupportedOpError
from fxcurv.networks import LossKind

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    def make_model():
        torch.manual_seed(3)
        return Net()

    instance = make_model()
    not_a_model = 42

    def broken():
        raise RuntimeError("no weights here")

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.a(x)
            return -self.a(x)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 3)

        def forward(self, x):
            return self.emb(x)

    class Identity(nn.Module):
        def forward(self, x):
            return x
''')


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_net.py"
    path.write_text(MODEL_SOURCE)
    return path


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main(["inspect", *argv, "--json", "--repeats", "0", "--dtype", "float64"])
    return code, json.loads(capsys.readouterr().out)


def test_json_of_a_model_in_a_file_matches_autograd(model_file, capsys):
    code, out = run_json(capsys, f"{model_file}:make_model", "--input-shape", "4,6", "-q", "diag_ggn")
    assert code == 0
    assert out["input"] == {"shape": [4, 6], "dtype": "float64"}
    assert out["target"] == {"shape": [4], "dtype": "int64"} and out["loss"] == "cross_entropy"
    assert out["parameters"] == 6 * 5 + 5 + 5 * 3 + 3 and out["unsupported"] == []
    # the CLI's numbers are the model's: recompute its batch (same seed) and the gradient with autograd
    spec = importlib.util.spec_from_file_location("user_net_for_the_reference", model_file)
    user_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user_net)
    model = user_net.make_model().double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    y = LossKind.CROSS_ENTROPY.target((4, 3), torch.float64, gen)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert out["loss_value"] == pytest.approx(loss.item(), rel=1e-12)
    for (name, _), g in zip(model.named_parameters(), grads):
        assert out["per_parameter"][name]["grad"] == pytest.approx(g.norm().item(), rel=1e-10)
        assert out["per_parameter"][name]["diag_ggn"] > 0
    program = out["program"]
    assert 0 < program["backward_nodes"] < program["nodes"] == len(program["node_records"])
    assert {r["name"] for r in program["node_records"]} >= {"x", "y"}
    assert any("grad" == r["kind"] for r in program["node_records"])
    assert out["memory"]["peak_bytes"] > 0 and out["memory"]["input_bytes"] > 0 and out["memory"]["at"]


@pytest.mark.parametrize("attr", ["Net", "instance", "make_model"])
def test_a_class_an_instance_or_a_factory_from_an_importable_module(model_file, monkeypatch, capsys, attr):
    monkeypatch.syspath_prepend(str(model_file.parent))
    monkeypatch.delitem(sys.modules, "user_net", raising=False)
    try:
        code, out = run_json(capsys, f"user_net:{attr}", "--input-shape", "2,6", "-q", "diag_ggn")
    finally:
        sys.modules.pop("user_net", None)  # imported from this test's directory only
    assert code == 0 and out["per_parameter"]["b.weight"]["shape"] == [3, 5]


def test_losses_derive_their_targets_from_the_output(model_file, capsys):
    code, out = run_json(capsys, f"{model_file}:Net", "--input-shape", "3,6", "--loss", "mse", "-q", "diag_ggn")
    assert code == 0 and out["target"] == {"shape": [3, 3], "dtype": "float64"} and out["loss"] == "mse"
    code, out = run_json(capsys, f"{model_file}:Net", "--input-shape", "3,6", "--loss", "bce_with_logits",
                         "-q", "diag_ggn")
    assert code == 0 and out["target"]["shape"] == [3, 3] and out["loss"] == "bce_with_logits"


def test_token_inputs_are_drawn_below_the_vocabulary(model_file):
    args = _parsed(f"{model_file}:Tokens", "--input-shape", "5,7", "--input-dtype", "long", "--vocab", "4",
                   "--loss", "mse")
    problem = build_problem(args)
    assert problem.x.shape == (5, 7) and problem.x.dtype == torch.int64
    assert 0 <= problem.x.min() and problem.x.max() < 4
    assert problem.y.shape == (5, 7, 3) and problem.y.dtype == torch.float32


def _parsed(*argv: str):
    return make_parser().parse_args(["inspect", *argv])


@pytest.mark.parametrize("argv, message", [
    (["{dir}/missing.py:make_model", "--input-shape", "2,6"], "model file not found"),
    (["{file}:nothing", "--input-shape", "2,6"], "has no attribute 'nothing'"),
    (["{file}:not_a_model", "--input-shape", "2,6"], "a int, not a torch.nn.Module"),
    (["{file}:broken", "--input-shape", "2,6"], "RuntimeError: no weights here"),
    (["{file}:Net"], "needs --input-shape"),
    (["{file}:Net", "--input-shape", "2,x"], "expected positive integers"),
    (["{file}:Net", "--input-shape", "2,7"], "fails on an input of shape (2, 7)"),
    (["{file}:Net", "--input-shape", "2,6", "--input-dtype", "long"], "give --vocab"),
    (["{file}:Identity", "--input-shape", "2,6", "--input-dtype", "long", "--vocab", "3"], "returns int64 values"),
    (["{file}:Net", "--input-shape", "2,6", "-q", "diag_gnn"], "unknown quantities ['diag_gnn']"),
    (["no_such_module_here:Net", "--input-shape", "2,6"], "module not found"),
    (["resnet19"], "unknown network 'resnet19'"),
])
def test_unusable_models_and_options_are_one_line_errors(model_file, capsys, argv, message):
    argv = [a.format(dir=model_file.parent, file=model_file) for a in argv]
    assert main(["inspect", *argv]) == EXIT_UNUSABLE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxcurv inspect: error: ") and message in err


def test_a_model_fxcurv_cannot_trace_exits_1(model_file, capsys):
    assert main(["inspect", f"{model_file}:Branchy", "--input-shape", "2,6"]) == EXIT_UNSUPPORTED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot trace the model" in err and "control flow" in err


def test_unsupported_nodes_are_listed_in_the_json(model_file, capsys, monkeypatch):
    """The error path for a model outside the vocabulary (simulated: with #9 every torch op has a rule)."""
    import fxcurv.__main__ as cli

    def refuse(*args, **kwargs):
        raise UnsupportedOpError("1 node(s) of the model are outside fxcurv's vocabulary:\n  ...")

    monkeypatch.setattr(cli, "compile", refuse)
    monkeypatch.setattr(cli, "unsupported_nodes", lambda traced: [
        "node 'a' (nn.Linear at a) is not supported by fxcurv (source: a: Linear(\n  in_features=6))"])
    code = main(["inspect", f"{model_file}:Net", "--input-shape", "2,6", "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_UNSUPPORTED
    out = json.loads(captured.out)
    assert out["unsupported"] == ["node 'a' (nn.Linear at a) is not supported by fxcurv"]
    assert out["exit_code"] == EXIT_UNSUPPORTED and captured.err.count("\n") == 1


def test_the_command_line_runs_as_a_module(model_file):
    """``python -m fxcurv`` end to end, in a process of its own: no traceback, the exit code."""
    done = subprocess.run([sys.executable, "-m", "fxcurv", "inspect", f"{model_file}:nothing", "--input-shape", "2,6"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == EXIT_UNUSABLE and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"fxcurv inspect: error: {model_file} has no attribute 'nothing'"
