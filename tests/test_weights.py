"""Loading and exporting Hugging Face safetensors checkpoints, and every way a checkpoint can be broken."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tsarank_engine.errors import TsarankError
from tsarank_engine.model.safetensors_io import conversion_buffer, read_header, read_tensor
from tsarank_engine.model.export import export_model
from tsarank_engine.model.loading import checkpoint_fingerprint, load_model

from conftest import save_tiny_model, tiny_config


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, bpe_tokenizer_dir):
    out = tmp_path_factory.mktemp("qwen2")
    save_tiny_model(tiny_config("qwen2"), out, bpe_tokenizer_dir)
    return out


@pytest.fixture()
def broken(tmp_path, qwen2_dir):
    """A fresh copy of the qwen2 checkpoint to damage."""
    out = tmp_path / "broken"
    shutil.copytree(qwen2_dir, out)
    return out


def assert_same_parameters(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype and torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_round_trip_is_bit_exact_and_transformers_loads_the_export(
    tmp_path, bpe_tokenizer_dir, family, dtype, max_shard_bytes
):
    src = tmp_path / "src"
    save_tiny_model(tiny_config(family), src, bpe_tokenizer_dir)
    first = load_model(src, dtype=dtype)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    out = export_model(first, tmp_path / "export", tokenizer_dir=src, **kwargs)
    sharded = (out / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_bytes is not None) and sharded != (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    second = load_model(out, dtype=dtype)
    assert_same_parameters(first, second)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == dtype
    ids = torch.randint(0, 400, (2, 23))
    with torch.no_grad():
        ours = first.logits(first(ids)).float()
        theirs = hf(input_ids=ids).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < tol


def test_fingerprint_follows_the_weights_not_the_files(tmp_path, qwen2_dir):
    """The same tensors in one file or in shards share a fingerprint; another dtype or one changed element at
    either end of a tensor larger than the bytes sampled changes it."""
    model = load_model(qwen2_dir)
    one = export_model(model, tmp_path / "one", tokenizer_dir=qwen2_dir)
    shards = export_model(model, tmp_path / "shards", tokenizer_dir=qwen2_dir, max_shard_bytes=40_000)
    assert (shards / "model.safetensors.index.json").is_file()
    reference = checkpoint_fingerprint(one)
    assert checkpoint_fingerprint(shards) == reference == checkpoint_fingerprint(one)
    assert checkpoint_fingerprint(export_model(model, tmp_path / "bf16", tokenizer_dir=qwen2_dir,
                                               dtype=torch.bfloat16)) != reference
    big = tmp_path / "big"
    big.mkdir()
    tensors = {"w": torch.randn(300, 301), "b": torch.randn(7)}  # 361 KB: larger than the two 64 KiB samples
    save_file(tensors, big / "model.safetensors")
    reference = checkpoint_fingerprint(big)
    for index in (0, -1):
        changed = {k: v.clone() for k, v in tensors.items()}
        changed["w"].view(-1)[index] += 1
        save_file(changed, big / "model.safetensors")
        assert checkpoint_fingerprint(big) != reference, index


def test_reader_matches_the_safetensors_library_in_every_dtype(tmp_path):
    tensors = {
        "a": torch.randn(37, 5),
        "b": torch.randn(3, 1, 7).to(torch.bfloat16),
        "c": torch.randn(11).to(torch.float16),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    reference = load_file(tmp_path / "t.safetensors")
    entries = read_header(tmp_path / "t.safetensors")
    with open(tmp_path / "t.safetensors", "rb") as f:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            buffer = conversion_buffer(list(entries.values()), dtype)
            for name, ref in reference.items():
                assert torch.equal(read_tensor(f, entries[name], dtype, buffer), ref.to(dtype)), (name, dtype)


def test_reading_some_rows_alone_and_into_a_given_tensor(tmp_path):
    from tsarank_engine.model.loading import equal_tensors

    tensors = {"a": torch.randn(37, 5), "b": torch.randn(9, 2, 3).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "t.safetensors")
    entries = read_header(tmp_path / "t.safetensors")
    with open(tmp_path / "t.safetensors", "rb") as f:
        for dtype in (torch.float32, torch.bfloat16):
            buffer = conversion_buffer(list(entries.values()), dtype)
            for name, rows in (("a", (0, 37)), ("a", (10, 19)), ("a", (36, 37)), ("a", (5, 5)), ("b", (2, 9))):
                want = tensors[name][rows[0]:rows[1]].to(dtype)
                assert torch.equal(read_tensor(f, entries[name], dtype, buffer, rows), want), (name, rows, dtype)
                into = torch.empty_like(want)
                assert read_tensor(f, entries[name], dtype, buffer, rows, out=into) is into and torch.equal(into, want)
        with pytest.raises(TsarankError, match="rows 30:40 of tensor 'a'"):
            read_tensor(f, entries["a"], torch.float32, buffer, (30, 40))
        with pytest.raises(TsarankError, match="cannot be read into a torch.float32 tensor of shape \\[4, 5\\]"):
            read_tensor(f, entries["a"], torch.float32, buffer, (0, 3), out=torch.empty(4, 5))

    other = dict(tensors, a=tensors["a"].clone())
    other["a"][20, 1] += 1
    save_file(other, tmp_path / "u.safetensors")
    theirs = read_header(tmp_path / "u.safetensors")
    assert equal_tensors(entries, theirs, ["b"], torch.float32)
    assert not equal_tensors(entries, theirs, ["a", "b"], torch.float32)
    # in 3 parts of 13 rows, row 20 falls in the second only
    assert [equal_tensors(entries, theirs, ["a"], torch.float32, (i, 3)) for i in range(3)] == [True, False, True]


def test_conversion_through_small_chunks(tmp_path, monkeypatch):
    import tsarank_engine.model.safetensors_io as io

    monkeypatch.setattr(io, "_CHUNK_BYTES", 40)  # 10 fp32 values per chunk, 37*5 values in all
    t = torch.randn(37, 5)
    save_file({"t": t}, tmp_path / "t.safetensors")
    entry = io.read_header(tmp_path / "t.safetensors")["t"]
    buffer = io.conversion_buffer([entry], torch.bfloat16)
    assert buffer.numel() == 40
    with open(tmp_path / "t.safetensors", "rb") as f:
        got = io.read_tensor(f, entry, torch.bfloat16, buffer)
    assert torch.equal(got, t.to(torch.bfloat16))


def _rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(broken):
    _rewrite(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(TsarankError, match=f"{broken}/model.safetensors: checkpoint lacks tensor\\(s\\) model.layers.1.mlp.up_proj.weight$"):
        load_model(broken)


def test_unexpected_tensor(broken):
    _rewrite(broken, lambda t: t.update({"model.layers.7.self_attn.q_proj.weight": torch.zeros(3)}))
    with pytest.raises(TsarankError, match=r"model.safetensors: unexpected tensor\(s\) "
                       r"model.layers.7.self_attn.q_proj.weight for Qwen2ForCausalLM"):
        load_model(broken)


def test_wrong_shape(broken):
    _rewrite(broken, lambda t: t.update({"model.norm.weight": torch.ones(47)}))
    with pytest.raises(TsarankError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \[47\], expected \[48\]"):
        load_model(broken)


def test_non_float_tensor(broken):
    _rewrite(broken, lambda t: t.update({"model.norm.weight": torch.ones(48, dtype=torch.int32)}))
    with pytest.raises(TsarankError, match="tensor 'model.norm.weight' has non-float dtype I32"):
        load_model(broken)


def test_truncated_file(broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(TsarankError, match=f"{path}: truncated: tensor '.*' ends at byte {len(data)}, the file has {len(data) - 100}"):
        load_model(broken)
    path.write_bytes(data[:5])
    with pytest.raises(TsarankError, match=f"{path}: truncated safetensors file \\(5 bytes, no header\\)"):
        load_model(broken)


def test_corrupt_header(broken):
    path = broken / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(TsarankError, match=f"{path}: corrupt safetensors header"):
        load_model(broken)
    data[:8] = (10**12).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(TsarankError, match=f"{path}: corrupt or truncated safetensors file \\(header claims 1000000000000 bytes"):
        load_model(broken)


def test_index_naming_a_missing_shard(tmp_path):
    save_tiny_model(tiny_config("llama"), tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / last).unlink()
    holder = next(n for n, f in index["weight_map"].items() if f == last)
    with pytest.raises(TsarankError, match=f"index.json: shard '{last}' \\(holding tensor '{holder}'\\) does not exist"):
        load_model(tmp_path)


def test_index_mapping_a_tensor_to_the_wrong_shard(tmp_path):
    save_tiny_model(tiny_config("llama"), tmp_path, max_shard_size="60KB")
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    path.write_text(json.dumps(index))
    with pytest.raises(TsarankError, match=f"tensor '{name}' is mapped to {shards[1]}, which does not hold it"):
        load_model(tmp_path)
    path.write_text("[]")
    with pytest.raises(TsarankError, match="index.json: not a safetensors index"):
        load_model(tmp_path)


def test_no_weights_or_no_directory(tmp_path, broken):
    (broken / "model.safetensors").unlink()
    torch.save({}, broken / "pytorch_model.bin")  # pickles are never read
    with pytest.raises(TsarankError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(broken)
    with pytest.raises(TsarankError, match=f"{tmp_path}/nowhere: model directory does not exist"):
        load_model(tmp_path / "nowhere")


def test_export_refuses_a_non_empty_target(tmp_path, qwen2_dir):
    model = load_model(qwen2_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(TsarankError, match="export target exists and is not an empty directory"):
        export_model(model, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


def _write_raw_safetensors(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def test_overlapping_or_gapped_tensors_are_refused(tmp_path):
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    path = tmp_path / "t.safetensors"
    _write_raw_safetensors(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                  "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, data)
    with pytest.raises(TsarankError, match=f"{path}: corrupt safetensors header: tensor 'b' starts at byte \\d+, "
                       "expected \\d+ \\(overlapping it\\)"):
        read_header(path)
    _write_raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                  "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, data)
    with pytest.raises(TsarankError, match="tensor 'b' starts at .* \\(a gap before it\\)"):
        read_header(path)


def test_single_file_wins_over_a_stale_index(broken):
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    load_model(broken)  # as transformers does, the single file is read and the index ignored


def test_tied_head_and_rope_tables_stored_anyway_are_ignored(broken):
    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    _rewrite(broken, add)
    model = load_model(broken)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_export_copies_sentencepiece_files_and_needs_a_tokenizer(tmp_path, qwen2_dir, spm_tokenizer_dir):
    model = load_model(qwen2_dir)
    out = export_model(model, tmp_path / "out", tokenizer_dir=spm_tokenizer_dir)
    assert (out / "tokenizer.model").read_bytes() == (spm_tokenizer_dir / "tokenizer.model").read_bytes()
    with pytest.raises(TsarankError, match=f"{tmp_path}: no tokenizer.json or tokenizer.model to export"):
        export_model(model, tmp_path / "out2", tokenizer_dir=tmp_path)


def test_failed_export_leaves_nothing_behind(tmp_path, qwen2_dir, monkeypatch):
    import tsarank_engine.model.export as export

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        export_model(load_model(qwen2_dir), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
