"""Bad input to any ``vidrec`` command: one line naming the input, exit status 2, no
traceback (``--debug`` or ``VIDREC_DEBUG=1`` shows it). In-process calls: seconds in all."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONFIGS

import vidrec_cli
from finetune.tables import InteractionFileError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty.yaml").write_text("")
    (root / "a_directory").mkdir()
    (root / "wrong_format.yaml").write_bytes(b"\x00\xffPK\x03\x04 not text, not yaml\x01")
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\n")
    (root / "items.jsonl").write_text("")
    return {
        "missing": root / "missing.yaml",
        "empty": root / "empty.yaml",
        "directory": root / "a_directory",
        "wrong_format": root / "wrong_format.yaml",
    }


# Each subcommand with its input in place of {}; outputs go beside the inputs.
COMMANDS = {
    "shards build": ["shards", "build", "--manifest", "{}", "--out", "{out}"],
    "shards merge-index": ["shards", "merge-index", "{}"],
    "shards inspect": ["shards", "inspect", "{}"],
    "shards stream": ["shards", "stream", "{}", "--workers", "0"],
    "pretrain": ["pretrain", "--config", "{}"],
    "finetune": ["finetune", "--config", "{}"],
    "export": ["export", "--checkpoint", "{}", "--out", "{out}"],
    "embed": ["embed", "--model", "{}", "--text", "a query", "--out", "{out}.parquet"],
    "recommend": ["recommend", "--model", "{}", "--users", "user_1"],
}
# A value of the wrong type: in a config (pretrain, finetune) or an option.
WRONG_TYPES = {
    "pretrain": ["pretrain", "--config", str(CONFIGS / "tiny.yaml"), "--set", "train.steps=many"],
    "finetune": [
        "finetune", "--config", str(CONFIGS / "finetune_tiny.yaml"), "--set", "train.steps=many"
    ],
    "shards stream": ["shards", "stream", "{}", "--batch-size", "many"],
    "shards inspect": ["shards", "inspect", "{}", "--decode", "many"],
    "embed": ["embed", "--model", "{}", "--text", "q", "--out", "{out}", "--batch-size", "many"],
    "recommend": ["recommend", "--model", "{}", "--users", "u", "--top-k", "many"],
}  # fmt: skip


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """Exit status, the lines vidrec printed about the error (log lines aside), all stderr."""
    try:
        status = vidrec_cli.main(argv)
    except SystemExit as stop:  # argparse refuses an option value
        status = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("vidrec", "usage:"))]
    return status, [line for line in lines if not line.startswith("usage:")], err


@pytest.mark.parametrize("kind", ["missing", "empty", "directory", "wrong_format"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_input_gets_one_line_naming_it(command, kind, inputs, tmp_path, capsys):
    given = inputs[kind]
    argv = [a.format(given, out=tmp_path / "out") for a in COMMANDS[command]]
    status, lines, err = run_cli(argv, capsys)
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vidrec {command}: ")
    assert str(given) in lines[0], lines[0]


@pytest.mark.parametrize("command", list(WRONG_TYPES))
def test_a_value_of_the_wrong_type_is_named(command, inputs, tmp_path, capsys):
    argv = [a.format(inputs["directory"], out=tmp_path / "out") for a in WRONG_TYPES[command]]
    status, lines, err = run_cli(argv, capsys)
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert "'many'" in lines[0]
    assert ("train.steps" in lines[0]) or ("--" in lines[0]), lines[0]  # the field or option


def finetune_argv(inputs) -> list[str]:
    """A finetune command whose config loads (the stage itself is replaced in the tests)."""
    root = inputs["empty"].parent
    data = [f"data.interactions={root / 'interactions.csv'}", f"data.shards=[{root}]"]
    data.append(f"data.catalogue={root / 'items.jsonl'}")
    argv = ["finetune", "--config", str(CONFIGS / "finetune_tiny.yaml")]
    for item in data + [f"train.output_dir={root / 'out'}"]:
        argv += ["--set", item]
    return argv


def test_errors_raised_inside_a_stage_get_one_line_and_debug_shows_the_traceback(
    inputs, monkeypatch, capsys
):
    """What a rank raises about its data (here the finetune tables) is reported like the rest;
    ``--debug`` and ``VIDREC_DEBUG`` let it through."""
    from finetune import train

    def bad_data(config):
        raise InteractionFileError("interactions.csv, row 3, column timestamp: not a time")

    monkeypatch.setattr(train, "run", bad_data)
    argv = finetune_argv(inputs)
    status, lines, err = run_cli(argv, capsys)
    assert status == 2 and "Traceback" not in err
    assert lines == ["vidrec finetune: interactions.csv, row 3, column timestamp: not a time"]
    with pytest.raises(InteractionFileError):
        vidrec_cli.main(["--debug", *argv])
    monkeypatch.setenv("VIDREC_DEBUG", "1")
    with pytest.raises(InteractionFileError):
        vidrec_cli.main(argv)


def test_a_bug_keeps_its_traceback(inputs, monkeypatch):
    from finetune import train

    def bug(config):
        raise KeyError("a bug, not an input")

    monkeypatch.setattr(train, "run", bug)
    with pytest.raises(KeyError):
        vidrec_cli.main(finetune_argv(inputs))


@pytest.mark.parametrize("depth", ["the directory", "a parent"])
@pytest.mark.parametrize("command", ["shards build", "shards synth"])
def test_an_output_directory_that_is_a_file_is_named(command, depth, tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"video": "clip.mp4", "caption": "a clip"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    out = a_file if depth == "the directory" else a_file / "shards"
    argv = {
        "shards build": ["shards", "build", "--manifest", str(manifest), "--out", str(out)],
        "shards synth": ["shards", "synth", "--out", str(out), "--items", "4", "--users", "2"],
    }[command]
    status, lines, err = run_cli(argv, capsys)
    assert status == 2 and "Traceback" not in err, err
    where = "" if out == a_file else f"{out}: "
    assert lines == [f"vidrec {command}: {where}{a_file} is a file, not a directory"]
    assert a_file.read_text() == "not a directory"
