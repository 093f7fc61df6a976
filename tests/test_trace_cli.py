"""``monetdsl trace`` on the command line: output, errors without tracebacks, shipped specs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import monetdsl
from monetdsl.cli import main
from monetdsl.commands.trace import parse_input
from monetdsl.errors import MonetError
from monetdsl.grammar import load_spec
from monetdsl.models.shipped import SHIPPED
from monetdsl.validate import validate_spec

ROOT = Path(__file__).resolve().parent.parent


def test_trace_writes_a_spec_that_check_accepts(tmp_path, capsys):
    out = tmp_path / "small.monet"
    assert main(["trace", "monetdsl.models:small_cnn", "--input", "4x3x32x32", "--device", "cpu", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    text = out.read_text()
    assert text.startswith("# small_cnn: one training step traced by monetdsl trace")
    assert "# costs: roofline on cpu" in text
    assert main(["check", str(out)]) == 0


def test_trace_to_stdout_and_json(tmp_path, capsys):
    assert main(["trace", "monetdsl.models:tiny_gpt", "--input", "2x64:i64", "--optimizer", "sgd"]) == 0
    text = capsys.readouterr().out
    assert "network tiny_gpt" in text and "op h.0.attn.sdpa" in text and "fixed optimizer" not in text
    assert main(["trace", "monetdsl.models:tiny_gpt", "--input", "2x64:i64", "--json", "-o", str(tmp_path / "g.monet")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["forward_ops"] > 20 and data["cost_model"].startswith("roofline on P100")


@pytest.mark.parametrize(
    "argv,message,status",
    [
        (["trace", "no_such_package.models:net", "--input", "2x3"], "cannot import no_such_package.models", 1),
        (["trace", "monetdsl.models:no_such_model", "--input", "2x3"], "has no attribute no_such_model", 1),
        (["trace", "monetdsl.models", "--input", "2x3"], "package.module:factory", 2),
        (["trace", "monetdsl.models:small_cnn", "--input", "2by3"], "write a shape", 2),
        (["trace", "monetdsl.models:small_cnn", "--input", "2x3x32x32:q8"], "unknown dtype", 2),
        (["trace", "monetdsl.models:small_cnn", "--input", "2x3x32x32", "--device", "TPU"], "unknown device", 2),
        (["trace", "monetdsl.models:small_cnn", "--input", "2x3x32x32", "--optimizer", "lamb"], "unknown optimizer", 2),
        (["trace", "monetdsl.models:small_cnn", "--input", "2x5x32x32"], "fails on these inputs: RuntimeError: Given groups=1", 1),
        (["trace", "monetdsl.models:SHIPPED", "--input", "2x3"], "not a torch.nn.Module", 1),
    ],
)
def test_errors_are_one_readable_line(argv, message, status, capsys):
    """A model or target that does not work is invalid input (1); a flag spelled wrong is a usage error (2)."""
    assert main(argv) == status
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_graph_break_through_the_cli(tmp_path, capsys, monkeypatch):
    (tmp_path / "breaky.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        print('side effect')\n"
        "        return self.fc(x)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["trace", "breaky:Net", "--input", "2x4"]) == 1
    err = capsys.readouterr().err
    assert "graph break" in err and "Traceback" not in err


def test_loss_options(tmp_path, capsys, monkeypatch):
    (tmp_path / "losses.py").write_text("def l1(out):\n    return out.abs().mean()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["trace", "monetdsl.models:small_cnn", "--input", "2x3x32x32"]
    assert main(base + ["--loss", "mse"]) == 0
    assert "loss.pow" in capsys.readouterr().out
    assert main(base + ["--loss", "losses:l1"]) == 0
    out = capsys.readouterr().out
    assert "loss.abs" in out and "loss l1" in out
    assert main(base + ["--loss", "none"]) == 1
    assert "needs a model that returns a scalar" in capsys.readouterr().err


def test_records_give_the_runtime_what_it_needs():
    from monetdsl import models
    from monetdsl.costs import trace_model

    result = trace_model(models.small_cnn(), [(2, 3, 32, 32)])
    pool = result.ops["pool1"]
    assert pool.kind.name == "max_pool2d" and pool.binding.attrs["kernel"] == (2, 2)
    assert pool.role_names["x"] == "relu1" and pool.role_names["window"] == "pool1.window"
    assert result.ops["fc"].kind.name == "matmul" and result.ops["loss.cross_entropy"].kind.name == "cross_entropy"


def test_parse_input():
    assert parse_input("184x3x224x224") == ((184, 3, 224, 224), torch.float32)
    assert parse_input("8x1024:i64") == ((8, 1024), torch.int64)
    with pytest.raises(MonetError):
        parse_input("8x")


def test_top_level_api_returns_the_ir():
    from monetdsl import models

    spec = monetdsl.trace(models.small_cnn(), [(2, 3, 32, 32)], device="cpu")
    assert isinstance(spec, monetdsl.Spec)
    assert spec.network.outputs == ("loss.cross_entropy",)
    assert spec.source.startswith("# small_cnn")


def test_command_line_entry_point_runs_without_torch_for_check():
    """`monetdsl check` does not import torch (the tracer is imported only by `trace`)."""
    code = "import sys, monetdsl.cli; monetdsl.cli.main(['check', 'specs/tiny_chain.monet']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip().endswith("False"), out.stderr


@pytest.mark.parametrize("entry", [e for e in SHIPPED if e.device == "cpu"], ids=lambda e: e.name)
def test_small_shipped_specs_are_up_to_date(entry):
    sys.path.insert(0, str(ROOT / "scripts"))
    from regenerate_specs import trace_text

    text, _ = trace_text(entry)
    assert (ROOT / "specs" / entry.filename).read_text() == text


@pytest.mark.slow
@pytest.mark.parametrize("entry", [e for e in SHIPPED if e.device != "cpu"], ids=lambda e: e.name)
def test_large_shipped_specs_are_deterministic_and_valid(entry):
    sys.path.insert(0, str(ROOT / "scripts"))
    from regenerate_specs import trace_text

    first, _ = trace_text(entry)
    second, _ = trace_text(entry)
    assert first == second
    assert (ROOT / "specs" / entry.filename).read_text() == first
    spec = load_spec(ROOT / "specs" / entry.filename)
    validate_spec(spec)
    assert main(["check", str(ROOT / "specs" / entry.filename)]) == 0


def test_a_file_path_as_target_gets_the_module_form(capsys):
    assert main(["trace", "/tmp/somewhere/models.py:Net", "--input", "2x4"]) == 2
    err = capsys.readouterr().err
    assert "run from /tmp/somewhere" in err and "write models:Net" in err and "Traceback" not in err
