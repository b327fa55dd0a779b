"""Kernels check themselves (kernels/selfcheck.py): before an op's Triton kernels first serve a
device, they are compared with its PyTorch op; a mismatch sends the op to PyTorch with one
warning. Here under Triton's interpreter (device "cpu-interpreter"), with a deliberately wrong
gather_rows kernel, and the verdict cache in tmp_path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from .test_kernels_common import CUDA, DEVICE, triton_run

import guidance_rt.kernels as K  # noqa: E402
from guidance_rt.kernels import _common, rows, selfcheck  # noqa: E402
from guidance_rt.kernels.selfcheck import KernelSelfCheckWarning  # noqa: E402

X = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(1))
INDEX = torch.tensor([3, 1])


@pytest.fixture(autouse=True)
def checking(tmp_path, monkeypatch):
    """The check on (conftest.py turns it off for the other tests), its cache in tmp_path, and no
    verdicts of this process before or after the test."""
    monkeypatch.setenv(selfcheck.SKIP_ENV, "1")
    monkeypatch.setenv(selfcheck.CACHE_ENV, str(tmp_path))
    selfcheck.forget()
    yield
    selfcheck.forget()


@pytest.fixture
def wrong_gather(monkeypatch):
    """gather_rows' launcher writes every value 1% too large."""
    launch = rows._launch

    def off_by_one_percent(x2, src2, y2, row_of):
        launch(x2, src2, y2, row_of)
        y2.mul_(1.01)

    monkeypatch.setattr(rows, "_launch", off_by_one_percent)


@pytest.fixture
def checks(monkeypatch):
    """The ops whose check ran, in order."""
    ran = []
    check = selfcheck._check

    def counted(case, device):
        ran.append(case.op)
        return check(case, device)

    monkeypatch.setattr(selfcheck, "_check", counted)
    return ran


def gather(x=X, index=INDEX):
    """gather_rows on DEVICE with the kernels on, back on the CPU, and our warnings."""
    with triton_run(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = K.gather_rows(x.to(DEVICE), index.to(DEVICE)).cpu()
    return y, [w for w in caught if issubclass(w.category, KernelSelfCheckWarning)]


def torch_gather(x=X, index=INDEX):
    return torch.ops.guidance_rt.gather_rows_torch(x, index)


def cache_entries() -> dict:
    return json.loads(selfcheck.cache_path().read_text())


def test_every_op_has_a_check_case():
    missing = set(_common.DEFINED_OPS) - set(selfcheck.CASES)
    assert not missing, f"ops defined with define_op but without a selfcheck.case: {sorted(missing)}"
    assert set(selfcheck.CASES) == set(_common.DEFINED_OPS)


def test_every_op_passes_its_selfcheck(checks):
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelSelfCheckWarning)
        assert selfcheck.verify(DEVICE) == {op: True for op in selfcheck.CASES}
    assert sorted(checks) == sorted(selfcheck.CASES)
    entries = cache_entries()
    assert all(entries[selfcheck.cache_key(op, DEVICE)]["ok"] for op in selfcheck.CASES)


def test_wrong_kernel_warns_once_and_falls_back_to_pytorch(wrong_gather, checks):
    y1, first = gather()
    y2, second = gather()
    assert len(first) == 1 and not second
    message = str(first[0].message)
    name = "cpu-interpreter" if not CUDA else torch.cuda.get_device_name(DEVICE)
    for part in ("guidance_rt::gather_rows", name, "float32: max |error|", "> tolerance", "report",
                 selfcheck.SKIP_ENV):
        assert part in message, (part, message)
    assert torch.equal(y1, torch_gather()) and torch.equal(y2, torch_gather())
    # only that op falls back: another op still passes its own check
    with triton_run():
        assert _common.use_triton(X.to(DEVICE), "token_shuffle")
    assert checks == ["gather_rows", "token_shuffle"]


