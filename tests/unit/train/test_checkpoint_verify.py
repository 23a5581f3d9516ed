"""Verified checkpoints (issue 13): a manifest written last, damaged checkpoints passed over for the newest intact
one, DCP's pickles read without running code, a full disk as one line with the previous checkpoint intact, and
checkpoints saved before manifests still loading."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from cybertron.errors import CheckpointError
from cybertron.models.llama import build_model
from cybertron.train import checkpoint as ckpt_io
from cybertron.train.manifest import MANIFEST, file_sha256, write_manifest
from cybertron.train.optim import build_optimizer
from tests.unit.train.test_checkpoint import CFG, _trained


def _two_checkpoints(tmp_path):
    """step-1 and step-2 of one model, whose norm weight differs between them (1 then 2)."""
    model, opt = _trained()
    with torch.no_grad():
        model.norm.weight.fill_(1.0)
    first = ckpt_io.save_checkpoint(tmp_path, 1, model, opt, {"pos": 1}, CFG, keep=5)
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    second = ckpt_io.save_checkpoint(tmp_path, 2, model, opt, {"pos": 2}, CFG, keep=5)
    return first, second


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_its_hash(tmp_path):
    model, opt = _trained()
    ckpt = ckpt_io.save_checkpoint(tmp_path, 3, model, opt, {}, CFG)
    listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != MANIFEST)
    assert sorted(listed) == on_disk == [".metadata", "__0_0.distcp", "model_config.json", "trainer_state.json"]
    for name, entry in listed.items():  # an independent hash of each file (hashlib, whole file at once)
        assert entry["sha256"] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == file_sha256(ckpt / name)
        assert entry["size"] == (ckpt / name).stat().st_size
    assert ckpt_io.checkpoint_problem(ckpt) is None


def test_a_flipped_byte_falls_back_to_the_previous_checkpoint_with_one_line(tmp_path):
    first, second = _two_checkpoints(tmp_path)
    _flip_byte(second / "__0_0.distcp")
    lines = []
    assert ckpt_io.intact_checkpoint(tmp_path, lines.append) == first
    assert lines == [f"warning: checkpoint {second} is corrupted (__0_0.distcp: content differs from the manifest "
                     "(sha256)); falling back to step-1"]
    model = build_model(CFG, seed=4)
    ckpt_io.load_checkpoint(ckpt_io.resolve_checkpoint(tmp_path, report=None), model, None, verified=True)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))  # step-1's weights
    with pytest.raises(CheckpointError, match=r"step-2 is corrupted \(__0_0.distcp: content differs"):
        ckpt_io.load_checkpoint(second, build_model(CFG), None)  # named directly: an error, not a fallback


def test_no_intact_checkpoint_is_one_error(tmp_path):
    first, second = _two_checkpoints(tmp_path)
    _flip_byte(second / "__0_0.distcp")
    (first / "trainer_state.json").write_text("{}  ")  # same length or not: the hash differs
    with pytest.raises(CheckpointError) as err:
        ckpt_io.intact_checkpoint(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "step-2 is corrupted (__0_0.distcp" in message
    assert "the 1 older one is too" in message and "no intact checkpoint" in message


def test_truncated_metadata_is_found_by_its_size(tmp_path):
    first, second = _two_checkpoints(tmp_path)
    meta = second / ".metadata"
    size = meta.stat().st_size
    meta.write_bytes(meta.read_bytes()[:200])
    assert ckpt_io.checkpoint_problem(second) == f".metadata: 200 bytes, the manifest says {size}"
    assert ckpt_io.intact_checkpoint(tmp_path, report=None) == first


def test_truncated_metadata_is_one_line_without_dcp_tracebacks(tmp_path, capfd):
    first, second = _two_checkpoints(tmp_path)
    for ckpt in (first, second):
        (ckpt / MANIFEST).unlink()  # a checkpoint from before manifests: DCP itself reads the damaged file
    meta = second / ".metadata"
    meta.write_bytes(meta.read_bytes()[:200])
    assert ckpt_io.checkpoint_problem(second) == ".metadata: pickle data was truncated"
    with pytest.raises(CheckpointError, match=r"step-2 is corrupted \(\.metadata: pickle data was truncated\)"):
        ckpt_io.load_checkpoint(second, build_model(CFG), None)
    lines = []
    assert ckpt_io.intact_checkpoint(tmp_path, lines.append) == first
    assert len(lines) == 2 and "falling back to step-1" in lines[0] and lines[1].startswith("note: ")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out


def test_a_checkpoint_without_manifest_loads_unverified_with_a_note(tmp_path):
    model, opt = _trained()
    ckpt = ckpt_io.save_checkpoint(tmp_path, 1, model, opt, {"pos": 1}, CFG)
    (ckpt / MANIFEST).unlink()  # as saved before this change
    lines = []
    assert ckpt_io.intact_checkpoint(tmp_path, lines.append) == ckpt
    assert lines == [f"note: {ckpt} has no manifest.json (saved before checkpoints were verified); "
                     "loading it unverified"]
    model2 = build_model(CFG, seed=7)
    opt2 = build_optimizer(model2, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    assert ckpt_io.load_checkpoint(ckpt, model2, opt2)["pos"] == 1
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


class _RunsCode:
    """A pickle that, when unpickled without restriction, creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("with_manifest", [False, True])
