"""Model files: entry-point rules and the one-line errors (exit 2) for each bad input."""

from __future__ import annotations

import textwrap

import pytest
from torch import nn

from fastgraph.core.errors import ModelError
from fastgraph.core.loading import load_model
from support import EXAMPLES, cli_error


def write(tmp_path, text, name="model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", ["resnet9.py", "resnet20.py", "preact_resnet20.py"])
def test_examples_load_through_build_model(name):
    assert isinstance(load_model(EXAMPLES / name), nn.Module)


def test_single_no_argument_class_is_the_entry(tmp_path):
    path = write(tmp_path, """
        from torch import nn
        class Block(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.conv = nn.Conv2d(c, c, 3)
        class Net(nn.Module):
            def __init__(self, width=8):
                super().__init__()
                self.block = Block(width)
    """)
    assert type(load_model(path)).__name__ == "Net"


def test_model_function_wins_over_classes_and_entry_overrides(tmp_path):
    path = write(tmp_path, """
        from torch import nn
        class A(nn.Module):
            pass
        class B(nn.Module):
            pass
        def model():
            return B()
    """)
    assert type(load_model(path)).__name__ == "B"
    assert type(load_model(path, entry="A")).__name__ == "A"


def test_two_files_with_the_same_name_do_not_collide(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write(tmp_path / "a", "from torch import nn\ndef model():\n    return nn.Linear(2, 3)\n")
    b = write(tmp_path / "b", "from torch import nn\ndef model():\n    return nn.Linear(4, 5)\n")
    assert load_model(a).out_features == 3 and load_model(b).out_features == 5


def test_missing_file(tmp_path, capsys):
    line = cli_error(capsys, "optimize", str(tmp_path / "nope.py"))
    assert "model file not found" in line and "nope.py" in line


@pytest.mark.parametrize("command", [["optimize"], ["train", "--recipe", "page2019"], ["export"], ["profile"],
                                     ["roofline"]])
def test_a_file_that_is_not_python_is_refused(tmp_path, capsys, command):
    path = write(tmp_path, "from torch import nn\ndef model():\n    return nn.Linear(2, 2)\n",
                 name="model.txt")
    line = cli_error(capsys, command[0], str(path), *command[1:])
    assert "not a Python file" in line and str(path) in line


@pytest.mark.parametrize("command", ["optimize", "train", "export", "profile", "roofline"])
def test_a_model_that_cannot_take_cifar_images_is_one_line(tmp_path, capsys, data_path, command):
    path = write(tmp_path, """
        from torch import nn
        def model():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(10, 10))
    """)
    extra = {"train": ["--recipe", "resnet20_seed_baseline", "--data", data_path],
             "roofline": ["--out", str(tmp_path / "roofline.png")],
             "export": ["--data", data_path, "--out", str(tmp_path / "out.onnx")]}.get(
        command, ["--data", data_path, "--out", str(tmp_path / "out")])
    line = cli_error(capsys, command, str(path), *extra)
    assert "the model fails on an input of shape" in line and "7200 and 10x10" in line


def test_syntax_error_names_the_line(tmp_path, capsys):
    path = write(tmp_path, "from torch import nn\n\ndef model(:\n    return nn.Linear(2, 2)\n")
    line = cli_error(capsys, "optimize", str(path))
    assert "syntax error" in line and "line 3" in line and str(path) in line


def test_import_error_names_the_line(tmp_path, capsys):
    path = write(tmp_path, "import torch\nx = 1\nraise RuntimeError('boom at import')\n")
    line = cli_error(capsys, "optimize", str(path))
    assert "line 3" in line and "boom at import" in line


def test_no_entry_point(tmp_path, capsys):
    path = write(tmp_path, """
        from torch import nn
        class Needs(nn.Module):
            def __init__(self, width):
                super().__init__()
    """)
    line = cli_error(capsys, "optimize", str(path))
    assert "no entry point" in line and "--entry" in line


def test_ambiguous_entry_point(tmp_path, capsys):
    path = write(tmp_path, """
        from torch import nn
        class A(nn.Module):
            pass
        class B(nn.Module):
            pass
    """)
    line = cli_error(capsys, "optimize", str(path))
    assert "ambiguous" in line and "A, B" in line


def test_unknown_entry(tmp_path, capsys):
    path = write(tmp_path, "from torch import nn\ndef model():\n    return nn.Linear(2, 2)\n")
    line = cli_error(capsys, "optimize", str(path), "--entry", "resnet")
    assert "'resnet'" in line and "model" in line


def test_constructor_raising_names_the_line(tmp_path, capsys):
    path = write(tmp_path, """
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, -8, 3)
    """)
    line = cli_error(capsys, "optimize", str(path))
    assert "constructing Net" in line and "line 6" in line


def test_entry_returning_no_module(tmp_path):
    path = write(tmp_path, "def model():\n    return 42\n")
    with pytest.raises(ModelError, match="returned int, not an nn.Module"):
        load_model(path)


def test_sys_exit_at_import_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where roofline.png would go
    path = write(tmp_path, """
        import sys
        sys.exit(3)
    """)
    line = cli_error(capsys, "roofline", str(path))
    assert str(path) in line and "exited while being imported (line 3)" in line, line
    assert "SystemExit(3)" in line and '__name__ == "__main__"' in line, line


def test_module_level_argparse_sees_the_file_alone(tmp_path):
    path = write(tmp_path, """
        import argparse
        import sys
        from torch import nn
        parser = argparse.ArgumentParser()
        parser.add_argument("--width", type=int, default=4)
        width = parser.parse_args().width
        seen = list(sys.argv)
        def build_model():
            return nn.Linear(width, len(seen))
    """)
    model = load_model(path)  # fastgraph's (here pytest's) arguments are not the file's
    assert (model.in_features, model.out_features) == (4, 1)


def test_argparse_refusing_at_import_ends_in_one_fastgraph_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, """
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("--lr", type=float, required=True)
        args = parser.parse_args()
    """)
    from fastgraph.cli.main import main

    assert main(["roofline", str(path)]) == 2
    err = capsys.readouterr().err
    assert "usage: fastgraph" not in err and "usage: model.py" in err, err  # argparse names the file
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastgraph: error: ") and str(path) in last and "(line 5)" in last, last
    assert "SystemExit(2)" in last and "argparse" in last, last


def test_constructor_calling_sys_exit_is_a_model_error(tmp_path):
    path = write(tmp_path, """
        import sys
        def build_model():
            sys.exit("no model today")
    """)
    with pytest.raises(ModelError, match=r"constructing build_model from .* exited \(line 4\)"):
        load_model(path)
