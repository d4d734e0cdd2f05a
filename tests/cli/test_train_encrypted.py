"""`gravel train-encrypted --json`: encrypted and plaintext accuracy on one split, epoch time."""

import json

import pytest

from gravel.cli.main import build_parser, run_command


def test_train_encrypted_json(capsys):
    assert run_command(["-q", "train-encrypted", "--data", "breast-cancer", "--epochs", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy_encrypted", "accuracy_plaintext", "epoch_s"):
        assert key in result
    assert abs(result["accuracy_encrypted"] - result["accuracy_plaintext"]) <= 0.02
    assert result["epochs"] == 2 and len(result["epoch_s_all"]) == 2
    assert result["refreshes"] == 1


def test_bad_arguments_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-encrypted", "--data", "mnist", "--epochs", "1"])
    assert "invalid choice" in capsys.readouterr().err
    assert run_command(["-q", "train-encrypted", "--data", "digits", "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
