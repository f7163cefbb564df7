"""The ``sj-sfn`` command end to end on digits, every user-error path, and ``--help`` everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sj_sfn import cli, zoo
from sj_sfn.io import converted_data_config

SUBCOMMANDS = ["demo", "convert", "eval", "tune", "info", "theorem"]


def _run(*argv: str, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "sj_sfn.cli", *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def _main_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process, expect exit code 2 and exactly one line on stderr; return it."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert err, "no reason printed"
    return err[-1]


@pytest.fixture(scope="session")
def cli_checkpoint(tmp_path_factory, cnn_digits_model):
    path = tmp_path_factory.mktemp("cli") / "cnn.pth"
    torch.save(cnn_digits_model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("cmd", [None, *SUBCOMMANDS])
def test_help(cmd, capsys):
    argv = ["--help"] if cmd is None else [cmd, "--help"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sj-sfn" + ("" if cmd is None else f" {cmd}"))
    if cmd is None:
        assert all(c in out for c in SUBCOMMANDS)


@pytest.mark.slow
def test_convert_eval_tune_end_to_end(tmp_path, cli_checkpoint, cnn_digits_model, cnn_digits_splits):
    snn_path, conv_json = tmp_path / "snn.pth", tmp_path / "convert.json"
    r = _run("convert", "zoo:digits_cnn", "--checkpoint", cli_checkpoint, "--data", "digits", "--tune", "--trials", "3", "--bounds", "0.5", "2",
             "--out", str(snn_path), "--json", str(conv_json), "--plot", str(tmp_path / "lam.png"), "--eval", "--quiet")
    assert r.returncode == 0, r.stderr
    conv = json.loads(conv_json.read_text())
    assert conv["tuned"] and 0.5 <= conv["lam"] <= 2 and conv["sites"] == 3  # λ scales the energy-budget steps
    ann_acc = zoo.accuracy(cnn_digits_model, cnn_digits_splits.loader("test", 256))
    assert conv["ann_accuracy"] == pytest.approx(ann_acc, abs=1e-9)
    assert conv["snn_accuracy"] > ann_acc - 10 and 0 < conv["energy_ratio"] < 2
    assert (tmp_path / "lam.png").read_bytes()[:4] == b"\x89PNG"
    # the saved file rebuilds the same network: same test accuracy and energy as right after conversion
    r = _run("eval", str(snn_path), "--json", str(tmp_path / "eval.json"), "--quiet")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["snn_accuracy"] == pytest.approx(conv["snn_accuracy"], abs=1e-9)
    assert ev["energy_ratio"] == pytest.approx(conv["energy_ratio"], rel=1e-9)
    assert ev["ann_accuracy"] == pytest.approx(ann_acc, abs=1e-9) and ev["samples"] == len(cnn_digits_splits.test)
    assert json.loads(r.stdout)["snn_accuracy"] == pytest.approx(ev["snn_accuracy"])
    # tune again from the file, write a re-tuned copy
    r = _run("tune", str(snn_path), "--trials", "2", "--objective", "tradeoff", "--beta", "50", "--json", str(tmp_path / "t.json"),
             "--out", str(tmp_path / "snn2.pth"), "--quiet")
    assert r.returncode == 0, r.stderr
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["objective"] == "tradeoff" and len(t["trials"]) == 2
    snn2, meta = cli.load_converted(str(tmp_path / "snn2.pth"))
    assert all(v == pytest.approx(t["best_lam"], rel=1e-6) for v in meta["lams"].values())
    assert all(float(m.lam) == pytest.approx(t["best_lam"], rel=1e-6) for _, m in __import__("sj_sfn").sfn_nodes(snn2))


def test_convert_fixed_lambda_in_process(tmp_path, cli_checkpoint, capsys):
    out = tmp_path / "snn.pth"
    rc = cli.main(["convert", "zoo:digits_cnn", "--checkpoint", cli_checkpoint, "--data", "digits", "--lam", "0.1", "-N", "8",
                   "--calib-samples", "256", "--out", str(out), "--quiet"])
    assert rc == 0
    snn, meta = cli.load_converted(str(out))
    assert meta["convert_kwargs"]["lam"] == 0.1 and meta["convert_kwargs"]["max_spikes"] == 8
    from sj_sfn import sfn_nodes

    assert [(float(m.lam), m.max_spikes) for _, m in sfn_nodes(snn)] == [(pytest.approx(0.1), 8)] * 3
    assert json.loads(capsys.readouterr().out)["lam"] == 0.1


def test_convert_image_folder(tmp_path, capsys, rng):
    from PIL import Image

    rng = np.random.default_rng(rng.initial_seed())  # fresh per run; a failure reports its seed (SJ_SFN_SEED)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")
    ck = tmp_path / "ck.pth"
    torch.save(zoo.digits_cnn(num_classes=2, in_chans=3).state_dict(), ck)
    out = tmp_path / "snn.pth"
    rc = cli.main(["convert", "zoo:digits_cnn", "--checkpoint", str(ck), "--data", str(tmp_path / "imgs"), "--img-size", "8",
                   "--batch-size", "4", "--out", str(out), "--eval", "--quiet"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["samples"] == 12 and 0 <= res["snn_accuracy"] <= 100
    _, meta = cli.load_converted(str(out))
    assert meta["input_shape"] == [3, 8, 8] and meta["model_kwargs"]["num_classes"] == 2


def _image_tree(root, rng: np.random.Generator, classes: dict[str, tuple[str, ...]], n: int = 4) -> None:
    from PIL import Image

    for split, names in classes.items():
        for cls in names:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_test_folder_missing_a_class_keeps_the_training_labels(tmp_path, rng):
    rng = np.random.default_rng(rng.initial_seed())
    _image_tree(tmp_path / "imgs", rng, {"train": ("a", "b", "c"), "val": ("a", "c")})
    d = cli.load_data(str(tmp_path / "imgs"), batch_size=4, spec="zoo:digits_cnn", img_size=8)
    labels = torch.cat([y for _, y in d.test])
    assert d.num_classes == 3 and sorted(labels.tolist()) == [0] * 4 + [2] * 4  # 'c' is class 2, as in train/
    (tmp_path / "imgs" / "val" / "z").mkdir()
    (tmp_path / "imgs" / "val" / "c" / "0.png").rename(tmp_path / "imgs" / "val" / "z" / "0.png")
    with pytest.raises(cli.UserError, match="classes that the training folder lacks: z"):
        cli.load_data(str(tmp_path / "imgs"), batch_size=4, spec="zoo:digits_cnn", img_size=8)


def test_eval_and_tune_preprocess_as_convert_did(tmp_path, capsys, rng):
    """The converted file records timm's data config; eval/tune without the ANN reuse it (not ImageNet defaults)."""
    timm = pytest.importorskip("timm")
    rng_np = np.random.default_rng(rng.initial_seed())
    _image_tree(tmp_path / "imgs", rng_np, {"train": ("a", "b"), "val": ("a", "b")})
    out = tmp_path / "snn.pth"
    assert cli.main(["convert", "resnet18", "--allow-random-weights", "--data", str(tmp_path / "imgs"), "--num-classes", "2",
                     "--batch-size", "4", "--calib-samples", "4", "--out", str(out), "--quiet", "--reconstruct", "0"]) == 0
    capsys.readouterr()
    _, meta = cli.load_converted(str(out))
    model = timm.create_model("resnet18", num_classes=2)
    expected = cli.data_config(model, "resnet18")
    assert meta["data_config"] == expected and expected["crop_pct"] != 0.875  # differs from the ImageNet fallback
    root = str(tmp_path / "imgs")
    with_model = next(iter(cli.load_data(root, batch_size=8, model=model, spec="resnet18").test))[0]
    recorded = next(iter(cli.load_data(root, batch_size=8, config=meta["data_config"]).test))[0]
    fallback = next(iter(cli.load_data(root, batch_size=8).test))[0]
    assert torch.equal(recorded, with_model) and not torch.equal(fallback, with_model)
    # files written before the config was recorded: rebuilt from the architecture
    legacy = {k: v for k, v in meta.items() if k != "data_config"}
    assert converted_data_config(legacy, root, None) == expected


