"""The run layer's files: the one atomic writer, each run-directory file's reader and writer, and the session's
rule for continuing a run."""
import json
import os

import pytest
import torch

from betanas_fast.runs import files
from betanas_fast.runs.ranks import Ranks
from betanas_fast.runs.session import RunSession, continued_settings
from betanas_fast.space import build_space


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "sub" / "a.json")
    files.write_json(path, {"v": 1})

    def broken(f):
        f.write('{"v": 2, ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        files.write_atomic(path, broken)
    assert json.load(open(path)) == {"v": 1}
    assert os.listdir(tmp_path / "sub") == ["a.json"]
    files.save_torch(path + ".pt", {"x": torch.arange(3)})
    assert torch.equal(torch.load(path + ".pt", weights_only=True)["x"], torch.arange(3))


def test_each_file_reads_back_what_its_writer_wrote(tmp_path):
    run = str(tmp_path)
    files.write_config(run, {"seed": 3})
    files.start_history(run)
    for step in (1, 2, 3):
        files.append_history(run, {"step": step})
    files.cut_history(run, "step", 2)
    assert files.read_config(run) == {"seed": 3} and files.read_history(run) == [{"step": 1}, {"step": 2}]
    space = build_space("demo")
    arch = [int(row.index(True)) for row in space.allowed_mask()]
    assert not files.finished(run, "search")
    files.write_arch(run, {"space": space.config.to_dict(), "arch": space.arch_strings(arch), "choices": arch})
    got_space, got_arch, summary = files.read_arch(run)
    assert got_arch == arch and got_space.config.to_dict() == space.config.to_dict() and files.finished(run, "search")
    files.write_result(run, {"best_val_top1": 0.5})
    assert files.read_result(run) == {"best_val_top1": 0.5} and files.finished(run, "train")
    files.save_net(os.path.join(run, files.BEST_NET), {"w": torch.ones(2)}, summary["arch"], summary["space"],
                   {"se_ratio": 0.0, "act": "relu6"})
    net = files.read_net(os.path.join(run, files.BEST_NET))
    assert net["arch"] == summary["arch"] and torch.equal(net["model"]["w"], torch.ones(2))
    for i in (1, 2, 3):
        files.save_checkpoint(files.checkpoint_dir(run), i, {"iteration": i})
    assert len(files.list_checkpoints(files.checkpoint_dir(run))) == 2  # the last two kept
    assert files.load_latest(files.checkpoint_dir(run))[1] == {"iteration": 3}


def test_bad_files_are_named(tmp_path):
    with pytest.raises(files.RunFileError, match="no such file"):
        files.read_arch(str(tmp_path))
    (tmp_path / "arch.json").write_text("{not json")
    with pytest.raises(files.RunFileError, match="is not a readable arch.json"):
        files.read_arch(str(tmp_path))
    (tmp_path / "arch.json").write_text('{"arch": []}')
    with pytest.raises(files.RunFileError, match="no 'space' entry"):
        files.read_arch(str(tmp_path))
    with pytest.raises(files.RunFileError, match="is not a run directory"):
        files.read_config(str(tmp_path))
    (tmp_path / "w.pt").write_text("not a checkpoint")
    with pytest.raises(files.RunFileError, match="not a readable torch checkpoint"):
        files.read_net(str(tmp_path / "w.pt"))
    ckpts = tmp_path / "checkpoints"
    files.save_checkpoint(str(ckpts), 1, {"iteration": 1})
    (ckpts / "ckpt_00000002.pt").write_bytes(b"truncated")
    with pytest.raises(files.CheckpointError, match="ckpt_00000001.pt is intact"):
        files.load_latest(str(ckpts))


def test_a_run_continues_only_with_its_own_settings(tmp_path):
    run = str(tmp_path / "run")
    assert continued_settings({"seed": 1, "out": run}, ("out", "resume"), run, None) is None  # nothing to continue
    files.write_config(run, {"seed": 1, "threads": 2, "out": run, "resume": None})
    files.save_checkpoint(files.checkpoint_dir(run), 1, {})
    same = continued_settings({"seed": 1, "threads": 4, "out": run, "resume": None}, ("out", "resume", "threads"),
                              run, None)
    assert same == {"seed": 1, "threads": 4, "out": run, "resume": run}  # how it runs may change
    with pytest.raises(ValueError, match="seed: saved 1, given 2"):
        continued_settings({"seed": 2, "threads": 2, "out": run, "resume": None}, ("out", "resume"), run, None)
    # --resume takes the saved settings whatever the command line says
    assert continued_settings({"seed": 2}, ("out", "resume"), None, run)["seed"] == 1


def test_a_session_starts_restores_and_records(tmp_path):
    session = RunSession(str(tmp_path / "run"), None, "search", Ranks())
    session.begin({"seed": 0}, restore=lambda: pytest.fail("a fresh run restores nothing"))
    for step in (1, 2):
        session.record({"step": step, "loss": 1.0 / step}, step)
        session.save_checkpoint(step, {"iteration": step})
    session.record({"step": 3, "loss": 0.3}, 3)  # written after the last checkpoint: recomputed on resume
    again = RunSession(None, session.dir, "search", Ranks())
    restored = []
    again.begin({"seed": 0}, restore=lambda: restored.append(again.restore("step", "iteration")))
    assert restored[0][1] == {"iteration": 2}
    assert [r["step"] for r in files.read_history(session.dir)] == [1, 2]
