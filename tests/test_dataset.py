"""Dataset, collator and sampler on real files: lengths, skips, bad images, batches, grouping."""

import json

import numpy as np
import pytest
import torch

from llavakit import IGNORE_INDEX
from llavakit.bench import real_fraction_padded
from llavakit.data.collate import LlavaCollator
from llavakit.data.dataset import BadSampleGuard, DataQualityError, LlavaDataset, build_sample_index
from llavakit.data.images import ImageTransform
from llavakit.data.records import load_records
from llavakit.data.sampler import LengthGroupedBatchSampler
from llavakit.data.templates import get_template
from llavakit.data.tokenize import ConversationEncoder

from .conftest import conv, make_image, write_json

N = 4
TRANSFORM = ImageTransform(shortest_edge=28, crop_hw=(28, 28))


def make_dataset(tmp_path, tokenizer, records, image_folder, max_len=None, **kw):
    path = tmp_path / "d.json"
    if not path.exists():
        write_json(path, records)
    store, valid, _ = load_records(path)
    enc = ConversationEncoder(tokenizer, get_template("v1"), N)
    index = build_sample_index(store, valid, enc, max_len, cache_dir=tmp_path / "cache")
    return LlavaDataset(store, index, enc, TRANSFORM, str(image_folder), max_len,
                        report_path=tmp_path / "bad.jsonl", **kw)


def test_samples_and_collated_batch(tmp_path, tokenizer, sample_records, image_folder):
    ds = make_dataset(tmp_path, tokenizer, sample_records, image_folder)
    assert len(ds) == 4 and list(ds.index.has_image) == [True, True, False, True]
    s0 = ds[0]
    assert s0["images"].dtype == torch.uint8 and s0["images"].shape == (1, 3, 28, 28)
    assert ds[2]["images"] is None
    assert list(ds.lengths) == [len(ds[i]["input_ids"]) for i in range(4)]
    pad = tokenizer.eos_token_id  # pad == eos must not break the attention mask
    batch = LlavaCollator(pad, TRANSFORM)([ds[i] for i in range(4)])
    n = int(max(ds.lengths))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, n)
    assert batch["attention_mask"].sum(1).tolist() == list(ds.lengths)
    assert batch["pixel_values"].shape == (3, 3, 28, 28) and batch["pixel_values"].dtype == torch.float32
    # images stacked in sample order
    assert torch.equal(batch["pixel_values"][2], TRANSFORM.normalize(ds[3]["images"][0]))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][:, :][batch["input_ids"] == 0].numel()) == 0  # <unk> never used as padding


def test_text_only_batch_has_no_pixel_values(tmp_path, tokenizer, sample_records, image_folder):
    ds = make_dataset(tmp_path, tokenizer, sample_records, image_folder)
    batch = LlavaCollator(tokenizer.eos_token_id, TRANSFORM)([ds[2]])
    assert "pixel_values" not in batch


def test_uint8_handover_when_not_normalising(tmp_path, tokenizer, sample_records, image_folder):
    ds = make_dataset(tmp_path, tokenizer, sample_records, image_folder)
    batch = LlavaCollator(0, None, normalize=False)([ds[0], ds[1]])
    assert batch["pixel_values"].dtype == torch.uint8


def test_over_long_samples_are_skipped_and_reported(tmp_path, tokenizer, image_folder):
    long_q = "What colour is the circle? " * 30
    recs = [
        {"id": "ok", "image": "coco/a.jpg", "conversations": conv("<image>\nWhere is the star?", "At the top.")},
        {"id": "img_cut", "image": ["coco/a.jpg", "coco/b.png"],
         "conversations": conv("<image> " + long_q + "<image>", "Red.")},
        {"id": "answer_cut", "conversations": conv(long_q, "Red.")},
        {"id": "truncated", "conversations": conv("Tell me a story.", "Once upon a time " * 40)},
    ]
    ds = make_dataset(tmp_path, tokenizer, recs, image_folder, max_len=60)
    kept = [ds.store.raw(int(i))["id"] for i in ds.index.record_idx]
    assert kept == ["ok", "truncated"]
    assert {s["id"]: s["kind"] for s in ds.index.skipped} == {"img_cut": "too_long", "answer_cut": "too_long"}
    assert any("image block would be cut" in s["message"] for s in ds.index.skipped)
    assert ds.index.num_truncated == 1
    assert len(ds[1]["input_ids"]) == 60 and ds.lengths[1] == 60


