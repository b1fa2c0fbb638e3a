"""Checkpoint reading and writing, and every kind of bad input: a clear error, and no file left behind."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from model_cache import cached_state_dict
from safetensors.torch import load_file, save_file

from lib_rebasin.errors import (
    CheckpointReadError,
    IncompatibleModelsError,
    OutputError,
    RebasinError,
    UnsupportedModelError,
)
from lib_rebasin.io import output_file
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.io.output_file import save_state_dict, write_safetensors
from lib_rebasin.merge.run import merge_checkpoints
from lib_rebasin.options import MergeOptions
from lib_rebasin.sd1.config import TINY, detect
from lib_rebasin.sd1.spec import build_spec
from lib_rebasin.sd1.synthetic import synthetic_tensor


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """Tiny models in place of the mini ones: what is tested is reading and writing files, not the spec."""
    return tiny_models


def _tiny_state(seed: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A state dict with SD 1.5's keys at the tiny scale (the layout is what these tests read)."""
    spec = build_spec(TINY)
    out = {}
    for k, shape in spec.shapes.items():
        t = synthetic_tensor(k, shape, seed, None, 0.0, TINY.timesteps)
        out[k] = t if not t.is_floating_point() else t.to(dtype)
    return out


def _no_stray_files(folder: Path, allowed: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == allowed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_safetensors_roundtrip_is_lazy_and_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {"x": torch.randn(3, 5).to(dtype), "i": torch.arange(7), "e": torch.zeros(0)}
    path = save_state_dict(tmp_path / "m.safetensors", sd, {"k": "v"})
    ref = load_file(path)  # the reference implementation reads what we wrote
    assert all(torch.equal(ref[k], sd[k]) for k in sd)
    with open_checkpoint(path) as ck:
        assert ck.metadata == {"k": "v"}
        assert all(torch.equal(ck.get(k), sd[k]) for k in sd)
        assert ck.infos["x"].dtype == dtype


def test_reads_files_written_by_the_safetensors_library(tmp_path: Path) -> None:
    sd = {"b": torch.randn(3).half(), "a": torch.randn(2, 2)}
    save_file(sd, tmp_path / "m.safetensors", metadata={"format": "pt"})
    with open_checkpoint(tmp_path / "m.safetensors") as ck:
        assert all(torch.equal(ck.get(k), sd[k]) for k in sd)


def test_pickle_with_nested_state_dict_old_text_encoder_keys_and_ema(tmp_path: Path) -> None:
    sd = _tiny_state()
    old = {}
    for k, v in sd.items():
        old[k.replace("transformer.text_model.", "transformer.")] = v
    old["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old, "global_step": 10}, path)
    with open_checkpoint(path) as ck:
        assert set(sd) <= set(ck.keys()) and "model_ema.decay" in ck
        assert detect(ck.shapes()) == TINY


def test_unsafe_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    with pytest.raises(CheckpointReadError, match="refused"):
        open_checkpoint(path)
    assert not marker.exists()


def test_truncated_files_are_reported(tmp_path: Path) -> None:
    good = save_state_dict(tmp_path / "m.safetensors", {"x": torch.randn(100, 100)})
    data = good.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match="truncated"):
        open_checkpoint(tmp_path / "t.safetensors")
    torch.save({"x": torch.randn(1000)}, tmp_path / "m.ckpt")
    raw = (tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "t.ckpt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointReadError):
        open_checkpoint(tmp_path / "t.ckpt")


def test_non_checkpoint_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointReadError):
        open_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointReadError):
        open_checkpoint(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("keys, message", [
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "SDXL"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
    ({"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "SD 2"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3)}, "VAE"),
    ({"fc.weight": (10, 10)}, "not a Stable Diffusion checkpoint"),
])
def test_unsupported_architectures_are_named(keys: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        detect(keys)


def test_sdxl_shaped_file_is_refused_by_merge(tmp_path: Path) -> None:
    a = cached_state_dict(tmp_path / "a.safetensors", _tiny_state(1))
    xl = save_state_dict(tmp_path / "xl.safetensors", {
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(8),
        "model.diffusion_model.label_emb.0.0.weight": torch.ones(8, 8)})
    with pytest.raises(UnsupportedModelError, match="Model B .*SDXL"):
        merge_checkpoints(a, xl, tmp_path / "out.safetensors", MergeOptions(method="weighted_sum"))
    _no_stray_files(tmp_path, {"a.safetensors", "xl.safetensors"})


def test_mismatched_shapes_are_refused(tmp_path: Path) -> None:
    a = cached_state_dict(tmp_path / "a.safetensors", _tiny_state(1))
    sd = _tiny_state(2)
    k = "model.diffusion_model.middle_block.1.proj_in.weight"
    sd[k] = torch.zeros(7, 7, 1, 1)
    b = cached_state_dict(tmp_path / "b.safetensors", sd)
    with pytest.raises(UnsupportedModelError, match="unexpected shapes"):
        merge_checkpoints(a, b, tmp_path / "out.safetensors", MergeOptions(method="weighted_sum"))
    # A different-width SD 1.x is readable but cannot be blended with A.
    from model_cache import cached_checkpoint

    wide = cached_checkpoint(tmp_path / "wide.safetensors", replace(TINY, te_width=96, te_mlp=384), seed=3)
    with pytest.raises(IncompatibleModelsError, match="different shapes"):
        merge_checkpoints(a, wide, tmp_path / "out.safetensors", MergeOptions(method="weighted_sum"))
    _no_stray_files(tmp_path, {"a.safetensors", "b.safetensors", "wide.safetensors"})


def test_output_exists_and_unwritable_folders(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        merge_checkpoints(models["a"], models["finetune"], out, MergeOptions(method="weighted_sum"))
    assert out.read_bytes() == b"precious"
    with pytest.raises(OutputError, match="does not exist"):
        merge_checkpoints(models["a"], models["finetune"], tmp_path / "nope" / "o.safetensors",
                          MergeOptions(method="weighted_sum"))
    # /proc refuses new files even for root, so this is a real unwritable folder on Linux.
    with pytest.raises(OutputError, match="not writable"):
        merge_checkpoints(models["a"], models["finetune"], "/proc/o.safetensors", MergeOptions(method="weighted_sum"))
    with pytest.raises(OutputError, match=".safetensors"):
        merge_checkpoints(models["a"], models["finetune"], tmp_path / "o.ckpt", MergeOptions(method="weighted_sum"))
    _no_stray_files(tmp_path, {"out.safetensors"})


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def produce(key: str) -> torch.Tensor:
        if key == "b":
            raise RuntimeError("disk on fire")
        return torch.zeros(2)

    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "o.safetensors", [("a", (2,), torch.float32), ("b", (2,), torch.float32)],
                          produce)
    assert list(tmp_path.iterdir()) == []


def test_a_streamed_write_is_the_whole_tensors_write(tmp_path: Path) -> None:
    """`streamed`: the data produce hands to the sink, piece by piece, is written in place of the tensor it
    returns (byte for byte the file of the plain write); a tensor handed to the sink only in part is an error,
    and then nothing is left."""
    values = {"a": torch.arange(10, dtype=torch.float32), "b": torch.arange(6, dtype=torch.float16)}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in values.items()]
    plain = write_safetensors(tmp_path / "plain.safetensors", entries, values.__getitem__)

    def in_pieces(key: str, sink: Callable[[torch.Tensor], None]) -> torch.Tensor:
        if key == "a":  # "b" is returned whole, without the sink
            for lo in range(0, 10, 4):
                sink(values[key][lo:lo + 4])
        return values[key]

    streamed = write_safetensors(tmp_path / "streamed.safetensors", entries, in_pieces, streamed=True)
    assert streamed.read_bytes() == plain.read_bytes()

    def partly(key: str, sink: Callable[[torch.Tensor], None]) -> torch.Tensor:
        sink(values[key][:3])
        return values[key]

    with pytest.raises(AssertionError, match="handed to the sink"):
        write_safetensors(tmp_path / "partly.safetensors", entries, partly, streamed=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.safetensors", "streamed.safetensors"]


@pytest.mark.parametrize("refused", [False, True])
def test_the_output_goes_to_disk_while_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      refused: bool) -> None:
    """Every WRITEBACK_BYTES written, the range just written is handed to the kernel's write-back (so the final
    fsync waits for the last piece only): consecutive ranges from the first byte on, each already in the file when
    advised. The bytes are the same with the advice taken, refused by the file system, or absent."""
    monkeypatch.setattr(output_file, "WRITEBACK_BYTES", 1000)
    values = {f"t{i}": torch.arange(100 * (i + 1), dtype=torch.float32) for i in range(6)}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in values.items()]
    advised: list[tuple[int, int, int]] = []

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED and os.fstat(fd).st_size >= offset + length  # flushed first
        advised.append((offset, length, advice))
        if refused:
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", advise, raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_DONTNEED", 4, raising=False)
    out = write_safetensors(tmp_path / "advised.safetensors", entries, values.__getitem__)
    size = out.stat().st_size
    assert advised[0][0] == 0 and all(o + n == advised[i + 1][0] for i, (o, n, _) in enumerate(advised[:-1]))
    assert size - 1000 - 4 * 600 < advised[-1][0] + advised[-1][1] <= size  # up to the last piece (<= 600 floats)
    monkeypatch.delattr(os, "posix_fadvise")  # a system without it
    plain = write_safetensors(tmp_path / "plain.safetensors", entries, values.__getitem__)
    assert out.read_bytes() == plain.read_bytes()


def test_same_model_twice_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(RebasinError, match="same file"):
        merge_checkpoints(models["a"], models["a"], tmp_path / "o.safetensors")


@pytest.mark.parametrize("channels, variant", [(4, "SD 1.x"), (9, "SD 1.x inpainting"), (8, "SD 1.x instruct-pix2pix")])
def test_sd1_variants_are_recognised(tmp_path: Path, channels: int, variant: str) -> None:
    from dataclasses import replace

    from model_cache import cached_checkpoint

    from lib_rebasin.io.describe import inspect_checkpoint

    path = cached_checkpoint(tmp_path / "m.safetensors", replace(TINY, unet_in_channels=channels), seed=1)
    info = inspect_checkpoint(path)
    assert info.supported and info.arch.startswith(variant + " (reduced width") and info.n_keys == 1143


def test_file_hash_is_remembered_until_the_file_changes(tmp_path: Path) -> None:
    import hashlib

    from lib_rebasin.io.input_file import file_sha256

    path = tmp_path / "m.bin"
    path.write_bytes(b"first")
    assert file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    os.utime(path, ns=(1, 1))
    path.write_bytes(b"second, longer")  # new size and modification time: hashed again
    assert file_sha256(path) == hashlib.sha256(b"second, longer").hexdigest()