def test_info(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"].startswith(torch.__version__[:4])
    assert "cpu" in info["kernels"] and info["kernels"]["cpu"]["name"] == "torch"
    assert set(info["extras"]) >= {"timm", "tune", "det", "cuda"}
    assert cli.main(["info"]) == 0
    assert "kernels:" in capsys.readouterr().out


def test_theorem(capsys):
    assert cli.main(["theorem", "--n", "500"]) == 0
    assert "worst difference" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_tiny(tmp_path):
    args = ["demo", "--trials", "2", "--epochs", "0.05", "--max-if-steps", "4", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--quiet"]
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    assert "SNN T=1 acc" in r.stdout and "energy ratio" in r.stdout
    res = json.loads((tmp_path / "out" / "demo.json").read_text())
    rows = {row["model"]: row for row in res["rows"]}
    assert set(rows) == {"cnn", "vit"} and not rows["cnn"]["cached"]
    for row in rows.values():
        assert 0 <= row["snn_accuracy"] <= 100 and 0.05 <= row["lam"] <= 1.0 and row["energy_ratio"] > 0
        assert (tmp_path / "out" / f"lambda_{row['model']}.png").exists()
    if_acc = rows["cnn"]["if_accuracy"]
    assert "1" in if_acc and set(if_acc) <= {"1", "2", "4"} and rows["vit"]["if_accuracy"] is None
    need = rows["cnn"]["if_steps_to_match"]
    assert (need is None and set(if_acc) == {"1", "2", "4"}) or if_acc[str(need)] >= rows["cnn"]["snn_accuracy"]
    # second run: models come from the cache, same ANN accuracy
    r = _run(*args[:-1], "--models", "cnn", "--quiet")
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "out" / "demo.json").read_text())["rows"][0]
    assert again["cached"] and again["ann_accuracy"] == rows["cnn"]["ann_accuracy"]