def test_length_cache_is_reused(tmp_path, tokenizer, sample_records, image_folder, monkeypatch):
    make_dataset(tmp_path, tokenizer, sample_records, image_folder)
    calls = []
    orig = ConversationEncoder.encode
    monkeypatch.setattr(ConversationEncoder, "encode", lambda self, r: calls.append(1) or orig(self, r))
    ds = make_dataset(tmp_path, tokenizer, sample_records, image_folder)
    assert calls == [] and len(ds) == 4
    assert list((tmp_path / "cache" / "lengths").glob("*.npz"))


def test_bad_image_replaced_counted_and_reported(tmp_path, tokenizer, image_folder):
    recs = [{"id": f"r{i}", "image": f"coco/{i}.jpg", "conversations": conv("<image>\nWhere?", "Here.")}
            for i in range(10)]
    for i in range(10):
        make_image(image_folder / "coco" / f"{i}.jpg", (30, 30), seed=i)
    (image_folder / "coco" / "3.jpg").write_bytes(b"garbage")
    (image_folder / "coco" / "7.jpg").unlink()
    ds = make_dataset(tmp_path, tokenizer, recs, image_folder)
    s2, s3, s7 = ds[2], ds[3], ds[7]
    assert s3["id"] == "r4"  # the next sample of the same modality, deterministically
    assert [r["id"] for r in s3["replaced"]] == ["r3"] and s2["replaced"] == []
    assert [r["id"] for r in s7["replaced"]] == ["r7"] and s7["id"] == "r8"
    # the replacement travels in the batch, whichever process loaded the samples
    batch = LlavaCollator(0, TRANSFORM)([s2, s3, s7])
    assert [r["id"] for r in batch["replaced"]] == ["r3", "r7"] and batch["num_samples"] == 3
    lines = [json.loads(x) for x in (tmp_path / "bad.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["r3", "r7"]
    assert "cannot decode" in lines[0]["reason"] and "not found" in lines[1]["reason"]


def test_too_many_bad_images_stop_the_run(tmp_path, tokenizer, image_folder):
    recs = [{"id": f"r{i}", "image": f"coco/m{i}.jpg", "conversations": conv("<image>\nWhere?", "Here.")}
            for i in range(20)]
    for i in range(20):
        make_image(image_folder / "coco" / f"m{i}.jpg", (30, 30), seed=i)
    for i in (2, 5, 9):
        (image_folder / "coco" / f"m{i}.jpg").unlink()
    ds = make_dataset(tmp_path, tokenizer, recs, image_folder)
    guard = BadSampleGuard(0.01, total=len(ds))
    first = ds[2]["replaced"]
    guard.check(seen=3, bad=len(first), last=first[-1])  # one of 20 is within max(1, 1% of 20)
    second = ds[5]["replaced"]
    with pytest.raises(DataQualityError, match="2 of 6 samples seen failed to load.*id='r5'"):
        guard.check(seen=6, bad=2, last=second[-1])
    BadSampleGuard(0.5, total=1000).check(seen=99, bad=40)  # under min_seen: the dataset-wide bound only
    with pytest.raises(DataQualityError):
        BadSampleGuard(0.5, total=1000).check(seen=100, bad=51)


def sampler_lengths(n=203, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 500, size=n)
    has_image = rng.random(n) < 0.8
    return np.where(has_image, lengths, -lengths), has_image


@pytest.mark.parametrize("bs,world,accum", [(4, 1, 1), (3, 2, 2), (8, 4, 1), (1, 1, 1)])
def test_modality_sampler_purity_coverage_determinism(bs, world, accum):
    mod_lengths, has_image = sampler_lengths()
    s = LengthGroupedBatchSampler(mod_lengths, bs, world, accum, group_by_modality=True, seed=7)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(mod_lengths)))  # every index exactly once
    assert all(len({bool(has_image[i]) for i in b}) == 1 for b in batches)  # modality purity
    assert all(len(b) == bs for b in batches[:-2])
    assert list(LengthGroupedBatchSampler(mod_lengths, bs, world, accum, True, seed=7)) == batches
    s.set_epoch(1)
    assert list(s) != batches and sorted(i for b in s for i in b) == flat.__class__(sorted(flat))
    assert len(s) == len(batches)


