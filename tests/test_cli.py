"""The `sandbox` command's cheap subcommands (no Ray)."""

from __future__ import annotations

import json

from sandbox_service import cli


def test_model_json_reports_the_paper_count(capsys):
    assert cli.main(["model", "minicpm-2.4b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["non_embedding_params"] == 2_442_057_984
    assert info["d_model"] == 2304 and info["n_layers"] == 40


def test_model_list_and_unknown_name(capsys):
    assert cli.main(["model", "--list"]) == 0
    assert "minicpm-1.2b" in capsys.readouterr().out
    assert cli.main(["model", "gpt-5"]) == 2
    assert "gpt-5" in capsys.readouterr().err


def test_coordcheck_writes_its_plot(tmp_path, capsys):
    out = tmp_path / "coord.png"
    args = ["coordcheck", "--widths", "32", "64", "--steps", "1", "--out", str(out)]
    assert cli.main(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "mup: slope" in printed and "sp: slope" in printed


def test_plan_prints_the_paper_count(tmp_path, capsys):
    spec = tmp_path / "pretrain.yaml"
    spec.write_text(
        "name: p\nmodel: {preset: minicpm-2.4b}\nlr: 0.01\nglobal_batch_tokens: 3932160\n"
        "seq_len: 4096\ntokens: 1.1e12\nmicro_batch_size: 4\n"
        "scaling: {num_workers: 120, use_gpu: true}\n"
    )
    assert cli.main(["plan", str(spec)]) == 0
    assert "2,442,057,984" in capsys.readouterr().out
