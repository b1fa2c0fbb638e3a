"""merge/held.py: a merge kept in memory and saved later writes exactly the bytes merge_checkpoints writes with the
same inputs and options (tensors and metadata, the header's reserved space included), without merging again."""

from __future__ import annotations

import pytest

from lib_rebasin.errors import Cancelled, OutputError
from lib_rebasin.merge.block_weights import parse_blocks
from lib_rebasin.merge.held import merge_held, save_held
from lib_rebasin.merge.run import merge_checkpoints
from lib_rebasin.options import MergeOptions
from lib_rebasin.progress import Reporter

EXTRA = {"lib_rebasin_host": "webui"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from model_cache import cached_checkpoint

    d = tmp_path_factory.mktemp("held")
    return (cached_checkpoint(d / "a.safetensors", "tiny", seed=1, base_seed=0),
            cached_checkpoint(d / "b.safetensors", "tiny", seed=2, base_seed=0),
            cached_checkpoint(d / "c.safetensors", "tiny", seed=3, base_seed=0))


@pytest.fixture(scope="module")
def pair_without_vae(pair, tmp_path_factory):
    """The same models without their VAE (from the model cache): for the cases whose merge needs none, so both
    files they write are half the bytes. The case that leaves the VAE unmerged keeps it, copied from A."""
    from model_cache import cached_without_parts

    d = tmp_path_factory.mktemp("held_without_vae")
    return tuple(cached_without_parts(d / p.name, p, ("vae",)) for p in pair)


@pytest.mark.parametrize("options", [
    MergeOptions(method="rebasin", alpha=0.35),
    MergeOptions(method="weighted_sum", alpha=0.5, precision="fp32", parts=("unet", "te")),
    MergeOptions(method="add_difference", alpha=0.7).with_blocks(parse_blocks("GRAD_V", 0.7).values, "GRAD_V"),
], ids=["rebasin", "weighted_sum_fp32_no_vae", "add_difference_blocks"])
def test_saving_a_held_merge_writes_the_direct_merges_bytes(pair, pair_without_vae, tmp_path, options):
    a, b, c = pair if "vae" not in options.parts else pair_without_vae
    needs_c = options.method == "add_difference"
    direct = merge_checkpoints(a, b, tmp_path / "direct.safetensors", options, c=c if needs_c else None,
                               extra_metadata=EXTRA)
    held = merge_held(a, b, options, c=c if needs_c else None, extra_metadata=EXTRA)
    saved = save_held(held, tmp_path / "saved.safetensors")
    assert saved.read_bytes() == direct.output.read_bytes()
    assert held.metadata == direct.metadata


def test_a_cancelled_held_merge_raises_and_an_existing_name_is_kept(pair, tmp_path):
    a, b, _ = pair
    with pytest.raises(Cancelled):
        merge_held(a, b, MergeOptions(method="weighted_sum"), report=Reporter(None, lambda: True))
    held = merge_held(a, b, MergeOptions(method="weighted_sum"))
    (tmp_path / "taken.safetensors").write_bytes(b"keep")
    with pytest.raises(OutputError):
        save_held(held, tmp_path / "taken.safetensors")
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]  # no temporary file left
    size = held.nbytes
    held.release()
    assert size > 0 and held.released and not held.tensors