def test_kernel_error_falls_back_and_is_not_cached(monkeypatch):
    def broken(*args):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(rows, "_launch", broken)
    y, caught = gather()
    assert len(caught) == 1 and "RuntimeError: out of resources" in str(caught[0].message)
    assert torch.equal(y, torch_gather())
    assert not selfcheck.cache_path().exists()      # maybe transient: the next process checks again


def test_verdict_is_read_from_disk_not_checked_again(wrong_gather, checks):
    gather()
    entry = cache_entries()[selfcheck.cache_key("gather_rows", DEVICE)]
    assert entry["ok"] is False and "tolerance" in entry["detail"]
    selfcheck.forget()                               # as in a new process, with the same file
    y, caught = gather()
    assert checks == ["gather_rows"]
    assert len(caught) == 1 and str(selfcheck.cache_path()) in str(caught[0].message)
    assert torch.equal(y, torch_gather())


def test_another_process_reads_the_verdict():
    gather()                                         # the right kernel: passes, cached
    code = ("import torch, guidance_rt.kernels as K\n"
            "from guidance_rt.kernels import selfcheck\n"
            "def no_check(case, device):\n"
            "    raise AssertionError('checked again: ' + selfcheck.cache_key(case.op, device))\n"
            "selfcheck._check = no_check\n"
            f"device = torch.device({str(DEVICE)!r})\n"
            "with K.triton_on_cpu(device.type == 'cpu'):\n"
            "    K.gather_rows(torch.zeros(3, 2, device=device), torch.tensor([1], device=device))\n"
            "assert selfcheck._by_device[('gather_rows', torch.zeros(0, device=device).device)]\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_changed_kernel_source_is_checked_again(checks, monkeypatch):
    gather()
    old = selfcheck.cache_key("gather_rows", DEVICE)
    monkeypatch.setattr(selfcheck, "_source_hash", lambda path: "edited")
    selfcheck.forget()
    y, caught = gather()
    assert checks == ["gather_rows", "gather_rows"] and not caught
    new = selfcheck.cache_key("gather_rows", DEVICE)
    assert new != old and set(cache_entries()) == {old, new}
    assert torch.equal(y, torch_gather())


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "{KEY: 3}", "{KEY: {\"ok\": 1}}"])
def test_corrupt_cache_is_checked_again_and_rewritten(content, checks):
    path = selfcheck.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content.replace("KEY", json.dumps(selfcheck.cache_key("gather_rows", DEVICE))))
    y, caught = gather()
    assert checks == ["gather_rows"] and not caught
    assert cache_entries()[selfcheck.cache_key("gather_rows", DEVICE)]["ok"] is True
    assert torch.equal(y, torch_gather())


def test_unwritable_cache_keeps_the_verdict_in_memory(wrong_gather, checks, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(selfcheck.CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    (y1, first), (y2, second) = gather(), gather()
    assert checks == ["gather_rows"] and len(first) == 1 and not second
    assert torch.equal(y1, torch_gather()) and torch.equal(y2, torch_gather())


def test_tracing_uses_the_verdict_made_eagerly(wrong_gather, checks):
    """Fake tensors (torch.compile) cannot run a check: before any verdict the op assumes its
    kernels, without remembering that; after an eager check it follows the verdict."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2, device=DEVICE)
    assert selfcheck.kernel_ok("gather_rows", fake) and not checks
    gather()
    assert not selfcheck.kernel_ok("gather_rows", fake) and checks == ["gather_rows"]


def test_fake_cuda_tensors_without_cuda_assume_the_kernels(checks):
    """_aot.py traces fake CUDA tensors on machines without CUDA: nothing to check or look up."""
    if CUDA:
        pytest.skip("needs a machine without CUDA")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2, device="cuda")
    assert selfcheck.kernel_ok("gather_rows", fake) and not checks


def test_skip_env_runs_the_kernels_unchecked(wrong_gather, checks, monkeypatch):
    monkeypatch.setenv(selfcheck.SKIP_ENV, "0")
    y, caught = gather()
    assert not caught and not checks and not selfcheck.cache_path().exists()
    assert torch.allclose(y, torch_gather() * 1.01) and not torch.equal(y, torch_gather())
