"""Launching on GPUs: more processes on one machine than it has GPUs is refused in one line before
any work (on one H200, torchrun --nproc_per_node 2 failed in Accelerate's first barrier with a
traceback: "CUDA error: invalid device ordinal")."""

import torch

import compress_model
from helpers import make_run_dir


def test_more_processes_than_gpus_is_one_line(tmp_path, tiny_teacher_dir, tiny_pairs, monkeypatch, capsys):
    run_dir = make_run_dir(tmp_path / "run", tiny_teacher_dir, tiny_pairs[:8], tiny_pairs[8:12])
    monkeypatch.chdir(run_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("sys.argv", ["compress_model.py"])
    assert compress_model.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "2 processes on this machine" in err and "1 GPU:" in err and "--nproc_per_node 1" in err
    assert not (run_dir / "out").exists() and not list(run_dir.glob("out*"))


def test_one_process_per_gpu_passes_the_check(monkeypatch):
    from distillation.knowledge_distillation import check_gpus_for_processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_gpus_for_processes()  # no error: two processes, two GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    check_gpus_for_processes()  # no GPU: several processes on the CPUs join with gloo