def test_error_exit_code_and_one_line_in_subprocess(tmp_path):
    r = _run("convert", "zoo:digits_cnn", "--checkpoint", str(tmp_path / "nope.pth"), "--data", "digits", "--out", str(tmp_path / "o.pth"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0] and "Traceback" not in r.stderr


def test_user_errors(tmp_path, capsys, cli_checkpoint):
    out = str(tmp_path / "o.pth")
    conv = ["convert", "zoo:digits_cnn", "--data", "digits", "--out", out, "--quiet"]
    assert "not found" in _main_error(capsys, conv + ["--checkpoint", str(tmp_path / "missing.pth")])
    assert "unknown model" in _main_error(capsys, ["convert", "no_such_model_xyz", "--checkpoint", cli_checkpoint, "--data", "digits", "--out", out])
    assert "unknown model" in _main_error(capsys, ["convert", "zoo:nope", "--checkpoint", cli_checkpoint, "--data", "digits", "--out", out])
    assert "unknown model" in _main_error(capsys, ["convert", "torchvision:nope", "--checkpoint", cli_checkpoint, "--data", "digits", "--out", out])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no class folders" in _main_error(capsys, ["convert", "zoo:digits_cnn", "--checkpoint", cli_checkpoint, "--data", str(empty), "--out", out])
    (empty / "cls").mkdir()
    msg = _main_error(capsys, ["convert", "zoo:digits_cnn", "--checkpoint", cli_checkpoint, "--data", str(empty), "--out", out])
    assert "no images" in msg or "does not match" in msg
    assert "neither" in _main_error(capsys, conv + ["--checkpoint", cli_checkpoint, "--data", "no-such-dataset"])
    # a checkpoint of another architecture
    other = tmp_path / "other.pth"
    torch.save(zoo.digits_cnn(width=8).state_dict(), other)
    assert "does not match" in _main_error(capsys, conv + ["--checkpoint", str(other)])
    torch.save(zoo.small_resnet().state_dict(), other)
    assert "does not match" in _main_error(capsys, conv + ["--checkpoint", str(other)])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert "cannot read" in _main_error(capsys, conv + ["--checkpoint", str(garbage)])
    assert "required" in _main_error(capsys, conv)
    # argparse-level errors: exit code 2 with a usage line and one error line
    assert "λ must be finite and > 0" in _main_error(capsys, conv + ["--checkpoint", cli_checkpoint, "--lam", "-1"])
    assert "not allowed with" in _main_error(capsys, conv + ["--checkpoint", cli_checkpoint, "--lam", "0.2", "--tune"])
    assert "invalid choice" in _main_error(capsys, ["frobnicate"])
    # eval / tune on files that are not converted models
    assert "not found" in _main_error(capsys, ["eval", str(tmp_path / "missing.pth")])
    assert "not a converted SNN" in _main_error(capsys, ["eval", cli_checkpoint])
    assert "not a converted SNN" in _main_error(capsys, ["tune", cli_checkpoint, "--trials", "1"])
    assert "--models" in _main_error(capsys, ["demo", "--models", "rnn"])
    # tuning and loader options are checked before any work, each with a one-line reason
    ok = conv + ["--checkpoint", cli_checkpoint]
    assert "expected 'kind' or 'NAME=PATTERN" in _main_error(capsys, ok + ["--tune", "--groups", "foo"])
    assert "LOW < HIGH" in _main_error(capsys, ok + ["--tune", "--bounds", "0.5", "0.1"])
    assert "a finite number >= 0" in _main_error(capsys, ok + ["--tune", "--beta", "-1"])
    assert "a finite number > 0" in _main_error(capsys, ok + ["--tune", "--timeout", "0"])
    assert "an integer >= 0" in _main_error(capsys, ok + ["--workers", "-1"])
    assert "a quantile in (0, 1]" in _main_error(capsys, ok + ["--p", "1.5"])
    assert "cannot tune λ" in _main_error(capsys, ok + ["--tune", "--trials", "1", "--groups", "g=no_such_site*"])
    # a model that cannot take the data's images (16-pixel patches on 8x8 digits)
    msg = _main_error(capsys, ["convert", "vit_tiny_patch16_224", "--allow-random-weights", "--data", "digits", "--out", out])
    assert "does not accept the images of --data digits (shape [1, 8, 8])" in msg


def test_converted_file_errors(tmp_path, capsys, cli_checkpoint):
    out = tmp_path / "snn.pth"
    assert cli.main(["convert", "zoo:digits_cnn", "--checkpoint", cli_checkpoint, "--data", "digits", "--lam", "0.1",
                     "--calib-samples", "128", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert "converted SNN" in _main_error(capsys, ["convert", "zoo:digits_cnn", "--checkpoint", str(out), "--data", "digits", "--out", str(tmp_path / "x.pth")])
    os.rename(cli_checkpoint, cli_checkpoint + ".moved")
    try:
        assert "ANN checkpoint not found" in _main_error(capsys, ["eval", str(out), "--quiet"])
    finally:
        os.rename(cli_checkpoint + ".moved", cli_checkpoint)
    if os.path.isdir("/usr/share/datasets/fashion-mnist"):
        assert "shape" in _main_error(capsys, ["eval", str(out), "--data", "fashion-mnist", "--no-ann", "--quiet"])


# -- file errors: one line, exit code 2, checked before any work ------------------------------

READ_ONLY = "/proc/sj-sfn-no-such-dir/out.pth"  # /proc takes no new files, not even from the superuser


def _bad_paths(tmp_path) -> dict[str, str]:
    """Output paths that cannot be written, each with the words its error must contain."""
    regular = tmp_path / "a-file"
    regular.write_text("x")
    folder = tmp_path / "a-folder"
    folder.mkdir(exist_ok=True)
    return {str(folder): "is a directory", str(regular / "out.pth"): "is a file, not a folder",
            str(regular / "deeper" / "out.pth"): "is a file, not a folder", READ_ONLY: "cannot write in /proc"}


@pytest.mark.parametrize("option", ["--out", "--json", "--plot"])
def test_convert_output_paths_are_checked_before_any_work(tmp_path, capsys, option):
    """A bad --out/--json/--plot is reported first: before the checkpoint is read (here it does not even exist)."""
    good = str(tmp_path / "snn.pth")
    for path, words in _bad_paths(tmp_path).items():
        argv = ["convert", "zoo:digits_cnn", "--checkpoint", str(tmp_path / "missing.pth"), "--data", "digits", "--tune",
                "--out", good, option, path]
        msg = _main_error(capsys, argv)
        assert option in msg and words in msg, msg
        assert not os.path.exists(good)


@pytest.mark.parametrize("cmd, options", [("tune", ["--out", "--json", "--plot"]), ("eval", ["--json"])])
def test_tune_and_eval_output_paths_are_checked_before_any_work(tmp_path, capsys, cmd, options):
    for option in options:
        for path, words in _bad_paths(tmp_path).items():
            msg = _main_error(capsys, [cmd, str(tmp_path / "missing.pth"), option, path])
            assert option in msg and words in msg, msg


@pytest.mark.parametrize("content", [b"hello, this is a text file\n", "random"])
def test_unreadable_checkpoints_are_one_line(tmp_path, capsys, cli_checkpoint, content, rng):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist()) if content == "random" else content)
    out = str(tmp_path / "o.pth")
    msg = _main_error(capsys, ["convert", "zoo:digits_cnn", "--checkpoint", str(bad), "--data", "digits", "--out", out])
    assert "cannot read" in msg and "not a torch checkpoint" in msg and str(bad) in msg
    for cmd in ("eval", "tune"):
        msg = _main_error(capsys, [cmd, str(bad)])
        assert "cannot read" in msg and str(bad) in msg
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "is empty" in _main_error(capsys, ["eval", str(tmp_path / "empty.pth")])
    assert "is a directory" in _main_error(capsys, ["eval", str(tmp_path)])
    assert not os.path.exists(out)


def test_checkpoint_with_pickled_objects_needs_trust(tmp_path, capsys, cnn_digits_model):
    """weights_only loading refuses pickled Python objects; --trust-checkpoint unpickles a file the user trusts."""
    import argparse

    ck = tmp_path / "train.pth"
    torch.save({"model": cnn_digits_model.state_dict(), "args": argparse.Namespace(lr=0.1)}, ck)
    argv = ["convert", "zoo:digits_cnn", "--checkpoint", str(ck), "--data", "digits", "--lam", "0.1", "--calib-samples", "64",
            "--out", str(tmp_path / "snn.pth"), "--quiet"]
    msg = _main_error(capsys, argv)
    assert "argparse.Namespace" in msg and "--trust-checkpoint" in msg
    assert cli.main(argv + ["--trust-checkpoint"]) == 0
    assert (tmp_path / "snn.pth").is_file()


def test_io_writes_are_atomic_and_create_folders(tmp_path):
    from sj_sfn import io

    target = tmp_path / "new" / "deeper" / "ck.pth"
    io.save({"w": torch.arange(3)}, target)  # missing folders are created
    assert torch.equal(io.load(target)["w"], torch.arange(3))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save({"w": Unpicklable()}, target)
    assert torch.equal(io.load(target)["w"], torch.arange(3))  # the old file survives a failed write
    assert sorted(p.name for p in target.parent.iterdir()) == ["ck.pth"]  # and no temporary file is left


@pytest.mark.parametrize("script", ["classification/train.py", "classification/convert.py", "classification/evaluate.py"])
def test_classification_scripts_give_one_line_errors(tmp_path, capsys, monkeypatch, script):
    """The scripts as ``python SCRIPT ...`` runs them (``__main__``, in this process): exit code 2, one line."""
    import runpy

    regular = tmp_path / "a-file"
    regular.write_text("x")
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint\n")
    argv = {"classification/train.py": ["zoo:digits_cnn", "--data", "digits", "--out", str(regular / "run")],
            "classification/convert.py": ["zoo:digits_cnn", "--checkpoint", str(text), "--data", "digits", "--out", str(tmp_path / "o.pth")],
            "classification/evaluate.py": [str(text)]}[script]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(root, script), run_name="__main__")
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert ("is a file, not a folder" in lines[0]) if script.endswith("train.py") else ("cannot read" in lines[0])