def test_crafted_metadata_does_not_run_code(tmp_path, with_manifest):
    model, opt = _trained()
    ckpt = ckpt_io.save_checkpoint(tmp_path, 1, model, opt, {}, CFG)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    if with_manifest:  # whoever crafted the directory can write a matching manifest too
        write_manifest(ckpt)
    else:  # or pass it off as a checkpoint from before manifests
        (ckpt / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: it refers to posix\.system"):
        ckpt_io.load_checkpoint(ckpt, build_model(CFG), None)
    with pytest.raises(CheckpointError):
        ckpt_io.resolve_checkpoint(tmp_path, report=None)
    assert not marker.exists()


def test_crafted_optimizer_value_does_not_run_code(tmp_path):
    """Non-tensor values (optimizer hyper-parameters) are pickles inside the .distcp file; DCP's own planner
    loads them with weights_only=False."""
    model, opt = _trained()
    ckpt = ckpt_io.save_checkpoint(tmp_path, 1, model, opt, {}, CFG)
    state = ckpt_io.state_to_save(model, opt)
    marker = tmp_path / "pwned"
    lr_key = next(k for k in state["optim"] if k.startswith("param_groups.") and k.endswith(".lr"))
    state["optim"][lr_key] = _RunsCode(marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(ckpt))  # rewrites the .distcp file and .metadata in place
    write_manifest(ckpt)
    model2 = build_model(CFG, seed=3)
    opt2 = build_optimizer(model2, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        ckpt_io.load_checkpoint(ckpt, model2, opt2)
    assert not marker.exists()


FULL_DISK = textwrap.dedent("""
    # RLIMIT_FSIZE stands in for a full disk: a write past the limit fails with an OSError (EFBIG, SIGXFSZ
    # ignored) in the middle of a file, as ENOSPC does, through the same write calls.
    import json, resource, signal, sys, pathlib
    import torch
    from cybertron.errors import CheckpointError
    from cybertron.models.llama import build_model
    from cybertron.models.presets import preset_config
    from cybertron.train.async_checkpoint import CheckpointSaver
    from cybertron.train.optim import build_optimizer
    cfg = preset_config("debug", tie_embeddings=True)
    model = build_model(cfg, seed=0)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    model(torch.randint(0, 256, (2, 8))).float().logsumexp(-1).mean().backward()
    opt.step()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    results = {}
    for mode in ("sync", "async"):
        run_dir = pathlib.Path(sys.argv[1]) / mode
        saver = CheckpointSaver(run_dir, cfg, keep=1, async_save=mode == "async")
        saver.save(1, model, opt, {"pos": 1})
        saver.finish()
        size = (run_dir / "checkpoints" / "step-1" / "__0_0.distcp").stat().st_size
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))
        out = results[mode] = {}
        try:
            saver.save(2, model, opt, {"pos": 2})
            saver.finish()
        except CheckpointError as err:
            out["error"] = str(err)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space freed
        out["after_failure"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        saver.save(2, model, opt, {"pos": 2})
        saver.finish()
        saver.close()
        out["after_retry"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    print(json.dumps(results))
""")


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """Synchronous and asynchronous saves (one subprocess: the limit applies to the whole process)."""
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for mode, out in json.loads(result.stdout.splitlines()[-1]).items():
        root = tmp_path / mode / "checkpoints"
        error = out["error"]
        assert "\n" not in error
        assert error.startswith(f"cannot write checkpoint {root / 'step-2'} ({root / '.tmp-step-2'}"), error
        assert "File too large" in error and " free on that disk" in error
        assert "the previous checkpoint step-1 is untouched: free space, then rerun with --resume" in error
        assert out["after_failure"] == ["step-1"]  # intact, and the half-written directory is gone
        assert out["after_retry"] == ["step-2"]    # keep=1: step-1 deleted only once step-2 is published
        assert ckpt_io.checkpoint_problem(root / "step-2") is None


def test_retention_keeps_a_newer_checkpoint_left_by_an_earlier_attempt(tmp_path):
    model, opt = _trained()
    for step in (2, 4, 6):
        ckpt_io.save_checkpoint(tmp_path, step, model, opt, {}, CFG, keep=2)
    # resumed from step-4 (step-6 was damaged, say): the next saves rotate step-2 and step-4 only
    ckpt_io.save_checkpoint(tmp_path, 5, model, opt, {}, CFG, keep=2)
    assert [p.name for p in ckpt_io.complete_checkpoints(tmp_path)] == ["step-4", "step-5", "step-6"]