def test_longest_batch_first_and_length_grouping():
    mod_lengths, _ = sampler_lengths(400, seed=3)
    lengths = np.abs(mod_lengths)
    s = LengthGroupedBatchSampler(mod_lengths, 8, 2, 1, group_by_modality=True, seed=1)
    batches = list(s)
    cost = [len(b) * lengths[b].max() for b in batches]
    assert cost[0] == max(cost)
    # grouping: the spread within batches is below that of random batches
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches if len(b) == 8])
    rng = np.random.default_rng(0)
    rand = np.mean([np.ptp(lengths[rng.choice(400, 8, replace=False)]) for _ in range(50)])
    assert spread < rand * 0.75


def test_plain_length_grouping_mixes_modalities():
    mod_lengths, has_image = sampler_lengths(100)
    batches = list(LengthGroupedBatchSampler(mod_lengths, 10, group_by_modality=False, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert any(len({bool(has_image[i]) for i in b}) == 2 for b in batches)


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 2)])
def test_a_window_of_steps_cuts_padding_and_keeps_each_step_together(world, accum):
    mod_lengths, has_image = sampler_lengths(2000, seed=5)
    lengths = np.abs(mod_lengths)
    one = LengthGroupedBatchSampler(mod_lengths, 8, world, accum, group_by_modality=True, seed=2)
    wide = LengthGroupedBatchSampler(mod_lengths, 8, world, accum, group_by_modality=True, seed=2, window_steps=20)
    batches = list(wide)
    assert sorted(i for b in batches for i in b) == list(range(2000))
    assert all(len({bool(has_image[i]) for i in b}) == 1 for b in batches)
    assert list(LengthGroupedBatchSampler(mod_lengths, 8, world, accum, True, seed=2, window_steps=20)) == batches
    assert real_fraction_padded(batches, lengths) > 0.95 > real_fraction_padded(list(one), lengths) + 0.1
    cost = [len(b) * lengths[b].max() for b in batches]
    assert cost[0] == max(cost)  # the most expensive batch still goes first
    # the batches of one optimizer step (across ranks and accumulation) have similar lengths ...
    step = world * accum
    full = len(batches) // step * step
    spread = [np.ptp([lengths[b].mean() for b in batches[k:k + step]]) for k in range(0, full, step)]
    assert np.median(spread) < 0.1 * lengths.mean() or step == 1
    # ... and the window's steps are shuffled, not visited longest first
    means = [lengths[b].mean() for b in batches[1:21 * step:step]]
    assert not (np.all(np.diff(means) <= 0) or np.all(np.diff(means) >= 0))


def test_window_of_one_step_is_the_original_order():
    mod_lengths, _ = sampler_lengths(300, seed=4)
    a = list(LengthGroupedBatchSampler(mod_lengths, 4, 2, 1, group_by_modality=True, seed=3))
    assert list(LengthGroupedBatchSampler(mod_lengths, 4, 2, 1, group_by_modality=True, seed=3, window_steps=1)) == a