def test_offset_and_its_deprecated_alias(tmp_path, capsys, cli_checkpoint):
    """--offset sets the SFN threshold offset; --v-init is the same option under its old name."""
    from sj_sfn import sfn_nodes

    for flag, value in (("--offset", 0.25), ("--v-init", 0.0)):
        out = tmp_path / f"snn{flag}.pth"
        assert cli.main(["convert", "zoo:digits_cnn", "--checkpoint", cli_checkpoint, "--data", "digits", "--lam", "0.1",
                         "--calib-samples", "64", flag, str(value), "--out", str(out), "--quiet"]) == 0
        snn, meta = cli.load_converted(str(out))
        assert meta["convert_kwargs"]["offset"] == value and "v_init" not in meta["convert_kwargs"]
        assert {m.offset for _, m in sfn_nodes(snn)} == {value}
    capsys.readouterr()
    assert "not allowed with" in _main_error(capsys, ["convert", "zoo:digits_cnn", "--data", "digits", "--out", str(tmp_path / "o.pth"),
                                                      "--offset", "0.5", "--v-init", "0.5"])
    assert "a threshold offset in [0, 1)" in _main_error(capsys, ["convert", "zoo:digits_cnn", "--data", "digits",
                                                                  "--out", str(tmp_path / "o.pth"), "--offset", "1"])
